"""Measured memory of one training step: the allocator's peak, beside plan.py's per-component ledger.

Two independent counts of the same step:

- the measured peak of live tensor bytes, from the allocator itself. On CUDA that is
  torch.cuda.max_memory_allocated. The CPU allocator keeps no statistics, so there it is the
  profiler's memory events (torch.profiler, profile_memory=True: every allocation and free the
  c10 CPU allocator serves, kernel workspaces included), summed in time order on top of the
  tensor bytes alive when the step starts (every tensor the garbage collector can see, counted
  once per storage). Peak RSS is printed beside it: it also counts the Python runtime and what
  glibc's heap kept after frees, which is why it barely moves between methods on the CPU.
- plan.py's Ledger, which follows every storage the step's operators create, and says what was
  alive at the peak (teacher weights, gradients, saved activations, ...). Its components must add
  up to the allocator's peak within 5%; the planner predicts from the same ledger on fake tensors.

    python -m benchmarks.memory                       # bench shape, every method, fp32 and bf16, vs the plan
    python -m benchmarks.memory --dtype bfloat16 --methods kd,neo
"""
import argparse
import functools
import gc
import resource
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import plan  # noqa: E402
from benchmarks import peers  # noqa: E402
from runkit import flags
from runkit.precision import choose_dtype

SHOWN = ("teacher weights", "frozen student weights", "trainable weights", "gradients", "optimizer state",
         "saved activations", "loss-time transients", "teacher activations", "other transients")


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage the garbage collector can reach, each storage once."""
    from torch._subclasses.fake_tensor import FakeTensor
    seen, total = set(), 0
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type == "cpu" \
                and not o.is_meta:
            st = o.untyped_storage()
            if st.data_ptr() not in seen and st.nbytes():
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def allocator_peak(run, device) -> int:
    """Peak bytes of live tensors while `run()` executes, as the allocator saw them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    start = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return start + peak


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(run, teacher, student, optimizer, device) -> dict:
    """One step `run()`, counted twice: the allocator's peak and the ledger's components."""
    with plan.Ledger(teacher, student, optimizer) as ledger:
        measured = allocator_peak(run, device)
    ledger_peak, parts, phase = ledger.peak()
    return {"measured_peak_bytes": measured, "ledger_peak_bytes": ledger_peak, "peak_phase": phase,
            "components_bytes": {c: parts[c] for c in SHOWN}, "peak_rss_bytes": peak_rss_bytes()}


def breakdown_line(m: dict) -> str:
    """'measured 2.41 GiB = teacher 0.50 + ... (sum 2.39, -0.8%)' for one method."""
    parts = m["components_bytes"]
    total = sum(parts.values())
    short = {"teacher weights": "teacher", "frozen student weights": "frozen", "trainable weights": "trainable",
             "gradients": "grads", "optimizer state": "AdamW", "saved activations": "saved acts",
             "loss-time transients": "loss", "teacher activations": "teacher acts", "other transients": "other"}
    body = " + ".join(f"{short[c]} {v / plan.GiB:.2f}" for c, v in parts.items() if v >= 0.005 * plan.GiB)
    err = 100 * (total - m["measured_peak_bytes"]) / m["measured_peak_bytes"]
    return (f"live peak {m['measured_peak_bytes'] / plan.GiB:.2f} GiB (at {m['peak_phase']}) = {body} "
            f"[sum {total / plan.GiB:.2f}, {err:+.1f}%]; peak RSS {m['peak_rss_bytes'] / plan.GiB:.2f} GiB")


# -----------------------------------------------------------------------------
# Predictions at the bench's shape, from the config.json files alone (plan.py on fake tensors).


def bench_setup(method, args, device, n_targets=None) -> "plan.Setup":
    """The plan.Setup of bench.py's step for one of our methods (bench.TRAIN_FLAGS)."""
    precision = choose_dtype(args.dtype, device)  # the bench row's precision, chosen as train.py does
    return plan.Setup(method="neo" if method == "neo-moslora" else method,
                      adapter="moslora" if method == "neo-moslora" else "lora", rank=args.rank,
                      batch_size=args.batch_size, max_len=args.max_len, chunk_size=args.chunk_size,
                      grad_checkpoint=args.grad_checkpoint, autocast=precision.compute is not None,
                      frozen_dtype=precision.frozen, n_targets=n_targets)


def predict(method, args, teacher_dir, student_dir, device, n_targets=None) -> dict:
    """{'predicted_peak_bytes', 'predicted_components_bytes'} for one bench method, weights never loaded.

    n_targets: the bench batch's valid target tokens (its prompts are not targets), for the loss's rows."""
    if method == "hf-peft-neo":
        ledger = hf_ledger(args, teacher_dir, student_dir, device)
    else:
        setup = bench_setup(method, args, device, n_targets)
        ledger = plan.ledger_of_step(setup, plan.load_config(teacher_dir), plan.load_config(student_dir))
    peak, parts, _ = ledger.peak()
    return {"predicted_peak_bytes": peak, "predicted_components_bytes": {c: parts[c] for c in SHOWN}}


