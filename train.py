"""
train.py: distil a teacher LLM into a student, the LLM-Neo way or as one of its baselines.

The four methods of the paper's Table I differ only in two switches:

    method   trains               loss
    sft      every student weight CE
    lora     the adapters ΔW      CE
    kd       every student weight α·CE + (1-α)·KL(teacher ‖ student)
    neo      the adapters ΔW      α·CE + (1-α)·KL(teacher ‖ student)     <- LLM-Neo

Run it
    python train.py                                  # offline demo: SmolLM2-135M -> its pruned half
    python train.py --teacher meta-llama/Llama-3.1-8B-Instruct --prune-to 8 --data BAAI/Infinity-Instruct
    python train.py --data big.jsonl --pack          # several conversations per row, kept apart
    torchrun --nproc_per_node 6 train.py --rank 128  # data parallel, one process per GPU
    torchrun --nproc_per_node 6 train.py --zero 1    # + optimizer state sharded (ZeroRedundancyOptimizer)
    torchrun --nproc_per_node 6 train.py --zero 3    # + student and teacher layers sharded (FSDP2)

The file reads top to bottom: arguments, set-up, then main() and the helpers it calls in the
order it calls them (models, data, optimizer, loop, checkpoints, save); the before/after report
is the last section.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import data
import lora
import model as llama
import neo
from runkit import adapters, files, run_folder, tokenized

# -----------------------------------------------------------------------------
# Arguments. Paper values are the defaults; the offline demo (no --teacher, no GPU) swaps in a
# budget that finishes in minutes on two CPU cores, and says so.

PAPER = dict(max_len=512, batch_size=4, grad_accum=16, epochs=2, max_samples=None, heldout=256, pack=False)
# The demo packs ~1700 conversations into ~60 steps of 8 rows and trains the adapters at 1e-3 (5x the
# paper's rate, which is tuned for 2 epochs of a million conversations; benchmarks/experiment.py's
# sweep shows the short budget's best rate).
DEMO = dict(max_len=512, batch_size=4, grad_accum=2, epochs=1, max_samples=1700, heldout=32, pack=True)
DEMO_ADAPTER_LR = 1e-3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to train
    p.add_argument("--method", choices=["neo", "lora", "kd", "sft"], default="neo",
                   help="neo/lora train adapters only; kd/sft train every student weight; "
                        "neo/kd add the KL-to-teacher term")
    p.add_argument("--adapter", choices=["lora", "moslora"], default="lora",
                   help="adapter variant for neo/lora (MoSLoRA adds an r x r mixer)")
    p.add_argument("--rank", type=int, default=128, help="adapter rank r (paper guideline: 128)")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter scale numerator (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the adapter input (0 as in PEFT; above 0 every adapter keeps its own "
                        "dropped copy of its input for backward: about +50%% activation memory)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated linear layers that get adapters")
    # models
    p.add_argument("--teacher", default=None,
                   help="teacher folder or Hub id (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--student", default=None, help="student folder or Hub id (default: prune the teacher)")
    p.add_argument("--teacher-cache", default=None,
                   help="train from a top-k teacher cache written by teacher_cache.py instead of running the "
                        "teacher (kd/neo use the sparse KL; the held-out report reads the cache too)")
    p.add_argument("--prune-to", type=int, default=None,
                   help="build the student by keeping this many of the teacher's most important layers "
                        "(default when no --student: half of them)")
    # data
    p.add_argument("--data", default=None, help="JSONL/JSON/Parquet file, folder or Hub dataset id "
                                                "(default: the offline instruction set)")
    p.add_argument("--max-samples", type=int, default=None, help="seeded random subset of the data")
    p.add_argument("--heldout", type=int, default=None, help="held-out conversations scored before/after")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed JSON lines")
    p.add_argument("--max-len", type=int, default=None, help="tokens per example; longer ones are cut and counted")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack several examples into each row of --max-len tokens (attention and RoPE positions "
                        "stay inside each example; far less padding; default: on in the offline demo unless "
                        "--teacher-cache, off otherwise)")
    # loss
    p.add_argument("--alpha", type=float, default=0.5, help="weight of CE; KL gets 1 - alpha")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    p.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl",
                   help="teacher-student divergence")
    p.add_argument("--chunk-size", type=int, default=256,
                   help="target tokens projected to the vocabulary at once (memory: ~8 x chunk x vocab x 4 bytes)")
    # optimisation
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch per process (paper: 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (paper: 16)")
    p.add_argument("--epochs", type=int, default=None, help="passes over the data (paper: 2)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 adapters, 2e-5 full)")
    p.add_argument("--min-lr", type=float, default=None, help="cosine floor (default: 1e-5 adapters, 1e-6 full)")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up, as a fraction of all steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each student block's activations in backward instead of storing them "
                        "(less memory, ~1/3 more student compute)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0,
                   help="0 DDP; 1 + sharded optimizer state; 2 FSDP2 keeping params gathered; 3 FSDP2 full")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="frozen weights' dtype and autocast (auto: bfloat16 where bf16 matmul is native: CUDA "
                        "compute capability >= 8, CPUs with avx512_bf16/amx_bf16; else float32). "
                        "Trainable weights and optimizer state stay float32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every teacher and student block (fuses the elementwise work around "
                        "the matmuls; the first steps pay the compilation)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, adapters and dropout")
    # output
    p.add_argument("--out", default="runs/neo", help="output folder")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out (a damaged latest one is skipped)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out may hold an earlier run: replace its outputs (checkpoints, adapter, model, "
                        "metrics, reports); other files there are kept. Without it a non-empty --out is refused")
    p.add_argument("--no-report", action="store_true", help="skip the before/after held-out scores and answers")
    # plan only
    p.add_argument("--plan", type=int, nargs="?", const=1, default=None, metavar="GPUS",
                   help="print the peak memory per GPU for GPUS processes (default 1) with these flags, from "
                        "the models' config.json alone (plan.py), and exit without loading weights")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="with --plan: GiB per GPU; say whether the run fits, and which flag would make it fit")
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: which flags did the user give?
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))

    args.demo = args.teacher is None and not torch.cuda.is_available()
    for key, value in (DEMO if args.demo else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pack and args.teacher_cache and "pack" not in args.given:
        args.pack = False  # the demo's packing gives way to a teacher cache, which holds unpacked rows
    full = args.method in ("sft", "kd")
    args.lr = args.lr if args.lr is not None else (2e-5 if full else DEMO_ADAPTER_LR if args.demo else 2e-4)
    args.min_lr = args.min_lr if args.min_lr is not None else (1e-6 if full else 1e-5)
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.rank
    return args


# Flags that must match when resuming: everything that changes the result (the model, the data and its
# order, the objective, the optimizer and its schedule, the numerics). Not here: where and how often to
# save, the report, --zero and --grad-checkpoint (same result, other memory).
RESUME_FLAGS = ["method", "adapter", "rank", "lora_alpha", "lora_dropout", "targets", "teacher", "student",
                "prune_to", "data", "max_samples", "heldout", "skip_bad_lines", "max_len", "pack", "alpha",
                "temperature", "divergence", "chunk_size", "batch_size", "grad_accum", "epochs", "max_steps",
                "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "dtype", "seed", "world_size",
                "teacher_cache"]


def check_args(args):
    """Refuse, before any model is loaded, every flag value that would make the run meaningless or
    be silently ignored. One place for all flags: a new flag adds its check here.

    Ranges come first (no I/O); then the limits that need the models' config.json only (layers to
    prune to, the position limit for --max-len).
    """
    def refuse(flag, why):
        raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {why}")

    # Written `not x > 0` rather than `x <= 0` so that nan is refused too.
    for flag in ("rank", "batch_size", "grad_accum", "epochs", "chunk_size"):
        if not getattr(args, flag) >= 1:
            refuse(flag, "must be 1 or more")
    for flag in ("max_steps", "max_samples"):
        if getattr(args, flag) is not None and not getattr(args, flag) >= 1:
            refuse(flag, "must be 1 or more (leave it out for no limit)")
    if not args.max_len >= 2:
        refuse("max_len", "must be 2 or more (a target is the token after another)")
    for flag in ("heldout", "save_every"):
        if not getattr(args, flag) >= 0:
            refuse(flag, "must be 0 or more")
    for flag, what in (("lr", "a learning rate of 0 trains nothing"), ("lora_alpha", "a scale of 0 trains nothing"),
                       ("temperature", "the softmax temperature must be above 0")):
        if not getattr(args, flag) > 0:
            refuse(flag, f"must be above 0 ({what})")
    if not 0 <= args.min_lr <= args.lr:
        refuse("min_lr", f"must lie in [0, --lr {args.lr}]")
    if not 0 <= args.alpha <= 1:
        refuse("alpha", "must lie in [0, 1]: the loss is alpha*CE + (1-alpha)*KL; outside it one term is "
                        "pushed the wrong way")
    if not 0 <= args.warmup <= 1:
        refuse("warmup", "is a fraction of all steps: must lie in [0, 1]")
    if not 0 <= args.lora_dropout < 1:
        refuse("lora_dropout", "must lie in [0, 1)")
    for flag in ("weight_decay", "grad_clip"):
        if not getattr(args, flag) >= 0:
            refuse(flag, "must be 0 or more")
    unknown = [t for t in args.targets.split(",") if t not in lora.ALL_PROJECTIONS]
    if unknown or not args.targets:
        refuse("targets", f"unknown layer(s) {unknown}; choose from {','.join(lora.ALL_PROJECTIONS)}")

    # Combinations in which one flag would be ignored without a word. Two flags that contradict each
    # other stop the run; flags that do not apply to the chosen --method are named, not refused, because
    # a comparison of methods (benchmarks/experiment.py) passes one flag set to all of them.
    if args.prune_to is not None and args.student is not None:
        refuse("prune_to", "prunes the teacher into a student, but --student gives the student: drop one")
    unused = {"sft": ("adapter", "rank", "lora_alpha", "lora_dropout", "targets", "alpha", "temperature", "divergence"),
              "kd": ("adapter", "rank", "lora_alpha", "lora_dropout", "targets"),
              "lora": ("alpha", "temperature", "divergence"), "neo": ()}[args.method]
    ignored = [f"--{f.replace('_', '-')}" for f in unused if f in args.given]
    if ignored:
        print0(f"note: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --method "
               f"{args.method} ({'it trains every weight' if args.method in ('sft', 'kd') else ''}"
               f"{', ' if args.method == 'sft' else ''}{'no teacher term: CE only' if args.method in ('sft', 'lora') else ''})")
    if args.pack and args.teacher_cache:
        refuse("pack", "the teacher cache holds one row per example, and a packed row holds several: "
                       "train from the cache unpacked, or pack with the live teacher")
    if args.resume and args.overwrite:
        refuse("overwrite", "would delete the checkpoints that --resume continues from: pass one of them")

    # Limits that need the models' config.json (nothing is loaded).
    teacher = llama.LlamaConfig.from_json(llama.resolve_folder(args.teacher or offline_model()) / "config.json")
    if args.prune_to is not None and not 1 <= args.prune_to < teacher.num_hidden_layers:
        refuse("prune_to", f"the teacher has {teacher.num_hidden_layers} layers: a student keeps 1.."
                           f"{teacher.num_hidden_layers - 1} of them")
    configs = {"teacher": teacher}
    if args.student is not None:
        configs["student"] = llama.LlamaConfig.from_json(llama.resolve_folder(args.student) / "config.json")
    for name, config in configs.items():
        if args.max_len > config.max_position_embeddings:
            refuse("max_len", f"the {name} handles at most {config.max_position_embeddings} positions "
                              f"(max_position_embeddings)")

# -----------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE; plain `python train.py` is a world of one.


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0


def setup_distributed():
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                            if device.type == "cuda" else None)
    return Dist(rank, local, world, device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


# -----------------------------------------------------------------------------
# The run, from arguments to the saved student. Every helper it calls follows, in the order called.


def main(argv=None):
    args = parse_args(argv)
    if args.plan:  # dry run: memory from config.json files, no weights, no data
        import plan
        return plan.plan_from_train_args(args, args.teacher or offline_model())
    check_args(args)  # every flag against its meaning, before anything is loaded
    d = setup_distributed()
    args.world_size = d.world
    out = Path(args.out)
    lock = run_folder.claim(out, args.resume, args.overwrite) if d.master else None  # ours, and only ours
    torch.manual_seed(args.seed)  # the same on every rank: every rank builds the same adapters
    print0(f"precision: {choose_dtype(args.dtype, d.device).why}; trainable weights, gradients and AdamW "
           f"state float32")
    if args.demo:
        budget = ", ".join(f"{k}={getattr(args, k)}" for k in DEMO) + f", lr={args.lr:g}"
        print0(f"offline demo on the CPU with a small budget: {budget} (the paper's budget applies with "
               f"--teacher or on a GPU; any flag overrides)")

    # ---- models ------------------------------------------------------------
    teacher_path = str(llama.resolve_folder(args.teacher or offline_model()))
    args.bases = base_fingerprints(args, teacher_path)
    state = load_checkpoint(out, args) if args.resume else None  # flags and bases checked before any model
    tokenizer = data.Tokenizer.from_dir(teacher_path)
    train_set, held_set = load_data(args, tokenizer)
    use_teacher = args.method in ("neo", "kd")
    cache = open_teacher_cache(args, teacher_path, tokenizer, train_set, held_set, d.device) if args.teacher_cache \
        else None
    teacher = load_teacher(teacher_path, args, d) if (use_teacher or not args.no_report) and cache is None else None
    student = build_student(args, teacher_path, train_set[0]["input_ids"], d.device)
    base_path = save_student_base(student, args, out, d)
    student = prepare_student(student, args, d.device)
    vocab_size = shared_vocab(student, teacher, tokenizer)
    for examples in (train_set, held_set):
        check_labels(examples, vocab_size or student.lm_head.weight.shape[0])

    # ---- data ----------------------------------------------------------------
    if args.pack:  # rows of several whole examples; the model keeps them apart by document_ids
        n_examples, train_set = len(train_set), data.pack(train_set, args.max_len, args.seed)
        print0(f"data: packed {n_examples} examples into {len(train_set)} rows of up to {args.max_len} tokens")
    loader = data.Batches(train_set, args.batch_size, pad_id=tokenizer.pad_token_id, rank=d.rank,
                          world_size=d.world, seed=args.seed)
    total_steps = count_steps(args, loader, len(train_set), d)
    # scored now, before the first step changes the student
    report = start_report(args, d, student, teacher, tokenizer, loader, held_set, vocab_size, out, cache)

    # ---- optimizer ------------------------------------------------------------
    if args.compile:
        compile_blocks(student, teacher if use_teacher else None)
    distiller = Distiller(student, args.alpha, args.temperature, args.divergence, args.chunk_size, vocab_size)
    start_step = 0
    if state is not None:
        distiller.load_state_dict(state["trainable"], strict=False)  # trainable weights only
        start_step = state["step"]
        loader.load_state_dict(state["data"])
    wrapped = wrap(distiller, teacher, args, d)
    torch.manual_seed(args.seed + 1 + d.rank)  # from here on each rank draws its own dropout masks
    params, optimizer = make_optimizer(wrapped, args)
    if state is not None:
        restore_optimizer(wrapped, optimizer, state, args, d)
    warmup = max(1, int(args.warmup * total_steps))

    # ---- loop ------------------------------------------------------------------
    metrics_path = start_metrics(out, args, start_step, d)
    wrapped.train()  # adapter dropout on; the teacher stays in eval()
    batches = endless(loader)
    t_start = time.time()
    with tqdm_bar(total_steps, start_step, d) as bar:  # closed even when a bad loss stops the run
        for step in range(start_step, total_steps):
            t0 = time.time()
            lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr)
            micro = [next(batches) for _ in range(args.grad_accum)]
            s = train_step(wrapped, teacher if use_teacher else None, optimizer, params, micro, lr, step, args, d, out,
                           cache if use_teacher else None)
            dt = time.time() - t0
            row = {"step": step + 1, "loss": s["loss"], "ce": s["ce"], "kl": s["kl"], "lr": lr,
                   "grad_norm": s["grad_norm"], "tokens_per_s": s["tokens"] / dt, "step_s": dt,
                   "mem_gb": memory_gb(d.device)}
            if d.master:
                log_step(row, metrics_path, bar)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                save_checkpoint(out, step + 1, wrapped, optimizer, loader, args, d, base_path)
    train_time = time.time() - t_start

    # ---- save ------------------------------------------------------------------
    save_checkpoint(out, total_steps, wrapped, optimizer, loader, args, d, base_path)
    final = final_student(wrapped, student, args, d)
    if d.master:
        torch.compiler.set_stance("force_eager")  # --compile: scoring and generating below need no graphs
        export(final, out, args, base_path)
        plot_losses(metrics_path, out / "loss_curve.png")
        print0(f"trained {total_steps - start_step} steps in {train_time:.0f} s; wrote {out}")
        if report is not None:
            report.after(final)
    if dist.is_initialized():
        dist.destroy_process_group()
    if lock is not None:
        lock.release()
    optimized = [n.removeprefix("module.").removeprefix("student.") for n, p in wrapped.named_parameters()
                 if p.requires_grad]
    return {"student": final, "optimized": optimized, "out": out}


# -----------------------------------------------------------------------------
# Precision. bf16 halves the bytes of every frozen weight and, where the hardware multiplies bf16
# natively, runs the matmuls 2-4x faster. What stays fp32 is what accumulates small updates: the
# trainable weights (the optimizer's master copy), their gradients and AdamW's moments. Under
# autocast each matmul gets a bf16 copy of its fp32 weight, and neo.py upcasts every logit chunk
# before its softmax, so the loss is fp32 too.


class Precision(NamedTuple):
    frozen: torch.dtype               # the teacher and the frozen student base (neo, lora)
    compute: torch.dtype | None       # autocast dtype for the student's matmuls; None: plain fp32
    why: str                          # one line, printed at start-up


def bf16_native(device) -> tuple[bool, str]:
    """Does `device` multiply bf16 in hardware? -> (yes/no, the evidence). Without it bf16 is
    emulated, slower than fp32, so auto keeps fp32 there."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor} (bf16 tensor cores from 8.0)"
    if device.type == "cpu":
        found = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
        return bool(found), (f"CPU flags {' '.join(found)}" if found else "no avx512_bf16/amx_bf16 CPU flag")
    return False, f"device {device.type}"


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def choose_dtype(requested: str, device) -> Precision:
    """--dtype auto|float32|bfloat16 -> the Precision used on `device`: auto picks bf16 (frozen
    weights and autocast) where bf16 matmul is native, fp32 elsewhere; an explicit dtype wins."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if requested == "float32":
        return Precision(fp32, None, "float32 (--dtype float32)")
    native, evidence = bf16_native(device)
    if requested == "bfloat16":
        return Precision(bf16, bf16, f"bfloat16 (--dtype bfloat16; {evidence}"
                                     f"{'' if native else ': emulated, expect it slower than float32'})")
    if requested != "auto":
        raise ValueError(f"--dtype {requested!r}: choose auto, float32 or bfloat16")
    if native:
        return Precision(bf16, bf16, f"bfloat16 (--dtype auto: {evidence})")
    return Precision(fp32, None, f"float32 (--dtype auto: {evidence}; bf16 would be emulated)")


def frozen_dtype(args, device):
    return choose_dtype(args.dtype, device).frozen


def autocast(device, args):
    """bf16 autocast for the student's forward and loss when the precision asks for it."""
    compute = choose_dtype(args.dtype, device).compute
    return torch.autocast(device.type, dtype=compute) if compute else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Models: the teacher as it is; the student given, or pruned from the teacher; then made trainable.


