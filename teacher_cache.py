"""teacher_cache.py: run the teacher once, keep its likeliest tokens and draws from the rest, train many students.

LLM-Neo's guidelines come from grids of runs (ranks x learning rates, 2 epochs each), and every
run repeats the same teacher forward on the same tokens. This script runs that forward once, over
the tokenised training and held-out examples that train.py builds from the same flags, and keeps
for every target position (labels[t + 1] != -100) what the sparse loss in neo.py needs:

    ids   (w,)  the teacher's w most likely next tokens at temperature T
    logp  (w,)  their log-probabilities log softmax(z_t / T), stored as uint8 steps below the top one
    tail  ()    log of the probability left over, log(1 − Σ kept)
    draws (s,)  tokens drawn from that leftover, the tail, in proportion to the teacher's probabilities
    plogp ()    the tail's Σ p_j log p_j

w varies by position: k tokens per position on average, up to --k-max, placed where the teacher's
mass is (neo.teacher_topk): a position where the teacher is sure of the next token keeps one or
two, one where it hesitates keeps hundreds. At the same bytes this leaves far less mass in the
tails than the same k everywhere, and the tail mass is what the sparse loss misses
(benchmarks/bench_cache.py measures both; --k-max equal to --k stores a plain top-k).

With the draws (--tail-samples s, 2 bytes each) the loss is D_S instead of D_K (neo.py): the tail
bucket's bias, the shape of the tail the student is never taught, becomes zero-mean noise.

Then `python train.py --teacher-cache DIR ...` trains kd / neo (LoRA or MoSLoRA) on
α·CE + (1 − α)·T²·D_K, the forward KL over those k + 1 buckets, without loading the teacher.
neo.py states how far D_K is from the full KL (below it, by the teacher's tail mass times the
mismatch of the tails); benchmarks/bench_cache.py measures it and the cache's size per token.

Run it with train.py's own flags for the model and the data (they must be the ones of the runs that
will read the cache; the manifest records them and train.py refuses a cache that differs):

    python teacher_cache.py --cache runs/cache                       # the offline demo's data, k = 128 on average + 32 tail draws
    python train.py --teacher-cache runs/cache --rank 32 --lr 5e-4   # any number of runs
    torchrun --nproc_per_node 8 teacher_cache.py --cache DIR --teacher meta-llama/Llama-3.1-8B-Instruct \
        --data BAAI/Infinity-Instruct --max-len 512                  # each rank writes its share of shards

Layout of DIR (safetensors shards, so they are memory-mapped, not read whole, when training):

    manifest.json               teacher (folder + sha256 of its weights + the dtype of its forward,
                                bf16 or fp32: a run at the other dtype is refused), tokenizer.json and chat
                                template sha256, per split the examples, target rows and a sha256 of
                                the token ids and labels, max_len, k, k_max, temperature, the shard list
    train-00000.safetensors     examples [first, last) of one split, R rows holding E tokens in all:
        ids      (E,)   uint16 (int32 when the vocabulary exceeds 65,536), row after row
        logp     (E,)   uint8   log p_1 − log p_i in steps of 1/16 nat (quantise_logp)
        width    (R,)   uint16  tokens kept per row (E = Σ width)
        tail     (R,)   float32
        draws    (R, s) uint16 (int32 as ids)   only with --tail-samples s > 0
        plogp    (R,)   float32                 only with --tail-samples s > 0
        offsets  (n + 1,) int64  rows of example first + i are offsets[i]:offsets[i + 1]
    heldout-00000.safetensors   the same for the held-out examples (train.py's before/after report)

Why uint8 log-probabilities: at 3 bytes per kept token instead of fp16's 4, a fixed budget
holds a third more tokens per position, and a larger k loses less than the rounding costs. Each
row's k log-probabilities are kept as whole steps of 1/16 nat below the row's top one; the tail
stays exact (fp32), and decoding (dequantise_logp) rescales the k buckets to hold 1 − p_tail, so
the k + 1 buckets the loss reads are a distribution. benchmarks/bench_cache.py measures both.

A kill loses at most the shards being written: each is written to a temporary name and renamed
when whole, and a rerun with the same flags checks every finished shard (header, shapes, rows,
examples) and writes only the missing or damaged ones.
"""
import argparse
import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import data
import model as llama
import neo
import train

