"""Checkpoints and exact resume.

A checkpoint is written to a temporary folder, swapped in, then `latest` is switched atomically
(run_folder.publish_checkpoint), so a crash mid-save, even mid re-save of the same step, leaves a
whole checkpoint; --resume takes the newest one that loads (run_folder.find_checkpoint) and refuses
one made with other flags or from other base models.
"""
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

import model as llama
from runkit import adapters, disk, run_folder, tokenized
from runkit.distributed import Dist, module_of, print0, trainable_state
from runkit.flags import RESUME_FLAGS


def save_checkpoint(out: Path, step, wrapped, optimizer, loader, args, d: Dist, base_path, extra=None):
    """Trainable weights, optimizer state, data position and every rank's dropout RNG (the learning
    rate is a pure function of the step, so there is no scheduler state); `extra`: anything else
    the loop must get back (a dict of picklable values)."""
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
                    "rng": rngs, "args": {k: getattr(args, k) for k in RESUME_FLAGS}, "bases": args.bases,
                    **(extra or {})}, folder / "state.pt")
        if args.method in ("neo", "lora"):  # the adapter so far, in PEFT's layout, usable on its own
            student = module_of(wrapped).student
            adapters.save_adapter(student, folder / "adapter", base_path,
                                  state_dict={k.removeprefix("student."): v for k, v in model_sd.items()},
                                  base_fingerprint=args.bases["student"])  # None: from the student_base folder

    if d.master:  # into a temporary folder, then swapped in; the newest two are kept
        latest = out / "checkpoints" / "latest"
        kept = f"--resume continues from {latest.read_text().strip()}" if latest.exists() else \
            "no checkpoint was written before this one"
        needed = disk.nbytes(optim_sd) + disk.nbytes(model_sd) * (2 if args.method in ("neo", "lora") else 1)
        with disk.room_for(out / "checkpoints", needed, f"saving the checkpoint of step {step}", kept=kept):
            run_folder.publish_checkpoint(out / "checkpoints", step, write, keep=2)
    if dist.is_initialized():
        dist.barrier()


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
        if role == "data" and saved != now:  # the same --data path, other bytes: name the file
            raise SystemExit(f"--resume: the data changed since the checkpoint: {tokenized.changed_data(saved, now)}. "
                             f"Resume with the data the run started with, or start a new --out.")
        if saved != now:
            raise SystemExit(f"--resume: the {role} is not the model the checkpoint was trained from: the "
                             f"checkpoint records {saved}, {getattr(args, role) or 'the ' + role} is {now}. "
                             f"Resume with the same {role}, or start a new --out.")
    return state


def base_fingerprints(args, teacher_path) -> dict:
    """What the run is made from, by content: fingerprints (adapters.fingerprint) of the teacher, which
    the student is pruned from, and --student when given; the sha256 of every --data file (hashed
    once: the tokenised cache's key reuses it). Kept in checkpoints, checked by --resume."""
    return {"teacher": adapters.fingerprint(teacher_path),
            "student": adapters.fingerprint(llama.resolve_folder(args.student)) if args.student else None,
            "data": tokenized.data_identity(args.data or "offline")}


def resume_weights(distiller, loader, state) -> int:
    """The checkpoint's trainable weights into the Distiller and its position into the loader;
    returns the step to start from (0 without a checkpoint)."""
    if state is None:
        return 0
    distiller.load_state_dict(state["trainable"], strict=False)  # trainable weights only
    loader.load_state_dict(state["data"])
    return state["step"]


def restore(wrapped, optimizer, state, args, d: Dist):
    """Optimizer state and this rank's dropout RNG, from a checkpoint (state None: nothing)."""
    if state is None:
        return
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


def stop_non_finite(step, micro, out: Path):
    """Stop the run at a non-finite loss (the weights are untouched: the optimizer step has not run)."""
    latest = out / "checkpoints" / "latest"
    kept = f"the last good checkpoint is {latest.read_text().strip()}" if latest.exists() else \
        "no checkpoint was written yet"
    raise SystemExit(f"non-finite loss at step {step + 1}, micro-batch {micro} (on at least one rank); "
                     f"stopped before the optimizer step, {kept} in {out / 'checkpoints'}. "
                     f"Lower --lr, or check the data of that batch.")


def start_metrics(out: Path, resume: bool, start_step, d: Dist) -> Path:
    """metrics.jsonl, one row per step. A resumed run continues the curve from its checkpoint; steps
    logged after it are redone."""
    metrics_path = out / "metrics.jsonl"
    if d.master:
        rows = metrics_path.read_text().splitlines() if resume and metrics_path.exists() else []
        run_folder.write_text(metrics_path, "".join(r + "\n" for r in rows if json.loads(r)["step"] <= start_step))
    return metrics_path
