"""Loglikelihood speed: eval.py's NeoLM vs lm-eval's built-in hf model, same model, same requests.

The requests are the real ones lm-eval builds for the first --docs documents of each offline task
(0-shot). Per task this prints:

  tokens    the model tokens each way computes: per row (every request alone, as hf; padding not
            counted) and shared (eval.py: each group of eval.share_prefixes as a token trie, eval.pack;
            eval.fill_rows leaves almost no padding);
  bound     per-row tokens / the fewest tokens any prefix sharing can compute (every distinct prefix
            of the inputs once: a token trie), counted from the requests alone, without a model;
  seconds   wall time of each model on the task, the two alternating in one process (same dtype,
            batch size, threads), best of --repeats, after a warm-up; and the ratio hf / eval.py;
  peak MB   the most resident memory either run added above the process's resting size (Linux).

Both get the same batch size, dtype and device; HFLM keeps its defaults otherwise (including its
one-token logits cache). The last columns check the two agree: largest log-probability difference
and whether every is_greedy is the same.

    python -m benchmarks.bench_eval                                  # SmolLM2-135M-Instruct, CPU, fp32
    python -m benchmarks.bench_eval --docs 200 --threads 2           # the results page's measurement
"""
import argparse
import ctypes
import os
import time

import torch

TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa"


def trie_tokens(inputs: list[list[int]]) -> int:
    """Distinct non-empty prefixes of the inputs: sorted, each input adds what it does not share with the one before."""
    import eval as neo_eval
    inputs = sorted(inputs)
    return sum(len(x) - (neo_eval.common_prefix(x, prev) if prev else 0)
               for prev, x in zip([None] + inputs[:-1], inputs))


def model_inputs(lm, requests) -> list[list[int]]:
    """What each request feeds the model: context + continuation, cut as HFLM cuts it, without the last token."""
    inputs = []
    for r in requests:
        context, cont = r.args
        ctx_ids, cont_ids = (lm._encode_pair(context, cont) if context
                             else ([lm.prefix_token_id], lm.tok_encode(cont, add_special_tokens=False)))
        inputs.append((ctx_ids + cont_ids)[-(lm.max_length + 1):-1])
    return inputs


