"""Score finished demo runs (issue 31): does the pruned student learn more, and loop less?

    OMP_NUM_THREADS=1 python train.py --seed 0 --out runs/base_s0                      # today's demo
    OMP_NUM_THREADS=1 python train.py --seed 0 --hidden-weight 10 --out runs/b10_s0    # a variant
    python -m benchmarks.bench_hidden runs/base_s0 runs/b10_s0   # the table, from the finished runs
    python -m benchmarks.bench_hidden --scale                   # why a cosine: distances per block

For each run folder (named <variant>_s<seed>): train.py's own held-out scores (report.json: CE
and KL(teacher ‖ student) on the seed's 32 held-out conversations); the KL and CE on a second
held-out set, the same for every run: 64 conversations of the offline held-out split that none of
seeds 0-9 draws into its 32 (never trained on, never scored by train.py); the trained student's
greedy answers (64 new tokens) to ten short questions that appear nowhere in the offline data,
how many are right (the expected word in the answer), and their token 4-gram repetition rate
(benchmarks/bench_onpolicy.py's rep-4: the share of an answer's 4-grams seen earlier in it); the
median step time from metrics.jsonl (step-based runs: the result does not depend on it; it says
what a variant costs). The teacher answers the same questions: its rate is the floor to compare with.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import model as llama  # noqa: E402
from benchmarks.bench_onpolicy import answers, rep4  # noqa: E402
from runkit import files, offline, report, tokenized  # noqa: E402

# Ten short questions, none of them in the offline data (checked: `--check-questions`); each with the
# words a right answer contains (any of them, case-insensitive).
QUESTIONS = {"What is the capital of Japan?": ["tokyo"],
             "How many days are in a week?": ["seven", "7"],
             "What color is the sky on a clear day?": ["blue"],
             "What is 12 plus 7?": ["19", "nineteen"],
             "Who wrote Romeo and Juliet?": ["shakespeare"],
             "What is the largest planet in our solar system?": ["jupiter"],
             "At what temperature in Celsius does water boil?": ["100"],
             "How many legs does a spider have?": ["eight", "8"],
             "What is the opposite of hot?": ["cold"],
             "What gas do plants take in from the air?": ["carbon dioxide", "co2"]}
SECOND_SET, SEEDS_EXCLUDED = 64, range(10)


def second_heldout(tok, max_len=512, heldout=32):
    """The second held-out set: offline held-out conversations outside every seed's scored 32."""
    store = tokenized.load("offline:heldout", tok, max_len)
    used = {i for s in SEEDS_EXCLUDED for i in files.sample_indices(len(store), heldout, s)}
    return store.select([i for i in range(len(store)) if i not in used][:SECOND_SET])


@torch.no_grad()
def second_scores(model_dir, teacher, held, tok):
    student = llama.Llama.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    loader = data.Batches(held, 4, pad_id=tok.pad_token_id, shuffle=False)
    batches = [loader.collate([held[j] for j in range(i, min(i + 4, len(held)))]) for i in range(0, len(held), 4)]
    ce, kl = report.heldout_scores(student, teacher, batches, torch.device("cpu"), 256, None)
    return {"second_ce": ce, "second_kl": kl}


def quality(said, tok):
    right = [any(w in a.lower() for w in ws) for a, ws in zip(said, QUESTIONS.values())]
    reps = [rep4(a, tok) for a in said]
    return {"correct": sum(right), "repeating": sum(r > 0 for r in reps), "rep4": statistics.mean(reps),
            "answers": dict(zip(QUESTIONS, said))}


def score(run: Path, teacher, held, tok) -> dict:
    name, seed = re.fullmatch(r"(.+)_s(\d+)", run.name).groups()
    rep = json.loads((run / "report.json").read_text())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    said = answers(run / "model", list(QUESTIONS))
    return {"variant": name, "seed": int(seed), "steps": len(steps),
            "step_s": statistics.median(r["step_s"] for r in steps), "train_s": sum(r["step_s"] for r in steps),
            "heldout_ce": rep["after"][0], "heldout_kl": rep["after"][1], "untrained_kl": rep["before"][1],
            **second_scores(run / "model", teacher, held, tok), **quality(said, tok)}