FORMAT = 3  # layout version of the files above (2: the same k in every row; 1: fp16 log-probabilities)
SPLITS = ("train", "heldout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Every other flag is train.py's "
                                "(--teacher, --data, --max-samples, --heldout, --max-len, --seed, --temperature, "
                                "--batch-size, --dtype, ...): use the values of the runs that will read the cache.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", required=True, help="output folder of the cache")
    p.add_argument("--k", type=int, default=128,
                   help="teacher tokens kept per position, on average: 3k + 2s + 10 bytes per target token with s "
                        "tail samples (the measured KL error per k and s is in README.md, from benchmarks/bench_cache.py)")
    p.add_argument("--k-max", type=int, default=None,
                   help=f"most tokens kept at one position (default: {K_MAX}, or --k if larger; the same as --k: a "
                        f"plain top-k, k at every position)")
    p.add_argument("--tail-samples", type=int, default=TAIL_SAMPLES,
                   help="tokens drawn per position from the teacher's tail (2 bytes each), for the unbiased D_S; "
                        "0: the tail is one bucket (D_K, a lower bound of the KL)")
    p.add_argument("--shard-examples", type=int, default=256, help="examples per shard file")
    own, rest = p.parse_known_args(argv)
    if own.k < 1 or own.shard_examples < 1 or own.tail_samples < 0:
        p.error("--k and --shard-examples must be positive, --tail-samples at least 0")
    own.k_max = max(K_MAX, own.k) if own.k_max is None else own.k_max
    if own.k_max < own.k:
        p.error(f"--k-max ({own.k_max}) must be at least --k ({own.k})")
    return own, train.parse_args(rest)


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
        "teacher_dtype": str(train.frozen_dtype(args, device)).removeprefix("torch."),
    }


def plan(args, k: int, k_max: int, tail_samples: int, shard_examples: int, teacher_path: str, tokenizer,
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
            "teacher": teacher_path, "source": {key: getattr(args, key) for key in
                                                ("data", "max_samples", "heldout", "seed", "dtype")},
            "shards": shards}


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


# -----------------------------------------------------------------------------
# Shards


def verify_shard(path: Path, entry: dict, k_max: int, tail_samples: int) -> str | None:
    """None when the shard file is whole and holds what the manifest says; else what is wrong."""
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
    size = path.stat().st_size
    with open(path, "rb") as f:  # 8-byte header length, the JSON header, then the tensors
        header = int.from_bytes(f.read(8), "little")
    rows, n = entry["rows"], entry["last"] - entry["first"] + 1
    ids_bytes = 2 if "uint16" in str(meta.get("ids_dtype", "uint16")) else 4
    expected = 8 + header + entries * (ids_bytes + 1) + rows * (2 + 4) + n * 8
    expected += rows * (tail_samples * ids_bytes + 4) if tail_samples else 0
    if size != expected:
        return f"{path} is truncated ({size} bytes, expected {expected})"
    with safe_open(str(path), framework="pt") as f:
        width = f.get_tensor("width").long()
    if rows and (int(width.sum()) != entries or int(width.min()) < 1 or int(width.max()) > k_max):
        return f"{path} is damaged: its rows hold {int(width.sum())} tokens ({int(width.min())}-{int(width.max())} " \
               f"per row), its ids {entries} (expected 1-{k_max} per row)"
    return None


