"""On-policy distillation (train.py --on-policy λ) against off-policy, at equal wall time.

    python -m benchmarks.bench_onpolicy                       # λ = 0, 0.5, 1 (reverse KL), seeds 0 and 1
    python -m benchmarks.bench_onpolicy --max-samples 400 --seeds 0,1,2
    python -m benchmarks.bench_onpolicy --on-policy-start 0.5 # off-policy for half the steps, then sampling
    python -m benchmarks.bench_onpolicy --reuse ...           # score the finished runs of --work-dir again

For each seed: the off-policy run (λ = 0) trains the offline demo's models and data for its
budget; each on-policy run then gets the same wall time, as a step count measured from a short
probe of its own steps (the schedule then runs to its end, as the off-policy one does). With
--on-policy-start S the first share S of those steps are off-policy (timed from the λ = 0 run), the
rest sample. Every
trained student is scored on the demo's held-out set (CE, and KL to the teacher: train.py's
report) and answers fixed prompts greedily: the 3 of train.py's report and the user turns of
the first held-out conversations. An answer repeats itself when some 4-gram of its tokens (the
tokenizer's: SmolLM2 writes every digit as a token, so "10000000" repeats too) occurs in it twice
or more; rep-4 is the share of an answer's token 4-grams that are repeats (Welleck et al. 2019).
The teacher answers the same prompts: its figures are what distillation can hope for.

    python -m benchmarks.bench_onpolicy --rescore             # the table again from the saved answers
    python -m benchmarks.bench_onpolicy --loops               # does the teacher resist the students' loops?

--loops takes each trained student of --work-dir, lets it answer the prompts greedily again (token
ids, 64 new tokens) and runs the teacher over the same text: at every answer token, the reverse KL
KL(student || teacher) that on-policy training would minimise there, and the teacher's probability
of the token the student chose, split into tokens that close a repeated 4-gram (inside a loop) and
the rest; forward KL(teacher || student) beside it.

Also measured, from the runs' metrics.jsonl: the sampling step's generation tokens/s and its
share of a training step.

Run it on an otherwise idle machine: it times training runs.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import model as llama  # noqa: E402
from runkit import flags, offline, report, tokenized  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lambdas", default="0,0.5,1", help="--on-policy values; the first is the off-policy reference")
    p.add_argument("--seeds", default="0,1", help="seeds, each a full set of runs")
    p.add_argument("--prompts", type=int, default=20, help="held-out user turns answered, besides train.py's 3")
    p.add_argument("--probe-steps", type=int, default=3, help="steps of the probe that times an on-policy step")
    p.add_argument("--work-dir", default="runs/bench_onpolicy")
    p.add_argument("--output", default="benchmarks/results/bench_onpolicy.json")
    p.add_argument("--reuse", action="store_true", help="a run already finished in --work-dir (its report.json "
                                                         "written) is scored again, not retrained")
    p.add_argument("--loops", action="store_true", help="no training: the teacher's reverse KL and agreement "
                                                         "inside and outside the loops of --work-dir's students")
    p.add_argument("--rescore", action="store_true", help="no training: the repetition figures and the table "
                                                           "again from --output's saved answers")
    flags.add(p, "max_samples", "divergence", "on_policy_start", "on_policy_temperature", "on_policy_max_new",
              "max_len", max_samples=400, divergence="reverse_kl", on_policy_max_new=96)
    return p.parse_args(argv)


def train(out: Path, flags_: list[str]) -> float:
    """`python train.py FLAGS` in its own process; its wall time in seconds."""
    t0 = time.time()
    cmd = [sys.executable, str(ROOT / "train.py"), *flags_, "--out", str(out), "--overwrite"]
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"training failed: {' '.join(cmd)}; see {out.parent / (out.name + '.log')}")
    return time.time() - t0


def repeated(ids: list[int]) -> list[bool]:
    """For each token 4-gram of `ids` in order (the one ending at token 3, 4, ...): whether it occurred earlier."""
    seen, out = set(), []
    for i in range(len(ids) - 3):
        gram = tuple(ids[i:i + 4])
        out.append(gram in seen)
        seen.add(gram)
    return out


def rep4(text: str, tok) -> float:
    """The share of the answer's token 4-grams that occurred earlier in it (0: no repeat)."""
    flags_ = repeated(tok.encode(text))
    return sum(flags_) / len(flags_) if flags_ else 0.0


