"""teacher_cache.py: run the teacher once, keep its likeliest tokens and draws from the rest, train many students.

LLM-Neo's guidelines come from grids of runs (ranks x learning rates, 2 epochs each), and every
run repeats the same teacher forward on the same tokens. This script runs that forward once, over
the tokenised training and held-out examples that train.py builds from the same flags, and keeps
for every target position (labels[t + 1] != -100) what the sparse loss in cached_loss.py needs:

    ids   (w,)  the teacher's w most likely next tokens at temperature T
    logp  (w,)  their log-probabilities log softmax(z_t / T), stored as uint8 steps below the top one
    tail  ()    log of the probability left over, log(1 − Σ kept)
    draws (s,)  tokens drawn from that leftover, the tail, in proportion to the teacher's probabilities
    plogp ()    the tail's Σ p_j log p_j

w varies by position: k tokens per position on average, up to --k-max, placed where the teacher's
mass is (cached_loss.teacher_topk): a position where the teacher is sure of the next token keeps one or
two, one where it hesitates keeps hundreds. At the same bytes this leaves far less mass in the
tails than the same k everywhere, and the tail mass is what the sparse loss misses
(benchmarks/bench_cache.py measures both; --k-max equal to --k stores a plain top-k).

With the draws (--tail-samples s, 2 bytes each) the loss is D_S instead of D_K (cached_loss.py): the tail
bucket's bias, the shape of the tail the student is never taught, becomes zero-mean noise.

Then `python train.py --teacher-cache DIR ...` trains kd / neo (LoRA or MoSLoRA) on
α·CE + (1 − α)·T²·D_K, the forward KL over those k + 1 buckets, without loading the teacher.
cached_loss.py states how far D_K is from the full KL (below it, by the teacher's tail mass times the
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
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import data
import cached_loss
import model as llama
import neo
from runkit import flags, offline, tokenized
from runkit.cache_store import (K_MAX, TAIL_SAMPLES, TeacherCache, data_change, digest, first_difference, flat, manifest_for,
                                read_manifest, save_shard, stored, targets_per_example, verify_shard)
from runkit.distributed import print0, setup_distributed
from runkit.precision import frozen_dtype


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
    return own, flags.parse(rest)



# -----------------------------------------------------------------------------
# The teacher's forward, shard by shard


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
        top = cached_loss.teacher_topk(hidden[:, :-1][mask], teacher.lm_head.weight[:manifest["vocab_size"]],
                               manifest["k"], args.temperature, args.chunk_size, manifest["k_max"],
                               manifest["tail_samples"], draws)
        parts.append(flat(stored(top, manifest["ids_dtype"]).to("cpu")))
        if bar is not None:
            bar.update(int(mask.sum()))
    save_shard(path, entry, {key: torch.cat([part[key] for part in parts]) for key in parts[0]},
               targets_per_example(examples), manifest)



def main(argv=None):
    own, args = parse_args(argv)
    teacher_path = str(llama.resolve_folder(args.teacher or offline.smollm2_dir()))
    # train.py's rules for train.py's flags, before any work (--temperature 0 would write NaN rows)
    flags.check(args, llama.LlamaConfig.from_json(Path(teacher_path) / "config.json"), say=print0)
    d = setup_distributed()
    cache = Path(own.cache)
    tokenizer = data.Tokenizer.from_dir(teacher_path)
    train_set, held_set = tokenized.load_splits(args, tokenizer)
    splits = {"train": train_set, "heldout": held_set}
    manifest = manifest_for(args, own.k, own.k_max, own.tail_samples, own.shard_examples, teacher_path, tokenizer, splits,
                    d.device)
    if d.master:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / "manifest.json"
        others = sorted(p.name for p in cache.iterdir())
        if not path.exists() and others:  # the user's folder, not a cache: never write into it
            raise SystemExit(f"--cache {cache} already holds files ({', '.join(others[:5])}) and no manifest.json: "
                             f"it is not a teacher cache. Choose a new or empty folder.")
        if path.exists():  # resuming: the folder must be a cache of exactly this run
            saved = read_manifest(path)
            diff = first_difference(saved, manifest, [k for k in manifest if k not in ("teacher", "source")])
            diff = diff and diff + (data_change(saved, args) if diff.startswith("data") else "")
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
    problems = {e["file"]: verify_shard(cache / e["file"], e, own.k_max, own.tail_samples, digest(manifest))
                for e in mine}
    todo = [e for e in mine if problems[e["file"]]]
    for e in todo:
        if (cache / e["file"]).exists():  # a damaged shard is written again, and said so
            print0(f"rewriting {problems[e['file']]}")
    done_rows = sum(e["rows"] for e in mine) - sum(e["rows"] for e in todo)
    print0(f"teacher cache {cache}: {len(manifest['shards'])} shards, k = {own.k} per position on average "
                 f"(at most {own.k_max}), {own.tail_samples} tail draws, T = {args.temperature}; "
                 f"rank 0 writes {len(todo)} of its {len(mine)} (the others are already whole)")
    if todo:
        teacher = llama.Llama.from_pretrained(teacher_path, dtype=frozen_dtype(args, d.device), device=d.device)
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
        print0(f"teacher cache {cache}: {rows:,} target tokens, {size / 2**20:.1f} MiB, "
                     f"{size / max(rows, 1):.0f} bytes/token")
    if dist.is_initialized():
        dist.destroy_process_group()
    return cache


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as e:  # bad input: say what and where, without a traceback
        sys.exit(f"error: {e}")
