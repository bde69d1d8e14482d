"""Loglikelihood throughput: eval.py's NeoLM vs lm-eval's built-in hf model, same model, same requests.

The requests are the real ones lm-eval builds for the first --docs documents of each offline task
(0-shot), scored by each model after a short warm-up, alternating, best of --repeats runs. Both get the same batch size, dtype and
device; HFLM keeps its defaults otherwise (including its one-token logits cache).

    python -m benchmarks.bench_eval                                  # SmolLM2-135M-Instruct, CPU, fp32
    python -m benchmarks.bench_eval --model DIR --tasks arc_easy,hellaswag --docs 100 --batch-size 16
"""
import argparse
import os
import time

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default="arc_easy,hellaswag,piqa,winogrande", help="offline tasks to take requests from")
    p.add_argument("--docs", type=int, default=40, help="documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, for both models")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights dtype for both")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per model (the best one counts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    import datasets
    import eval as neo_eval
    from runkit import offline
    from lm_eval.models.huggingface import HFLM

    datasets.disable_progress_bars()

    folder = args.model or str(offline.smollm2_dir())
    tasks = neo_eval.task_manager("offline").load(args.tasks.split(","))["tasks"]
    requests = []
    for task in tasks.values():
        task.build_all_requests(limit=args.docs)
        requests += [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    print(f"{len(requests)} loglikelihood requests from {args.docs} documents of each of {args.tasks}; "
          f"{folder}; {args.dtype} on {args.device}; batch {args.batch_size}; {torch.get_num_threads()} threads")

    models = {
        "neo (eval.py)": neo_eval.NeoLM(folder, device=args.device, dtype=args.dtype, batch_size=args.batch_size),
        "hf (lm-eval)": HFLM(pretrained=folder, device=args.device, dtype=args.dtype, batch_size=args.batch_size),
    }
    results, seconds = {}, {name: float("inf") for name in models}
    for lm in models.values():
        lm.loglikelihood(requests[:args.batch_size], disable_tqdm=True)  # warm-up
    for _ in range(args.repeats):  # alternate the two, keep each one's best time: the CPU may be shared
        for name, lm in models.items():
            t0 = time.perf_counter()
            results[name] = lm.loglikelihood(requests, disable_tqdm=True)
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
    ours, theirs = results.values()
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    neo = models["neo (eval.py)"]
    tokens = sum(len(ctx) + len(cont) for ctx, cont in (neo._encode_pair(*r.args) for r in requests))
    for name in models:
        print(f"{name:>14}: {seconds[name]:7.2f} s  {len(requests) / seconds[name]:7.1f} requests/s  "
              f"{tokens / seconds[name]:8.0f} tokens/s")
    print(f"speed-up {seconds['hf (lm-eval)'] / seconds['neo (eval.py)']:.2f}x; "
          f"largest log-likelihood difference {diff:.2e}")


if __name__ == "__main__":
    main()
