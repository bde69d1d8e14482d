"""Untrained held-out KL of the demo student for each pruning choice (seed 0: its 32 held-out, its first
N training conversations as calibration). python -m benchmarks.bench_hidden_prune"""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import json
import torch
import data, model as llama
from runkit import offline, flags, tokenized, report
torch.manual_seed(0)
args = flags.parse([])
tok = data.Tokenizer.from_dir(str(offline.smollm2_dir()))
train_set, held = tokenized.load_splits(args, tok)
teacher = llama.Llama.from_pretrained(str(offline.smollm2_dir()), dtype=torch.float32).eval()
loader = data.Batches(held, 4, pad_id=tok.pad_token_id, shuffle=False)
batches = [loader.collate([held[j] for j in range(i, i + 4)]) for i in range(0, len(held), 4)]
out = {}
for by in ("importance", "span"):
    for k in (1, 16, 64):
        rows = [train_set[i] for i in range(k)]
        b = data.Batches(rows, k, pad_id=0, shuffle=False).collate(rows)
        with torch.no_grad():
            if by == "span":
                keep = llama.span_to_keep(teacher, b["input_ids"], 15, b["attention_mask"])
            else:
                keep = llama.most_important_layers(llama.block_importance(teacher, b["input_ids"], b["attention_mask"]), 15)
        st = llama.prune_layers(teacher, keep).eval()
        ce, kl = report.heldout_scores(st, teacher, batches, torch.device("cpu"), 256, None)
        out[f"{by}_k{k}"] = {"keep": keep, "ce": ce, "kl": kl}
        print(by, k, keep, f"CE {ce:.4f} KL {kl:.4f}", flush=True)
json.dump(out, open("benchmarks/results/hidden_states_prune.json", "w"), indent=1)
