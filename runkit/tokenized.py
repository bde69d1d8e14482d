"""A data set tokenised once, kept on disk memory-mapped, and shared by every later run and every rank.

The paper trains on 1,000,000 conversations (~500M tokens). Tokenising them takes minutes, so it
happens once per (data, tokenizer, chat template, max length) and is kept:

    $NEO_CACHE/tokenized/<key>/         ($NEO_CACHE defaults to ~/.cache/llm-neo)
        tokens.npy     int32 (N,)       every conversation's token ids, back to back
        trained.npy    bool  (N,)       True where the label is the token (assistant replies), else -100
        offsets.npy    int64 (n + 1,)   conversation i is tokens[offsets[i]:offsets[i + 1]]
        truncated.npy  bool  (n,)       cut to max_len
        dropped.npy    bool  (n,)       no target left after the cut (never reaches a batch)
        meta.json                       what the key was made of, and the reading statistics

The key is a hash of the data files' bytes (or of the built-in data set's records), the
tokenizer (its full tokenizer.json), the chat template and special tokens, max_len,
skip_bad_lines and FORMAT; change any of them and a new folder is built next to the old one.
Clear the cache with `rm -rf ~/.cache/llm-neo/tokenized` (or `$NEO_CACHE/tokenized`).

A folder appears complete or not at all: it is written under a temporary name and renamed,
while a lock file keeps two processes from building the same key at once. Under torchrun, rank
0 builds and the other ranks wait for it, then every rank maps the same files (the OS keeps one
copy in memory). Reading is a stream and the writers append, so a data set of any size tokenises
in bounded memory; worker processes (one per core) render and tokenise chunks in parallel.

    store = tokenized.load("BAAI/Infinity-Instruct", tok, max_len=512)
    examples = store.select(range(len(store)), stats)   # examples[i] -> {"input_ids", "labels"}

Run `python -m runkit.tokenized --data FILE` to build (or find) a cache and print its folder.
"""
import hashlib
import json
import os
import random
import shutil
import struct
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from itertools import chain, islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import data
from data import IGNORE_INDEX, DataStats
from runkit import disk, files, offline
from runkit.distributed import print0

FORMAT = 2    # bump when tokenisation, label rules or the folder's layout change, so old caches are not reused
CHUNK = 2048  # conversations per work item
OFFLINE = ("offline", "offline:train", "offline:heldout")  # the built-in data set's names


def cache_root() -> Path:
    return offline.cache_dir() / "tokenized"


# ----------------------------------------------------------------------------------------------
# The key


_HASHED = {}  # (path, size, mtime, inode) -> sha256: a run hashes its data once (--resume's check, then the key)


