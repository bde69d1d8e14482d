"""What the offline teacher cache costs and what it loses (teacher_cache.py, cached_loss.sparse_neo_loss).

    python -m benchmarks.bench_cache sizes        # bytes/token and KL error against the dense loss, per k
    python -m benchmarks.bench_cache demo         # the offline demo trained from the cache vs the live teacher
    python -m benchmarks.bench --methods neo,neo-cache   # one Neo step, cache vs live teacher (tokens/s, memory)
    python -m benchmarks.bench_cache loss         # the sparse and the dense loss alone at the bench shape

`sizes`: the real SmolLM2-135M-Instruct teacher and students (train.py's untrained pruned half by
default; --student adds trained ones), on the offline held-out conversations. The teacher runs
once; for each k its rows are written as teacher_cache.py writes a shard, in two layouts: the
plain top-k (k tokens at every position) and the adaptive one teacher_cache.py writes (k per
position on average, up to --k-max, where the teacher's mass is). Bytes per target token is the
file's size over its rows; the adaptive layout is also written with --tail-samples draws per
position. Then the sparse KL of each student against the rows read back (D_K, or D_S with draws)
is compared with the dense KL(teacher ‖ student) of neo.neo_loss on the same tokens. The relative
error (KL − D) / KL is what the cache gives away: for D_K ≥ 0 by cached_loss.py's bound, up to the rounding
of the stored log-probabilities; for D_S the noise of one set of draws, of either sign.

    python -m benchmarks.bench_cache sizes --student untrained=pruned \
        --student neo-live=runs/bench_cache/demo_live_512_32/model \
        --student neo-cache=runs/bench_cache/demo_cache_512_32/model     # after `demo`: its two students

`loss`: cached_loss.sparse_neo_loss against the cached rows and neo.neo_loss against teacher hidden states,
forward + backward, on the bench batch (4 x 512 tokens, V = 49,152, bf16 hidden states and head
as under --dtype auto), alternated --repeats times; CPU time of this process, median (robust to
other jobs on the machine where wall time is not). Run `python -m benchmarks.bench --methods
neo-cache` first: it writes the batch and its rows.

`demo`: train.py's offline demo budget twice, with the live teacher and with --teacher-cache, then
the held-out KL(teacher ‖ student) of both students against the live teacher (the full KL, not
the cached one). Both runs are unpacked (--no-pack), as a cached run must be: a cache row belongs
to one example. --max-samples scales the budget down on a busy machine.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from runkit import cache_store, flags, offline, report, tokenized

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["sizes", "demo", "loss"])
    p.add_argument("--repeats", type=int, default=7, help="loss: alternations of the two losses")
    p.add_argument("--threads", type=int, default=1, help="loss: torch CPU threads")
    p.add_argument("--k", type=int, default=128, help="loss: the rows file of benchmarks/bench.py --k")
    p.add_argument("--ks", default="8,32,64,96,128,144,160,256,512", help="sizes: the k values to measure (mean per position)")
    p.add_argument("--k-max", type=int, default=1024, help="sizes: the adaptive layout's most tokens at one position")
    p.add_argument("--tail-samples", default="16,32,64", help="sizes: tail draws per position of the sampled layouts")
    p.add_argument("--student", action="append", default=None, metavar="NAME=DIR",
                   help="sizes: a student to score, repeatable (DIR 'pruned': train.py's untrained pruned half, "
                        "the default as untrained=pruned; a trained one: e.g. neo=runs/bench_cache/demo_live_512_32/model)")
    p.add_argument("--heldout", type=int, default=32, help="held-out conversations (the demo's 32)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per conversation (the demo's 512)")
    p.add_argument("--max-samples", type=int, default=None, help="demo: training conversations (default: the demo's)")
    p.add_argument("--work-dir", default="runs/bench_cache", help="caches and runs")
    p.add_argument("--output", default=None, help="JSON results (default: benchmarks/results/cache_<command>.json)")
    args = p.parse_args(argv)
    args.output = args.output or f"benchmarks/results/cache_{args.command}.json"
    return args


def student_and_teacher(work: Path, max_len: int):
    """The SmolLM2 teacher and train.py's pruned student (built once, saved under work/)."""
    import data
    import model as llama
    import train
    teacher_dir = str(llama.resolve_folder(offline.smollm2_dir()))
    student_dir = work / "student"
    if not (student_dir / "config.json").exists():
        targs = flags.parse(["--max-len", str(max_len)])
        train_set, _ = tokenized.load_splits(targs, data.Tokenizer.from_dir(teacher_dir))
        train.build_student(targs, teacher_dir, train_set, torch.device("cpu")).save_pretrained(student_dir)
    return teacher_dir, str(student_dir)