@torch.no_grad()
def write_shard(path: Path, entry: dict, examples: list, teacher, manifest: dict, args, device, bar=None):
    """Teacher forward over one shard's examples; top-k rows written to a temporary file, then renamed."""
    collate = data.Batches(examples, 1, pad_id=0, shuffle=False).collate  # right-padding only
    parts = []
    for start in range(0, len(examples), args.batch_size):
        b = {key: v.to(device) for key, v in collate(examples[start:start + args.batch_size]).items()}
        hidden = teacher(b["input_ids"], b["attention_mask"], return_hidden=True)    # (B, T, D)
        mask = b["labels"][:, 1:] != neo.IGNORE_INDEX                                 # (B, T-1)
        draws = torch.Generator(device).manual_seed(args.seed * 1_000_003 + entry["first"] + start)  # per batch
        top = neo.teacher_topk(hidden[:, :-1][mask], teacher.lm_head.weight[:manifest["vocab_size"]],
                               manifest["k"], args.temperature, args.chunk_size, manifest["k_max"],
                               manifest["tail_samples"], draws)
        parts.append(flat(stored(top, manifest["ids_dtype"]).to("cpu")))
        if bar is not None:
            bar.update(int(mask.sum()))
    save_shard(path, entry, {key: torch.cat([part[key] for part in parts]) for key in parts[0]},
               targets_per_example(examples), manifest)


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
    kept = rel if width is None else rel.masked_fill(neo.padding_columns(width, rel.shape[1]), -torch.inf)
    return rel - torch.logsumexp(kept, dim=-1, keepdim=True) + top_mass[:, None]


def stored(top: neo.TeacherTopK, ids_dtype: str) -> neo.TeacherTopK:
    """The rows in the stored dtypes: 16-bit ids when the vocabulary fits, uint8 log-prob codes, fp32
    tail, uint16 widths (every row's full k when the rows are a plain top-k)."""
    width = top.width if top.width is not None else torch.full(top.tail_logp.shape, top.ids.shape[1])
    return neo.TeacherTopK(top.ids.to(getattr(torch, ids_dtype)), quantise_logp(top.logp), top.tail_logp.float(),
                           width.to(device=top.ids.device, dtype=torch.uint16),
                           None if top.samples is None else top.samples.to(getattr(torch, ids_dtype)),
                           None if top.tail_plogp is None else top.tail_plogp.float())


def decoded(top: neo.TeacherTopK) -> neo.TeacherTopK:
    """Stored rows as the loss reads them: long ids, fp32 log-probabilities, long widths."""
    width = None if top.width is None else top.width.long()
    return neo.TeacherTopK(top.ids.long(), dequantise_logp(top.logp, top.tail_logp, width), top.tail_logp, width,
                           None if top.samples is None else top.samples.long(), top.tail_plogp)


def flat(top: neo.TeacherTopK) -> dict:
    """Stored rows as they go to disk: each row's width tokens, row after row (no padding)."""
    keep = ~neo.padding_columns(top.width.long(), top.ids.shape[1])
    tensors = {"ids": top.ids[keep], "logp": top.logp[keep], "width": top.width, "tail": top.tail_logp}
    return tensors if top.samples is None else {**tensors, "draws": top.samples, "plogp": top.tail_plogp}


def unflat(ids: torch.Tensor, logp: torch.Tensor, width: torch.Tensor, tail: torch.Tensor,
           draws: torch.Tensor | None = None, plogp: torch.Tensor | None = None) -> neo.TeacherTopK:
    """flat()'s inverse: rows padded to the widest, each padding column a copy of the row's column 0."""
    w = width.long()
    start = w.cumsum(0) - w                                                    # (R,) each row's first entry
    cols = torch.arange(int(w.max()) if len(w) else 0)
    index = start[:, None] + torch.where(cols[None, :] < w[:, None], cols[None, :], 0)   # (R, max width)
    return neo.TeacherTopK(ids[index], logp[index], tail, width, draws, plogp)


def save_shard(path: Path, entry: dict, tensors: dict, rows_per_example: list, manifest: dict):
    """One shard's flat rows (flat(), in the stored dtypes) to a temporary file, made durable, then renamed."""
    tensors = {**tensors, "offsets": torch.tensor([0] + rows_per_example).cumsum(0)}
    if tensors["width"].shape[0] != entry["rows"]:
        raise RuntimeError(f"{path.name}: {tensors['width'].shape[0]} rows, the manifest expects {entry['rows']}")
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"split": entry["split"], "first": str(entry["first"]),
                                           "last": str(entry["last"]), "k": str(manifest["k"]),
                                           "k_max": str(manifest["k_max"]),
                                           "tail_samples": str(manifest.get("tail_samples", 0)),
                                           "ids_dtype": manifest["ids_dtype"]})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Reading the cache when training


