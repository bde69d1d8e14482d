"""Data at the paper's scale: how fast conversations tokenise, how much padding packing removes, and
what that is worth in trained tokens per second.

    python -m benchmarks.bench_data                               # all three parts, 1,000,000 conversations
    python -m benchmarks.bench_data --conversations 100000 --parts tokenize

1. tokenize: N conversations (the offline set repeated: as is, two joined into one multi-turn chat,
   or with the reply cut in half, each with a unique first line) written as JSONL, then
   tokenised into a fresh cache by tokenized.load (hashing, reading, rendering, encoding,
   writing, worker processes: everything a first training run pays). Wall time, CPU time
   (this process + its workers) and peak resident memory (this process's, each worker's own, and
   the largest total seen at once, sampled from /proc). Before that, on a sample, the old
   one-by-one path (data.tokenize_conversation) against the batched one, interleaved.
2. padding: the offline training set at --max-len, batches of --batch-size as train.py draws
   them (seeded shuffle), unpacked vs --pack: the share of padding and the targets per batch.
3. steps: neo at the bench shape (SmolLM2-135M teacher -> its pruned half, rank 128,
   batch 4 x 512) on real batches of the offline set, unpacked vs packed, interleaved: real
   target tokens (labels that train) per second.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import data  # noqa: E402
import model as llama  # noqa: E402
import neo  # noqa: E402
from runkit import files, flags, offline, tokenized  # noqa: E402
from runkit.distributed import Dist  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process and its (finished) worker processes."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class TreeMemory:
    """Peak resident memory of this process and its children while it is open, read from /proc.

    getrusage cannot give a worker's own peak: a spawned child's ru_maxrss starts from the parent's
    resident size at the fork before exec, so every worker would look as large as the reading
    process. /proc/PID/status's VmHWM is the peak of the process's own memory; the total is the
    largest sum of VmRSS over the tree seen at one sample (every `every` seconds)."""

    def __init__(self, every: float = 0.25):
        self.every, self.workers, self.total = every, {}, 0  # workers: pid -> VmHWM (bytes)
        self.done = threading.Event()

    @staticmethod
    def _status(pid) -> dict:
        try:
            with open(f"/proc/{pid}/status") as f:
                return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                        if k in ("VmRSS", "VmHWM")}
        except (OSError, ValueError):  # the process has just ended
            return {}

    def sample(self):
        kids = []
        for task in os.listdir("/proc/self/task"):
            try:
                kids += Path(f"/proc/self/task/{task}/children").read_text().split()
            except OSError:
                pass
        total = self._status("self").get("VmRSS", 0)
        for pid in kids:
            status = self._status(pid)
            total += status.get("VmRSS", 0)
            self.workers[pid] = max(self.workers.get(pid, 0), status.get("VmHWM", 0))
        self.total = max(self.total, total)

    def _run(self):
        while not self.done.wait(self.every):
            self.sample()

    def __enter__(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def write_conversations(path: Path, n: int):
    """The offline training set repeated to n conversations with varied lengths, streamed to JSONL."""
    chats = [r["messages"] for r in offline.chat_dataset("train")]
    with open(path, "w") as f:
        for j in range(n):
            base = chats[j % len(chats)]
            kind = (j // len(chats) + j) % 3
            if kind == 1:    # two conversations as one multi-turn chat
                messages = base + chats[(7 * j + 1) % len(chats)]
            elif kind == 2:  # a shorter reply
                reply = base[-1]["content"]
                messages = base[:-1] + [{"role": "assistant", "content": reply[:max(1, len(reply) // 2)]}]
            else:
                messages = base
            messages = [{**messages[0], "content": f"Request {j}. {messages[0]['content']}"}, *messages[1:]]
            f.write(json.dumps({"messages": messages}) + "\n")


def bench_tokenize(args, tok, work: Path) -> dict:
    path = work / f"chat_{args.conversations}.jsonl"
    if not path.exists():
        t0 = time.time()
        write_conversations(path, args.conversations)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.time() - t0:.0f} s", flush=True)

    # One by one (the old path) against the batched encoder, on the same sample, interleaved.
    sample = list(islice(files.iter_conversations(path), args.sample))
    timing = {"one_by_one": [], "batched": []}
    for _ in range(2):
        for name in timing:
            w, c = time.time(), time.process_time()
            if name == "one_by_one":
                [data.tokenize_conversation(tok, m, args.max_len) for m in sample]
            else:
                data.encode_conversations(tok, sample, args.max_len)
            timing[name].append(((time.time() - w) / len(sample) * 1e6, (time.process_time() - c) / len(sample) * 1e6))
    per_conversation = {name: {"wall_us": min(t[0] for t in v), "cpu_us": min(t[1] for t in v)}
                        for name, v in timing.items()}

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    w, c = time.time(), cpu_seconds()
    with TreeMemory() as memory:
        store = tokenized.load(path, tok, args.max_len, root=cache, workers=args.workers)
    wall, cpu = time.time() - w, cpu_seconds() - c
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    worker_peak = max(memory.workers.values(), default=0) / 2**30
    workers = args.workers or len(os.sched_getaffinity(0))
    return {"conversations": len(store), "tokens": store.meta["tokens"], "file_gb": path.stat().st_size / 1e9,
            "cache_gb": sum(f.stat().st_size for f in store.folder.iterdir()) / 1e9, "wall_s": wall, "cpu_s": cpu,
            "workers": workers, "peak_gb_main": own_peak, "peak_gb_largest_worker": worker_peak,
            "peak_gb_total_bound": own_peak + workers * worker_peak, "peak_gb_total_sampled": memory.total / 2**30,
            "per_conversation": per_conversation,
            "sample": len(sample)}


def offline_examples(tok, max_len):
    store = tokenized.load("offline", tok, max_len)
    return store.select(range(len(store)))


def bench_padding(args, tok) -> dict:
    examples = offline_examples(tok, args.max_len)
    out = {}
    for name, rows in (("unpacked", examples), ("packed", data.pack(examples, args.max_len, seed=0))):
        real = slots = targets = n = 0
        for b in data.Batches(rows, args.batch_size, pad_id=tok.pad_token_id, seed=0):
            real += int(b["attention_mask"].sum())
            slots += b["attention_mask"].numel()
            targets += int(neo.count_targets(b["labels"]))
            n += 1
        out[name] = {"batches": n, "padding": 1 - real / slots, "tokens_per_batch": real / n,
                     "targets_per_batch": targets / n, "width": slots / n / args.batch_size}
    return out


def bench_steps(args, tok) -> dict:
    import train
    teacher_dir = str(offline.smollm2_dir())
    examples = offline_examples(tok, args.max_len)
    targs = flags.parse(["--teacher", teacher_dir, "--rank", str(args.rank), "--method", "neo"])
    device = torch.device("cpu")
    teacher = llama.Llama.from_pretrained(teacher_dir).eval().requires_grad_(False)
    student = train.prepare_student(train.build_student(targs, teacher_dir, examples, device),
                                    targs, device)
    distiller = neo.Distiller(student, teacher, targs.alpha, targs.temperature, targs.divergence, targs.chunk_size)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr)
    ctx = train.Step(distiller, optimizer, params, None, targs, Dist(), Path(args.work_dir), tok)

    def step(b):  # train.py's step, on one micro-batch
        train.train_step(ctx, [b], targs.lr, 0)

    loaders = {"unpacked": iter(data.Batches(examples, args.batch_size, pad_id=tok.pad_token_id, seed=0)),
               "packed": iter(data.Batches(data.pack(examples, args.max_len, seed=0), args.batch_size,
                                           pad_id=tok.pad_token_id, seed=0))}
    times, targets, tokens, widths = ({k: [] for k in loaders} for _ in range(4))
    for i in range(args.warmup + args.steps):  # interleaved, so both see the same machine load
        for name, loader in loaders.items():
            b = next(loader)
            t0 = time.time()
            step(b)
            if i >= args.warmup:
                times[name].append(time.time() - t0)
                targets[name].append(int(neo.count_targets(b["labels"])))
                tokens[name].append(int(b["attention_mask"].sum()))
                widths[name].append(b["input_ids"].shape[1])
            print(f"  {name:8} step {i}: {time.time() - t0:.1f} s, {b['input_ids'].shape}", flush=True)
    return {name: {"step_s_median": statistics.median(times[name]), "targets_per_step": statistics.mean(targets[name]),
                   "tokens_per_step": statistics.mean(tokens[name]), "width_mean": statistics.mean(widths[name]),
                   "target_tokens_per_s": sum(targets[name]) / sum(times[name]),
                   "real_tokens_per_s": sum(tokens[name]) / sum(times[name])} for name in loaders}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="tokenize,padding,steps", help="comma-separated: tokenize, padding, steps")
    p.add_argument("--conversations", type=int, default=1_000_000, help="conversations to tokenise")
    p.add_argument("--sample", type=int, default=5000, help="conversations for the one-by-one vs batched timing")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: one per core)")
    flags.add(p, "max_len", "batch_size", "rank", max_len=512, batch_size=4)  # train.py's
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--work-dir", default="runs/bench_data", help="the generated JSONL and its cache (large)")
    p.add_argument("--output", default="benchmarks/results/bench_data.json", help="JSON results (merged)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tok = data.Tokenizer.from_dir(offline.smollm2_dir())
    command = "python -m benchmarks.bench_data " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.output)
    results = json.loads(out.read_text()) if out.exists() else {}
    load = os.getloadavg()
    parts = {"tokenize": lambda: bench_tokenize(args, tok, work), "padding": lambda: bench_padding(args, tok),
             "steps": lambda: bench_steps(args, tok)}
    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        res = parts[part]()
        res["command"], res["load_average_at_start"] = command, load
        results[part] = res
        print(json.dumps(res, indent=2), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