def sizes(args):
    import data
    import model as llama
    import cached_loss
    import neo
    from safetensors.torch import load_file
    work = Path(args.work_dir)
    teacher_dir, pruned_dir = student_and_teacher(work, args.max_len)
    students = dict(s.split("=", 1) for s in args.student) if args.student else {"untrained": pruned_dir}
    students = {name: pruned_dir if d == "pruned" else d for name, d in students.items()}
    teacher = llama.Llama.from_pretrained(teacher_dir).eval()
    tok = data.Tokenizer.from_dir(teacher_dir)
    _, held = tokenized.load_splits(flags.parse(["--max-len", str(args.max_len), "--heldout", str(args.heldout)]), tok)
    collate = data.Batches(held, 1, pad_id=tok.pad_token_id).collate
    batches = [collate(held[i:i + 4]) for i in range(0, len(held), 4)]   # teacher_cache.py's batches of 4
    masks = [b["labels"][:, 1:] != -100 for b in batches]
    ks = sorted(int(x) for x in args.ks.split(","))
    with torch.no_grad():
        teacher_hidden = [teacher(b["input_ids"], b["attention_mask"], return_hidden=True) for b in batches]
    n = sum(int(m.sum()) for m in masks)
    layouts = {"top-k": (lambda k: k, 0), f"adaptive (k_max {args.k_max})": (lambda k: max(k, args.k_max), 0)}
    for draws in (int(x) for x in args.tail_samples.split(",") if int(x)):
        layouts[f"adaptive + {draws} tail draws"] = (lambda k: max(k, args.k_max), draws)
    stored = {}   # (k, layout) -> (bytes per target token, the rows as the loss reads them back, tail mass)
    for k in ks:
        for layout, (k_max, draws) in layouts.items():
            # per batch of 4 conversations, as teacher_cache.write_shard calls it
            parts = [cache_store.flat(cache_store.stored(
                cached_loss.teacher_topk(th[:, :-1][m], teacher.lm_head.weight, k, k_max=k_max(k), samples=draws,
                                 generator=torch.Generator().manual_seed(i)), "uint16"))
                for i, (th, m) in enumerate(zip(teacher_hidden, masks))]
            tensors = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            path = work / f"heldout_k{k}_{k_max(k)}_s{draws}.safetensors"  # written as teacher_cache.py writes a shard
            cache_store.save_shard(path, {"split": "heldout", "first": 0, "last": len(held), "rows": n}, tensors,
                                     cache_store.targets_per_example(held),
                                     {"k": k, "k_max": k_max(k), "tail_samples": draws, "ids_dtype": "uint16"})
            back = load_file(str(path))
            top = cache_store.decoded(cache_store.unflat(**{key: back[key] for key in tensors}))
            stored[k, layout] = (path.stat().st_size / n, top, top.tail_logp.exp().mean().item(),
                                 int(top.width.max()))
    rows = []
    for name, folder in students.items():
        student = llama.Llama.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden = [student(b["input_ids"], b["attention_mask"], return_hidden=True) for b in batches]
            dense = 0.0
            for b, sh, th in zip(batches, hidden, teacher_hidden):
                out = neo.neo_loss(sh, student.lm_head.weight, th, teacher.lm_head.weight, b["labels"], normalizer=1.0)
                dense += out.kl.item() * out.n_tokens.item()
            dense /= n
            print(f"{name} ({folder}): {len(held)} held-out conversations, {n} target tokens; dense "
                  f"KL(teacher || student) = {dense:.4f} nats/token", flush=True)
            for (k, layout), (size, top, tail_mass, widest) in stored.items():
                sparse, first = 0.0, 0
                for b, sh, m in zip(batches, hidden, masks):
                    part = top.select(slice(first, first + int(m.sum())))
                    first += int(m.sum())
                    out = cached_loss.sparse_neo_loss(sh, student.lm_head.weight, part, b["labels"], normalizer=1.0)
                    sparse += out.kl.item() * out.n_tokens.item()
                sparse /= n
                row = {"student": name, "student_dir": folder, "k": k, "layout": layout, "bytes_per_token": size,
                       "kl_sparse": sparse, "kl_dense": dense, "kl_rel_error": (dense - sparse) / dense,
                       "mean_tail_mass": tail_mass, "widest_row": widest}
                rows.append(row)
                print(f"  k={k:4d} {layout:>20}: {size:6.0f} bytes/token  D_K {sparse:.4f}  "
                      f"error {100 * row['kl_rel_error']:6.3f}%  teacher tail mass {tail_mass:.4f}  "
                      f"widest row {widest}", flush=True)
    names = list(students)
    table = ["| k (mean) | layout | bytes/token | teacher tail mass | widest row | "
             + " | ".join(f"KL error, {s}" for s in names) + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(names)]
    for (k, layout), (size, _, tail_mass, widest) in stored.items():
        err = {r["student"]: r["kl_rel_error"] for r in rows if r["k"] == k and r["layout"] == layout}
        table.append(f"| {k} | {layout} | {size:.0f} | {tail_mass:.4f} | {widest} | "
                     + " | ".join(f"{100 * err[s]:.2f}%" for s in names) + " |")
    print("\n" + "\n".join(table))
    met = {s: [(r["k"], r["layout"]) for r in rows if r["student"] == s and r["bytes_per_token"] <= 512
               and abs(r["kl_rel_error"]) <= 0.01] for s in names}
    for s in names:
        print(f"target (<= 512 bytes/token at a k whose KL error <= 1%), {s}: "
              f"{'met at ' + str(met[s]) if met[s] else 'MISSED'}")
    return {"heldout_conversations": len(held), "target_tokens": n, "students": students, "rows": rows,
            "table": "\n".join(table), "target_met_at": met}


