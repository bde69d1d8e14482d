"""What a run shows of itself (rank 0): the progress bar and metrics.jsonl, the loss curve, and the
held-out scores and answers of the student before and after training, beside the teacher's."""
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import cached_loss
import data
import neo
from runkit import run_folder
from runkit.distributed import Dist, print0

PROMPTS = ["What is the capital of France?",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?",
           "Name three primary colors."]


def progress_bar(total, start, d: Dist):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not d.master, desc="train", dynamic_ncols=True)


def memory_gb(device):
    """Peak memory in GiB (2^30 bytes; the logs' 'G' and 'mem_gb'): CUDA max allocated, or peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def log_step(row: dict, metrics_path: Path, bar):
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kl=f"{row['kl']:.3f}",
                    lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}", mfu=f"{100 * row['mfu']:.0f}%",
                    mem=f"{row['mem_gb']:.1f}G")
    bar.update(1)


def plot_losses(metrics_path: Path, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "ce", "kl"):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats / token")
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.stem}.tmp-{os.getpid()}{png.suffix}")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, png)  # complete or not at all
    plt.close(fig)


def print_settings(args, d: Dist):
    """The run's first lines: the precision chosen, and the demo's small budget when it is the demo."""
    from runkit import flags
    from runkit.precision import choose_dtype, master_dtype
    print0(f"precision: {choose_dtype(args.dtype, d.device).why}; trainable weights, gradients and AdamW "
           f"state {str(master_dtype(args, d.device)).removeprefix('torch.')}")
    if args.demo:
        budget = ", ".join(f"{k}={getattr(args, k)}" for k in flags.DEMO) + f", lr={args.lr:g}"
        print0(f"offline demo on the CPU with a small budget: {budget} (the paper's budget applies with "
               f"--teacher or on a GPU; any flag overrides)")


def start_report(args, d, student, teacher, tokenizer, loader, held_set, vocab_size, out, cache):
    """The before/after report with its "before" half scored now, or None where there is none to make
    (--no-report, no held-out examples, a teacher sharded by --zero 3, or not the first rank)."""
    if not args.no_report and (not held_set or args.zero == 3):
        why = "no held-out examples" if not held_set else "--zero 3 shards the teacher across ranks"
        print0(f"{why}: skipping the before/after report")
        args.no_report = True
    if args.no_report or not d.master:
        return None
    held = [{**loader.collate(held_set[i:i + args.batch_size]),  # ids: the cache's rows of each example
             "example_ids": torch.arange(i, min(i + args.batch_size, len(held_set)))}
            for i in range(0, len(held_set), args.batch_size)]
    report = Report(teacher, tokenizer, held, d.device, args.chunk_size, vocab_size, out, cache, args.temperature)
    report.before(student, resume=args.resume)
    return report


@dataclass
class Report:
    """Scores the student on the held-out batches and asks it PROMPTS, before and after training.
    The 'before' half is kept in report_before.json, so that a resumed run still compares against
    the untrained student; report.json holds both halves."""
    teacher: nn.Module | None  # None with a teacher cache: its top-k rows give the KL (cached_loss.sparse_neo_loss)
    tokenizer: data.Tokenizer
    batches: list            # held-out micro-batches (CPU tensors)
    device: torch.device
    chunk_size: int
    vocab_size: int | None
    out: Path
    cache: object = None       # runkit.cache_store.TeacherCache
    temperature: float = 1.0   # the cache's T
    scores: dict = field(default_factory=dict)

    def before(self, student, resume: bool):
        path = self.out / "report_before.json"
        if resume and path.exists():
            self.scores = json.loads(path.read_text())
            return
        self.scores["before"] = heldout_scores(student, self.teacher, self.batches, self.device,
                                               self.chunk_size, self.vocab_size, self.cache, self.temperature)
        models = {"teacher": self.teacher, "student": student} if self.teacher is not None else {"student": student}
        self.scores["answers_before"] = answers(models, self.tokenizer, self.device)
        run_folder.write_json(path, self.scores)

    def after(self, trained):
        trained.eval()
        self.scores["after"] = heldout_scores(trained, self.teacher, self.batches, self.device, self.chunk_size,
                                              self.vocab_size, self.cache, self.temperature)
        table = {**self.scores["answers_before"], **answers({"trained student": trained}, self.tokenizer,
                                                            self.device)}
        (ce0, kl0), (ce1, kl1) = self.scores["before"], self.scores["after"]
        n = sum(len(b["input_ids"]) for b in self.batches)
        kl_name = "KL(teacher||student)" if self.cache is None else f"top-{self.cache.k} KL (cache, T={self.temperature:g})"
        print0(f"\nheld-out ({n} conversations)      CE      {kl_name}")
        print0(f"  student before training  {ce0:8.4f}   {kl0:8.4f}")
        print0(f"  student after  training  {ce1:8.4f}   {kl1:8.4f}")
        # How much of the gap to the teacher training closed: 1 - KL_after / KL_before (100%: the teacher's
        # distribution exactly; 0%: no better than the untrained student, pruned or not).
        self.scores["kl_recovered"] = 1 - kl1 / kl0 if kl0 > 0 else None
        if kl0 > 0:
            print0(f"  KL recovered: {100 * self.scores['kl_recovered']:.1f}% of the untrained student's "
                   f"({kl0:.4f} -> {kl1:.4f})")
        print_answers(table)
        run_folder.write_json(self.out / "report.json", self.scores, indent=2)


@torch.no_grad()
def heldout_scores(student, teacher, batches, device, chunk_size, vocab_size, cache=None, temperature=1.0):
    """Per-token CE on the labels and forward KL(teacher ‖ student) on the held-out set; with a teacher
    cache (teacher None) the KL is the cache's form of it: D_K, a lower bound of the full KL, or with
    tail draws D_S, an unbiased estimate of it (cached_loss.py)."""
    was_training = student.training
    student.eval()
    ce = kl = n = 0.0
    for b in batches:
        top = cache.rows("heldout", b["example_ids"]).to(device) if cache is not None else None
        b = {k: v.to(device) for k, v in b.items()}
        sh = student(b["input_ids"], b["attention_mask"], return_hidden=True)
        th = teacher(b["input_ids"], b["attention_mask"], return_hidden=True).float() if top is None else None
        ws = student.lm_head.weight.float()
        if top is not None:
            out = cached_loss.sparse_neo_loss(sh.float(), ws, top, b["labels"], temperature=temperature,
                                              chunk_size=chunk_size, normalizer=1.0)
        else:
            out = neo.neo_loss(sh.float(), ws, th, teacher.lm_head.weight.float(), b["labels"],
                               temperature=temperature, chunk_size=chunk_size, normalizer=1.0,
                               vocab_size=vocab_size)
        ce += out.ce.item() * out.n_tokens.item()
        kl += out.kl.item() * out.n_tokens.item()
        n += out.n_tokens.item()
    student.train(was_training)
    return ce / max(n, 1), kl / max(n, 1)


def chat_prompts(tokenizer, questions) -> list[list[int]]:
    """Each question as a user turn in the chat template, ready for the assistant's reply (token ids)."""
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
            for q in questions]


def answers(models: dict, tokenizer, device, max_new_tokens=48, prompts=PROMPTS):
    """Each model's greedy answer to each of `prompts` (a chat turn each)."""
    ids = chat_prompts(tokenizer, prompts)
    table = {}
    for name, m in models.items():
        was_training = m.training
        m.eval()
        outs = m.generate(ids, max_new_tokens=max_new_tokens, stop_token_ids=tokenizer.stop_token_ids)
        m.train(was_training)
        table[name] = [tokenizer.decode(o).strip() for o in outs]
    return table


def print_answers(table, prompts=PROMPTS):
    for i, q in enumerate(prompts):
        print0(f"\nQ: {q}")
        for name, outs in table.items():
            print0(f"  [{name:>16}] {outs[i]!r}")
