"""lora.py: the layer on plain nn.Linear, then on tiny random Llamas from model.py.

The proof the issue asks for: only ΔW receives gradients (and updates), B = 0 starts the student
at the base model, merging is exact and explicit, and our adapter files load in PEFT onto the
transformers Llama with our logits.
"""
import json
import math

import peft
import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file

import lora
import model
from lora import LoRALinear, apply_lora, lora_parameters, merge_lora, unmerge_lora
from neo import count_targets, neo_loss
from runkit import adapters
from runkit.adapters import load_adapter, save_adapter
from tolerance import close, close_norm


def random_adapter_(layer: LoRALinear, seed=0):
    """Give B (and everything else) random values, so that ΔW ≠ 0 and the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_M):
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------- the layer alone

@pytest.mark.parametrize("variant", ["lora", "moslora"])
def test_layer_keeps_base_parameters_and_starts_at_base_output(variant):
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    ref = nn.Linear(20, 12)
    ref.load_state_dict(base.state_dict())
    layer = LoRALinear(base, rank=4, alpha=8, variant=variant)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().sum() > 0
    if variant == "moslora":
        assert layer.lora_M.shape == (4, 4) and layer.lora_M.abs().sum() > 0
    else:
        assert layer.lora_M is None
    # A base state dict loads without renaming (strict=False: the adapters are new keys).
    missing, unexpected = layer.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("lora_") for k in missing)
    x = torch.randn(3, 5, 20)
    assert torch.equal(layer(x), ref(x))


@pytest.mark.parametrize("variant,rslora", [("lora", False), ("lora", True), ("moslora", False)])
def test_forward_is_w0x_plus_scaled_bmax(variant, rslora):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(20, 12), rank=4, alpha=6, variant=variant, rslora=rslora)
    random_adapter_(layer)
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    assert layer.scale == s
    M = layer.lora_M if variant == "moslora" else torch.eye(4)
    x = torch.randn(7, 20)
    ref = x @ layer.weight.T + layer.bias + s * (x @ layer.lora_A.T @ M.T @ layer.lora_B.T)
    close(layer(x), ref)


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.9).train()
    x = torch.randn(8, 20)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot leak into the base path
    random_adapter_(layer)
    layer.eval()
    close(layer(x), base(x) + x @ layer.delta_weight().T)  # eval: no dropout


@pytest.mark.parametrize("variant", ["lora", "moslora"])
def test_merge_is_exact_idempotent_and_explicit(variant):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(20, 12), rank=4, alpha=8, variant=variant)
    random_adapter_(layer)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 20)
    y = layer(x)
    layer.train(), layer.eval()  # never merges by itself
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.merge()
    close(layer.weight, w0 + layer.delta_weight(), rtol=0, atol=1e-7)
    close(layer(x), y, atol=1e-5, rtol=0)
    merged = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, merged)  # merging twice is a no-op
    layer.unmerge()
    close(layer.weight, w0, atol=1e-6, rtol=0)
    layer.unmerge()
    close(layer.weight, w0, atol=1e-6, rtol=0)
    close(layer(x), y, atol=1e-5, rtol=0)


def test_fp32_adapters_on_a_bf16_base():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    ref = LoRALinear(base, rank=4, alpha=8)
    random_adapter_(ref)
    layer = LoRALinear(nn.Linear(20, 12).bfloat16(), rank=4, alpha=8)
    layer.load_state_dict({k: v.bfloat16() if k in ("weight", "bias") else v
                           for k, v in ref.state_dict().items()})
    for p in (layer.lora_A, layer.lora_B):
        p.data = p.data.float()
    x = torch.randn(5, 20)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits: each rounding is off by up to 2^-9 = 2e-3 relative, and x, W and y are each
    # rounded once, so ~3.5e-3 in norm (measured 3.2e-3 here); 5e-2 is 15x that and
    # still fails on a lost adapter branch (~0.5 relative with these random adapters).
    close_norm(y.float(), ref(x), 5e-2)


def test_merge_in_bf16_computes_in_fp32():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(20, 12).bfloat16(), rank=4, alpha=8)
    random_adapter_(layer)
    expected = (layer.weight.float() + layer.delta_weight()).bfloat16()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, expected)


# ----------------------------------------------------------------------------- tiny Llamas

STUDENT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
               max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TEACHER = dict(STUDENT, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
               tie_word_embeddings=False)
RANK = 4


def tiny(cfg, seed):
    torch.manual_seed(seed)
    m = model.Llama(model.LlamaConfig(**cfg))
    with torch.no_grad():  # norms away from 1, so a bug in their handling would show
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def batch(n=4, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    labels = ids.clone()
    for i in range(n):
        prompt, pad = 2 + i % 4, i % 3
        labels[i, :prompt] = -100
        if pad:
            mask[i, -pad:] = 0
            labels[i, -pad:] = -100
            ids[i, -pad:] = 0
    return ids, mask, labels


def student_with_lora(variant="lora", seed=0, **kw):
    return apply_lora(tiny(STUDENT, seed), rank=RANK, alpha=2 * RANK, variant=variant, **kw)


def neo_step_loss(student, teacher, ids, mask, labels, normalizer=None):
    with torch.no_grad():
        th = teacher(ids, mask, return_hidden=True)
    sh = student(ids, mask, return_hidden=True)
    return neo_loss(sh, student.lm_head.weight, th, teacher.lm_head.weight, labels, alpha=0.5,
                    temperature=2.0, chunk_size=7, normalizer=normalizer).loss


def test_apply_lora_swaps_all_projections_and_freezes_the_rest(capsys):
    student = student_with_lora()
    layers = lora.lora_layers(student)
    assert len(layers) == 7 * STUDENT["num_hidden_layers"]
    assert {n.rsplit(".", 1)[-1] for n in layers} == set(lora.ALL_PROJECTIONS)
    adapters = {id(p) for p in lora_parameters(student)}
    assert len(adapters) == 2 * len(layers)  # A and B per layer
    for name, p in student.named_parameters():
        assert p.requires_grad == (id(p) in adapters), name
    trainable = sum(p.numel() for p in lora_parameters(student))
    total = sum(p.numel() for p in student.parameters())
    assert f"trainable {trainable:,} / total {total:,}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="already"):
        apply_lora(student, rank=RANK)


def test_apply_lora_rejects_rank_above_a_layer_dimension():
    m = tiny(STUDENT, 0)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        apply_lora(m, rank=20)  # k_proj is 32 -> 16 (2 KV heads x 8)
    assert not lora.lora_layers(m)  # nothing was swapped
    with pytest.raises(ValueError, match="lm_head.weight is tied"):
        apply_lora(m, targets=("q_proj", "lm_head"), rank=RANK)


def test_only_the_adapters_receive_gradients():
    teacher = tiny(TEACHER, 1)
    student = student_with_lora("moslora")
    ids, mask, labels = batch()
    th = teacher(ids, mask, return_hidden=True)  # even with the teacher's graph left attached
    sh = student(ids, mask, return_hidden=True)
    neo_loss(sh, student.lm_head.weight, th, teacher.lm_head.weight, labels).loss.backward()
    adapters = {id(p) for p in lora_parameters(student)}
    for name, p in student.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    for name, p in teacher.named_parameters():
        assert p.grad is None, name


@pytest.mark.parametrize("variant", ["lora", "moslora"])
def test_zero_b_means_first_gradient_reaches_b_only(variant):
    teacher, student = tiny(TEACHER, 1), student_with_lora(variant)
    neo_step_loss(student, teacher, *batch()).backward()
    for name, layer in lora.lora_layers(student).items():
        assert torch.all(layer.lora_A.grad == 0), name
        assert layer.lora_B.grad.abs().sum() > 0, name
        if variant == "moslora":
            assert torch.all(layer.lora_M.grad == 0), name


def test_adamw_moves_adapters_and_leaves_every_base_weight_bit_identical():
    """Every parameter goes to AdamW with weight decay, as a careless training script would do.

    So the base weights stay put only because apply_lora froze them (no gradient, so AdamW skips
    them, decay included) and nothing writes to them in place.
    """
    teacher, student = tiny(TEACHER, 1), student_with_lora("moslora")
    adapters = {id(p) for p in lora_parameters(student)}
    base = {n: p.detach().clone() for n, p in student.named_parameters() if id(p) not in adapters}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    adapters_before = [p.detach().clone() for p in lora_parameters(student)]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        neo_step_loss(student, teacher, *batch(seed=step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert len(base) == len(list(student.parameters())) - len(adapters)
    for n, p in student.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), n
    for before, p in zip(adapters_before, lora_parameters(student)):
        assert not torch.equal(before, p)


@pytest.mark.exact
def test_sixteen_accumulated_micro_batches_equal_one_batch_of_sixteen():
    # fp64, so that the test sees the normalisation and not fp32 summation order (fp32: ~4e-7).
    teacher, student = tiny(TEACHER, 1).double(), student_with_lora("moslora").double()
    for layer in lora.lora_layers(student).values():
        random_adapter_(layer)  # so that A and M get gradients too
    ids, mask, labels = batch(n=16)
    neo_step_loss(student, teacher, ids, mask, labels).backward()
    full = [p.grad.clone() for p in lora_parameters(student)]
    student.zero_grad(set_to_none=True)
    n_global = count_targets(labels)
    for i in range(16):
        s = slice(i, i + 1)
        neo_step_loss(student, teacher, ids[s], mask[s], labels[s], normalizer=n_global).backward()
    for g_full, p in zip(full, lora_parameters(student)):
        close_norm(p.grad, g_full, 1e-10)  # the issue asks ≤ 1e-6


# Merging is exact mathematically, (W + ΔW)·x = W·x + B(A·x), but not in rounding: in float32 logits of
# ~10 moved by 5.7e-6 against the old bound of 1e-5 (1.7x margin). So the model tests run in float64,
# where that reordering costs ~1e-14, and EXACT leaves 1e4x; a lost or doubled ΔW moves them by >1e-2.
EXACT = 1e-10


@pytest.mark.exact
@pytest.mark.parametrize("variant", ["lora", "moslora"])
def test_merge_lora_on_a_model(variant):
    student = student_with_lora(variant).double()
    for layer in lora.lora_layers(student).values():
        random_adapter_(layer)
    base = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    ids, mask, _ = batch()
    with torch.no_grad():
        y = student(ids, mask)
        merge_lora(student)
        merged_state = {n: p.clone() for n, p in student.state_dict().items()}
        close(student(ids, mask), y, atol=EXACT, rtol=0)
        merge_lora(student)
        assert all(torch.equal(p, merged_state[n]) for n, p in student.state_dict().items())
        unmerge_lora(student)
        for n, p in student.named_parameters():
            if n in base:
                close(p, base[n], atol=EXACT, rtol=0, msg=n)


@pytest.mark.exact
def test_save_merged_writes_a_plain_folder_and_leaves_the_model_alone(tmp_path):
    student = student_with_lora("moslora").double()
    for layer in lora.lora_layers(student).values():
        random_adapter_(layer)
    base = {n: p.detach().clone() for n, p in student.named_parameters()}
    ids, mask, _ = batch()
    with torch.no_grad():
        y = student(ids, mask)
        lora.save_merged(student, tmp_path / "merged")
        plain = model.Llama.from_pretrained(tmp_path / "merged", dtype=torch.float64)
        assert not lora.lora_layers(plain)
        close(plain(ids, mask), y, atol=EXACT, rtol=0)
        assert all(torch.equal(p, base[n]) for n, p in student.named_parameters())
        assert torch.equal(student(ids, mask), y)


@pytest.mark.parametrize("variant", ["lora", "moslora"])
def test_adapter_round_trip_in_peft_layout(tmp_path, variant):
    student = student_with_lora(variant, rslora=True)
    for layer in lora.lora_layers(student).values():
        random_adapter_(layer)
    save_adapter(student, tmp_path, base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == RANK and config["lora_alpha"] == 2 * RANK and config["use_rslora"] is True
    assert config["target_modules"] == sorted(lora.ALL_PROJECTIONS)
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config.get("use_moslora", False) == (variant == "moslora")
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (RANK, 64)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, RANK)
    assert ("base_model.model.model.layers.0.self_attn.q_proj.lora_M.weight" in keys) == (variant == "moslora")

    fresh = tiny(STUDENT, 0)  # same base weights, no adapters yet: load_adapter applies them
    load_adapter(fresh, tmp_path)
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), student(ids, mask))


def test_load_adapter_names_the_module_that_does_not_fit(tmp_path):
    student = student_with_lora()
    save_adapter(student, tmp_path)
    other = apply_lora(tiny(STUDENT, 0), rank=2 * RANK)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        load_adapter(other, tmp_path)
    fewer = apply_lora(tiny(STUDENT, 0), targets=("q_proj",), rank=RANK)
    with pytest.raises(ValueError, match=r"module model\.layers\.\d\.\w+\.(?!q_proj)\w+_proj"):
        load_adapter(fewer, tmp_path)  # the file has adapters the model lacks
    save_adapter(fewer, tmp_path / "q_only")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj"):
        load_adapter(student_with_lora(), tmp_path / "q_only")  # the model has adapters the file lacks


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_onto_transformers_llama_with_our_logits(tmp_path, rslora):
    base = tiny(STUDENT, 0)
    base.save_pretrained(tmp_path / "base")
    student = apply_lora(base, rank=RANK, alpha=3 * RANK, rslora=rslora)
    for layer in lora.lora_layers(student).values():
        random_adapter_(layer)
    save_adapter(student, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))

    assert adapters.adapter_base(tmp_path / "adapter") == (str(tmp_path / "base"), adapters.fingerprint(tmp_path / "base"))

    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    import warnings
    with warnings.catch_warnings(record=True) as caught:  # the base fingerprint is invisible to PEFT
        warnings.simplefilter("always")
        hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]
    ids, mask, _ = batch()
    with torch.no_grad():
        ours = student(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.float()
        no_adapter = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        plain = no_adapter(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions are not compared
    assert (plain[real] - theirs[real]).abs().max() > 1e-2  # the adapter really changes the logits
    close(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_fingerprint_tells_bases_apart(tmp_path):
    import model as llama
    base = tiny(STUDENT, 0)
    base.save_pretrained(tmp_path / "a")
    base.save_pretrained(tmp_path / "same")
    fp = adapters.fingerprint(tmp_path / "a")
    assert fp == adapters.fingerprint(tmp_path / "same") and fp["parameters"] == sum(
        p.numel() for n, p in base.state_dict().items() if n != "lm_head.weight" or not base.config.tie_word_embeddings)
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3  # one value
    base.save_pretrained(tmp_path / "nudged")
    nudged = adapters.fingerprint(tmp_path / "nudged")
    assert nudged["shapes"] == fp["shapes"] and nudged["weights"] != fp["weights"]
    llama.prune_layers(tiny(STUDENT, 0), [0]).save_pretrained(tmp_path / "pruned")
    assert adapters.fingerprint(tmp_path / "pruned")["shapes"] != fp["shapes"]
