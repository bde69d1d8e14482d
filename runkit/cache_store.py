"""The teacher cache's store: its manifest (what run it belongs to), its shard files (written
whole or not at all, verified on every read) and the rows the sparse loss reads.

teacher_cache.py is the command that writes a cache (its docstring shows the layout and why
uint8 log-probabilities); train.py --teacher-cache reads one through TeacherCache.
"""
import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import cached_loss
import model as llama
import neo
from runkit import disk, tokenized
from runkit.distributed import print0
from runkit.precision import frozen_dtype

FORMAT = 3  # layout version of the files above (2: the same k in every row; 1: fp16 log-probabilities)
SPLITS = ("train", "heldout")


# -----------------------------------------------------------------------------
# What identifies a cache: the teacher, the tokens, and the loss settings baked into the rows


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def weights_sha256(folder) -> str:
    """sha256 of the teacher's weight files (*.safetensors, in name order)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weight files to fingerprint")
    return sha256_files(files)


def examples_sha256(examples) -> str:
    """sha256 of every example's token ids and labels, in order (lengths included)."""
    h = hashlib.sha256()
    for e in examples:
        ids, labels = np.asarray(e["input_ids"], np.int64), np.asarray(e["labels"], np.int64)
        h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())
    return h.hexdigest()


def targets_per_example(examples) -> list[int]:
    """Cache rows per example: its valid shifted targets, the positions neo's losses score."""
    return [int((np.asarray(e["labels"][1:]) != neo.IGNORE_INDEX).sum()) for e in examples]


def identity(args, teacher_path: str, tokenizer, splits: dict, device) -> dict:
    """The fields a training run must share with the cache, in the order they are checked.

    teacher_dtype is the dtype of the teacher's weights in its forward (train.py's --dtype resolved
    on `device`: bf16 where native, fp32 elsewhere): a live run would get its targets from a teacher
    in that dtype, and bf16 and fp32 teachers give different rows (other log-probabilities, at times
    another top-k), so a bf16 cache is not reused for an fp32 run, nor the reverse."""
    return {
        "format": FORMAT,
        "tokenizer_sha256": sha256_files([Path(tokenizer.folder) / "tokenizer.json"]),
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "max_len": args.max_len,
        "temperature": args.temperature,
        "data": {name: {"examples": len(ex), "targets": sum(targets_per_example(ex)), "sha256": examples_sha256(ex)}
                 for name, ex in splits.items()},
        "teacher_weights_sha256": weights_sha256(teacher_path),
        "teacher_dtype": str(frozen_dtype(args, device)).removeprefix("torch."),
    }


def manifest_for(args, k: int, k_max: int, tail_samples: int, shard_examples: int, teacher_path: str, tokenizer,
                 splits: dict, device) -> dict:
    """The whole manifest, before any teacher forward: identity, the vocabulary, and every shard."""
    vocab = llama.LlamaConfig.from_json(Path(teacher_path) / "config.json").vocab_size
    shards = []
    for name, examples in splits.items():
        rows = targets_per_example(examples)
        for i, first in enumerate(range(0, len(examples), shard_examples)):
            last = min(first + shard_examples, len(examples))
            shards.append({"file": f"{name}-{i:05d}.safetensors", "split": name, "first": first, "last": last,
                           "rows": sum(rows[first:last])})
    if k_max > vocab:
        raise SystemExit(f"--k-max {k_max} is larger than the teacher's vocabulary ({vocab}); use at most {vocab}")
    return {**identity(args, teacher_path, tokenizer, splits, device), "k": k, "k_max": k_max,
            "tail_samples": tail_samples, "vocab_size": vocab,
            "ids_dtype": "uint16" if vocab <= 2**16 else "int32", "logp_dtype": "uint8", "logp_step": LOGP_STEP,
            "teacher": teacher_path, "source": {**{key: getattr(args, key) for key in
                                                   ("data", "max_samples", "heldout", "seed", "dtype")},
                                                "data_files": tokenized.data_identity(args.data or "offline")},
            "shards": shards}