def offline_model():
    from runkit import offline
    return offline.smollm2_dir()


def load_teacher(teacher_path, args, d):
    """The frozen teacher: eval() (no dropout), no gradients, in the frozen dtype (bf16 where native)."""
    teacher = llama.Llama.from_pretrained(teacher_path, dtype=frozen_dtype(args, d.device), device=d.device)
    return teacher.eval().requires_grad_(False)


def build_student(args, teacher_path, calibration, device):
    """The student in fp32: a given model, or the teacher with its least important layers removed."""
    if args.student is not None:
        return llama.Llama.from_pretrained(args.student, dtype=torch.float32, device=device)
    full = llama.Llama.from_pretrained(teacher_path, dtype=torch.float32, device=device)
    n_layers = full.config.num_hidden_layers
    keep_n = args.prune_to or n_layers // 2
    if not 0 < keep_n <= n_layers:
        raise SystemExit(f"--prune-to {keep_n}: the teacher has {n_layers} layers; choose 1..{n_layers}")
    ids = torch.as_tensor(np.asarray(calibration, dtype=np.int64), device=device)[None]  # (1, T)
    keep = llama.most_important_layers(llama.block_importance(full, ids), keep_n)
    print0(f"student: the teacher's {keep_n} most important of {n_layers} layers {keep} "
           f"(block importance on {ids.shape[1]} calibration tokens)")
    return llama.prune_layers(full, keep)


