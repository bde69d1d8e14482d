"""What the offline teacher cache costs and what it loses (teacher_cache.py, neo.sparse_neo_loss).

    python -m benchmarks.bench_cache sizes        # bytes/token and KL error against the dense loss, per k
    python -m benchmarks.bench_cache demo         # the offline demo trained from the cache vs the live teacher
    python -m benchmarks.bench --methods neo,neo-cache   # one Neo step, cache vs live teacher (tokens/s, memory)

`sizes`: the real SmolLM2-135M-Instruct teacher and train.py's pruned half as the student, on the
offline held-out conversations. The teacher runs once; for each k its rows are written as
teacher_cache.py writes a shard (bytes per target token is the file's size over its rows), then the
sparse KL D_K of the student against it is compared with the dense KL(teacher ‖ student) of
neo.neo_loss on the same tokens. The relative error (KL − D_K) / KL is what the cache gives away:
always ≥ 0 up to the fp16 rounding of the stored log-probabilities (neo.py's bound).

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
    p.add_argument("command", choices=["sizes", "demo"])
    p.add_argument("--ks", default="8,32,64,128", help="sizes: the k values to measure")
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
    teacher_dir, student_dir = student_and_teacher(work, args.max_len)
    teacher = llama.Llama.from_pretrained(teacher_dir).eval()
    student = llama.Llama.from_pretrained(student_dir).eval()
    tok = data.Tokenizer.from_dir(teacher_dir)
    _, held = train.load_data(train.parse_args(["--max-len", str(args.max_len), "--heldout", str(args.heldout)]), tok)
    collate = data.Batches(held, 1, pad_id=tok.pad_token_id).collate
    batches = [collate(held[i:i + 4]) for i in range(0, len(held), 4)]
    ks = sorted(int(x) for x in args.ks.split(","))
    dense = n = 0.0
    student_hidden, tops = [], []
    with torch.no_grad():  # one teacher forward; the top-k of every smaller k is a prefix of the largest
        for b in batches:
            th = teacher(b["input_ids"], b["attention_mask"], return_hidden=True)
            sh = student(b["input_ids"], b["attention_mask"], return_hidden=True)
            out = neo.neo_loss(sh, student.lm_head.weight, th, teacher.lm_head.weight, b["labels"], normalizer=1.0)
            dense, n = dense + out.kl.item() * out.n_tokens.item(), n + out.n_tokens.item()
            mask = b["labels"][:, 1:] != -100
            student_hidden.append(sh)
            tops.append(neo.teacher_topk(th[:, :-1][mask], teacher.lm_head.weight, ks[-1]))
    dense /= n
    print(f"held-out: {len(held)} conversations, {int(n)} target tokens; dense KL(teacher || student) "
          f"= {dense:.4f} nats/token", flush=True)
    rows = []
    for k in ks:
        # top-k from the top-k_max: the first k columns; the tail gains the columns k..k_max
        top = neo.TeacherTopK(torch.cat([t.ids[:, :k] for t in tops]), torch.cat([t.logp[:, :k] for t in tops]),
                              torch.cat([torch.logsumexp(torch.cat([t.tail_logp[:, None], t.logp[:, k:]], 1), 1)
                                         for t in tops]))
        path = work / f"heldout_k{k}.safetensors"    # written exactly as teacher_cache.py writes a shard
        entry = {"split": "heldout", "first": 0, "last": len(held), "rows": top.ids.shape[0]}
        teacher_cache.save_shard(path, entry, teacher_cache.stored(top, "uint16"),
                                 teacher_cache.targets_per_example(held), {"k": k, "ids_dtype": "uint16"})
        size, back = path.stat().st_size, load_file(str(path))
        sparse, first = 0.0, 0
        with torch.no_grad():
            for b, sh in zip(batches, student_hidden):
                m = int((b["labels"][:, 1:] != -100).sum())
                rows_b = neo.TeacherTopK(back["ids"][first:first + m].long(), back["logp"][first:first + m],
                                         back["tail"][first:first + m])
                first += m
                out = neo.sparse_neo_loss(sh, student.lm_head.weight, rows_b, b["labels"], normalizer=1.0)
                sparse += out.kl.item() * out.n_tokens.item()
        sparse /= n
        row = {"k": k, "bytes_per_token": size / n, "kl_sparse": sparse, "kl_dense": dense,
               "kl_rel_error": (dense - sparse) / dense, "mean_tail_mass": back["tail"].exp().mean().item()}
        rows.append(row)
        print(f"k={k:4d}: {row['bytes_per_token']:6.0f} bytes/token  D_K {sparse:.4f}  KL {dense:.4f}  "
              f"error {100 * row['kl_rel_error']:6.3f}%  teacher tail mass {row['mean_tail_mass']:.4f}", flush=True)
    table = ["| k | bytes/token | D_K (nats/token) | KL error | teacher tail mass |", "|---:|---:|---:|---:|---:|"]
    table += [f"| {r['k']} | {r['bytes_per_token']:.0f} | {r['kl_sparse']:.4f} | {100 * r['kl_rel_error']:.2f}% | "
              f"{r['mean_tail_mass']:.4f} |" for r in rows]
    print("\n" + "\n".join(table))
    ok = [r["k"] for r in rows if r["bytes_per_token"] <= 512 and r["kl_rel_error"] <= 0.01]
    print(f"target (<= 512 bytes/token at a k whose KL error <= 1%): {'met at k = ' + str(ok) if ok else 'MISSED'}")
    return {"heldout_conversations": len(held), "target_tokens": int(n), "dense_kl": dense, "rows": rows,
            "table": "\n".join(table), "target_met_at_k": ok}


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
    result = sizes(args) if args.command == "sizes" else demo(args)
    blob = {"command": "python -m benchmarks.bench_cache " + " ".join(sys.argv[1:] if argv is None else argv),
            **result, "wall_s": time.time() - t0, "torch": torch.__version__}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(blob, indent=2))
    print(f"wrote {args.output}")
    return blob


if __name__ == "__main__":
    main()