def data_change(saved: dict, args) -> str:
    """'; <file> has other bytes ...' when the data files the cache recorded changed since, else ''."""
    recorded = (saved.get("source") or {}).get("data_files")
    change = recorded and tokenized.changed_data(recorded, tokenized.data_identity(args.data or "offline"))
    return f" ({change})" if change else ""


def first_difference(saved: dict, now: dict, keys) -> str | None:
    """The first field among `keys` whose values differ, as 'field: cache X, this run Y'."""
    for key in keys:
        if saved.get(key) != now.get(key):
            a, b = saved.get(key), now.get(key)
            if isinstance(a, dict) and isinstance(b, dict):  # data: name the split and the sub-field
                for sub in dict.fromkeys([*b, *a]):  # this run's order: train first
                    if a.get(sub) != b.get(sub):
                        inner = next((f for f in ("examples", "targets", "sha256")
                                      if (a.get(sub) or {}).get(f) != (b.get(sub) or {}).get(f)), "")
                        return (f"{key} ({sub} split{', ' + inner if inner else ''}): cache "
                                f"{(a.get(sub) or {}).get(inner, a.get(sub))!r}, this run "
                                f"{(b.get(sub) or {}).get(inner, b.get(sub))!r}")
            return f"{key}: cache {a!r}, this run {b!r}"
    return None


