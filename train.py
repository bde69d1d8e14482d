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

Read it top to bottom: main() is the whole run (set-up, models, data, optimizer, the loop, save),
then the helpers it calls, in the order it calls them; train_step() holds the step and
writes the loss it backpropagates, α·CE + (1 − α)·T²·KL, from the sums neo.Distiller returns.
Data parallel is plain PyTorch: DistributedDataParallel around the Distiller, ZeroRedundancyOptimizer
for --zero 1, no_sync() during accumulation; FSDP2 (--zero 2/3) is in runkit/distributed.py. What a
real run needs but the method does not teach (flag checks, precision, checkpoints and resume, the
report, on-policy sampling) is in runkit/.
"""
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import cached_loss
import data
import lora
import model as llama
import neo
from runkit import adapters, cache_store, checkpoint, disk, flags, mfu, offline, on_policy, report, run_folder, tokenized
from runkit.distributed import Dist, all_reduce_sum, close_run, full_student, print0, setup_distributed, shard
from runkit.precision import autocast, checkpoint_blocks, compile_blocks, compile_choice, frozen_dtype, master_dtype


def main(argv=None):
    args = flags.parse(argv, description=__doc__.split("\n\n")[0].strip())
    if args.plan is not None:  # a dry run, whatever its value: config.json files alone, no weights, no data
        import plan
        return plan.plan_from_train_args(args, args.teacher or offline.smollm2_dir())
    teacher_path = str(llama.resolve_folder(args.teacher or offline.smollm2_dir()))
    flags.check_against_models(args, teacher_path, say=print0)  # every flag, before any weight loads
    d = setup_distributed()
    args.world_size = d.world
    out = Path(args.out)
    lock = run_folder.claim(out, args.resume, args.overwrite) if d.master else None  # ours, and only ours
    torch.manual_seed(args.seed)  # the same on every rank: every rank builds the same adapters
    report.print_settings(args, d)  # the precision chosen, and the demo's budget

    # ---- models ------------------------------------------------------------
    args.bases = checkpoint.base_fingerprints(args, teacher_path)
    state = checkpoint.load_checkpoint(out, args) if args.resume else None  # flags and bases checked first
    tokenizer = data.Tokenizer.from_dir(teacher_path)
    train_set, held_set = tokenized.load_splits(args, tokenizer)
    distilling = args.method in ("neo", "kd")
    cache = cache_store.open_cache(args, teacher_path, tokenizer, train_set, held_set, d.device) \
        if args.teacher_cache else None
    teacher = load_teacher(teacher_path, args, d) if (distilling or not args.no_report) and cache is None else None
    student = build_student(args, teacher_path, train_set, d.device)
    base_path = save_student_base(student, args, out, d)
    student = prepare_student(student, args, d.device)
    vocab_size = shared_vocab(student, teacher, tokenizer, (train_set, held_set))

    # ---- data ----------------------------------------------------------------
    train_set = packed(train_set, args) if args.pack else train_set
    loader = data.Batches(train_set, args.batch_size, pad_id=tokenizer.pad_token_id, rank=d.rank,
                          world_size=d.world, seed=args.seed)
    total_steps = count_steps(args, loader, len(train_set), d)
    sample_from = on_policy.first_step(args, total_steps)  # the first step the student answers rows
    # scored now, before the first step changes the student
    scores = report.start_report(args, d, student, teacher, tokenizer, loader, held_set, vocab_size, out, cache)

    # ---- optimizer ------------------------------------------------------------
    args.compile, why = compile_choice(args, d.device, (total_steps - (state or {}).get("step", 0)) * args.grad_accum)
    print0(f"compile: {why}")
    if args.compile:  # every block, and below the loss's chunk arithmetic, through torch.compile
        compile_blocks(student, teacher if distilling else None)
        loader.width = args.max_len if args.pack else None  # packed rows: one shape, compiled once, not again
    # The student and the loss as one module (neo.py; from a teacher cache, cached_loss.py)
    Distiller = cached_loss.CachedDistiller if cache is not None and distilling else neo.Distiller
    distiller = Distiller(student, teacher if distilling else None, args.alpha, args.temperature, args.divergence,
                          args.chunk_size, vocab_size, **hidden_states(args, student, teacher), compiled=args.compile)
    start_step = checkpoint.resume_weights(distiller, loader, state)  # 0 for a new run
    # Data parallel: every rank holds the whole student and DDP all-reduces its gradients in
    # backward; FSDP2 (--zero 2/3) instead shards it, layer by layer (runkit/distributed.py).
    if args.zero >= 2:
        wrapped = shard(distiller, teacher if distilling else None, args.zero)
    elif d.world > 1:
        wrapped = DistributedDataParallel(distiller, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    else:
        wrapped = distiller
    torch.manual_seed(args.seed + 1 + d.rank)  # from here on each rank draws its own dropout masks
    params = [p for p in wrapped.parameters() if p.requires_grad]
    adamw = dict(lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    if args.zero == 1:  # ZeRO-1: each rank keeps the AdamW state of its share of the parameters
        optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **adamw)
    else:
        optimizer = torch.optim.AdamW(params, **adamw)
    print0(f"method {args.method}: optimising {sum(p.numel() for p in params):,} parameters "
           f"({type(optimizer).__name__}{', FSDP2' if args.zero >= 2 else ''})")
    checkpoint.restore(wrapped, optimizer, state, args, d)  # a new run: nothing to restore
    step_kit = Step(wrapped, optimizer, params, cache if distilling else None, args, d, out, tokenizer, sample_from)

    # MFU, as nanoGPT prints it: the model FLOPs of the step's micro-batches / step time / the device's peak
    peak, source, flops = mfu.for_run(args, student.config, teacher_path, d.device, teacher_runs=cache is None)
    print0(f"MFU: model FLOPs per second (runkit/mfu.py) / {source}")

    # ---- loop ------------------------------------------------------------------
    metrics_path = checkpoint.start_metrics(out, args.resume, start_step, d)
    wrapped.train()  # adapter dropout on; the teacher stays in eval()
    batches = endless(loader)
    t_start = time.time()
    with report.progress_bar(total_steps, start_step, d) as bar:  # closed even when a bad loss stops the run
        for step in range(start_step, total_steps):
            t0 = time.time()
            lr = lr_at(step, total_steps, max(1, int(args.warmup * total_steps)), args.lr, args.min_lr)
            micro = [next(batches) for _ in range(args.grad_accum)]
            s = train_step(step_kit, micro, lr, step)
            dt = time.time() - t0
            row = {"step": step + 1, "loss": s["loss"], "ce": s["ce"], "kl": s["kl"], "lr": lr,
                   **({"hidden": s["hidden"]} if args.hidden_weight else {}),
                   "grad_norm": s["grad_norm"], "tokens_per_s": s["tokens"] / dt, "step_s": dt,
                   "mfu": sum(map(flops, micro)) / dt / peak,
                   "mem_gb": report.memory_gb(d.device), **{k: s[k] for k in ("gen_s", "gen_tokens") if k in s}}
            if d.master:
                report.log_step(row, metrics_path, bar)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                checkpoint.save_checkpoint(out, step + 1, wrapped, optimizer, loader, args, d, base_path)
    train_time = time.time() - t_start

    # ---- save ------------------------------------------------------------------
    checkpoint.save_checkpoint(out, total_steps, wrapped, optimizer, loader, args, d, base_path)
    final = full_student(wrapped, student, args.zero, d, lambda: lora.make_trainable(
        llama.Llama(student.config), args.method, **flags.lora_options(args)))  # FSDP2: an empty copy to fill
    if d.master:
        torch.compiler.set_stance("force_eager")  # --compile: scoring and generating below need no graphs
        export(final, out, args, base_path)
        report.plot_losses(metrics_path, out / "loss_curve.png")
        print0(f"trained {total_steps - start_step} steps in {train_time:.0f} s; wrote {out}")
        if scores is not None:
            scores.after(final)
    close_run(lock)  # the process group closed, the run folder's lock released
    optimized = [n for n, p in distiller.student.named_parameters() if p.requires_grad]
    return {"student": final, "optimized": optimized, "out": out}


# -----------------------------------------------------------------------------
# Models: the teacher as it is; the student given, or pruned from the teacher; then made trainable.


def load_teacher(teacher_path, args, d: Dist):
    """The frozen teacher: eval() (no dropout), no gradients, in the frozen dtype (bf16 where native)."""
    teacher = llama.Llama.from_pretrained(teacher_path, dtype=frozen_dtype(args, d.device), device=d.device)
    return teacher.eval().requires_grad_(False)


def build_student(args, teacher_path, train_set, device):
    """The student in fp32 (fp64 for tests): a given model, or the teacher less its least important
    layers (--prune-by importance: ShortGPT's block by block; span: Gromov et al.'s contiguous span),
    measured on the first --calibration training examples."""
    dtype = master_dtype(args, device)
    if args.student is not None:
        return llama.Llama.from_pretrained(args.student, dtype=dtype, device=device)
    full = llama.Llama.from_pretrained(teacher_path, dtype=dtype, device=device)
    n_layers = full.config.num_hidden_layers
    keep_n = args.prune_to or n_layers // 2
    if not 0 < keep_n <= n_layers:
        raise SystemExit(f"--prune-to {keep_n}: the teacher has {n_layers} layers; choose 1..{n_layers}")
    rows = [train_set[i] for i in range(min(args.calibration, len(train_set)))]
    batch = data.Batches(rows, len(rows), pad_id=0, shuffle=False).collate(rows)  # right-padded (K, T)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    keep = llama.layers_to_keep(full, ids, keep_n, mask, by=args.prune_by)
    print0(f"student: the teacher's {keep_n} of {n_layers} layers {keep} (--prune-by {args.prune_by} on "
           f"{int(mask.sum())} calibration tokens)")
    return llama.prune_layers(full, keep)


def hidden_states(args, student, teacher) -> dict:
    """The Distiller's hidden-state term (--hidden-weight β): β and π, the teacher block each student
    block distils from (neo.matched_layers); nothing when β is 0."""
    if not args.hidden_weight or teacher is None:
        return {}
    layers = neo.matched_layers(student.config, teacher.config)
    print0(f"hidden states: student block j follows teacher block {layers}[j], weight {args.hidden_weight}")
    return dict(hidden_weight=args.hidden_weight, teacher_layers=layers)


def save_student_base(student, args, out: Path, d: Dist) -> str:
    """The adapter's base model: --student, or the pruned student saved as a folder (also a baseline
    to evaluate). Returns its path."""
    if args.student is not None:
        return args.student
    folder = out / "student_base"
    if d.master and not (args.resume and (folder / "config.json").exists()):
        with disk.room_for(folder, disk.nbytes(student.state_dict()), "saving the pruned student"):
            student.save_pretrained(folder)  # always this run's (atomic: complete or not at all)
    return str(folder)


def prepare_student(student, args, device):
    """The student as the training step uses it: trainable set chosen, activation checkpointing as
    asked, and for neo/lora the frozen base in the frozen dtype (bf16 under --dtype auto where
    it is native; the adapters stay fp32: the optimizer's master copy). sft/kd keep every weight
    fp32 and get bf16 only through autocast."""
    student = lora.make_trainable(student, args.method, say=print0, **flags.lora_options(args))
    if args.grad_checkpoint:
        checkpoint_blocks(student)
    dtype = frozen_dtype(args, device)
    if args.method in ("neo", "lora") and dtype != master_dtype(args, device):
        for p in student.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
    return student


def shared_vocab(student, teacher, tokenizer, splits):
    """None when the LM heads match; the tokenizer's size when they differ only by padding rows.
    Every label of the splits is checked against it, once, on the host."""
    vs = student.lm_head.weight.shape[0]
    vt = teacher.lm_head.weight.shape[0] if teacher is not None else vs
    if vs == vt or tokenizer.vocab_size <= min(vs, vt):
        vocab_size = None if vs == vt else tokenizer.vocab_size
        if vocab_size is not None:
            print0(f"vocab: teacher {vt} and student {vs} rows; comparing the tokenizer's {vocab_size}")
        for examples in splits:
            tokenized.check_labels(examples, vocab_size or vs)
        return vocab_size
    raise SystemExit(f"teacher and student vocabularies differ: teacher head {vt} rows, student head {vs} "
                     f"rows, tokenizer {tokenizer.vocab_size} tokens. Distillation needs one shared "
                     f"tokenizer; pick a student from the teacher's family (or --prune-to).")


# -----------------------------------------------------------------------------
# Data: micro-batches forever, and how many optimizer steps they make.


def count_steps(args, loader, n_examples, d: Dist) -> int:
    """Optimizer steps in the run. Micro-batches run on across epoch boundaries; a step is always
    grad_accum of them."""
    total_steps = args.epochs * len(loader) // args.grad_accum
    if total_steps == 0:
        raise SystemExit(f"data: {n_examples} examples make {len(loader)} micro-batches of "
                         f"{args.batch_size} x {d.world} processes per epoch, fewer than --grad-accum "
                         f"{args.grad_accum}. Use more data or a smaller --batch-size/--grad-accum.")
    return min(total_steps, args.max_steps) if args.max_steps else total_steps


def packed(examples, args):
    """Rows of several whole examples (--pack); the model keeps them apart by document_ids."""
    rows = data.pack(examples, args.max_len, args.seed)
    print0(f"data: packed {len(examples)} examples into {len(rows)} rows of up to {args.max_len} tokens")
    return rows


def endless(loader):
    """Micro-batches forever: the loader resumes from its saved position and moves to the next epoch."""
    while True:
        yield from loader


def lr_at(step, total, warmup, peak, floor):
    """Linear warm-up to `peak`, then cosine decay to `floor` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# The step


@dataclass
class Step:
    """What every optimizer step uses, built once by main()."""
    model: nn.Module                 # neo.Distiller, wrapped by DDP or sharded by FSDP2 (or neither)
    optimizer: torch.optim.Optimizer
    params: list                     # the trainable parameters, for gradient clipping
    cache: object                    # runkit.cache_store.TeacherCache for kd/neo from a cache, else None
    args: object                     # the run's flags
    d: Dist
    out: Path                        # the run folder (named when a bad loss stops the run)
    tokenizer: data.Tokenizer        # stop tokens and padding of sampled replies (--on-policy)
    sample_from: int = 0             # the first step whose rows the student may answer (--on-policy-start)


def train_step(kit: Step, micro: list, lr: float, step: int) -> dict:
    """One optimizer step over the micro-batches `micro` (CPU tensors). With a teacher cache the
    teacher's rows of each example are looked up by example id, not computed.

    The host never waits for the GPU between micro-batches: what it needs (the loss terms to log,
    whether every loss was finite, the gradient norm) comes back in one transfer per step, before
    the optimizer step, so a non-finite loss still stops the run with the weights untouched."""
    args, device = kit.args, kit.d.device
    for group in kit.optimizer.param_groups:
        group["lr"] = lr
    sampling = {}
    # On-policy: first every reply the step needs, so that its targets can be counted.
    if args.on_policy and step >= kit.sample_from:
        t0 = time.time()
        micro, n_sampled = on_policy.sample_replies(kit, micro, step)
        sampling = {"gen_s": time.time() - t0, "gen_tokens": n_sampled}
    # Normalise by the valid target tokens of the whole step, over micro-batches and ranks, so
    # that 16 accumulated micro-batches on 6 processes equal one batch of 16 x 6 x 4. Counted on
    # the host from the CPU batches, summed over ranks on the device.
    n_local = sum(neo.count_targets(b["labels"]) for b in micro)
    n_tokens = sum(b["attention_mask"].sum() for b in micro)
    n_global, tokens, n_gen = all_reduce_sum(torch.tensor(
        [float(n_local), float(n_tokens), float(sampling.get("gen_tokens", 0))], device=device))
    # DDP and FSDP average gradients over ranks; the loss is already a global mean, so undo that.
    normalizer = n_global.clamp(min=1) / kit.d.world
    alpha = args.alpha if args.method in ("kd", "neo") else 1.0   # sft/lora: CE alone
    kd_weight = (1 - alpha) * (args.temperature * args.temperature)
    # For logging: loss·n, ce·n_ce, kl·n, n_ce and H·n (CE is logged per target it counts at: not at
    # sampled replies; H is --hidden-weight's term, 0 without it)
    sums = torch.zeros(5, device=device, dtype=master_dtype(args, device))
    bad = torch.zeros(len(micro), device=device)    # 1 where a micro-batch's loss is not finite
    for i, b in enumerate(micro):
        cached = {} if kit.cache is None else {"teacher_rows": kit.cache.rows("train", b.get("example_ids")).to(device)}
        b = {k: v.to(device) for k, v in b.items()}
        ce_mask = ~b["sampled"][:, None].expand_as(b["labels"]) if "sampled" in b else None
        # Gradients add up over the micro-batches; DDP all-reduces them once, after the last one
        # (FSDP2 has its own switch for the same).
        last = i == len(micro) - 1
        if args.zero >= 2:
            kit.model.set_requires_gradient_sync(last)
        no_sync = kit.model.no_sync if isinstance(kit.model, DistributedDataParallel) and not last \
            else contextlib.nullcontext
        with no_sync(), autocast(device, args):
            res = kit.model(b["input_ids"], b["attention_mask"], b["labels"], normalizer,
                            b.get("document_ids"), ce_mask=ce_mask, **cached)  # the sums over the targets
            # The LLM-Neo loss as torchtune's KD recipe writes it: CE and KL(teacher ‖ student)
            # mixed by α, T² keeping the KL's gradient scale, over the step's target count.
            loss = (alpha * res.ce_sum + kd_weight * res.kl_sum) / normalizer
            if res.hidden_sum is not None:  # --hidden-weight β: + β·H, the blocks' distance to the teacher's
                loss = loss + args.hidden_weight * res.hidden_sum / normalizer
            loss.backward()
        bad[i] = (~torch.isfinite(loss.detach())).float()
        hidden = res.hidden_sum.detach() if res.hidden_sum is not None else torch.zeros_like(res.ce)
        sums += torch.stack([loss.detach() * normalizer, res.ce * res.n_ce, res.kl * res.n_tokens, res.n_ce, hidden])
    grad_norm = torch.nn.utils.clip_grad_norm_(kit.params, args.grad_clip if args.grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: DTensor
    sums = all_reduce_sum(sums)
    sums = torch.cat([sums[:3], sums[4:]]) / torch.stack([n_global, sums[3], n_global, n_global]).clamp(min=1)
    bad = all_reduce_sum(bad)
    host = torch.cat([sums, grad_norm.reshape(1), tokens.reshape(1), bad]).tolist()  # the step's one sync
    if any(host[6:]):
        checkpoint.stop_non_finite(step, next(i for i, x in enumerate(host[6:]) if x), kit.out)
    kit.optimizer.step()
    kit.optimizer.zero_grad(set_to_none=True)
    if sampling:  # every rank's sampled tokens; the time is this rank's
        sampling["gen_tokens"] = int(n_gen)
    return {**dict(zip(("loss", "ce", "kl", "hidden", "grad_norm", "tokens"), host[:6])), **sampling}


# -----------------------------------------------------------------------------
# Save: the trained student as an adapter and as an ordinary model folder.


def export(student, out: Path, args, base_path):
    """The adapter (PEFT layout) and a merged Hugging Face folder; or the full student for sft/kd."""
    with disk.room_for(out, 2 * disk.nbytes(student.state_dict()), "saving the trained student",
                       kept=f"the checkpoints in {out / 'checkpoints'} are whole: --resume exports again"):
        _export(student, out, args, base_path)


def _export(student, out: Path, args, base_path):
    if args.method in ("neo", "lora"):
        adapters.save_adapter(student, out / "adapter", base_model_name_or_path=base_path,
                              base_fingerprint=args.bases["student"])  # None: from the student_base folder
        lora.save_merged(student, out / "model")
    else:
        student.save_pretrained(out / "model")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as e:  # bad input: say what and where, without a traceback
        sys.exit(f"error: {e}")
