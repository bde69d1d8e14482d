"""train.py's command line: every flag defined once, its defaults, and the checks run before
anything is loaded.

FLAGS is the one definition of each flag, in the groups `train.py --help` shows. train.py builds
its parser from all of them (`parse`); a benchmark or command that takes one of train.py's flags
adds the same definition with `add(parser, "rank", "max_len", max_len=256)` (a keyword overrides
that flag's default), so a flag's name, type and help are written in one place only.

Paper values are the defaults; the offline demo (no --teacher, no GPU) swaps in a budget that
finishes in minutes on two CPU cores, and says so.
"""
import argparse
from pathlib import Path

import torch

import model as llama
from lora import ALL_PROJECTIONS
from neo import DIVERGENCES

METHODS = ("neo", "lora", "kd", "sft")
DTYPES = ("auto", "float32", "bfloat16", "float64")

PAPER = dict(max_len=512, batch_size=4, grad_accum=16, epochs=2, max_samples=None, heldout=256, pack=False)
# The demo packs ~1700 conversations into ~60 steps of 8 rows and trains the adapters at 2e-3 (10x the
# paper's rate, which is tuned for 2 epochs of a million conversations; benchmarks/experiment.py's
# sweep found 1e-3 the best of 3e-4/1e-3/3e-3 without the hidden-state term, issue 31's runs 2e-3 with it).
DEMO = dict(max_len=512, batch_size=4, grad_accum=2, epochs=1, max_samples=1700, heldout=32, pack=True)
# Issue 31's measurement (benchmarks/results/README.md, "Intermediate states and pruning"): at this
# budget the demo's pruned student learns most at 2e-3 with the hidden-state term at β = 10 (and
# pruning measured on 16 examples, --calibration's default): held-out KL 1.298 -> 1.038 over seeds 0-2.
DEMO_ADAPTER_LR = 2e-3
DEMO_HIDDEN_WEIGHT = 10.0