def _sha256_file(path: Path) -> str:
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _HASHED:
        with open(path, "rb") as f:
            _HASHED[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASHED[key]


def data_identity(source) -> dict[str, str]:
    """{file: sha256 of its bytes} for every data file of `source`, in reading order ({"offline:split":
    sha256 of its records} for the built-in set). What a run's data *is*: train.py --resume and the
    teacher cache compare it, so that new bytes at the same path are named, not trained on."""
    source = str(source)
    if source in OFFLINE:
        split = source.partition(":")[2] or "train"
        records = json.dumps(offline.chat_dataset(split), sort_keys=True).encode()
        return {f"offline:{split}": hashlib.sha256(records).hexdigest()}
    return {str(f): _sha256_file(f) for f in files.data_files(source)}


def changed_data(saved: dict, now: dict) -> str | None:
    """What differs between two data_identity() results, naming the files; None when they agree."""
    for name in dict.fromkeys([*saved, *now]):
        if name not in now:
            return f"{name} is gone"
        if name not in saved:
            return f"{name} is new"
        if saved[name] != now[name]:
            return f"{name} has other bytes (sha256 {saved[name][:12]}... then, {now[name][:12]}... now)"
    return None


def fingerprint(source, tok: data.Tokenizer, max_len: int, skip_bad_lines: bool) -> tuple[str, dict]:
    """-> (key, what it was made of). The data is identified by content, never by name or date."""
    identity = data_identity(source)
    if str(source) in OFFLINE:
        split, sha = next(iter(identity.items()))
        content = {"offline": split.partition(":")[2], "sha256": sha}
    else:
        content = {"files_sha256": list(identity.values())}  # in reading order
    parts = {"format": FORMAT, "data": content, "max_len": max_len,
             "skip_bad_lines": skip_bad_lines,
             "tokenizer": hashlib.sha256(tok.tokenizer.to_str().encode()).hexdigest(),
             "chat_template": hashlib.sha256((tok.chat_template or "").encode()).hexdigest(),
             "special_tokens": tok.special_tokens}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    return key, parts


# ----------------------------------------------------------------------------------------------
# Reading a built cache


class Damaged(Exception):
    """A cache folder that fails its checks; the message says which file and what is wrong."""


SMALL = ("offsets.npy", "truncated.npy", "dropped.npy")  # one value per conversation: hashed in meta.json


def _sha256_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


class TokenizedSet:
    """The memory-mapped arrays of one cache folder, verified; `select` turns conversations into examples.

    A cache is trusted only after its checks (a Damaged error says what failed): meta.json reads and
    belongs to this folder's key; every array opens with its dtype; the sizes agree with each other
    and with meta.json (O(1)); the offsets start at 0, rise and end at the token count, and the three
    per-conversation arrays have the sha256 meta.json recorded (one vectorised pass over n + 1
    values: ~40 ms at 1M conversations). The token arrays themselves (~500M values at 1M
    conversations) are checked by size, not hashed: a byte changed inside them is not detected."""

    def __init__(self, folder):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            key = hashlib.sha256(json.dumps(self.meta["key"], sort_keys=True).encode()).hexdigest()[:20]
            n, total, hashes = self.meta["conversations"], self.meta["tokens"], self.meta["sha256"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise Damaged(f"meta.json is not this cache's record ({type(e).__name__}: {e})") from None
        if key != self.folder.name:
            raise Damaged(f"meta.json describes cache {key}, not {self.folder.name}")
        arrays = {}
        for name, dtype, length in (("tokens.npy", np.int32, total), ("trained.npy", np.bool_, total),
                                    ("offsets.npy", np.int64, n + 1), ("truncated.npy", np.bool_, n),
                                    ("dropped.npy", np.bool_, n)):
            try:  # the token arrays are mapped, not read; a truncated file fails here by its header
                array = np.load(self.folder / name, mmap_mode="r" if name not in SMALL else None)
            except Exception as e:  # EOFError (empty), ValueError (mmap past the end), OSError, ...
                raise Damaged(f"{name} does not open ({type(e).__name__}: {e})") from None
            if array.dtype != dtype or array.shape != (length,):
                raise Damaged(f"{name} holds {array.dtype} {array.shape}; meta.json says {np.dtype(dtype)} ({length},)")
            if name in SMALL and _sha256_array(array) != hashes.get(name):
                raise Damaged(f"{name} is not the array this cache was built with (its sha256 differs)")
            arrays[name] = array
        offsets = arrays["offsets.npy"]
        if offsets[0] != 0 or offsets[-1] != total or not (np.diff(offsets) > 0).all():
            raise Damaged(f"offsets.npy does not cut tokens.npy into {n} conversations")
        self.tokens, self.trained = arrays["tokens.npy"], arrays["trained.npy"]  # (N,) int32, (N,) bool
        self.offsets = offsets                                                    # (n + 1,) int64
        self.truncated, self.dropped = arrays["truncated.npy"], arrays["dropped.npy"]  # (n,) bool each

    def __len__(self) -> int:
        """Usable conversations (with an assistant reply), in data order."""
        return len(self.offsets) - 1

    def stats(self) -> DataStats:
        """The reading statistics of the whole source (conversations and examples: see select)."""
        return DataStats(**self.meta["stats"])

    def select(self, indices, stats: DataStats | None = None) -> "Examples":
        """Conversations `indices` as examples, without those left with nothing to train on.

        Counts into `stats` as benchmarks/examples.tokenize_all does: conversations, truncated, dropped, examples."""
        indices = np.asarray(indices, dtype=np.int64)
        stats = stats if stats is not None else DataStats()
        stats.conversations = len(indices)
        stats.truncated = int(self.truncated[indices].sum())
        stats.dropped = int(self.dropped[indices].sum())
        kept = indices[~self.dropped[indices]]
        if not len(kept):
            raise ValueError(f"no example keeps an assistant token within max_len={self.meta['key']['max_len']} "
                             f"({stats.summary()})")
        stats.examples = len(kept)
        return Examples(self, kept)


class Examples:
    """A read-only list of examples backed by a TokenizedSet: examples[i] -> {"input_ids", "labels"}.

    Rows are sliced out of the memory-mapped arrays on demand, so a million examples cost a few
    bytes each in memory. `lengths` lets data.pack plan rows without reading any token."""

    def __init__(self, store: TokenizedSet, indices: np.ndarray):
        self.store, self.indices = store, indices
        self.lengths = store.offsets[indices + 1] - store.offsets[indices]

    def __len__(self) -> int:
        return len(self.indices)

    def max_token_id(self) -> int:
        """The largest token id in the whole cache (so at least every label of these examples)."""
        return int(self.store.tokens.max()) if len(self.store.tokens) else -1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        start, end = self.store.offsets[self.indices[i]], self.store.offsets[self.indices[i] + 1]
        ids = self.store.tokens[start:end].astype(np.int64)
        return {"input_ids": ids, "labels": np.where(self.store.trained[start:end], ids, IGNORE_INDEX)}


# ----------------------------------------------------------------------------------------------
# Building, once


def load(source, tok: data.Tokenizer, max_len: int, *, skip_bad_lines: bool = False, root=None,
         workers: int | None = None) -> TokenizedSet:
    """The tokenised `source`, from the cache or built into it now (see the module docstring).

    Under torch.distributed, rank 0 finds or builds the cache while the others wait; a build error
    on rank 0 is raised on every rank, so no rank hangs."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return _load_or_build(source, tok, max_len, skip_bad_lines, root, workers)
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            store = _load_or_build(source, tok, max_len, skip_bad_lines, root, workers)
        except (ValueError, FileNotFoundError, ImportError, disk.DiskFull) as e:
            outcome = [e]
    dist.broadcast_object_list(outcome, src=0)  # the others wait here for rank 0
    if outcome[0] is not None:
        raise outcome[0]
    # Other ranks map rank 0's folder (or, on a node without the shared folder, build their own).
    return store if dist.get_rank() == 0 else _load_or_build(source, tok, max_len, skip_bad_lines, root, workers)


def _load_or_build(source, tok, max_len, skip_bad_lines, root, workers) -> TokenizedSet:
    root = Path(root) if root is not None else cache_root()
    key, parts = fingerprint(source, tok, max_len, skip_bad_lines)
    folder = root / key
    if folder.exists():  # complete (it was renamed in whole), unless damaged since: checked, never trusted
        try:
            return TokenizedSet(folder)
        except Damaged as e:
            print0(f"tokenised cache {folder} is damaged: {e}; rebuilding it from {source}")
    root.mkdir(parents=True, exist_ok=True)
    with offline._locked(root / f".{key}.lock"):
        try:  # somebody may have rebuilt it while we waited for the lock
            return TokenizedSet(folder)
        except Damaged:
            pass
        for stale in [*root.glob(f".{key}.tmp-*"), *root.glob(f".{key}.damaged-*")]:  # an interrupted build
            shutil.rmtree(stale, ignore_errors=True)
        damaged = root / f".{key}.damaged-{os.getpid()}"
        if folder.exists():  # out of the way; a run still mapping its files keeps them until it ends
            folder.rename(damaged)
        tmp = root / f".{key}.tmp-{os.getpid()}"
        tmp.mkdir()
        # tokens.npy + trained.npy take 5 bytes a token, and a token is ~4 bytes of text
        needed = 0 if str(source) in OFFLINE else 5 * sum(f.stat().st_size for f in files.data_files(source)) // 4
        try:
            with disk.room_for(root, needed, f"tokenising {source} into the cache",
                               kept="the data is untouched (set $NEO_CACHE to put the cache on another disk)"):
                build(source, tok, max_len, skip_bad_lines, tmp, {"source": str(source), "key": parts}, workers)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(damaged, ignore_errors=True)
    return TokenizedSet(folder)


def build(source, tok, max_len, skip_bad_lines, folder: Path, meta: dict, workers: int | None = None):
    """Stream `source` through the tokenizer into `folder`'s arrays (see the module docstring)."""
    stats = DataStats()
    conversations = files.iter_conversations(source, skip_bad_lines, stats)
    lengths, truncated, dropped = [], [], []
    with _NpyAppender(folder / "tokens.npy", np.int32) as tokens, \
            _NpyAppender(folder / "trained.npy", np.bool_) as trained:
        for ids, mask, n, cut in _encoded_chunks(conversations, tok, max_len, workers):
            tokens.write(ids)
            trained.write(mask)
            lengths.append(n)
            truncated.append(cut)
            # dropped: no target after each example's first token (labels[0] is never a target)
            seen = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])  # trained tokens before each position
            ends = np.cumsum(n)
            dropped.append(seen[ends] - seen[np.minimum(ends - n + 1, ends)] == 0)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if not len(lengths):
        raise ValueError(f"no usable conversations in {source} ({stats.summary()})")
    small = {"offsets.npy": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
             "truncated.npy": np.concatenate(truncated), "dropped.npy": np.concatenate(dropped)}
    for name, array in small.items():
        np.save(folder / name, array)
    stats.conversations = len(lengths)
    meta = {**meta, "stats": asdict(stats), "conversations": len(lengths), "tokens": int(lengths.sum()),
            "sha256": {name: _sha256_array(array) for name, array in small.items()}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


_worker_tok = None


def _worker_init(tok, parent: int):
    global _worker_tok
    _end_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker_tok = tok


def _end_with_parent(parent: int):
    """Make this worker die with `parent`. A pool worker waits on a queue whose writing end it holds
    itself, so it never sees the parent go: after a kill -9 of train.py the workers (~400 MB each)
    would run on for good. Linux: the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG);
    elsewhere a thread checks every second whether the parent is still this process's parent."""
    import signal
    if os.getpid() == parent:  # not a worker process (a thread pool stands in for the processes in a test)
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):  # not Linux
        import threading
        import time

        def watch():
            while os.getppid() == parent:
                time.sleep(1)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _worker_encode(conversations, max_len):
    return data.encode_conversations(_worker_tok, conversations, max_len)


