"""Peak memory and time of the chunked LLM-Neo loss against the naive full-logits loss.

The naive loss is what distillation code usually does (and the paper's reference code): project
student and teacher hidden states to full (B, T, V) logits, upcast to fp32, then F.cross_entropy
and F.kl_div; here that is neo.reference_loss on those logits. neo.neo_loss projects `chunk_size`
target rows at a time instead. Both start from
the same final hidden states and LM heads (student hidden requires grad, heads frozen as in
LLM-Neo) and run forward + backward.

Each (method, V) runs in a fresh subprocess. On CPU, "extra peak" is the growth of the process's
peak resident memory (getrusage ru_maxrss) during the first forward + backward, after the inputs
exist; on CUDA it is torch.cuda.max_memory_allocated() above the inputs. Time is the best of
--repeats further runs.

    python -m benchmarks.bench_loss                                   # V = 49152 and 128256, T=512, B=4, D=576
    python -m benchmarks.bench_loss --vocab 49152 --chunk-size 128 256 512
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import neo

ROOT = Path(__file__).resolve().parent.parent  # the repository root: workers run as `python -m benchmarks.<name>`


def naive_loss(hs, ws, ht, wt, labels):
    """Full (B, T, V) logits for student and teacher, then neo.reference_loss (fp32 inside)."""
    logits = F.linear(hs, ws)                                    # (B, T, V)
    with torch.no_grad():
        t_logits = F.linear(ht, wt)                              # (B, T, V)
    return neo.reference_loss(logits, t_logits, labels).loss     # α = 0.5, T = 1, as neo_loss's defaults


def run_one(method, V, B, T, D, chunk_size, repeats, device, train_head):
    """Runs inside the subprocess: returns extra peak bytes and best seconds."""
    torch.manual_seed(0)
    dev = torch.device(device)
    hs = torch.randn(B, T, D, device=dev, requires_grad=True)
    ws = (torch.randn(V, D, device=dev) * 0.02).requires_grad_(train_head)
    ht = torch.randn(B, T, D, device=dev)
    wt = torch.randn(V, D, device=dev) * 0.02
    labels = torch.randint(0, V, (B, T), device=dev)
    labels[:, : T // 4] = -100  # a prompt: a quarter of each row has no target

    def step():
        if method == "naive":
            loss = naive_loss(hs, ws, ht, wt, labels)
        else:
            loss = neo.neo_loss(hs, ws, ht, wt, labels, chunk_size=chunk_size).loss
        loss.backward()
        hs.grad = ws.grad = None
        return loss.item()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"extra_bytes": extra, "seconds": min(times), "loss": loss}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256], help="vocabulary sizes V")
    p.add_argument("--batch", type=int, default=4, help="B, sequences per micro-batch")
    p.add_argument("--seq", type=int, default=512, help="T, tokens per sequence")
    p.add_argument("--dim", type=int, default=576, help="D, hidden size of student and teacher")
    p.add_argument("--chunk-size", type=int, nargs="+", default=[256], help="rows per vocabulary chunk")
    p.add_argument("--repeats", type=int, default=2, help="timed runs after the measured one (best is kept)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--train-head", action="store_true", help="student LM head trainable (full KD)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement, JSON to stdout
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child:
        method, V, chunk = args.child.split(":")
        r = run_one(method, int(V), args.batch, args.seq, args.dim, int(chunk), args.repeats,
                    args.device, args.train_head)
        print(json.dumps(r))
        return

    print(f"B={args.batch} T={args.seq} D={args.dim} device={args.device} "
          f"threads={args.threads or torch.get_num_threads()} head={'trainable' if args.train_head else 'frozen'}")
    print(f"{'V':>7} {'method':>14} {'extra peak MiB':>15} {'time s':>8} {'mem ratio':>10} {'time ratio':>11} {'loss':>9}")
    common = [a for a in sys.argv[1:]]
    for V in args.vocab:
        runs = [("naive", 0)] + [("chunked", c) for c in args.chunk_size]
        naive = None
        for method, chunk in runs:
            cmd = [sys.executable, "-m", "benchmarks.bench_loss", *common, "--child", f"{method}:{V}:{chunk}"]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{V:>7} {method:>14} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            naive = naive or r
            name = method if method == "naive" else f"chunked {chunk}"
            print(f"{V:>7} {name:>14} {r['extra_bytes'] / 2**20:>15.0f} {r['seconds']:>8.2f} "
                  f"{r['extra_bytes'] / naive['extra_bytes']:>10.3f} {r['seconds'] / naive['seconds']:>11.2f} "
                  f"{r['loss']:>9.4f}")


if __name__ == "__main__":
    main()