def save_student_base(student, args, out: Path, d: Dist) -> str:
    """The adapter's base model: --student, or the pruned student saved as a folder (also a baseline
    to evaluate). Returns its path."""
    if args.student is not None:
        return args.student
    folder = out / "student_base"
    if d.master and not (args.resume and (folder / "config.json").exists()):
        student.save_pretrained(folder)  # always this run's (atomic: complete or not at all)
    return str(folder)


def make_trainable(student, args, verbose=True):
    """sft/kd: every weight trains. neo/lora: adapters on the target linears, everything else frozen."""
    if args.method in ("sft", "kd"):
        student.requires_grad_(True)
        n = sum(p.numel() for p in student.parameters())
        if verbose:
            print0(f"trainable parameters: {n:,} / {n:,} (100%)")
        return student
    return lora.apply_lora(student, targets=tuple(args.targets.split(",")), rank=args.rank,
                           alpha=args.lora_alpha, dropout=args.lora_dropout, variant=args.adapter,
                           verbose=verbose)


def prepare_student(student, args, device):
    """The student as the training step uses it: trainable set chosen, activation checkpointing as
    asked, and for neo/lora the frozen base in the frozen dtype (bf16 under --dtype auto where
    it is native; the adapters stay fp32: the optimizer's master copy). sft/kd keep every weight
    fp32 and get bf16 only through autocast."""
    student = make_trainable(student, args)
    if args.grad_checkpoint:
        checkpoint_blocks(student)
    dtype = frozen_dtype(args, device)
    if args.method in ("neo", "lora") and dtype != torch.float32:
        for p in student.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return student