def _encoded_chunks(conversations, tok, max_len, workers):
    """Encoded chunks in data order. Small data stays in this process; larger data goes to
    `workers` processes (default: one per core), at most 2 chunks each in flight, so memory stays
    bounded however large the stream is: a chunk is read from the stream only when a slot for it
    frees up, and a chunk's result is freed once the caller has written it."""
    workers = workers or len(os.sched_getaffinity(0))
    chunks = iter(lambda: list(islice(conversations, CHUNK)), [])
    first = list(islice(chunks, workers))
    if len(first) < workers or workers == 1:  # fits in a few chunks: not worth starting processes
        for chunk in chain(first, chunks):
            yield data.encode_conversations(tok, chunk, max_len)
        return
    # spawn, not fork: the parent may hold threads (torch, tokenizers, gloo) that fork would break
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(tok, os.getpid())) as pool:
        pending = deque()
        for chunk in chain(first, chunks):
            pending.append(pool.submit(_worker_encode, chunk, max_len))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _NpyAppender:
    """A 1-D .npy file written piece by piece; the header gets the final length when it closes.

    .npy v1.0 = magic "\\x93NUMPY", version 1.0, a little-endian uint16 header length, then a
    Python-literal dict padded with spaces and ended by "\\n"; 128 bytes in all leaves room for
    any length and keeps the data 64-byte aligned. np.load(mmap_mode="r") reads it as usual."""
    HEADER = 128

    def __init__(self, path: Path, dtype):
        self.file, self.dtype, self.n = open(path, "wb"), np.dtype(dtype), 0
        self.file.write(b"\0" * self.HEADER)

    def write(self, array):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self.file.write(array.tobytes())
        self.n += len(array)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": (self.n,)}).encode("latin1")
        header = header.ljust(self.HEADER - 10 - 1) + b"\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
        self.file.close()