def loss(args):
    import statistics
    import cached_loss
    import neo
    torch.set_num_threads(args.threads)
    b = torch.load("runs/bench/batch_4x512.pt")
    rows = torch.load(f"runs/bench/batch_4x512_top{args.k}.pt")
    g = torch.Generator().manual_seed(0)
    V, D = 49152, 576
    hs = torch.randn(4, 512, D, generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(V, D, generator=g) * 0.05).bfloat16()
    ht = torch.randn(4, 512, D, generator=g).bfloat16()

    def sparse():
        cached_loss.sparse_neo_loss(hs, ws, cache_store.decoded(cached_loss.TeacherTopK(**rows)), b["labels"]).loss.backward()

    def dense():
        neo.neo_loss(hs, ws, ht, ws, b["labels"]).loss.backward()
    times = {"sparse": [], "dense": []}
    for _ in range(args.repeats + 1):
        for name, f in (("sparse", sparse), ("dense", dense)):
            t0 = time.process_time()
            f()
            times[name].append(time.process_time() - t0)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}  # the first is a warm-up
    print(f"{int(neo.count_targets(b['labels']))} target rows, k = {args.k}, {args.threads} thread(s): "
          f"sparse loss {med['sparse']:.3f} s CPU, dense loss {med['dense']:.3f} s CPU (forward + backward, median)")
    return {"target_rows": int(neo.count_targets(b["labels"])), "k": args.k, "threads": args.threads,
            "cpu_s": med, "cpu_s_all": times}


def demo(args):
    import model as llama
    work = Path(args.work_dir)
    budget = ["--max-len", str(args.max_len), "--heldout", str(args.heldout), "--no-pack"]  # a cache row is one example
    budget += ["--max-samples", str(args.max_samples)] if args.max_samples else []
    tag = "_".join(budget[1:4:2])
    cache = work / f"teacher_cache_{tag}"  # not demo_cache_*: that is the cached run's --out
    t0 = time.time()
    run([sys.executable, "teacher_cache.py", "--cache", str(cache)] + budget, work / "demo_cache.log")
    t_cache = time.time() - t0
    times = {}
    for name, extra in (("live", []), ("cache", ["--teacher-cache", str(cache)])):
        out = work / f"demo_{name}_{tag}"
        t0 = time.time()
        run([sys.executable, "train.py", "--out", str(out), "--no-report"] + budget + extra, out.with_suffix(".log"))
        times[name] = time.time() - t0
    # Both students against the live teacher: the full KL on the demo's held-out conversations.
    import data
    targs = flags.parse(budget)
    teacher_dir = str(llama.resolve_folder(offline.smollm2_dir()))
    tok = data.Tokenizer.from_dir(teacher_dir)
    _, held = tokenized.load_splits(targs, tok)
    batches = [data.Batches(held, 1, pad_id=tok.pad_token_id).collate(held[i:i + 4]) for i in range(0, len(held), 4)]
    teacher = llama.Llama.from_pretrained(teacher_dir).eval()
    scores = {}
    for name in ("live", "cache"):
        out = work / f"demo_{name}_{tag}"
        m = llama.Llama.from_pretrained(str(out / "model")).eval()
        ce, kl = report.heldout_scores(m, teacher, batches, torch.device("cpu"), 256, None)
        scores[name] = {"heldout_ce": ce, "heldout_kl": kl, "wall_s": times[name]}
        print(f"{name:>5}: held-out CE {ce:.4f}  KL(teacher || student) {kl:.4f}  train.py wall {times[name]:.0f} s")
    diff = abs(scores["cache"]["heldout_kl"] - scores["live"]["heldout_kl"]) / scores["live"]["heldout_kl"]
    print(f"cache written in {t_cache:.0f} s; held-out KL differs by {100 * diff:.2f}% (target <= 2%): "
          f"{'met' if diff <= 0.02 else 'MISSED'}")
    return {"budget": {k: getattr(targs, k) for k in flags.DEMO}, "cache_s": t_cache,
            "scores": scores, "kl_rel_diff": diff}


def run(cmd, log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}; see {log}:\n{log.read_text()[-2000:]}")


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    result = {"sizes": sizes, "demo": demo, "loss": loss}[args.command](args)
    blob = {"command": "python -m benchmarks.bench_cache " + " ".join(sys.argv[1:] if argv is None else argv),
            **result, "wall_s": time.time() - t0, "torch": torch.__version__}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(blob, indent=2))
    print(f"wrote {args.output}")
    return blob


if __name__ == "__main__":
    main()