def checkpoint_blocks(student):
    """Activation checkpointing: each decoder block keeps only its input for backward and recomputes
    its activations there (torch.utils.checkpoint; dropout masks are replayed from the saved RNG
    state). Each block's forward is wrapped in place rather than the block put inside a new module,
    so every parameter keeps its Hugging Face name (adapter files, checkpoints, FSDP2's state dict)
    and FSDP2 shards the block as before: its hooks stay on the block, around the wrapped forward."""
    for block in student.model.layers:
        block.forward = functools.partial(_recomputed_in_backward, block.forward)


def _recomputed_in_backward(forward, *inputs):
    if not torch.is_grad_enabled():  # evaluation and generation store nothing for backward anyway
        return forward(*inputs)
    return checkpoint(forward, *inputs, use_reentrant=False)


def shared_vocab(student, teacher, tokenizer):
    """None when the LM heads match; the tokenizer's size when they differ only by padding rows."""
    vs = student.lm_head.weight.shape[0]
    vt = teacher.lm_head.weight.shape[0] if teacher is not None else vs
    if vs == vt:
        return None
    if tokenizer.vocab_size <= min(vs, vt):
        print0(f"vocab: teacher {vt} and student {vs} rows; comparing the tokenizer's {tokenizer.vocab_size}")
        return tokenizer.vocab_size
    raise SystemExit(f"teacher and student vocabularies differ: teacher head {vt} rows, student head {vs} "
                     f"rows, tokenizer {tokenizer.vocab_size} tokens. Distillation needs one shared "
                     f"tokenizer; pick a student from the teacher's family (or --prune-to).")


