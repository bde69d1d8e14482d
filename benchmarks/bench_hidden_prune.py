"""Which layers pruning keeps, and the untrained demo student's held-out KL, per seed and calibration
size (issue 31): each seed's 32 held-out, its first K training examples as calibration (train.py's
build_student). Also the seconds block importance takes on K examples (a shared CPU, 1 thread).
    OMP_NUM_THREADS=1 python -m benchmarks.bench_hidden_prune --seeds 0 1 2 --calibration 1 16 64"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import argparse
import json
import time
import torch
import data, model as llama
from runkit import offline, flags, tokenized, report

p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--calibration", type=int, nargs="+", default=[1, 16, 64])
p.add_argument("--by", nargs="+", default=["importance"], choices=["importance", "span"])
p.add_argument("--output", default="benchmarks/results/hidden_states_prune.json")
cli = p.parse_args()
tok = data.Tokenizer.from_dir(str(offline.smollm2_dir()))
teacher = llama.Llama.from_pretrained(str(offline.smollm2_dir()), dtype=torch.float32).eval()
out = json.loads(Path(cli.output).read_text()) if Path(cli.output).exists() else {}
for seed in cli.seeds:
    torch.manual_seed(seed)
    train_set, held = tokenized.load_splits(flags.parse(["--seed", str(seed)]), tok)
    loader = data.Batches(held, 4, pad_id=tok.pad_token_id, shuffle=False)
    batches = [loader.collate([held[j] for j in range(i, i + 4)]) for i in range(0, len(held), 4)]
    for by in cli.by:
        for k in cli.calibration:
            rows = [train_set[i] for i in range(k)]
            b = data.Batches(rows, k, pad_id=0, shuffle=False).collate(rows)  # as train.py: right-padded (K, T)
            t0 = time.perf_counter()
            keep = llama.layers_to_keep(teacher, b["input_ids"], 15, b["attention_mask"], by=by)  # as train.py
            secs = time.perf_counter() - t0
            same = [v for v in out.values() if v["seed"] == seed and v["keep"] == keep]  # scored already
            if same:
                ce, kl = same[0]["ce"], same[0]["kl"]
            else:
                st = llama.prune_layers(teacher, keep).eval()
                ce, kl = report.heldout_scores(st, teacher, batches, torch.device("cpu"), 256, None)
            out[f"s{seed}_{by}_k{k}"] = {"seed": seed, "by": by, "k": k, "tokens": int(b["attention_mask"].sum()),
                                         "keep": keep, "ce": ce, "kl": kl, "measure_s": secs}
            print(f"seed {seed} {by} K={k} ({int(b['attention_mask'].sum())} tokens, {secs:.1f} s): {keep} "
                  f"CE {ce:.4f} KL {kl:.4f}", flush=True)
            Path(cli.output).write_text(json.dumps(out, indent=1))
lines = ["| seed | prune by | K examples | tokens | seconds (shared CPU, 1 thread) | layers kept | untrained CE | untrained KL |",
         "|---:|---|---:|---:|---:|---|---:|---:|"]
for r in sorted(out.values(), key=lambda r: (r["seed"], r["by"], r["k"])):
    lines.append(f"| {r['seed']} | {r['by']} | {r['k']} | {r['tokens']} | {r['measure_s']:.1f} | {r['keep']} | "
                 f"{r['ce']:.4f} | {r['kl']:.4f} |")
Path(cli.output).with_suffix(".md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
