"""What the offline teacher cache costs and what it loses (teacher_cache.py, neo.sparse_neo_loss).

    python -m benchmarks.bench_cache sizes        # bytes/token and KL error against the dense loss, per k
    python -m benchmarks.bench_cache demo         # the offline demo trained from the cache vs the live teacher
    python -m benchmarks.bench --methods neo,neo-cache   # one Neo step, cache vs live teacher (tokens/s, memory)
    python -m benchmarks.bench_cache loss         # the sparse and the dense loss alone at the bench shape

`sizes`: the real SmolLM2-135M-Instruct teacher and students (train.py's untrained pruned half by
default; --student adds trained ones), on the offline held-out conversations. The teacher runs
once; for each k its rows are written as teacher_cache.py writes a shard, twice: with uint8
log-prob codes (the format it writes) and with fp16 log-probabilities (the format before it), so
bytes per target token is the file's size over its rows. Then the sparse KL D_K of each student
against the rows read back is compared with the dense KL(teacher ‖ student) of neo.neo_loss on the
same tokens. The relative error (KL − D_K) / KL is what the cache gives away: by neo.py's bound
≥ 0 up to the rounding of the stored log-probabilities, which the two formats show.

    python -m benchmarks.bench_cache sizes --student untrained=pruned \
        --student neo-live=runs/bench_cache/demo_live_256_32/model \
        --student neo-cache64=runs/bench_cache/demo_cache_256_32/model   # after `demo`: its two students

`loss`: neo.sparse_neo_loss against the cached rows and neo.neo_loss against teacher hidden states,
forward + backward, on the bench batch (4 x 512 tokens, V = 49,152, bf16 hidden states and head
as under --dtype auto), alternated --repeats times; CPU time of this process, median (robust to
other jobs on the machine where wall time is not). Run `python -m benchmarks.bench --methods
neo-cache` first: it writes the batch and its rows.

`demo`: train.py's offline demo budget twice, with the live teacher and with --teacher-cache, then
the held-out KL(teacher ‖ student) of both students against the live teacher (the full KL, not
the cached one). --max-samples scales the budget down on a busy machine.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["sizes", "demo", "loss"])
    p.add_argument("--repeats", type=int, default=7, help="loss: alternations of the two losses")
    p.add_argument("--threads", type=int, default=1, help="loss: torch CPU threads")
    p.add_argument("--k", type=int, default=160, help="loss: the rows file of benchmarks/bench.py --k")
    p.add_argument("--ks", default="8,32,64,128,160,256,512", help="sizes: the k values to measure")
    p.add_argument("--student", action="append", default=None, metavar="NAME=DIR",
                   help="sizes: a student to score, repeatable (DIR 'pruned': train.py's untrained pruned half, "
                        "the default as untrained=pruned; a trained one: e.g. neo=runs/bench_cache/demo_live_256_32/model)")
    p.add_argument("--heldout", type=int, default=32, help="held-out conversations (the demo's 32)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per conversation (the demo's 256)")
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
    teacher_dir = str(llama.resolve_folder(train.offline_model()))
    student_dir = work / "student"
    if not (student_dir / "config.json").exists():
        targs = train.parse_args(["--max-len", str(max_len)])
        train_set, _ = train.load_data(targs, data.Tokenizer.from_dir(teacher_dir))
        train.build_student(targs, teacher_dir, train_set[0]["input_ids"], torch.device("cpu")).save_pretrained(student_dir)
    return teacher_dir, str(student_dir)


def sizes(args):
    import data
    import model as llama
    import neo
    import teacher_cache
    import train
    from safetensors.torch import load_file
    work = Path(args.work_dir)
    teacher_dir, pruned_dir = student_and_teacher(work, args.max_len)
    students = dict(s.split("=", 1) for s in args.student) if args.student else {"untrained": pruned_dir}
    students = {name: pruned_dir if d == "pruned" else d for name, d in students.items()}
    teacher = llama.Llama.from_pretrained(teacher_dir).eval()
    tok = data.Tokenizer.from_dir(teacher_dir)
    _, held = train.load_data(train.parse_args(["--max-len", str(args.max_len), "--heldout", str(args.heldout)]), tok)
    collate = data.Batches(held, 1, pad_id=tok.pad_token_id).collate
    batches = [collate(held[i:i + 4]) for i in range(0, len(held), 4)]
    ks = sorted(int(x) for x in args.ks.split(","))
    with torch.no_grad():  # one teacher forward; the top-k of every smaller k is a prefix of the largest
        teacher_hidden = [teacher(b["input_ids"], b["attention_mask"], return_hidden=True) for b in batches]
        tops = [neo.teacher_topk(th[:, :-1][b["labels"][:, 1:] != -100], teacher.lm_head.weight, ks[-1])
                for b, th in zip(batches, teacher_hidden)]
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    stored = {}   # (k, format) -> (bytes per target token, the rows as the loss reads them back)
    for k in ks:
        # top-k from the top-k_max: the first k columns; the tail gains the columns k..k_max
        top = neo.TeacherTopK(torch.cat([t.ids[:, :k] for t in tops]), torch.cat([t.logp[:, :k] for t in tops]),
                              torch.cat([torch.logsumexp(torch.cat([t.tail_logp[:, None], t.logp[:, k:]], 1), 1)
                                         for t in tops]))
        entry = {"split": "heldout", "first": 0, "last": len(held), "rows": top.ids.shape[0]}
        uint8 = teacher_cache.stored(top, "uint16")          # the format teacher_cache.py writes
        for fmt, rows in (("fp16", uint8._replace(logp=top.logp.half())), ("uint8", uint8)):
            path = work / f"heldout_k{k}_{fmt}.safetensors"   # written exactly as teacher_cache.py writes a shard
            teacher_cache.save_shard(path, entry, rows, teacher_cache.targets_per_example(held),
                                     {"k": k, "ids_dtype": "uint16"})
            back = load_file(str(path))
            logp = back["logp"] if fmt == "fp16" else teacher_cache.dequantise_logp(back["logp"], back["tail"])
            stored[k, fmt] = (path.stat().st_size / n, neo.TeacherTopK(back["ids"].long(), logp, back["tail"]))
    tail_mass = {k: stored[k, "uint8"][1].tail_logp.exp().mean().item() for k in ks}
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
            for (k, fmt), (size, top) in stored.items():
                sparse, first = 0.0, 0
                for b, sh in zip(batches, hidden):
                    m = int((b["labels"][:, 1:] != -100).sum())
                    part = neo.TeacherTopK(*(t[first:first + m] for t in top))
                    first += m
                    out = neo.sparse_neo_loss(sh, student.lm_head.weight, part, b["labels"], normalizer=1.0)
                    sparse += out.kl.item() * out.n_tokens.item()
                sparse /= n
                row = {"student": name, "student_dir": folder, "k": k, "logp": fmt, "bytes_per_token": size,
                       "kl_sparse": sparse, "kl_dense": dense, "kl_rel_error": (dense - sparse) / dense,
                       "mean_tail_mass": tail_mass[k]}
                rows.append(row)
                print(f"  k={k:4d} {fmt:>5} log-probs: {size:6.0f} bytes/token  D_K {sparse:.4f}  "
                      f"error {100 * row['kl_rel_error']:6.3f}%  teacher tail mass {tail_mass[k]:.4f}", flush=True)
    names = list(students)
    table = ["| k | bytes/token, fp16 log-probs | bytes/token, uint8 | teacher tail mass | "
             + " | ".join(f"KL error, {s} (fp16 / uint8)" for s in names) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(names)]
    for k in ks:
        err = {(r["student"], r["logp"]): r["kl_rel_error"] for r in rows if r["k"] == k}
        table.append(f"| {k} | {stored[k, 'fp16'][0]:.0f} | {stored[k, 'uint8'][0]:.0f} | {tail_mass[k]:.4f} | "
                     + " | ".join(f"{100 * err[s, 'fp16']:.2f}% / {100 * err[s, 'uint8']:.2f}%" for s in names) + " |")
    print("\n" + "\n".join(table))
    met = {s: [(r["k"], r["logp"]) for r in rows if r["student"] == s and r["bytes_per_token"] <= 512
               and r["kl_rel_error"] <= 0.01] for s in names}
    for s in names:
        print(f"target (<= 512 bytes/token at a k whose KL error <= 1%), {s}: "
              f"{'met at ' + str(met[s]) if met[s] else 'MISSED'}")
    return {"heldout_conversations": len(held), "target_tokens": n, "students": students, "rows": rows,
            "table": "\n".join(table), "target_met_at": met}


def loss(args):
    import statistics
    import neo
    import teacher_cache
    torch.set_num_threads(args.threads)
    b = torch.load("runs/bench/batch_4x512.pt")
    rows = torch.load(f"runs/bench/batch_4x512_top{args.k}.pt")
    g = torch.Generator().manual_seed(0)
    V, D = 49152, 576
    hs = torch.randn(4, 512, D, generator=g).bfloat16().requires_grad_()
    ws = (torch.randn(V, D, generator=g) * 0.05).bfloat16()
    ht = torch.randn(4, 512, D, generator=g).bfloat16()

    def sparse():
        top = neo.TeacherTopK(rows["ids"].long(), teacher_cache.dequantise_logp(rows["logp"], rows["tail_logp"]),
                              rows["tail_logp"])
        neo.sparse_neo_loss(hs, ws, top, b["labels"]).loss.backward()

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
    import train
    work = Path(args.work_dir)
    budget = ["--max-len", str(args.max_len), "--heldout", str(args.heldout)]
    budget += ["--max-samples", str(args.max_samples)] if args.max_samples else []
    tag = "_".join(budget[1::2])
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
    targs = train.parse_args(budget)
    teacher_dir = str(llama.resolve_folder(train.offline_model()))
    tok = data.Tokenizer.from_dir(teacher_dir)
    _, held = train.load_data(targs, tok)
    batches = [data.Batches(held, 1, pad_id=tok.pad_token_id).collate(held[i:i + 4]) for i in range(0, len(held), 4)]
    teacher = llama.Llama.from_pretrained(teacher_dir).eval()
    scores = {}
    for name in ("live", "cache"):
        out = work / f"demo_{name}_{tag}"
        m = llama.Llama.from_pretrained(str(out / "model")).eval()
        ce, kl = train.heldout_scores(m, teacher, batches, torch.device("cpu"), 256, None)
        scores[name] = {"heldout_ce": ce, "heldout_kl": kl, "wall_s": times[name]}
        print(f"{name:>5}: held-out CE {ce:.4f}  KL(teacher || student) {kl:.4f}  train.py wall {times[name]:.0f} s")
    diff = abs(scores["cache"]["heldout_kl"] - scores["live"]["heldout_kl"]) / scores["live"]["heldout_kl"]
    print(f"cache written in {t_cache:.0f} s; held-out KL differs by {100 * diff:.2f}% (target <= 2%): "
          f"{'met' if diff <= 0.02 else 'MISSED'}")
    return {"budget": {k: getattr(targs, k) for k in train.DEMO}, "cache_s": t_cache,
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
