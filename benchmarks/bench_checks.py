"""What the cache checks cost at the paper's scale (issue 27): the tokenised cache's checks at 1M
conversations and 500M tokens, and the teacher cache's shard check per million target tokens.

    python -m benchmarks.bench_checks        # writes ~1.1 GB of sparse files under a temporary folder

The token arrays are sparse files: their sizes are real, and the checks never read them."""
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runkit import cache_store, tokenized  # noqa: E402

work = Path(tempfile.mkdtemp())
root = work / "tok"
n, N = 1_000_000, 500_000_000
parts = {"format": tokenized.FORMAT, "synthetic": True}
key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
folder = root / key; folder.mkdir(parents=True, exist_ok=True)
for name, dtype in (("tokens.npy", np.int32), ("trained.npy", np.bool_)):
    np.lib.format.open_memmap(folder / name, mode="w+", dtype=dtype, shape=(N,)).flush()  # sparse
rng = np.random.default_rng(0)
lengths = rng.multinomial(N - n, np.ones(n) / n) + 1
small = {"offsets.npy": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
         "truncated.npy": rng.random(n) < 0.1, "dropped.npy": rng.random(n) < 0.01}
for name, a in small.items():
    np.save(folder / name, a)
(folder / "meta.json").write_text(json.dumps({"key": parts, "stats": {}, "conversations": n, "tokens": N,
    "sha256": {k: tokenized._sha256_array(a) for k, a in small.items()}}))
ts = [0]*5
for i in range(5):
    t0 = time.perf_counter(); tokenized.TokenizedSet(folder); ts[i] = time.perf_counter() - t0
print(f"tokenised cache, {n:,} conversations, {N:,} tokens: open + every check {min(ts)*1e3:.0f} ms "
      f"(best of 5; median {sorted(ts)[2]*1e3:.0f} ms)")

# teacher cache: verify_shard of one shard with 1M rows (target tokens), k = 1 entry per row to keep it small
from safetensors.torch import save_file
R, s = 1_000_000, 32
entry = {"file": "train-00000.safetensors", "split": "train", "first": 0, "last": 4000, "rows": R}
tensors = {"ids": torch.zeros(R, dtype=torch.uint16), "logp": torch.zeros(R, dtype=torch.uint8),
           "width": torch.ones(R, dtype=torch.uint16), "tail": -torch.rand(R) - 0.01,
           "draws": torch.zeros(R, s, dtype=torch.uint16), "plogp": -torch.rand(R),
           "offsets": torch.linspace(0, R, 4001).long()}
path = work / "shard.safetensors"
save_file(tensors, str(path), metadata={"first": "0", "last": "4000", "ids_dtype": "uint16"})
ts = []
for _ in range(5):
    t0 = time.perf_counter(); why = cache_store.verify_shard(path, entry, 1024, s); ts.append(time.perf_counter() - t0)
assert why is None, why
print(f"teacher cache shard check, {R:,} target tokens: {min(ts)*1e3:.0f} ms (best of 5); the per-row part "
      f"(width, tail, plogp) is {10 * R / 2**20:.0f} MiB read")
from safetensors import safe_open
ts = []
for _ in range(5):
    t0 = time.perf_counter()
    with safe_open(str(path), framework="pt") as f:
        w = f.get_tensor("width").long(); int(w.sum()); int(w.min()); int(w.max())
    ts.append(time.perf_counter() - t0)
print(f"  the same shard checked before this change (width only, in torch): {min(ts)*1e3:.0f} ms")
ts = []
for _ in range(5):
    t0 = time.perf_counter()
    [np.load(folder / nm) for nm in ("offsets.npy", "truncated.npy", "dropped.npy")]
    [np.load(folder / nm, mmap_mode="r") for nm in ("tokens.npy", "trained.npy")]
    json.loads((folder / "meta.json").read_text()); ts.append(time.perf_counter() - t0)
print(f"tokenised cache open without the checks (before this change): {min(ts)*1e3:.0f} ms")
import shutil  # noqa: E402
shutil.rmtree(work)