def repetition(answers: list[str], tok) -> dict:
    reps = [rep4(a, tok) for a in answers]
    return {"repeating": sum(r > 0 for r in reps) / len(reps), "rep4": statistics.mean(reps)}


@torch.no_grad()
def answers(model_dir: Path, questions: list[str]) -> list[str]:
    m = llama.Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = data.Tokenizer.from_dir(str(model_dir))
    return report.answers({"m": m}, tok, torch.device("cpu"), max_new_tokens=64, prompts=questions)["m"]


@torch.no_grad()
def loop_agreement(model_dir: Path, teacher, questions: list[str], tok) -> dict:
    """On the student's own greedy answers: mean reverse and forward KL and the teacher's mean
    probability of the student's token, at tokens that close a repeated 4-gram and at the others."""
    student = llama.Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = report.chat_prompts(tok, questions)
    outs = student.generate(prompts, max_new_tokens=64, stop_token_ids=tok.stop_token_ids)
    sums = {"loop": [0.0, 0.0, 0.0, 0], "rest": [0.0, 0.0, 0.0, 0]}  # reverse KL, forward KL, teacher p, count
    for prompt, out in zip(prompts, outs):
        if not out:
            continue
        ids = torch.tensor([prompt + out])
        n = len(prompt)
        ls = torch.log_softmax(student(ids).float()[0, n - 1:-1], -1)        # (len(out), V)
        lt = torch.log_softmax(teacher(ids).float()[0, n - 1:-1], -1)
        rkl = (ls.exp() * (ls - lt)).sum(-1)
        fkl = (lt.exp() * (lt - ls)).sum(-1)
        p_t = lt.gather(-1, torch.tensor(out)[:, None]).exp().squeeze(-1)
        inside = [False] * 3 + repeated(out)  # the first 3 tokens close no 4-gram
        for j in range(len(out)):
            where = "loop" if inside[j] else "rest"
            for i, x in enumerate((rkl[j].item(), fkl[j].item(), p_t[j].item(), 1)):
                sums[where][i] += x
    return {f"{w}_{k}": (v[i] / v[3] if v[3] else None) for w, v in sums.items()
            for i, k in enumerate(("rkl", "fkl", "teacher_p"))} | {f"{w}_tokens": v[3] for w, v in sums.items()}