def table(rows, teacher_q) -> str:
    lines = ["| variant | seed | held-out KL | (untrained) | held-out CE | second-set KL | second-set CE | "
             "answers right | answers looping | rep-4 | step s (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = f" (= {r['same_run_as']})" if "same_run_as" in r else ""  # a run scored once, under two names
        lines.append(f"| {r['variant']} | {r['seed']}{same} | {r['heldout_kl']:.4f} | {r['untrained_kl']:.4f} | "
                     f"{r['heldout_ce']:.4f} | {r['second_kl']:.4f} | {r['second_ce']:.4f} | {r['correct']}/10 | "
                     f"{r['repeating']}/10 | {r['rep4']:.3f} | {r['step_s']:.1f} |")
    lines += ["", "| variant | seeds | held-out KL | second-set KL | rep-4 | answers right | looping |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]

        def ms(k, f=".3f"):
            x = [r[k] for r in rs]
            return f"{statistics.mean(x):{f}} ± {(max(x) - min(x)) / 2:{f}}"
        lines.append(f"| {v} | {','.join(str(r['seed']) for r in rs)} | {ms('heldout_kl')} | {ms('second_kl')} | "
                     f"{ms('rep4')} | {ms('correct', '.1f')} | {ms('repeating', '.1f')} |")
    lines.append(f"| teacher | | | | {teacher_q['rep4']:.3f} | {teacher_q['correct']} | {teacher_q['repeating']} |")
    return "\n".join(lines) + "\n\n± is half the range over the seeds.\n"


@torch.no_grad()
def scale(tok, keep=(0, 1, 8, 10, 11, 18, 19, 20, 21, 22, 23, 24, 27, 28, 29), n=8):
    """Why a cosine: per kept block of the untrained demo student (seed 0's layers), on its first n
    training conversations, the squared error per coordinate, the relative one, 1 − cos, and the
    teacher stream's median norm, at the loss's target positions."""
    import torch.nn.functional as F
    from runkit import flags
    train_set, _ = tokenized.load_splits(flags.parse([]), tok)
    teacher = llama.Llama.from_pretrained(str(offline.smollm2_dir()), dtype=torch.float32).eval()
    student = llama.prune_layers(teacher, list(keep)).eval()
    rows = [train_set[i] for i in range(n)]
    b = data.Batches(rows, n, pad_id=tok.pad_token_id, shuffle=False).collate(rows)
    _, ts = teacher(b["input_ids"], b["attention_mask"], return_hidden=True, hidden_at=list(keep))
    _, ss = student(b["input_ids"], b["attention_mask"], return_hidden=True, hidden_at=range(len(keep)))
    mask = b["labels"][:, 1:] != -100
    lines = ["| student block | teacher block | squared error per coordinate | relative squared error | 1 − cos | "
             "teacher stream's median norm |", "|---:|---:|---:|---:|---:|---:|"]
    for j, (a, t) in enumerate(zip(ss, ts)):
        a, t = a[:, :-1][mask], t[:, :-1][mask]
        se = (a - t).pow(2).sum(-1)
        lines.append(f"| {j} | {keep[j]} | {se.mean() / a.shape[1]:.1f} | {(se / t.pow(2).sum(-1)).mean():.3f} | "
                     f"{(1 - F.cosine_similarity(a, t, dim=-1)).mean():.3f} | {t.norm(dim=-1).median():.0f} |")
    return "\n".join(lines) + f"\n\n{int(mask.sum())} target positions of {n} training conversations.\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="finished train.py run folders named <variant>_s<seed>")
    p.add_argument("--output", default="benchmarks/results/hidden_states.json")
    p.add_argument("--check-questions", action="store_true", help="say whether any question is in the offline data")
    p.add_argument("--merge", nargs="*", default=[], help="add the runs of these --output files (other scorers')")
    p.add_argument("--same-run", nargs="*", default=[], metavar="NEW=OLD",
                   help="score NEW (<variant>_s<seed>) as the scored run OLD: the same run, e.g. a --calibration "
                        "that keeps the same layers (no RNG is drawn in pruning: the training is bit for bit OLD's)")
    p.add_argument("--scale", action="store_true", help="no runs: the distances per block of the untrained student")
    args = p.parse_args(argv)
    if args.scale:
        text = scale(data.Tokenizer.from_dir(str(offline.smollm2_dir())))
        Path(args.output).with_name("hidden_states_scale.md").write_text(text)
        return print(text)
    if args.check_questions:
        texts = [m["content"].lower() for split in ("train", "heldout") for r in offline.chat_dataset(split)
                 for m in r["messages"]]
        for q in QUESTIONS:
            print(f"{sum(q.lower() in t for t in texts)} records contain {q!r}")
        return
    out = Path(args.output)
    saved = json.loads(out.read_text()) if out.exists() else {"runs": []}
    for other in args.merge:  # runs scored by another process (two scorers side by side)
        more = json.loads(Path(other).read_text())
        saved["teacher"] = saved.get("teacher", more["teacher"])
        keys = {(r["variant"], r["seed"]) for r in more["runs"]}
        saved["runs"] = [r for r in saved["runs"] if (r["variant"], r["seed"]) not in keys] + more["runs"]
    for pair in args.same_run:
        (name, seed), (old, old_seed) = (re.fullmatch(r"(.+)_s(\d+)", x).groups() for x in pair.split("="))
        row = next(r for r in saved["runs"] if (r["variant"], r["seed"]) == (old, int(old_seed)))
        saved["runs"] = [r for r in saved["runs"] if (r["variant"], r["seed"]) != (name, int(seed))]
        saved["runs"].append({**row, "variant": name, "same_run_as": f"{old}_s{old_seed}"})
    tok = data.Tokenizer.from_dir(str(offline.smollm2_dir()))
    if args.runs:
        teacher = llama.Llama.from_pretrained(str(offline.smollm2_dir()), dtype=torch.float32).eval()
        held = second_heldout(tok)
    if "teacher" not in saved:
        saved["teacher"] = quality(answers(Path(offline.smollm2_dir()), list(QUESTIONS)), tok)
    out.write_text(json.dumps(saved, indent=1))
    for run in map(Path, args.runs):
        r = score(run, teacher, held, tok)
        saved["runs"] = [x for x in saved["runs"] if (x["variant"], x["seed"]) != (r["variant"], r["seed"])] + [r]
        print(f"{r['variant']} s{r['seed']}: held-out KL {r['heldout_kl']:.4f}, second {r['second_kl']:.4f}, "
              f"rep-4 {r['rep4']:.3f}, right {r['correct']}/10, step {r['step_s']:.1f} s", flush=True)
        out.write_text(json.dumps(saved, indent=1))
    rows = sorted(saved["runs"], key=lambda r: (r["variant"] != "base", r["variant"], r["seed"]))
    text = table(rows, saved["teacher"])
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