FLAGS = {  # group -> {dest: (flag, argparse keywords)}
    "what to train": {
        "method": ("--method", dict(choices=METHODS, default="neo",
                                    help="neo/lora train adapters only; kd/sft train every student weight; "
                                         "neo/kd add the KL-to-teacher term")),
        "adapter": ("--adapter", dict(choices=["lora", "moslora"], default="lora",
                                      help="adapter variant for neo/lora (MoSLoRA adds an r x r mixer)")),
        "rank": ("--rank", dict(type=int, default=128, help="adapter rank r (paper guideline: 128)")),
        "lora_alpha": ("--lora-alpha", dict(type=float, default=None,
                                            help="adapter scale numerator (default: 2 x rank)")),
        "lora_dropout": ("--lora-dropout", dict(type=float, default=0.0,
                                                help="dropout on the adapter input (0 as in PEFT; above 0 every "
                                                     "adapter keeps its own dropped copy of its input for "
                                                     "backward: about +50%% activation memory)")),
        "targets": ("--targets", dict(default=",".join(ALL_PROJECTIONS),
                                      help="comma-separated linear layers that get adapters")),
    },
    "models": {
        "teacher": ("--teacher", dict(default=None,
                                      help="teacher folder or Hub id (default: the offline SmolLM2-135M-Instruct)")),
        "student": ("--student", dict(default=None, help="student folder or Hub id (default: prune the teacher)")),
        "teacher_cache": ("--teacher-cache", dict(default=None,
                                                  help="train from a top-k teacher cache written by teacher_cache.py "
                                                       "instead of running the teacher (kd/neo use the sparse KL; "
                                                       "the held-out report reads the cache too)")),
        "prune_to": ("--prune-to", dict(type=int, default=None,
                                        help="build the student by keeping this many of the teacher's most important "
                                             "layers (default when no --student: half of them)")),
        "prune_by": ("--prune-by", dict(choices=["importance", "span"], default="importance",
                                        help="which layers pruning removes: importance, the least important blocks "
                                             "one by one (ShortGPT: 1 - cos(input, output)); span, the contiguous "
                                             "span whose input and output are closest in angle (Gromov et al. 2024)")),
        "calibration": ("--calibration", dict(type=int, default=16,
                                              help="training examples on which pruning measures the layers")),
    },
    "data": {
        "data": ("--data", dict(default=None, help="JSONL/JSON/Parquet file, folder or Hub dataset id "
                                                   "(default: the offline instruction set)")),
        "max_samples": ("--max-samples", dict(type=int, default=None, help="seeded random subset of the data")),
        "heldout": ("--heldout", dict(type=int, default=None, help="held-out conversations scored before/after")),
        "skip_bad_lines": ("--skip-bad-lines", dict(action="store_true",
                                                    help="skip and count malformed JSON lines")),
        "max_len": ("--max-len", dict(type=int, default=None,
                                      help="tokens per example; longer ones are cut and counted")),
        "pack": ("--pack", dict(action=argparse.BooleanOptionalAction, default=None,
                                help="pack several examples into each row of --max-len tokens (attention and RoPE "
                                     "positions stay inside each example; far less padding; default: on in the "
                                     "offline demo unless --teacher-cache or --on-policy, off otherwise)")),
    },
    "loss": {
        "alpha": ("--alpha", dict(type=float, default=0.5, help="weight of CE; KL gets 1 - alpha")),
        "temperature": ("--temperature", dict(type=float, default=1.0, help="distillation temperature T")),
        "divergence": ("--divergence", dict(choices=DIVERGENCES, default="forward_kl",
                                            help="teacher-student divergence")),
        "on_policy": ("--on-policy", dict(type=float, default=0.0, metavar="LAMBDA",
                                          help="share of training rows whose reply the student samples itself, "
                                               "scored token by token by the teacher (GKD's lambda; 0: the data "
                                               "set's replies only, 1: the student's samples only; neo/kd)")),
        "on_policy_start": ("--on-policy-start", dict(type=float, default=0.0, metavar="SHARE",
                                                      help="share of the run's steps trained on the data set's "
                                                           "replies only, before the student starts sampling "
                                                           "(off-policy, then on-policy, as Qwen3 distils)")),
        "on_policy_temperature": ("--on-policy-temperature", dict(type=float, default=1.0,
                                                                  help="sampling temperature of the student's "
                                                                       "replies (0: greedy)")),
        "on_policy_max_new": ("--on-policy-max-new", dict(type=int, default=128,
                                                          help="most tokens of a sampled reply (and at most "
                                                               "--max-len with its prompt)")),
        "hidden_weight": ("--hidden-weight", dict(type=float, default=None, metavar="BETA",
                                                  help="add BETA x the mean over the student's blocks of the cosine "
                                                       "distance between its hidden state after each block and the "
                                                       "teacher's after the block it was cut from (evenly matched for "
                                                       "a --student not pruned from the teacher; neo/kd, live teacher, "
                                                       "same width; default 0, and 10 in the offline demo where it "
                                                       "applies)")),
        "chunk_size": ("--chunk-size", dict(type=int, default=256,
                                            help="target tokens projected to the vocabulary at once "
                                                 "(memory: ~8 x chunk x vocab x 4 bytes)")),
    },
    "optimisation": {
        "batch_size": ("--batch-size", dict(type=int, default=None, help="micro-batch per process (paper: 4)")),
        "grad_accum": ("--grad-accum", dict(type=int, default=None, help="micro-batches per step (paper: 16)")),
        "epochs": ("--epochs", dict(type=int, default=None, help="passes over the data (paper: 2)")),
        "max_steps": ("--max-steps", dict(type=int, default=None, help="stop after this many optimizer steps")),
        "lr": ("--lr", dict(type=float, default=None,
                            help="peak learning rate (default: 2e-4 adapters, 2e-5 full)")),
        "min_lr": ("--min-lr", dict(type=float, default=None,
                                    help="cosine floor (default: 1e-5 adapters, 1e-6 full)")),
        "warmup": ("--warmup", dict(type=float, default=0.03, help="warm-up, as a fraction of all steps")),
        "weight_decay": ("--weight-decay", dict(type=float, default=0.0, help="AdamW weight decay")),
        "grad_clip": ("--grad-clip", dict(type=float, default=1.0, help="clip the global gradient norm (0: off)")),
        "grad_checkpoint": ("--grad-checkpoint", dict(action="store_true",
                                                      help="recompute each student block's activations in backward "
                                                           "instead of storing them (less memory, ~1/3 more student "
                                                           "compute)")),
        "zero": ("--zero", dict(type=int, choices=[0, 1, 2, 3], default=0,
                                help="0 DDP; 1 + sharded optimizer state; 2 FSDP2 keeping params gathered; "
                                     "3 FSDP2 full")),
        "dtype": ("--dtype", dict(choices=DTYPES, default="auto",
                                  help="frozen weights' dtype and autocast (auto: bfloat16 where bf16 matmul is "
                                       "native: CUDA compute capability >= 8, CPUs with avx512_bf16/amx_bf16; else "
                                       "float32). Trainable weights and optimizer state stay float32. float64: "
                                       "everything in double, for exactness tests (slow)")),
        "compile": ("--compile", dict(nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                                      help="torch.compile every teacher and student block and the loss's chunk "
                                           "arithmetic (fuses the element-wise work around the matmuls; the first "
                                           "step pays the compilation). auto: on where a compiler exists, for runs "
                                           "long enough to pay it back (runkit/precision.py); --compile alone: on")),
        "seed": ("--seed", dict(type=int, default=0, help="seed for data order, adapters and dropout")),
    },
    "output": {
        "out": ("--out", dict(default="runs/neo", help="output folder")),
        "save_every": ("--save-every", dict(type=int, default=0,
                                            help="checkpoint every N steps (0: only at the end)")),
        "resume": ("--resume", dict(action="store_true",
                                    help="continue from the newest complete checkpoint in --out (a damaged latest "
                                         "one is skipped)")),
        "overwrite": ("--overwrite", dict(action="store_true",
                                          help="--out may hold an earlier run: replace its outputs (checkpoints, "
                                               "adapter, model, metrics, reports); other files there are kept. "
                                               "Without it a non-empty --out is refused")),
        "no_report": ("--no-report", dict(action="store_true",
                                          help="skip the before/after held-out scores and answers")),
    },
    "plan only": {
        "plan": ("--plan", dict(type=int, nargs="?", const=1, default=None, metavar="GPUS",
                                help="print the peak memory per GPU for GPUS processes (default 1) with these flags, "
                                     "from the models' config.json alone (plan.py), and exit without loading "
                                     "weights")),
        "gpu_memory": ("--gpu-memory", dict(type=float, default=None,
                                            help="with --plan: GiB per GPU; say whether the run fits, and which flag "
                                                 "would make it fit")),
    },
}
DEFINITIONS = {dest: flag for group in FLAGS.values() for dest, flag in group.items()}