def loops(args, tok, saved) -> None:
    teacher = llama.Llama.from_pretrained(str(offline.smollm2_dir()), dtype=torch.float32).eval()
    lines = ["| run | tokens in loops | reverse KL in loops | elsewhere | forward KL in loops | elsewhere | "
             "teacher p(student's token) in loops | elsewhere |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for r in saved["runs"]:
        name = f"lam{r['lambda']:g}_s{r['seed']}"
        g = r["loops"] = loop_agreement(Path(args.work_dir) / name / "model", teacher, saved["questions"], tok)
        share = g["loop_tokens"] / max(1, g["loop_tokens"] + g["rest_tokens"])
        lines.append(f"| {name} | {share:.0%} | {fmt(g['loop_rkl'])} | {fmt(g['rest_rkl'])} | "
                     f"{fmt(g['loop_fkl'])} | {fmt(g['rest_fkl'])} | "
                     f"{fmt(g['loop_teacher_p'])} | {fmt(g['rest_teacher_p'])} |")
        print(lines[-1], flush=True)
    Path(args.output).write_text(json.dumps(saved, indent=1))
    Path(args.output).with_name(Path(args.output).stem + "_loops.md").write_text("\n".join(lines) + "\n")


def finished_with(folder: Path, expect: dict) -> bool:
    """Whether `folder` holds a finished run (its report.json written). A finished run whose recorded
    flags (its last checkpoint's) differ from `expect` is refused rather than reused."""
    if not (folder / "report.json").exists():
        return False
    latest = (folder / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(folder / "checkpoints" / latest / "state.pt", map_location="cpu", weights_only=False,
                       mmap=True)["args"]  # mapped: only the recorded flags are read
    other = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if other:
        said = ", ".join(f"{k}: {a!r}, not {b!r}" for k, (a, b) in other.items())
        sys.exit(f"--reuse: {folder} was trained with other flags ({said}); give another --work-dir")
    return True


def heldout_questions(n: int, max_len: int) -> list[str]:
    """The first user turn of the first n held-out conversations of the offline set."""
    teacher = str(offline.smollm2_dir())
    args = flags.parse(["--max-len", str(max_len)])
    tok = data.Tokenizer.from_dir(teacher)
    _, held = tokenized.load_splits(args, tok)
    out = []
    for e in held:
        ids = list(e["input_ids"])
        first = next(i for i, y in enumerate(e["labels"]) if y != -100)
        text = tok.decode(ids[:first])
        user = text.split("user\n", 1)[-1].rsplit("<|im_end|>", 1)[0].strip()
        if user and user not in out:
            out.append(user)
        if len(out) == n:
            break
    return out


def main(argv=None):
    args = parse_args(argv)
    tok = data.Tokenizer.from_dir(str(offline.smollm2_dir()))
    if args.loops:
        return loops(args, tok, json.loads(Path(args.output).read_text()))
    if args.rescore:
        saved = json.loads(Path(args.output).read_text())
        for r in saved["runs"]:
            r.update(repetition(list(r["answers"].values()), tok))
        if "teacher" in saved:
            saved["teacher"].update(repetition(list(saved["teacher"]["answers"].values()), tok))
        Path(args.output).write_text(json.dumps(saved, indent=1))
        return table(saved["runs"], saved.get("teacher"), Path(args.output))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    questions = report.PROMPTS + heldout_questions(args.prompts, args.max_len or 512)
    base = ["--max-samples", str(args.max_samples), "--divergence", args.divergence, "--no-pack",
            "--on-policy-temperature", str(args.on_policy_temperature),
            "--on-policy-max-new", str(args.on_policy_max_new)] + (["--max-len", str(args.max_len)] if args.max_len else [])
    said = answers(Path(offline.smollm2_dir()), questions)  # the teacher's own: the reference
    teacher = {**repetition(said, tok), "answers": dict(zip(questions, said))}
    print(f"teacher: repeating {100 * teacher['repeating']:.0f}%, rep-4 {teacher['rep4']:.3f}", flush=True)
    same = {"divergence": args.divergence, "max_samples": args.max_samples, "max_len": args.max_len or 512,
            "pack": False}  # what every run of --reuse must share; an on-policy run also:
    same_on_policy = {"on_policy_start": args.on_policy_start, "on_policy_temperature": args.on_policy_temperature,
                      "on_policy_max_new": args.on_policy_max_new}
    rows = []
    for seed in seeds:
        budget = off_step_s = None  # from the first (off-policy) run of the seed
        for lam in lambdas:
            name = f"lam{lam:g}_s{seed}"
            run = base + ["--seed", str(seed), "--on-policy", str(lam)]
            expect = {"seed": seed, "on_policy": lam, **same, **(same_on_policy if lam else {})}
            done = args.reuse and finished_with(work / name, expect)
            if budget is not None and lam > 0 and not done:  # equal wall time: steps from a probe of this λ's own steps
                probe = work / f"probe_{name}"
                train(probe, run + ["--max-steps", str(args.probe_steps), "--no-report"])
                step_s = statistics.median(json.loads(r)["step_s"] for r in (probe / "metrics.jsonl").read_text().splitlines())
                f = args.on_policy_start  # that share of the steps is off-policy, at the λ = 0 run's pace
                run += ["--max-steps", str(max(1, round(budget / (f * off_step_s + (1 - f) * step_s)))),
                        "--on-policy-start", str(f)]
            wall = None if done else train(work / name, run)
            metrics = [json.loads(r) for r in (work / name / "metrics.jsonl").read_text().splitlines()]
            train_s = sum(r["step_s"] for r in metrics)
            if budget is None:
                budget, off_step_s = train_s, statistics.median(r["step_s"] for r in metrics)
            rep = json.loads((work / name / "report.json").read_text())
            said = answers(work / name / "model", questions)
            gen_s = sum(r.get("gen_s", 0) for r in metrics)
            gen_tok = sum(r.get("gen_tokens", 0) for r in metrics)
            rows.append({"lambda": lam, "start": args.on_policy_start if lam > 0 else 0.0, "seed": seed,
                         "steps": len(metrics), "train_s": train_s, "wall_s": wall,
                         "heldout_ce": rep["after"][0], "heldout_kl": rep["after"][1],
                         **repetition(said, tok),
                         "gen_tokens_per_s": gen_tok / gen_s if gen_s else None,
                         "gen_share": gen_s / train_s if gen_s else 0.0, "answers": dict(zip(questions, said))})
            r = rows[-1]
            print(f"λ={lam:g} seed {seed}: {r['steps']} steps, {train_s:.0f} s; held-out CE {r['heldout_ce']:.4f} "
                  f"KL {r['heldout_kl']:.4f}; repeating {100 * r['repeating']:.0f}%, rep-4 {r['rep4']:.3f}; "
                  f"sampling {r['gen_tokens_per_s'] or 0:.0f} tok/s, {100 * r['gen_share']:.0f}% of a step",
                  flush=True)
            Path(args.output).write_text(json.dumps({"args": vars(args), "questions": questions, "runs": rows,
                                                     "teacher": teacher}, indent=1))
    table(rows, teacher, Path(args.output))
    return rows


def table(rows, teacher, output: Path) -> str:
    lines = ["| λ | sampling from | seeds | steps | training s | held-out KL | held-out CE | answers repeating (token 4-gram) | "
             "rep-4 | sampling tok/s | sampling share |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lam, start in dict.fromkeys((r["lambda"], r.get("start", 0.0)) for r in rows):
        rs = [r for r in rows if (r["lambda"], r.get("start", 0.0)) == (lam, start)]

        def ms(key, scale=1.0, fmt=".4f"):
            v = [r[key] * scale for r in rs if r[key] is not None]
            if not v:
                return "-"
            return f"{statistics.mean(v):{fmt}} ± {(max(v) - min(v)) / 2:{fmt}}"
        when = "-" if not lam else f"step {start:.0%} on" if start else "the start"
        lines.append(f"| {lam:g} | {when} | {','.join(str(r['seed']) for r in rs)} | {ms('steps', fmt='.0f')} | {ms('train_s', fmt='.0f')} | "
                     f"{ms('heldout_kl')} | {ms('heldout_ce')} | {ms('repeating', 100, '.0f')}% | {ms('rep4', fmt='.3f')} | "
                     f"{ms('gen_tokens_per_s', fmt='.0f')} | {ms('gen_share', 100, '.0f')}% |")
    if teacher is not None:
        lines.append(f"| teacher | | | | | | | {100 * teacher['repeating']:.0f}% | {teacher['rep4']:.3f} | | |")
    text = "\n".join(lines)
    print("\n" + text)
    output.with_suffix(".md").write_text(text + "\n\n± is half the range over the seeds.\n")
    return text


if __name__ == "__main__":
    main()