if __name__ == "__main__":
    import argparse
    import time
    p = argparse.ArgumentParser(description="Tokenise a data set into the cache (or find it there).")
    p.add_argument("--data", default="offline", help="file, folder, Hub id or 'offline'")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the offline SmolLM2)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per example")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSON lines")
    args = p.parse_args()
    t0 = time.time()
    store = load(args.data, data.Tokenizer.from_dir(args.tokenizer or offline.smollm2_dir()), args.max_len,
                 skip_bad_lines=args.skip_bad_lines)
    print(f"{store.folder}: {len(store)} conversations, {store.meta['tokens']:,} tokens ({time.time() - t0:.1f} s)")


# -----------------------------------------------------------------------------
# The run's two splits, as train.py and the commands built on it read them


def load_splits(args, tokenizer):
    """Training and held-out examples for train.py's flags (--data, --max-len, --max-samples,
    --heldout, --seed, --skip-bad-lines), read from the tokenised cache (built by the first run,
    rank 0, and shared). The offline set has its own fixed held-out split; for user data the
    held-out conversations are a seeded sample set aside before training."""
    offline_data = args.data in (None, "offline")
    store = load("offline" if offline_data else args.data, tokenizer, args.max_len, skip_bad_lines=args.skip_bad_lines)
    stats = store.stats()
    order = files.sample_indices(len(store), args.max_samples, args.seed)
    if offline_data:
        held_store = load("offline:heldout", tokenizer, args.max_len)
        held = files.sample_indices(len(held_store), args.heldout, args.seed)
    else:
        random.Random(args.seed).shuffle(order)
        n_held = min(args.heldout, len(order) // 10)
        held_store, held, order = store, order[:n_held], order[n_held:]
    train_set = store.select(order, stats)
    print0(f"data: {stats.summary()} (tokenised in {store.folder})")
    held_set = held_store.select(held) if held else []
    print0(f"data: {len(train_set)} training and {len(held_set)} held-out examples, max {args.max_len} tokens")
    return train_set, held_set


def check_labels(examples, n_rows: int):
    """Every label is a row of the LM head (or -100). Checked once, before training, so that no
    training step has to ask the GPU. Examples from the cache answer with the largest token id of
    the whole cache (labels are token ids), one pass over its memory-mapped ids."""
    if not len(examples):
        return
    top = examples.max_token_id() if isinstance(examples, Examples) else max(max(e["labels"]) for e in examples)
    if top >= n_rows:
        raise ValueError(f"data: token id {top} is outside the model's vocabulary of {n_rows} rows; the "
                         f"tokenizer does not belong to this model (use the teacher's own tokenizer)")