def digest(manifest: dict) -> str:
    """What a shard's rows depend on (the manifest less its shard list and where things were read
    from), hashed. Each shard records it, so a shard copied from another cache is refused."""
    fields = {key: value for key, value in manifest.items() if key not in ("shards", "teacher", "source")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


MANIFEST_FIELDS = {"format": int, "k": int, "k_max": int, "tail_samples": int, "vocab_size": int, "ids_dtype": str,
                   "shards": list}
SHARD_FIELDS = {"file": str, "split": str, "first": int, "last": int, "rows": int}


def read_manifest(path: Path) -> dict:
    """manifest.json, checked field by field: a SystemExit names the file and what is wrong."""
    def bad(why):
        raise SystemExit(f"{path} is damaged: {why}. Write the cache again into a new folder "
                         f"(python teacher_cache.py --cache NEW_DIR <the same flags>)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        bad(f"not readable JSON ({e})")
    if not isinstance(manifest, dict):
        bad(f"expected a JSON object, found a {type(manifest).__name__}")
    for fields, where, record in [(MANIFEST_FIELDS, "", manifest)] + [
            (SHARD_FIELDS, f"shards[{i}].", e) for i, e in enumerate(manifest.get("shards") or [])]:
        if not isinstance(record, dict):
            bad(f"{where.rstrip('.')} is {record!r}; expected an object with {', '.join(fields)}")
        for key, kind in fields.items():
            if not isinstance(record.get(key), kind):
                bad(f"'{where}{key}' is {'missing' if key not in record else repr(record[key])}; expected "
                    f"{'a list' if kind is list else 'a string' if kind is str else 'an integer'}")
    if manifest["format"] != FORMAT:
        bad(f"format {manifest['format']}; this code reads format {FORMAT}")
    return manifest


# -----------------------------------------------------------------------------
# Shards


def verify_shard(path: Path, entry: dict, k_max: int, tail_samples: int, cache: str | None = None) -> str | None:
    """None when the shard file is whole and holds what the manifest says; else what is wrong.

    Reads the header and the per-row tensors (width, tail, plogp: 10 bytes per target token, one
    vectorised pass); the per-token ids are range-checked when TeacherCache.rows reads them.
    cache: the manifest's digest(), which the shard must record (a shard of another cache is refused)."""
    if not path.exists():
        return f"{path} is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # a truncated file fails here: its header points past its end
        return f"{path} is truncated or not a safetensors file ({type(e).__name__}: {e})"
    entries = shapes.get("ids", (None,))[0]
    want = {"ids": (entries,), "logp": (entries,), "width": (entry["rows"],), "tail": (entry["rows"],),
            "offsets": (entry["last"] - entry["first"] + 1,)}
    if tail_samples:
        want |= {"draws": (entry["rows"], tail_samples), "plogp": (entry["rows"],)}
    if shapes != want or meta.get("first") != str(entry["first"]) or meta.get("last") != str(entry["last"]):
        return f"{path} does not hold what the manifest lists (shapes {shapes}, metadata {meta}; expected {want})"
    if cache is not None and meta.get("cache", cache) != cache:  # shards from before the digest are not checked
        return f"{path} belongs to another cache (it records cache {meta['cache']}, the manifest is {cache})"
    size = path.stat().st_size
    with open(path, "rb") as f:  # 8-byte header length, the JSON header, then the tensors
        header = int.from_bytes(f.read(8), "little")
    rows, n = entry["rows"], entry["last"] - entry["first"] + 1
    ids_bytes = 2 if "uint16" in str(meta.get("ids_dtype", "uint16")) else 4
    expected = 8 + header + entries * (ids_bytes + 1) + rows * (2 + 4) + n * 8
    expected += rows * (tail_samples * ids_bytes + 4) if tail_samples else 0
    if size != expected:
        return f"{path} is truncated ({size} bytes, expected {expected})"
    with safe_open(str(path), framework="np") as f:  # numpy: these passes run ~10x faster than torch's on a CPU
        width = f.get_tensor("width").astype(np.int64)
        tail = f.get_tensor("tail")
        plogp = f.get_tensor("plogp") if tail_samples else np.zeros(rows, np.float32)
    if rows and (int(width.sum()) != entries or int(width.min()) < 1 or int(width.max()) > k_max):
        return f"{path} is damaged: its rows hold {int(width.sum())} tokens ({int(width.min())}-{int(width.max())} " \
               f"per row), its ids {entries} (expected 1-{k_max} per row)"
    # tail = log(1 - kept mass) < 0 (-inf when nothing is left); plogp = the tail's sum of p log p <= 0.
    # `not (x < 0)` catches nan too: a nan or positive tail would make the loss nan, blamed on --lr.
    for name, values, ok in (("tail", tail, tail < 0), ("plogp", plogp, np.isfinite(plogp) & (plogp <= 0))):
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            return f"{path} is damaged: {name} of row {row} is {float(values[row])} (expected " \
                   f"{'a log-probability below 0' if name == 'tail' else 'a finite value <= 0'})"
    return None


K_MAX = 1024       # --k-max's default (benchmarks/bench_cache.py sizes)
TAIL_SAMPLES = 32  # --tail-samples' default (benchmarks/bench_cache.py sizes)
LOGP_STEP = 1 / 16  # nats per step of the uint8 log-probability codes: 255 steps span 15.9 nats


def quantise_logp(logp: torch.Tensor) -> torch.Tensor:
    """(N, k) top-k log-probabilities, most likely first -> uint8 codes of log p_1 − log p_i in steps
    of LOGP_STEP (a token more than 15.9 nats below the top one is stored at 15.9)."""
    return ((logp[:, :1] - logp) / LOGP_STEP).round_().clamp_(0, 255).to(torch.uint8)


def dequantise_logp(codes: torch.Tensor, tail_logp: torch.Tensor, width: torch.Tensor | None = None) -> torch.Tensor:
    """The codes back to log-probabilities (N, k), fp32: their shape from the codes, their total
    1 − p_tail from the exact fp32 tail, so the kept buckets and the tail are a distribution again.
    With width, only a row's first width columns are its tokens (the rest repeat column 0)."""
    rel = codes.float() * -LOGP_STEP                                           # log p_i − log p_1, rounded
    top_mass = torch.log(-torch.expm1(tail_logp.float()))                      # log(1 − p_tail)
    kept = rel if width is None else rel.masked_fill(cached_loss.padding_columns(width, rel.shape[1]), -torch.inf)
    return rel - torch.logsumexp(kept, dim=-1, keepdim=True) + top_mass[:, None]


def stored(top: cached_loss.TeacherTopK, ids_dtype: str) -> cached_loss.TeacherTopK:
    """The rows in the stored dtypes: 16-bit ids when the vocabulary fits, uint8 log-prob codes, fp32
    tail, uint16 widths (every row's full k when the rows are a plain top-k)."""
    width = top.width if top.width is not None else torch.full(top.tail_logp.shape, top.ids.shape[1])
    return cached_loss.TeacherTopK(top.ids.to(getattr(torch, ids_dtype)), quantise_logp(top.logp), top.tail_logp.float(),
                           width.to(device=top.ids.device, dtype=torch.uint16),
                           None if top.samples is None else top.samples.to(getattr(torch, ids_dtype)),
                           None if top.tail_plogp is None else top.tail_plogp.float())


def decoded(top: cached_loss.TeacherTopK) -> cached_loss.TeacherTopK:
    """Stored rows as the loss reads them: long ids, fp32 log-probabilities, long widths."""
    width = None if top.width is None else top.width.long()
    return cached_loss.TeacherTopK(top.ids.long(), dequantise_logp(top.logp, top.tail_logp, width), top.tail_logp, width,
                           None if top.samples is None else top.samples.long(), top.tail_plogp)


def flat(top: cached_loss.TeacherTopK) -> dict:
    """Stored rows as they go to disk: each row's width tokens, row after row (no padding)."""
    keep = ~cached_loss.padding_columns(top.width.long(), top.ids.shape[1])
    tensors = {"ids": top.ids[keep], "logp": top.logp[keep], "width": top.width, "tail": top.tail_logp}
    return tensors if top.samples is None else {**tensors, "draws": top.samples, "plogp": top.tail_plogp}


def unflat(ids: torch.Tensor, logp: torch.Tensor, width: torch.Tensor, tail: torch.Tensor,
           draws: torch.Tensor | None = None, plogp: torch.Tensor | None = None) -> cached_loss.TeacherTopK:
    """flat()'s inverse: rows padded to the widest, each padding column a copy of the row's column 0."""
    w = width.long()
    start = w.cumsum(0) - w                                                    # (R,) each row's first entry
    cols = torch.arange(int(w.max()) if len(w) else 0)
    index = start[:, None] + torch.where(cols[None, :] < w[:, None], cols[None, :], 0)   # (R, max width)
    return cached_loss.TeacherTopK(ids[index], logp[index], tail, width, draws, plogp)


def save_shard(path: Path, entry: dict, tensors: dict, rows_per_example: list, manifest: dict):
    """One shard's flat rows (flat(), in the stored dtypes) to a temporary file, made durable, then renamed."""
    tensors = {**tensors, "offsets": torch.tensor([0] + rows_per_example).cumsum(0)}
    if tensors["width"].shape[0] != entry["rows"]:
        raise RuntimeError(f"{path.name}: {tensors['width'].shape[0]} rows, the manifest expects {entry['rows']}")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk.room_for(path.parent, disk.nbytes(tensors), f"writing the teacher cache shard {path.name}",
                           kept="the shards already written are whole: rerun with the same flags to finish"):
            save_file(tensors, str(tmp), metadata={"split": entry["split"], "first": str(entry["first"]),
                                                   "last": str(entry["last"]), "k": str(manifest["k"]),
                                                   "k_max": str(manifest["k_max"]),
                                                   "tail_samples": str(manifest.get("tail_samples", 0)),
                                                   "ids_dtype": manifest["ids_dtype"],
                                                   "cache": digest(manifest)})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    disk.follow_umask(tmp)  # safetensors writes 0600; a cache is shared by every run that reads it
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Reading the cache when training


class TeacherCache:
    """A finished cache: checked against the run, then read row by row by example id (memory-mapped)."""

    def __init__(self, folder, expected: dict | None = None, args=None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise SystemExit(f"--teacher-cache {folder}: no manifest.json there. Write the cache first: "
                             f"python teacher_cache.py --cache {folder} <the same model and data flags>")
        self.manifest = read_manifest(path)
        if expected is not None:
            diff = first_difference(self.manifest, expected, list(expected))
            if diff:
                diff += data_change(self.manifest, args) if diff.startswith("data") and args else ""
                raise SystemExit(f"--teacher-cache {folder} was made for another run; {diff}. Rebuild it with "
                                 f"this run's flags (python teacher_cache.py --cache NEW_DIR ...) or use the "
                                 f"cache's flags.")
        self.k, self.k_max, self.tail_samples, self.vocab = (
            self.manifest[key] for key in ("k", "k_max", "tail_samples", "vocab_size"))
        problems = [p for e in self.manifest["shards"]
                    if (p := verify_shard(self.folder / e["file"], e, self.k_max, self.tail_samples,
                                          digest(self.manifest)))]
        if problems:
            raise SystemExit(f"--teacher-cache {folder} is incomplete: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                             + ". Rerun teacher_cache.py with the same flags to finish it.")
        self.shards = {name: [e for e in self.manifest["shards"] if e["split"] == name] for name in SPLITS}
        self._open = {}

    def _handle(self, entry):
        """The open shard, its rows per example, and where each row's tokens start (R + 1,)."""
        if entry["file"] not in self._open:
            f = safe_open(str(self.folder / entry["file"]), framework="pt")
            starts = torch.cat([torch.zeros(1, dtype=torch.long), f.get_tensor("width").long().cumsum(0)])
            self._open[entry["file"]] = (f, f.get_tensor("offsets").tolist(), starts.tolist())
        return self._open[entry["file"]]

    def rows(self, split: str, example_ids) -> cached_loss.TeacherTopK:
        """The cached rows of these examples, concatenated in the given order (the batch's row order),
        with the log-probabilities decoded to fp32."""
        shards = self.shards[split]
        firsts = [e["first"] for e in shards]
        per_row = ("width", "tail") + (("draws", "plogp") if self.tail_samples else ())
        parts = {key: [] for key in ("ids", "logp") + per_row}
        for i in torch.as_tensor(example_ids).tolist():  # one device-to-host copy, not one per id
            entry = shards[bisect.bisect_right(firsts, i) - 1]
            f, offsets, starts = self._handle(entry)
            a, b = offsets[i - entry["first"]], offsets[i - entry["first"] + 1]   # its rows
            for key in parts:
                lo, hi = (a, b) if key in per_row else (starts[a], starts[b])
                parts[key].append(f.get_slice(key)[lo:hi])
                # an id outside the vocabulary would index past the student's head: a crash, or another
                # token's logit on some devices. One max() over the batch's own entries.
                top = int(parts[key][-1].int().max()) if key in ("ids", "draws") and len(parts[key][-1]) else 0
                if top >= self.vocab:  # (.int(): torch has no max() for uint16)
                    raise SystemExit(f"{self.folder / entry['file']} is damaged: example {i} holds token id "
                                     f"{top} in '{key}', outside the vocabulary of "
                                     f"{self.vocab}. Delete that file and rerun teacher_cache.py with the same "
                                     f"flags to write it again.")
        return decoded(unflat(**{key: torch.cat(value) for key, value in parts.items()}))


def open_cache(args, teacher_path, tokenizer, train_set, held_set, device) -> "TeacherCache":
    """The teacher cache for this run, refused (naming the field) if it was made for other tokens,
    another teacher or teacher dtype, tokenizer, template, max length or temperature, or if a shard
    is missing."""
    expected = identity(args, teacher_path, tokenizer, {"train": train_set, "heldout": held_set}, device)
    cache = TeacherCache(args.teacher_cache, expected, args)
    print0(f"teacher: not loaded; its most likely tokens ({cache.k} per position on average, at most "
           f"{cache.k_max}) come from {args.teacher_cache}")
    return cache