# Flags that must match when resuming: everything that changes the result (the model, the data and its
# order, the objective, the optimizer and its schedule, the numerics). Not here: where and how often to
# save, the report, --zero and --grad-checkpoint (same result, other memory).
RESUME_FLAGS = ["method", "adapter", "rank", "lora_alpha", "lora_dropout", "targets", "teacher", "student",
                "prune_to", "data", "max_samples", "heldout", "skip_bad_lines", "max_len", "pack", "alpha",
                "temperature", "divergence", "chunk_size", "batch_size", "grad_accum", "epochs", "max_steps",
                "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "dtype", "seed", "world_size",
                "teacher_cache", "on_policy", "on_policy_start", "on_policy_temperature", "on_policy_max_new",
                "hidden_weight", "prune_by", "calibration"]


def lora_options(args) -> dict:
    """The adapter flags as lora.apply_lora's keyword arguments."""
    return dict(targets=tuple(args.targets.split(",")), rank=args.rank, alpha=args.lora_alpha,
                dropout=args.lora_dropout, variant=args.adapter)


def add(parser, *dests, **defaults):
    """Add train.py's own definition of the flags `dests` to `parser`; a keyword overrides a default."""
    for dest in dests:
        flag, kwargs = DEFINITIONS[dest]
        kwargs = {**kwargs, **({"default": defaults[dest]} if dest in defaults else {})}
        parser.add_argument(flag, dest=dest, **kwargs)


