"""Precision and the speed/memory switches a run can turn on, none of which changes the method.

bf16 halves the bytes of every frozen weight and, where the hardware multiplies bf16 natively,
runs the matmuls 2-4x faster. What stays fp32 is what accumulates small updates: the trainable
weights (the optimizer's master copy), their gradients and AdamW's moments. Under autocast each
matmul gets a bf16 copy of its fp32 weight, and neo.py upcasts every logit chunk before its
softmax, so the loss is fp32 too.

Also here: activation checkpointing (--grad-checkpoint), and torch.compile of the blocks and the
loss (--compile auto|on|off: whether a run compiles, compile_choice).
"""
import contextlib
import functools
import importlib.util
import shutil
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint


class Precision(NamedTuple):
    frozen: torch.dtype               # the teacher and the frozen student base (neo, lora)
    compute: torch.dtype | None       # autocast dtype for the student's matmuls; None: no autocast
    why: str                          # one line, printed at start-up
    master: torch.dtype = torch.float32  # trainable weights, gradients, AdamW state (fp64 only in tests)


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
    """--dtype auto|float32|bfloat16|float64 -> the Precision used on `device`: auto picks bf16 (frozen
    weights and autocast) where bf16 matmul is native, fp32 elsewhere; an explicit dtype wins.

    float64 is for tests: every weight, activation and optimizer state in double, so that two runs
    that are equal mathematically (2 ranks and 1, resumed and not) agree to ~1e-12 on any CPU,
    whatever order its vector kernels add in. It is ~2-4x slower than float32 and never needed to train."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if requested == "float32":
        return Precision(fp32, None, "float32 (--dtype float32)")
    if requested == "float64":
        return Precision(torch.float64, None, "float64 (--dtype float64: exactness tests, slow)", torch.float64)
    native, evidence = bf16_native(device)
    if requested == "bfloat16":
        return Precision(bf16, bf16, f"bfloat16 (--dtype bfloat16; {evidence}"
                                     f"{'' if native else ': emulated, expect it slower than float32'})")
    if requested != "auto":
        raise ValueError(f"--dtype {requested!r}: choose auto, float32, bfloat16 or float64")
    if native:
        return Precision(bf16, bf16, f"bfloat16 (--dtype auto: {evidence})")
    return Precision(fp32, None, f"float32 (--dtype auto: {evidence}; bf16 would be emulated)")


def frozen_dtype(args, device):
    return choose_dtype(args.dtype, device).frozen


def master_dtype(args, device):
    return choose_dtype(args.dtype, device).master


def autocast(device, args):
    """bf16 autocast for the student's forward and loss when the precision asks for it."""
    compute = choose_dtype(args.dtype, device).compute
    return torch.autocast(device.type, dtype=compute) if compute else contextlib.nullcontext()


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


# --compile auto compiles runs of at least this many micro-batches. Measured on a 2-core AMD EPYC
# (benchmarks/results/README.md, "The step at this CPU's limit"): compiling the blocks and the loss
# costs ~34 s there, once, and saves ~0.5-0.7 s of each ~6.5 s micro-batch of the bench shape, so it
# pays back after roughly 70-100; where matmuls are faster (AMX, GPUs) the saving per micro-batch is larger.
COMPILE_PAYS_AFTER = 100


def compiler_found(device) -> tuple[bool, str]:
    """Can inductor build kernels for `device`? -> (yes/no, the evidence): Triton on CUDA, a C++
    compiler (inductor's own choice, $CXX or g++) on the CPU."""
    if device.type == "cuda":
        found = importlib.util.find_spec("triton") is not None
        return found, "Triton installed" if found else "Triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        cxx = get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 (no compiler, or an inductor that cannot tell)
        return False, f"no C++ compiler for inductor ({e})"
    return (True, f"C++ compiler {cxx}") if shutil.which(cxx) else (False, f"no C++ compiler ({cxx} not found)")


def compile_choice(args, device, micro_batches: int) -> tuple[bool, str]:
    """--compile auto|on|off -> (compile?, the reason printed at start). auto compiles where inductor
    can build kernels, for a float32/bfloat16 run of at least COMPILE_PAYS_AFTER micro-batches that
    samples no replies (--on-policy generates inside the step; every new length would recompile)."""
    if args.compile == "off":
        return False, "off (--compile off)"
    found, evidence = compiler_found(device)
    if args.compile == "on":
        if not found:
            raise SystemExit(f"--compile on: {evidence}; install one, or train with --compile off")
        return True, f"on (--compile on; {evidence})"
    why = ("float64 runs are exactness checks" if choose_dtype(args.dtype, device).master == torch.float64 else
           "--on-policy samples inside the step" if args.on_policy else
           f"{micro_batches} micro-batches, fewer than the {COMPILE_PAYS_AFTER} that pay the compilation back"
           if micro_batches < COMPILE_PAYS_AFTER else None if found else evidence)
    return (False, f"off (--compile auto: {why})") if why else (True, f"on (--compile auto: {evidence}; "
                                                               f"{micro_batches} micro-batches; --compile off for eager)")