# -----------------------------------------------------------------------------
# Data: tokenised conversations, checked once on the host, then micro-batches forever.


def load_data(args, tokenizer):
    """Training and held-out examples, read from the tokenised cache (runkit/tokenized.py: built by the
    first run, rank 0, and shared). The offline set has its own fixed held-out split; for user
    data the held-out conversations are a seeded sample set aside before training."""
    offline_data = args.data in (None, "offline")
    store = tokenized.load("offline" if offline_data else args.data, tokenizer, args.max_len,
                           skip_bad_lines=args.skip_bad_lines)
    stats = store.stats()
    order = files.sample_indices(len(store), args.max_samples, args.seed)
    if offline_data:
        held_store = tokenized.load("offline:heldout", tokenizer, args.max_len)
        held = files.sample_indices(len(held_store), args.heldout, args.seed)
    else:
        random.Random(args.seed).shuffle(order)
        n_held = min(args.heldout, len(order) // 10)
        held_store, held, order = store, order[:n_held], order[n_held:]
    train_set = store.select(order, stats)
    print0(f"data: {stats.summary()} (tokenised in {store.folder})")
    held_set = held_store.select(held) if held else []
    print0(f"data: {len(train_set)} training and {len(held_set)} held-out examples, max {args.max_len} tokens")
    return train_set, held_set


def check_labels(examples, n_rows: int):
    """Every label is a row of the LM head (or -100). Checked once here, before training, so that no
    training step has to ask the GPU. Examples from the tokenised cache answer with the largest
    token id of the whole cache (labels are token ids), one pass over its memory-mapped ids."""
    if not len(examples):
        return
    if isinstance(examples, tokenized.Examples):
        top = examples.max_token_id()
    else:
        top = max(max(e["labels"]) for e in examples)
    if top >= n_rows:
        raise ValueError(f"data: token id {top} is outside the model's vocabulary of {n_rows} rows; the "
                         f"tokenizer does not belong to this model (use the teacher's own tokenizer)")


def count_steps(args, loader, n_examples, d: Dist) -> int:
    """Optimizer steps in the run. Micro-batches run on across epoch boundaries; a step is always
    grad_accum of them."""
    total_steps = args.epochs * len(loader) // args.grad_accum
    if total_steps == 0:
        raise SystemExit(f"data: {n_examples} examples make {len(loader)} micro-batches of "
                         f"{args.batch_size} x {d.world} processes per epoch, fewer than --grad-accum "
                         f"{args.grad_accum}. Use more data or a smaller --batch-size/--grad-accum.")
    return min(total_steps, args.max_steps) if args.max_steps else total_steps


def open_teacher_cache(args, teacher_path, tokenizer, train_set, held_set, device):
    """The teacher cache for this run, refused (naming the field) if it was made for other tokens,
    another teacher or teacher dtype, tokenizer, template, max length or temperature, or if a shard
    is missing."""
    import teacher_cache
    if args.divergence != "forward_kl":
        raise SystemExit(f"--teacher-cache holds the teacher's likeliest tokens and tail draws, which give the "
                         f"forward KL only; drop --divergence {args.divergence} or train with the live teacher")
    expected = teacher_cache.identity(args, teacher_path, tokenizer, {"train": train_set, "heldout": held_set},
                                      device)
    cache = teacher_cache.TeacherCache(args.teacher_cache, expected)
    print0(f"teacher: not loaded; its most likely tokens ({cache.k} per position on average, at most "
           f"{cache.k_max}) come from {args.teacher_cache}")
    return cache


def endless(loader):
    """Micro-batches forever: the loader resumes from its saved position and moves to the next epoch."""
    while True:
        yield from loader


# -----------------------------------------------------------------------------
# The trained module: the student plus the objective. Wrapping the loss inside forward() lets DDP
# and FSDP2 see one module: FSDP2 gathers the student's LM head for the chunked projection.


class Distiller(nn.Module):
    def __init__(self, student, alpha, temperature, divergence, chunk_size, vocab_size=None):
        super().__init__()
        self.student = student
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        self.chunk_size, self.vocab_size = chunk_size, vocab_size

    def forward(self, input_ids, attention_mask, labels, teacher_hidden, teacher_head, normalizer,
                document_ids=None, teacher_topk=None):
        hidden = self.student(input_ids, attention_mask, document_ids=document_ids, return_hidden=True)  # (B, T, D)
        if teacher_topk is not None:  # the teacher's cached top-k rows (teacher_cache.py)
            return neo.sparse_neo_loss(hidden, self.student.lm_head.weight, teacher_topk, labels, alpha=self.alpha,
                                       temperature=self.temperature, chunk_size=self.chunk_size,
                                       normalizer=normalizer, vocab_size=self.vocab_size)
        return neo.neo_loss(hidden, self.student.lm_head.weight, teacher_hidden, teacher_head, labels,
                            alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                            chunk_size=self.chunk_size, normalizer=normalizer, vocab_size=self.vocab_size)


def compile_blocks(*models):
    """torch.compile each transformer block in place, as torchtune does: one block's graph is
    compiled once and reused by every layer, and inductor fuses the elementwise work between the
    matmuls (RMSNorm, RoPE, SiLU·up, the adapter's add) into a few kernels. The loss stays eager:
    its chunk loop already runs at matmul speed. Blocks, not the whole model, keep compilation
    short and leave activation checkpointing and FSDP2 (which wrap blocks) working as before."""
    for m in models:
        if m is not None:
            for layer in m.model.layers:
                layer.compile()


def wrap(distiller, teacher, args, d: Dist):
    """Data parallel (DDP) or sharded (FSDP2) student; the teacher is never wrapped by DDP."""
    if args.zero >= 2:
        reshard = args.zero == 3
        for layer in distiller.student.model.layers:
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(distiller, reshard_after_forward=reshard)
        if args.zero == 3 and teacher is not None:
            # Teacher layers are sharded too; its LM head stays whole for the chunked loss.
            for layer in teacher.model.layers:
                fully_shard(layer)
            fully_shard(teacher, ignored_params={teacher.lm_head.weight, teacher.model.embed_tokens.weight})
        return distiller
    if d.world > 1:
        return DDP(distiller, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return distiller


def make_optimizer(wrapped, args):
    """AdamW over the trainable parameters; with --zero 1 each rank keeps the state of its share."""
    params = [p for p in wrapped.parameters() if p.requires_grad]
    print0(f"method {args.method}: optimising {sum(p.numel() for p in params):,} parameters "
           f"({'ZeroRedundancyOptimizer' if args.zero == 1 else 'FSDP2' if args.zero >= 2 else 'AdamW'})")
    adamw = dict(lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    if args.zero == 1:
        return params, ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
    return params, torch.optim.AdamW(params, **adamw)


def lr_at(step, total, warmup, peak, floor):
    """Linear warm-up to `peak`, then cosine decay to `floor` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# The loop


def start_metrics(out: Path, args, start_step, d: Dist) -> Path:
    """metrics.jsonl, one row per step. A resumed run continues the curve from its checkpoint; steps
    logged after it are redone."""
    metrics_path = out / "metrics.jsonl"
    if d.master:
        rows = metrics_path.read_text().splitlines() if args.resume and metrics_path.exists() else []
        run_folder.write_text(metrics_path, "".join(r + "\n" for r in rows if json.loads(r)["step"] <= start_step))
    return metrics_path


def tqdm_bar(total, start, d: Dist):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not d.master, desc="train", dynamic_ncols=True)


def train_step(wrapped, teacher, optimizer, params, micro, lr, step, args, d: Dist, out: Path, cache=None) -> dict:
    """One optimizer step over the micro-batches `micro` (CPU tensors); teacher None for sft/lora,
    and for kd/neo from a teacher cache (then its rows are looked up by example id, not position).

    The host never waits for the GPU between micro-batches: what it needs (the loss terms to log,
    whether every loss was finite, the gradient norm) comes back in one transfer per step, before
    the optimizer step, so a non-finite loss still stops the run with the weights untouched."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Normalise by the valid target tokens of the whole step, over micro-batches and ranks, so
    # that 16 accumulated micro-batches on 6 processes equal one batch of 16 x 6 x 4. Counted on
    # the host from the CPU batches, summed over ranks on the device.
    n_local = sum(neo.count_targets(b["labels"]) for b in micro)
    n_tokens = sum(b["attention_mask"].sum() for b in micro)
    n_global, tokens = all_reduce_sum(torch.tensor([float(n_local), float(n_tokens)], device=d.device))
    # DDP and FSDP average gradients over ranks; the loss is already a global mean, so undo that.
    normalizer = n_global.clamp(min=1) / d.world
    sums = torch.zeros(3, device=d.device)            # loss·n, ce·n, kl·n for logging
    bad = torch.zeros(len(micro), device=d.device)    # 1 where a micro-batch's loss is not finite
    for i, b in enumerate(micro):
        teacher_topk = None
        if cache is not None:
            teacher_topk = cache.rows("train", b["example_ids"]).to(d.device)
        b = {k: v.to(d.device) for k, v in b.items()}
        with no_grad_sync(wrapped, args, last=i == len(micro) - 1):
            res = forward_backward(wrapped, teacher, b, normalizer, d.device, args, teacher_topk)
        bad[i] = (~torch.isfinite(res.loss.detach())).float()
        sums += torch.stack([res.loss.detach() * normalizer, res.ce * res.n_tokens, res.kl * res.n_tokens])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
    sums = all_reduce_sum(sums) / n_global.clamp(min=1)
    bad = all_reduce_sum(bad)
    host = torch.cat([sums, grad_norm.reshape(1), tokens.reshape(1), bad]).tolist()  # the step's one sync
    if any(host[5:]):
        stop_non_finite(step, next(i for i, x in enumerate(host[5:]) if x), out)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(zip(("loss", "ce", "kl", "grad_norm", "tokens"), host[:5]))


def forward_backward(model, teacher, b, normalizer, device, args, teacher_topk=None):
    """One micro-batch: the teacher's hidden states under no_grad (skipped with a cache's rows or
    no teacher), then the student's forward and loss under the run's autocast, and backward.
    `model` is a Distiller, wrapped or not; packed rows carry their document_ids to both models."""
    teacher_hidden = teacher_head = None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = teacher(b["input_ids"], b["attention_mask"], document_ids=b.get("document_ids"),
                                     return_hidden=True)
        teacher_head = teacher.lm_head.weight
    with autocast(device, args):
        res = model(b["input_ids"], b["attention_mask"], b["labels"], teacher_hidden, teacher_head, normalizer,
                    b.get("document_ids"), teacher_topk)
        res.loss.backward()
    return res


def no_grad_sync(wrapped, args, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if args.zero >= 2:
        wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(wrapped, DDP) and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def stop_non_finite(step, micro, out: Path):
    latest = out / "checkpoints" / "latest"
    kept = f"the last good checkpoint is {latest.read_text().strip()}" if latest.exists() else \
        "no checkpoint was written yet"
    raise SystemExit(f"non-finite loss at step {step + 1}, micro-batch {micro} (on at least one rank); "
                     f"stopped before the optimizer step, {kept} in {out / 'checkpoints'}. "
                     f"Lower --lr, or check the data of that batch.")


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
                    lr=f"{row['lr']:.1e}", tok_s=f"{row['tokens_per_s']:.0f}", mem=f"{row['mem_gb']:.1f}G")
    bar.update(1)


# -----------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, swapped in, then `latest` is switched atomically
# (run_folder.publish_checkpoint), so a crash mid-save, even mid re-save of the same step, leaves a
# whole checkpoint; --resume takes the newest one that loads (run_folder.find_checkpoint).


def save_checkpoint(out: Path, step, wrapped, optimizer, loader, args, d: Dist, base_path):
    """Trainable weights, optimizer state, data position and every rank's dropout RNG (the learning
    rate is a pure function of the step, so there is no scheduler state)."""
    model_sd, optim_sd = trainable_state(wrapped, optimizer, d, args.zero)
    # Adapter dropout is the only random draw of training; it draws from the device's generator.
    rng = torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else torch.get_rng_state()
    rngs = [None] * d.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    def write(folder: Path):
        torch.save({"step": step, "trainable": model_sd, "optimizer": optim_sd, "data": loader.state_dict(),
                    "rng": rngs, "args": {k: getattr(args, k) for k in RESUME_FLAGS}, "bases": args.bases},
                   folder / "state.pt")
        if args.method in ("neo", "lora"):  # the adapter so far, in PEFT's layout, usable on its own
            student = module_of(wrapped).student
            adapters.save_adapter(student, folder / "adapter", base_path,
                                  state_dict={k.removeprefix("student."): v for k, v in model_sd.items()},
                                  base_fingerprint=args.bases["student"])  # None: from the student_base folder

    if d.master:  # into a temporary folder, then swapped in; the newest two are kept
        run_folder.publish_checkpoint(out / "checkpoints", step, write, keep=2)
    if dist.is_initialized():
        dist.barrier()


def trainable_state(wrapped, optimizer, d: Dist, zero: int):
    """Full (unsharded) trainable weights and optimizer state, on rank 0 (None elsewhere)."""
    if zero >= 2:  # FSDP2: gather the shards with PyTorch's distributed state-dict API
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(wrapped, optimizer, options=opts)
    else:  # DDP keeps whole copies; ZeRO-1 first gathers its optimizer shards on rank 0
        if zero == 1:
            optimizer.consolidate_state_dict(to=0)
        model_sd = module_of(wrapped).state_dict()
        optim_sd = optimizer.state_dict() if d.master else None
    names = {n for n, p in module_of(wrapped).named_parameters() if p.requires_grad}
    model_sd = {k: v.detach().cpu().clone() for k, v in model_sd.items() if k in names}
    return (model_sd, optim_sd) if d.master else (None, None)


def module_of(wrapped):
    return wrapped.module if isinstance(wrapped, DDP) else wrapped


def load_checkpoint(out: Path, args):
    """The newest checkpoint that loads (a damaged one is named and skipped), checked against this
    run: every flag that changes the result, and the fingerprints of the teacher and --student."""
    folder, state = run_folder.find_checkpoint(out, lambda f: torch.load(f / "state.pt", weights_only=False),
                                               say=print0)
    for flag in RESUME_FLAGS:
        if flag not in state["args"]:  # a checkpoint from before this flag was recorded
            print0(f"--resume: {folder.name} does not record --{flag.replace('_', '-')}; not checked")
            continue
        saved, now = state["args"][flag], getattr(args, flag)
        if saved != now:
            raise SystemExit(f"--resume: the checkpoint was made with --{flag.replace('_', '-')}={saved!r}, "
                             f"this run has {now!r}. Use the same flags, or a new --out.")
    for role, saved in (state.get("bases") or {}).items():
        now = args.bases.get(role)
        if saved != now:
            raise SystemExit(f"--resume: the {role} is not the model the checkpoint was trained from: the "
                             f"checkpoint records {saved}, {getattr(args, role) or 'the ' + role} is {now}. "
                             f"Resume with the same {role}, or start a new --out.")
    return state


def base_fingerprints(args, teacher_path) -> dict:
    """Fingerprints (adapters.fingerprint) of the models the adapter's base is made from: the teacher, which
    the student is pruned from, and --student when given. Kept in checkpoints, checked by --resume."""
    return {"teacher": adapters.fingerprint(teacher_path),
            "student": adapters.fingerprint(llama.resolve_folder(args.student)) if args.student else None}


def restore_optimizer(wrapped, optimizer, state, args, d):
    """Optimizer state and this rank's dropout RNG, from a checkpoint."""
    if args.zero >= 2:
        set_optimizer_state_dict(wrapped, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:  # ZeroRedundancyOptimizer takes the consolidated dict and keeps its own shard
        optimizer.load_state_dict(state["optimizer"])
    rng = state["rng"][d.rank]
    if d.device.type == "cuda":
        torch.cuda.set_rng_state(rng, d.device)
    else:
        torch.set_rng_state(rng)


# -----------------------------------------------------------------------------
# Save: the trained student as an adapter and as an ordinary model folder.


def final_student(wrapped, student, args, d):
    """A plain, unsharded copy of the trained student on rank 0 (None elsewhere)."""
    if args.zero < 2:
        return student if d.master else None
    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.master:
        return None
    # FSDP2 sharded `student` in place; an empty fp32 skeleton of the same shape (config and
    # adapters, built on the meta device without weights) receives the gathered full state.
    with torch.device("meta"):
        plain = make_trainable(llama.Llama(student.config), args, verbose=False)
    plain.to_empty(device=d.device)
    if student.config.tie_word_embeddings:  # to_empty gave the head and the embedding a tensor each
        plain.lm_head.weight = plain.model.embed_tokens.weight
    plain.init_rope(d.device)
    plain.load_state_dict({k.removeprefix("student."): v for k, v in full.items()})
    plain.source_dir = student.source_dir
    return plain


def export(student, out: Path, args, base_path):
    """The adapter (PEFT layout) and a merged Hugging Face folder; or the full student for sft/kd."""
    if args.method in ("neo", "lora"):
        adapters.save_adapter(student, out / "adapter", base_model_name_or_path=base_path,
                              base_fingerprint=args.bases["student"])  # None: from the student_base folder
        lora.save_merged(student, out / "model")
    else:
        student.save_pretrained(out / "model")


# -----------------------------------------------------------------------------
# The report (rank 0): the loss curve, and held-out scores and answers of the student before and
# after training, side by side with the teacher's.

PROMPTS = ["What is the capital of France?",
           "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
           "How many clips did Natalia sell altogether in April and May?",
           "Name three primary colors."]


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
    teacher: nn.Module | None  # None with a teacher cache: its top-k rows give the KL (neo.sparse_neo_loss)
    tokenizer: data.Tokenizer
    batches: list            # held-out micro-batches (CPU tensors)
    device: torch.device
    chunk_size: int
    vocab_size: int | None
    out: Path
    cache: object = None       # teacher_cache.TeacherCache
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
    tail draws D_S, an unbiased estimate of it (neo.py)."""
    was_training = student.training
    student.eval()
    ce = kl = n = 0.0
    for b in batches:
        top = cache.rows("heldout", b["example_ids"]) if cache is not None else None
        b = {k: v.to(device) for k, v in b.items()}
        sh = student(b["input_ids"], b["attention_mask"], return_hidden=True)
        if top is not None:
            top = top.to(device)
            out = neo.sparse_neo_loss(sh.float(), student.lm_head.weight.float(), top, b["labels"], alpha=0.5,
                                      temperature=temperature, chunk_size=chunk_size, normalizer=1.0)
        else:
            th = teacher(b["input_ids"], b["attention_mask"], return_hidden=True)
            out = neo.neo_loss(sh.float(), student.lm_head.weight.float(), th.float(),
                               teacher.lm_head.weight.float(), b["labels"], alpha=0.5, temperature=temperature,
                               chunk_size=chunk_size, normalizer=1.0, vocab_size=vocab_size)
        ce += out.ce.item() * out.n_tokens.item()
        kl += out.kl.item() * out.n_tokens.item()
        n += out.n_tokens.item()
    student.train(was_training)
    return ce / max(n, 1), kl / max(n, 1)


def answers(models: dict, tokenizer, device, max_new_tokens=48):
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                              add_generation_prompt=True))
               for q in PROMPTS]
    table = {}
    for name, m in models.items():
        was_training = m.training
        m.eval()
        outs = m.generate(prompts, max_new_tokens=max_new_tokens, stop_token_ids=tokenizer.stop_token_ids)
        m.train(was_training)
        table[name] = [tokenizer.decode(o).strip() for o in outs]
    return table


def print_answers(table):
    for i, q in enumerate(PROMPTS):
        print0(f"\nQ: {q}")
        for name, outs in table.items():
            print0(f"  [{name:>16}] {outs[i]!r}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as e:  # bad input: say what and where, without a traceback
        sys.exit(f"error: {e}")
