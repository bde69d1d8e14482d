"""Model FLOPs utilisation (MFU), as nanoGPT prints it: the FLOPs the method needs per step, over
the time the step took, over the device's peak.

Model FLOPs count matmuls only (PaLM's convention), per token of the batch:
    every Linear (in -> out) of a block     forward 2·in·out
        student backward                    + 2·in·out (input gradient, every layer, frozen or not)
                                            + 2·in·out if the weight trains (sft, kd)
    every adapter (A: r x in, B: out x r[, M: r x r])   3 x 2·r·(in + out [+ r]) (fwd, input and weight grad)
    attention per layer                     forward 4·T·H·hd (QKᵀ and AV over the full T x T square,
                                            not halved for causality), student backward 2x that
    LM head, only on the N target rows the loss projects: teacher 2·V·D, student 2·V·D forward +
    2·V·D input gradient (+ 2·V·D weight gradient if it trains)
Not counted: embeddings, norms, RoPE, softmax and other elementwise work, the recomputation of
--grad-checkpoint, and on-policy generation. The teacher runs forward only, and not at all with a
teacher cache. tests/test_bench.py checks the count against torch.utils.flop_counter.

The peak: a known GPU's datasheet dense bf16 rate; anything else (the CPU, fp32) is measured once
at start: the best of a few matmuls of the student's MLP shape, in the step's compute dtype.
"""
import math
import time

import torch

DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM parts


def linears(c) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one block of config c."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
            "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
            "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}


def step_flops(method: str, teacher_cfg, student_cfg, tokens: int, seq_len: int, n_targets: int,
               rank: int = 0, targets=(), moslora: bool = False, teacher_runs: bool = True) -> float:
    """Model FLOPs of `tokens` tokens in rows of seq_len, n_targets of them projected by the loss.

    method: sft, lora, kd or neo (train.py's); rank/targets/moslora: the adapters (lora, neo);
    teacher_runs: False with a teacher cache (the teacher's rows are read, not computed)."""
    full = method in ("sft", "kd")
    s = student_cfg

    def block(c):  # forward FLOPs per token of one block's linears, and of its attention
        return sum(2 * i * o for i, o in linears(c).values()), 4 * seq_len * c.num_attention_heads * c.head_dim

    matmuls, attention = block(s)
    student = tokens * s.num_hidden_layers * (matmuls * (3 if full else 2) + attention * 3)
    if not full:
        student += tokens * s.num_hidden_layers * sum(3 * 2 * rank * (i + o + (rank if moslora else 0))
                                                      for name, (i, o) in linears(s).items() if name in targets)
    student += n_targets * 2 * s.vocab_size * s.hidden_size * (3 if full else 2)
    teacher = 0
    if method in ("kd", "neo") and teacher_runs:
        t_matmuls, t_attention = block(teacher_cfg)
        teacher = (tokens * teacher_cfg.num_hidden_layers * (t_matmuls + t_attention)
                   + n_targets * 2 * teacher_cfg.vocab_size * teacher_cfg.hidden_size)
    return float(student + teacher)


def matmul_peak(dtype, device, m=2048, k=576, n=1536, repeats=10) -> float:
    """FLOP/s of the best of `repeats` (m x k) @ (k x n) matmuls in `dtype` on `device`."""
    gen = torch.Generator(device).manual_seed(0)  # its own: the run's random stream (dropout, resume) stays untouched
    a = torch.randn(m, k, dtype=dtype, device=device, generator=gen)
    b = torch.randn(k, n, dtype=dtype, device=device, generator=gen)
    best = math.inf
    for _ in range(repeats + 2):  # the first two warm up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def device_peak(device, dtype, m=2048, k=576, n=1536) -> tuple[float, str]:
    """(FLOP/s, where it came from): a known GPU's datasheet dense bf16 rate, else a measured matmul."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, rate in DATASHEET_BF16.items():
            if key in name:
                return rate, f"{name}: datasheet dense bf16 {rate / 1e12:.1f} TFLOP/s"
    rate = matmul_peak(dtype, device, m, k, n)
    return rate, (f"the best {str(dtype).removeprefix('torch.')} {m}x{k}x{n} matmul measured on this "
                  f"{device.type} ({rate / 1e9:.0f} GFLOP/s)")


def batch_flops(batch: dict, method: str, teacher_cfg, student_cfg, **adapters) -> float:
    """step_flops for one micro-batch {"input_ids": (B, T), "labels": (B, T)}; adapters: rank, targets,
    moslora, teacher_runs as step_flops takes them."""
    import neo
    B, T = batch["input_ids"].shape
    return step_flops(method, teacher_cfg, student_cfg, B * T, T, int(neo.count_targets(batch["labels"])), **adapters)


def for_run(args, student_cfg, teacher_path, device, teacher_runs: bool):
    """train.py's meter: (the device's peak FLOP/s, where it came from, micro-batch -> its model FLOPs)."""
    from pathlib import Path
    import model as llama
    from runkit.precision import choose_dtype
    precision = choose_dtype(args.dtype, device)
    peak, source = device_peak(device, precision.compute or precision.master, args.batch_size * args.max_len,
                               student_cfg.hidden_size, student_cfg.intermediate_size)
    teacher_cfg = llama.LlamaConfig.from_json(Path(teacher_path) / "config.json")
    adapters = dict(rank=args.rank, targets=args.targets.split(","), moslora=args.adapter == "moslora")

    def flops(batch):
        return batch_flops(batch, args.method, teacher_cfg, student_cfg, teacher_runs=teacher_runs, **adapters)
    return peak, source, flops