def peak_rss_mb(run):
    """(run(), the most resident memory in MB the call added above the resting size), or None on non-Linux."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed memory back first, so the rest size is honest
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM, the peak resident size, to the current one
        rest = _status_kb("VmRSS")
    except OSError:
        return run(), None
    out = run()
    return out, (_status_kb("VmHWM") - rest) / 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--tasks", default=TASKS, help="offline tasks to take requests from")
    p.add_argument("--docs", type=int, default=40, help="documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, for both models")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights dtype for both")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per model and task (the best one counts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--count-only", action="store_true", help="only the token columns (no model runs): fast")
    p.add_argument("--chunk-docs", type=int, default=8, help="documents per timed chunk (the two models alternate)")
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
    names = args.tasks.split(",")
    loaded = neo_eval.task_manager("offline").load(names)["tasks"]
    requests = {}
    for name in names:
        task = loaded[name]
        task.build_all_requests(limit=args.docs)
        requests[name] = [inst for inst in task.instances if inst.request_type == "loglikelihood"]
    print(f"{sum(map(len, requests.values()))} loglikelihood requests from {args.docs} documents of each of "
          f"{args.tasks}; {folder}; {args.dtype} on {args.device}; batch {args.batch_size}; "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")

    neo = neo_eval.NeoLM(folder, device=args.device, dtype=args.dtype, batch_size=args.batch_size)

    # Tokens, from the requests alone.
    tokens = {}
    for name, reqs in requests.items():
        inputs = model_inputs(neo, reqs)
        groups = neo_eval.share_prefixes(inputs, max_row=neo.max_length)
        tokens[name] = (sum(map(len, inputs)), sum(neo_eval.trie_length(inputs, g) for g in groups),
                        trie_tokens(inputs))

    if args.count_only:
        print(f"{'task':<14}{'requests':>9}{'per-row tok':>12}{'shared tok':>11}{'tok ratio':>10}{'bound':>7}")
        for name, (row, shared, trie) in [*tokens.items(), ("all", [sum(t) for t in zip(*tokens.values())])]:
            n = sum(map(len, requests.values())) if name == "all" else len(requests[name])
            print(f"{name:<14}{n:>9}{row:>12}{shared:>11}{row / shared:>9.2f}x{row / trie:>6.2f}x")
        return

    # Wall time and memory, the two models alternating chunk by chunk (a few whole documents each,
    # so a question's choices stay together): each chunk's best of --repeats, summed per task. On a
    # shared machine a burst of another job then costs one chunk's repeat, not a whole task's.
    models = {"neo": neo, "hf": HFLM(pretrained=folder, device=args.device, dtype=args.dtype,
                                     batch_size=args.batch_size)}
    for lm in models.values():
        lm.loglikelihood(requests[names[0]][:args.batch_size], disable_tqdm=True)  # warm-up
    chunks = {name: [[r for r in reqs if start <= r.doc_id < start + args.chunk_docs]
                     for start in range(0, args.docs, args.chunk_docs)] for name, reqs in requests.items()}
    best = {}  # (task, chunk, model) -> (wall s, CPU s), each the least over the repeats
    peak = {(n, m): 0.0 for n in names for m in models}
    chunk_scores = {}
    for _ in range(args.repeats):
        for name in names:
            for c, chunk in enumerate(chunks[name]):
                for m, lm in models.items():
                    def timed():
                        t0, c0 = time.perf_counter(), time.process_time()
                        out = lm.loglikelihood(chunk, disable_tqdm=True)
                        return out, time.perf_counter() - t0, time.process_time() - c0
                    (chunk_scores[name, c, m], wall, cpu), mb = peak_rss_mb(timed)
                    old = best.get((name, c, m), (float("inf"), float("inf")))
                    best[name, c, m] = (min(old[0], wall), min(old[1], cpu))
                    peak[name, m] = max(peak[name, m], mb) if mb is not None else float("nan")
    seconds = {(n, m): sum(best[n, c, m][0] for c in range(len(chunks[n]))) for n in names for m in models}
    cpu_seconds = {(n, m): sum(best[n, c, m][1] for c in range(len(chunks[n]))) for n in names for m in models}
    scores = {(n, m): [x for c in range(len(chunks[n])) for x in chunk_scores[n, c, m]] for n in names for m in models}
    requests = {n: [r for chunk in chunks[n] for r in chunk] for n in names}

    # The table.
    head = (f"{'task':<14}{'requests':>9}{'per-row tok':>12}{'shared tok':>11}{'tok ratio':>10}{'bound':>7}"
            f"{'neo s':>8}{'hf s':>8}{'speed-up':>9}{'CPU-time':>9}{'neo MB':>8}{'hf MB':>7}{'max |dlogp|':>12}"
            f"{'greedy':>8}")
    print(head)
    total = {"n": 0, "row": 0, "shared": 0, "trie": 0, "neo": 0.0, "hf": 0.0, "neo_cpu": 0.0, "hf_cpu": 0.0,
             "neo_mb": 0.0, "hf_mb": 0.0, "diff": 0.0, "same": True}

    def line(name, n, row, shared, trie, t_neo, t_hf, cpu_neo, cpu_hf, mb_neo, mb_hf, diff, same):
        return (f"{name:<14}{n:>9}{row:>12}{shared:>11}{row / shared:>9.2f}x{row / trie:>6.2f}x"
                f"{t_neo:>8.2f}{t_hf:>8.2f}{t_hf / t_neo:>8.2f}x{cpu_hf / cpu_neo:>8.2f}x"
                f"{mb_neo:>8.0f}{mb_hf:>7.0f}{diff:>12.1e}"
                f"{'same' if same else 'DIFFER':>8}")

    for name in names:
        row, shared, trie = tokens[name]
        ours, theirs = scores[name, "neo"], scores[name, "hf"]
        diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
        same = all(a[1] == b[1] for a, b in zip(ours, theirs))
        print(line(name, len(requests[name]), row, shared, trie, seconds[name, "neo"], seconds[name, "hf"],
                   cpu_seconds[name, "neo"], cpu_seconds[name, "hf"], peak[name, "neo"], peak[name, "hf"], diff, same))
        for key, value in (("n", len(requests[name])), ("row", row), ("shared", shared), ("trie", trie),
                           ("neo", seconds[name, "neo"]), ("hf", seconds[name, "hf"]),
                           ("neo_cpu", cpu_seconds[name, "neo"]), ("hf_cpu", cpu_seconds[name, "hf"])):
            total[key] += value
        total["neo_mb"], total["hf_mb"] = max(total["neo_mb"], peak[name, "neo"]), max(total["hf_mb"], peak[name, "hf"])
        total["diff"], total["same"] = max(total["diff"], diff), total["same"] and same
    print(line("all", *total.values()))
    print("tok ratio = per-row / shared tokens (what eval.py computes); bound = per-row / fewest tokens any prefix "
          "sharing computes; speed-up = hf wall seconds / neo wall seconds; CPU-time = the same ratio of this "
          "process's CPU seconds; MB = peak resident memory added by a run")


if __name__ == "__main__":
    main()