def parser(description=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for title, group in FLAGS.items():
        add(p.add_argument_group(title), *group)
    return p


def parse(argv=None, description=None):
    """train.py's flags -> args, with the paper's or the demo's budget filled in and `args.given`,
    the flags the user typed (a note names those that the chosen method ignores)."""
    p = parser(description)
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: which flags did the user give?
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))

    args.demo = args.teacher is None and not torch.cuda.is_available()
    for key, value in (DEMO if args.demo else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pack and (args.teacher_cache or args.on_policy) and "pack" not in args.given:
        args.pack = False  # the demo's packing gives way to a teacher cache or sampled replies: both need one
        #                    conversation per row
    full = args.method in ("sft", "kd")
    args.lr = args.lr if args.lr is not None else (2e-5 if full else DEMO_ADAPTER_LR if args.demo else 2e-4)
    if args.hidden_weight is None:  # the demo's pruned student also follows the teacher's blocks, where it can
        applies = args.method in ("neo", "kd") and not args.teacher_cache and args.student is None
        args.hidden_weight = DEMO_HIDDEN_WEIGHT if args.demo and applies else 0.0
    args.min_lr = args.min_lr if args.min_lr is not None else (1e-6 if full else 1e-5)
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.rank
    return args


def check_plan(args, refuse):
    """The flags of a dry run (--plan [GPUS], --gpu-memory), shared with plan.py's --world-size.
    Checked on every run, planned or not, so that `--plan 0` cannot mean "no plan"."""
    if getattr(args, "plan", None) is not None and not args.plan >= 1:  # plan.py: --world-size
        refuse("plan", "is the number of GPUs to plan for: must be 1 or more")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        refuse("gpu_memory", "is the memory of one GPU in GiB: must be above 0")


def check_against_models(args, teacher_path, say=print):
    """check() with the teacher's and --student's config.json read from their folders."""
    student_config = llama.LlamaConfig.from_json(llama.resolve_folder(args.student) / "config.json") \
        if args.student else None
    check(args, llama.LlamaConfig.from_json(Path(teacher_path) / "config.json"), student_config, say=say)


def check(args, teacher_config, student_config=None, say=print):
    """Refuse, before any model is loaded, every flag value that would make the run meaningless or
    be silently ignored. One place for all flags: a new flag adds its check here.

    Ranges come first; then the limits that need the models' config.json only (layers to prune
    to, the position limit for --max-len), passed in as LlamaConfig objects.
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
    check_plan(args, refuse)
    unknown = [t for t in args.targets.split(",") if t not in ALL_PROJECTIONS]
    if unknown or not args.targets:
        refuse("targets", f"unknown layer(s) {unknown}; choose from {','.join(ALL_PROJECTIONS)}")

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
        say(f"note: {', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --method "
            f"{args.method} ({'it trains every weight' if args.method in ('sft', 'kd') else ''}"
            f"{', ' if args.method == 'sft' else ''}{'no teacher term: CE only' if args.method in ('sft', 'lora') else ''})")
    if args.pack and args.teacher_cache:
        refuse("pack", "the teacher cache holds one row per example, and a packed row holds several: "
                       "train from the cache unpacked, or pack with the live teacher")
    if args.teacher_cache and args.divergence != "forward_kl":
        refuse("divergence", "--teacher-cache holds the teacher's likeliest tokens and tail draws, which give the "
                             "forward KL only: drop --divergence or train with the live teacher")
    if not 0 <= args.on_policy <= 1:
        refuse("on_policy", "is the share of rows the student answers itself: must lie in [0, 1]")
    if not 0 <= args.on_policy_start < 1:
        refuse("on_policy_start", "is the share of steps before sampling starts: must lie in [0, 1)")
    if args.on_policy_start and not args.on_policy:
        refuse("on_policy_start", "starts the student's sampling, which needs --on-policy above 0")
    if not args.on_policy_temperature >= 0:
        refuse("on_policy_temperature", "must be 0 (greedy) or more")
    if not args.on_policy_max_new >= 1:
        refuse("on_policy_max_new", "must be 1 or more")
    if args.on_policy:
        if args.method not in ("neo", "kd"):
            refuse("on_policy", f"a sampled reply has no ground truth, only the teacher can score it; --method "
                                f"{args.method} has no teacher term: use neo or kd")
        if args.alpha >= 1:
            refuse("on_policy", "a sampled reply is scored by the teacher term only, which --alpha 1 switches off")
        if args.teacher_cache:
            refuse("teacher_cache", "holds the teacher's rows for the data set's replies; the student's sampled "
                                    "replies are new tokens the live teacher must score: drop --teacher-cache or "
                                    "--on-policy")
        if args.pack:
            refuse("pack", "a sampled reply replaces one conversation's reply, and a packed row holds several: "
                           "train on-policy unpacked")
    if not args.hidden_weight >= 0:
        refuse("hidden_weight", "must be 0 or more (0: no hidden-state term)")
    if args.hidden_weight and args.method not in ("neo", "kd"):
        refuse("hidden_weight", f"compares the student's hidden states with the teacher's; --method {args.method} "
                                f"has no teacher: use neo or kd")
    if args.hidden_weight and args.teacher_cache:
        refuse("hidden_weight", "needs the teacher's hidden states after its blocks, which --teacher-cache does "
                                "not hold (only its top-k output rows): drop --teacher-cache or --hidden-weight")
    if not args.calibration >= 1:
        refuse("calibration", "must be 1 or more")
    if args.student is not None and {"prune_by", "calibration"} & args.given:
        refuse("prune_by" if "prune_by" in args.given else "calibration",
               "chooses the layers pruning keeps, but --student gives the student: drop one")
    if args.resume and args.overwrite:
        refuse("overwrite", "would delete the checkpoints that --resume continues from: pass one of them")

    # Limits from the models' config.json (nothing is loaded).
    layers = teacher_config.num_hidden_layers
    if args.prune_to is not None and not 1 <= args.prune_to < layers:
        refuse("prune_to", f"the teacher has {layers} layers: a student keeps 1..{layers - 1} of them")
    if args.hidden_weight and student_config is not None and student_config.hidden_size != teacher_config.hidden_size:
        refuse("hidden_weight", f"compares hidden states block by block, but the student's are "
                                f"{student_config.hidden_size} wide and the teacher's {teacher_config.hidden_size}: "
                                f"use a student of the teacher's width (or --prune-to), or drop --hidden-weight")
    for name, config in (("teacher", teacher_config), ("student", student_config)):
        if config is not None and args.max_len > config.max_position_embeddings:
            refuse("max_len", f"the {name} handles at most {config.max_position_embeddings} positions "
                              f"(max_position_embeddings)")