def hf_ledger(args, teacher_dir, student_dir, device) -> "plan.Ledger":
    """bench.py's transformers + PEFT step (peers.py), built from the two config.json files on fake tensors."""
    import contextlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaConfig, LlamaForCausalLM
    precision = choose_dtype(args.dtype, device)
    dtype = precision.frozen
    # Built on the meta device (Module.to(), which PEFT calls, cannot swap fake parameters), then
    # every meta tensor is replaced by a fake CPU one of the same shape and dtype, ties kept.
    with torch.device("meta"), contextlib.redirect_stdout(None):
        teacher = LlamaForCausalLM(LlamaConfig.from_pretrained(teacher_dir)).to(dtype).eval().requires_grad_(False)
        student = LlamaForCausalLM(LlamaConfig.from_pretrained(student_dir)).to(dtype)
        no_compile = argparse.Namespace(**{**vars(args), "compile": False})
        step, params, (teacher, student, optimizer) = peers.hf_peft_step(no_compile, teacher, student, precision,
                                                                         torch.device("cpu"))
    mode = FakeTensorMode()
    _meta_to_fake([teacher, student], mode)
    params[:] = [p for p in student.parameters() if p.requires_grad]  # the list the step clips and steps
    optimizer.param_groups[0]["params"] = params
    with mode:
        ids = torch.randint(0, student.config.vocab_size, (args.batch_size, args.max_len))
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        with plan._answers(True):
            step(batch)  # AdamW's state now exists
        with plan.Ledger(teacher, student, optimizer, fake=True) as ledger:
            step(batch)
    return ledger


def _meta_to_fake(modules, mode):
    """Swap every meta parameter and buffer for a fake CPU tensor (tied weights stay tied)."""
    memo = {}
    with mode:
        for module in modules:
            for m in module.modules():
                for slots, make in ((m._parameters, lambda t: torch.nn.Parameter(
                        torch.empty(t.shape, dtype=t.dtype), requires_grad=t.requires_grad)),
                                    (m._buffers, lambda t: torch.empty(t.shape, dtype=t.dtype))):
                    for name, t in list(slots.items()):
                        if t is not None:
                            memo.setdefault(id(t), make(t))
                            slots[name] = memo[id(t)]


# -----------------------------------------------------------------------------
# `python -m benchmarks.memory`: plan.py's own step at the bench shape, measured and planned, in fp32
# and in bf16 (frozen weights bf16 + autocast, trainable weights and AdamW fp32), random weights.


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags.add(p, "teacher", "batch_size", "max_len", "rank", batch_size=4, max_len=512)  # train.py's
    p.add_argument("--methods", default="sft,lora,kd,neo,neo-moslora", help="comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help="frozen weights' dtype (bfloat16 adds autocast)")
    args = p.parse_args(argv)
    if args.teacher is None:
        from runkit import offline
        args.teacher = offline.smollm2_dir()
    teacher_cfg = plan.load_config(args.teacher)
    student_cfg = plan.student_config(teacher_cfg)
    print(f"teacher {args.teacher} -> its {student_cfg.num_hidden_layers}-layer half, batch {args.batch_size} x "
          f"{args.max_len}, rank {args.rank}, every position a target, random weights, CPU")
    print("| method | dtype | measured live peak (GiB) | planned (GiB) | plan vs measured | components (GiB) |")
    print("|---|---|---:|---:|---:|---|")
    peaks = {}
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            bf16 = dtype == "bfloat16"
            setup = plan.Setup(method="neo" if method == "neo-moslora" else method,
                               adapter="moslora" if method == "neo-moslora" else "lora", rank=args.rank,
                               batch_size=args.batch_size, max_len=args.max_len, autocast=bf16,
                               frozen_dtype=torch.bfloat16 if bf16 else torch.float32)
            teacher, distiller, optimizer, batch = plan.build(setup, teacher_cfg, student_cfg, fake=False)
            run = functools.partial(plan.training_step, distiller, optimizer, batch, setup.autocast)
            run()
            m = measure(run, teacher, distiller.student, optimizer, torch.device("cpu"))
            del run, teacher, distiller, optimizer  # free this method's models before the next one is built
            predicted = plan.ledger_of_step(setup, teacher_cfg, student_cfg, fake=True).peak()[0]
            peak = peaks[method, dtype] = m["measured_peak_bytes"]
            print(f"| {method} | {dtype} | {peak / plan.GiB:.2f} | {predicted / plan.GiB:.2f} | "
                  f"{100 * (predicted / peak - 1):+.1f}% | {breakdown_line(m)} |", flush=True)
    for dtype in args.dtypes.split(","):
        if ("neo", dtype) in peaks and ("kd", dtype) in peaks:
            r = peaks["neo", dtype] / peaks["kd", dtype]
            print(f"neo / kd live peak, {dtype}: {r:.2f} (target <= 0.65 with bf16; paper 0.77)")


if __name__ == "__main__":
    main()