class TeacherCache:
    """A finished cache: checked against the run, then read row by row by example id (memory-mapped)."""

    def __init__(self, folder, expected: dict | None = None):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise SystemExit(f"--teacher-cache {folder}: no manifest.json there. Write the cache first: "
                             f"python teacher_cache.py --cache {folder} <the same model and data flags>")
        self.manifest = json.loads(path.read_text())
        if expected is not None:
            diff = first_difference(self.manifest, expected, list(expected))
            if diff:
                raise SystemExit(f"--teacher-cache {folder} was made for another run; {diff}. Rebuild it with "
                                 f"this run's flags (python teacher_cache.py --cache NEW_DIR ...) or use the "
                                 f"cache's flags.")
        self.k, self.k_max, self.tail_samples = (self.manifest[key] for key in ("k", "k_max", "tail_samples"))
        problems = [p for e in self.manifest["shards"]
                    if (p := verify_shard(self.folder / e["file"], e, self.k_max, self.tail_samples))]
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

    def rows(self, split: str, example_ids) -> neo.TeacherTopK:
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
        return decoded(unflat(**{key: torch.cat(value) for key, value in parts.items()}))


# -----------------------------------------------------------------------------


def main(argv=None):
    own, args = parse_args(argv)
    d = train.setup_distributed()
    cache = Path(own.cache)
    teacher_path = str(llama.resolve_folder(args.teacher or train.offline_model()))
    tokenizer = data.Tokenizer.from_dir(teacher_path)
    train_set, held_set = train.load_data(args, tokenizer)
    splits = {"train": train_set, "heldout": held_set}
    manifest = plan(args, own.k, own.k_max, own.tail_samples, own.shard_examples, teacher_path, tokenizer, splits,
                    d.device)
    if d.master:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "manifest.json"
        if path.exists():  # resuming: the folder must be a cache of exactly this run
            saved = json.loads(path.read_text())
            diff = first_difference(saved, manifest, [k for k in manifest if k not in ("teacher", "source")])
            if diff:
                raise SystemExit(f"{cache} already holds a cache of another run; {diff}. "
                                 f"Use a new --cache folder (or delete this one).")
        else:
            tmp = cache / "manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()

    mine = [e for i, e in enumerate(manifest["shards"]) if i % d.world == d.rank]  # each rank its share
    todo = [e for e in mine if verify_shard(cache / e["file"], e, own.k_max, own.tail_samples) is not None]
    done_rows = sum(e["rows"] for e in mine) - sum(e["rows"] for e in todo)
    train.print0(f"teacher cache {cache}: {len(manifest['shards'])} shards, k = {own.k} per position on average "
                 f"(at most {own.k_max}), {own.tail_samples} tail draws, T = {args.temperature}; "
                 f"rank 0 writes {len(todo)} of its {len(mine)} (the others are already whole)")
    if todo:
        teacher = llama.Llama.from_pretrained(teacher_path, dtype=train.frozen_dtype(args, d.device), device=d.device)
        teacher.eval().requires_grad_(False)
        from tqdm import tqdm
        with tqdm(total=sum(e["rows"] for e in mine), initial=done_rows, unit="tok", disable=not d.master,
                  desc=f"teacher top-{own.k}", dynamic_ncols=True) as bar:
            for e in todo:
                write_shard(cache / e["file"], e, splits[e["split"]][e["first"]:e["last"]], teacher, manifest,
                            args, d.device, bar)
    if dist.is_initialized():
        dist.barrier()
    if d.master:
        TeacherCache(cache)  # every shard whole
        size = sum((cache / e["file"]).stat().st_size for e in manifest["shards"])
        rows = sum(e["rows"] for e in manifest["shards"])
        train.print0(f"teacher cache {cache}: {rows:,} target tokens, {size / 2**20:.1f} MiB, "
                     f"{size / max(rows, 1):.0f} bytes/token")
    if dist.is_initialized():
        dist.destroy_process_group()
    return cache


if __name__ == "__main__":
    main()
