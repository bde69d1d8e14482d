"""Speed and memory at the paper's real shapes, with random weights: no downloads, no data.

The paper's two Table I pairs, built straight from their config.json (benchmarks/configs/, copies
of benchmarks/configs/: Llama-3.1-8B teacher -> a Llama-3.2-1B-shaped student, Llama-2-7B ->
TinyLlama-1.1B), random weights drawn on the device itself, synthetic tokens (every position a
target), batch 4 x 512, rank 128, train.py's --dtype auto (bf16 frozen weights + bf16 autocast on
a GPU; trainable weights and AdamW state fp32). One optimizer step per method, as
benchmarks/bench.py defines them (sft, lora, kd, neo, and hf-peft-neo: transformers + PEFT + the
full-logits loss neo.reference_loss), each method in its own process.

    python -m benchmarks.bench_gpu --device cuda                      # both pairs, every method, the loss
    python -m benchmarks.bench_gpu --device cpu --scale 16 --steps 1  # the same code, 1/16 of width and depth

Reported per row: seconds per step (median of --steps after --warmup), tokens/s, peak memory
(torch.cuda.max_memory_allocated on a GPU, everything the step held: weights, optimizer state,
activations; peak RSS of the worker on the CPU) and model FLOPs utilisation (MFU):

    MFU = model FLOPs of the step / step time / peak FLOP/s
    model FLOPs: runkit/mfu.py's step_flops (train.py's MFU), matmuls only, per token of the batch:
      every block Linear 2·in·out forward, + 2·in·out input gradient in the student's backward,
      + 2·in·out weight gradient where it trains; adapters 3 x 2·r·(in + out); attention
      4·T·heads·head_dim per layer forward (the full T x T square, as PaLM's MFU), x3 in the
      student; LM heads 2·V·D on the target rows only (student x2, x3 when it trains). The teacher
      runs forward only; hf-peft-neo is credited with neo's FLOPs (the same useful work).
    peak FLOP/s: the GPU's datasheet dense bf16 rate where known (H100/H200 SXM: 989.4 TFLOP/s),
      else the best measured matmul in the step's dtype (1024³ on the CPU). The measured rate
      (8192³ bf16 on a GPU) is printed beside it either way.

The chunked loss alone (--parts loss) at Liger-Kernel's benchmark shape: hidden 4096, vocabulary
128,256, 8,192 target tokens, bf16 inputs, the JSD divergence (beta 0.5), forward + backward into
the student's hidden states and LM head, peak memory counted as Liger counts it
(max_memory_allocated, inputs included). Liger's published figures for that shape on an H100:
LigerFusedLinearJSDLoss 60.7 ms and 11.1 GB, plain torch 213 ms and 68.9 GB. Peers: neo_loss at
several chunk sizes, neo.reference_loss (plain torch on full logits) and, if `liger-kernel` is
importable, Liger's own fused linear JSD.

--scale N divides widths, depths, head counts, vocabularies, the rank and the loss tokens by N
(so the CPU runs the same code in a minute or two); the targets mean something only at --scale 1
on an H200.
"""
import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from runkit import flags, mfu
from runkit.distributed import Dist
from runkit.precision import autocast, choose_dtype, frozen_dtype

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"
PAIRS = {"llama3": ("llama-3.1-8b", "llama-3.2-1b"), "llama2": ("llama-2-7b", "tinyllama-1.1b")}
METHODS = ("sft", "lora", "kd", "neo", "hf-peft-neo")
LOSS_CHUNKS = (256, 1024, 2048)
LIGER = {"liger fused linear JSD (published, H100)": (60.7e-3, 11.1), "plain torch (published, H100)": (213e-3, 68.9)}
TARGETS = {"mfu": 0.40, "loss_time_vs_liger": 1.5, "neo_vs_kd_peak": 0.8}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--scale", type=int, default=1,
                   help="divide widths, depths, heads, vocabularies, the rank and the loss tokens by this")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, from {list(PAIRS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    p.add_argument("--parts", default="steps,loss", help="steps (one optimizer step per method), loss (chunked loss)")
    flags.add(p, "batch_size", "max_len", "rank", "chunk_size", "dtype", batch_size=4, max_len=512)  # train.py's
    p.add_argument("--loss-tokens", type=int, default=8192, help="target tokens for the loss part (Liger: 8192)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--timeout", type=int, default=240, help="seconds one worker may run before it is stopped")
    p.add_argument("--configs", default=str(CONFIGS), help="folder of config.json files named as in PAIRS")
    p.add_argument("--output", default="benchmarks/results/bench_gpu.json", help="JSON results (+ .md beside)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: "step:pair:method" or "loss:name"
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pairs = [x for x in args.pairs.split(",") if x]
    args.methods = [x for x in args.methods.split(",") if x]
    args.parts = [x for x in args.parts.split(",") if x]
    for name, given, known in (("pair", args.pairs, PAIRS), ("method", args.methods, METHODS),
                               ("part", args.parts, ("steps", "loss"))):
        bad = [x for x in given if x not in known]
        if bad:
            p.error(f"unknown {name} {bad[0]!r}; choose from {list(known)}")
    if args.scale < 1:
        p.error("--scale must be 1 or more")
    args.rank = max(1, args.rank // args.scale)  # the adapters shrink with the layers they sit on
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (use --device cpu --scale 16 for a CPU run)")
    return args


# -----------------------------------------------------------------------------
# Models from config.json, random weights drawn where they live.


def load_config(name, args):
    """The named config.json as a LlamaConfig, shrunk by --scale (head_dim kept where possible)."""
    import model as llama
    cfg = llama.LlamaConfig.from_json(Path(args.configs) / f"{name}.json")
    s = args.scale
    if s == 1:
        return cfg
    heads = max(1, cfg.num_attention_heads // s)
    kv = max(1, cfg.num_key_value_heads // s)
    while heads % kv:
        kv -= 1
    hidden = max(heads, cfg.hidden_size // s)
    return llama.LlamaConfig(**{**cfg.__dict__, "hidden_size": hidden, "intermediate_size": max(1, cfg.intermediate_size // s),
                                "num_hidden_layers": max(1, cfg.num_hidden_layers // s), "num_attention_heads": heads,
                                "num_key_value_heads": kv, "head_dim": hidden // heads,
                                "vocab_size": max(256, cfg.vocab_size // s),
                                "max_position_embeddings": min(cfg.max_position_embeddings, 4 * args.max_len)})


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_llama(cfg, dtype, device, seed):
    """Our Llama with nn.Linear's and nn.Embedding's own random initialisation, created directly on
    `device` in `dtype` (an 8B model in bf16 is 16 GB of random numbers drawn on the GPU in
    milliseconds; drawn on the CPU and copied it would take minutes). RoPE tables stay fp32."""
    import model as llama
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        m = llama.Llama(cfg)
    return m


def synthetic_batch(vocab, args, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch_size, args.max_len), generator=gen)
    labels = ids.clone()
    labels[:, 0] = -100  # a row's first token is nobody's target; every other position is one
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


# -----------------------------------------------------------------------------
# One optimizer step per method (a worker process each).


def our_step(method, tcfg, scfg, args, device):
    """train.py's pieces, as benchmarks/bench.py's `ours`, on random models: -> (step, trainable params)."""
    import neo
    import train
    targs = flags.parse(["--method", method, "--teacher", "random", "--rank", str(args.rank),
                              "--chunk-size", str(args.chunk_size), "--dtype", args.dtype])
    use_teacher = method in ("neo", "kd")
    teacher = random_llama(tcfg, frozen_dtype(targs, device), device, seed=0).eval().requires_grad_(False) \
        if use_teacher else None
    student = train.prepare_student(random_llama(scfg, torch.float32, device, seed=1), targs, device)
    distiller = neo.Distiller(student, teacher, targs.alpha, targs.temperature, targs.divergence, targs.chunk_size)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, betas=(0.9, 0.999), weight_decay=targs.weight_decay)
    ctx = train.Step(distiller, optimizer, params, None, targs, Dist(device=device), Path("."), None)

    def step(b):  # train.py's step, on one micro-batch
        return train.train_step(ctx, [b], targs.lr, 0)["loss"]
    return step, params


def peer_step(tcfg, scfg, args, device):
    """transformers + PEFT LoRA (same rank, alpha, targets) + the full-logits loss, in the same
    precision (frozen weights in the frozen dtype, the same autocast)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    import neo
    targs = flags.parse(["--method", "neo", "--teacher", "random", "--rank", str(args.rank), "--dtype", args.dtype])
    dtype = frozen_dtype(targs, device)

    def hf(cfg, seed):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    teacher = hf(tcfg, 0).eval().requires_grad_(False)
    student = get_peft_model(hf(scfg, 1), LoraConfig(r=args.rank, lora_alpha=targs.lora_alpha, lora_dropout=0.0,
                                                     target_modules=targs.targets.split(","), task_type="CAUSAL_LM"))
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, betas=(0.9, 0.999), weight_decay=targs.weight_decay)

    def step(b):
        with torch.no_grad():
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        with autocast(device, targs):
            s_logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
            loss = neo.reference_loss(s_logits, t_logits, b["labels"], alpha=targs.alpha,
                                      temperature=targs.temperature).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, targs.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, params


def step_worker(pair, method, args, device):
    tcfg, scfg = (load_config(n, args) for n in PAIRS[pair])
    batch = synthetic_batch(scfg.vocab_size, args, device)
    start = memory_now(device)
    t0 = time.perf_counter()
    step, params = peer_step(tcfg, scfg, args, device) if method == "hf-peft-neo" else our_step(method, tcfg, scfg, args, device)
    build_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step(batch))
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_gb = peak_memory(device, start)  # before the matmul probes below allocate anything
    step_s = statistics.median(times)
    tokens = batch["input_ids"].numel()
    flops = step_flops("neo" if method == "hf-peft-neo" else method, tcfg, scfg, args.rank, batch)
    peak, peak_source = peak_flops(device, compute_dtype(args, device))
    return {"pair": pair, "method": method, "teacher": PAIRS[pair][0], "student": PAIRS[pair][1],
            "precision": precision(args, device),
            "build_s": build_s, "step_s": step_s, "step_s_all": times, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "step_flops": flops, "peak_flops": peak, "peak_flops_source": peak_source,
            "mfu": flops / step_s / peak, "matmul_flops_measured": measured_matmul(device, compute_dtype(args, device)),
            "peak_mem_gb": peak_gb, "trainable_params": sum(p.numel() for p in params),
            "losses": losses}


def precision(args, device) -> str:
    return choose_dtype(args.dtype, device).why + "; trainable weights and AdamW state float32"


def step_flops(method, tcfg, scfg, rank, batch) -> float:
    """runkit/mfu.py's count (train.py's MFU), for the configs in hand (the --scale'd shapes included)."""
    return mfu.batch_flops(batch, method, tcfg, scfg, rank=rank, targets=flags.parse([]).targets.split(","))


# -----------------------------------------------------------------------------
# The chunked loss alone at Liger's shape (a worker process per row).


def loss_inputs(args, device):
    """Student and teacher final hidden states and LM heads at the Liger shape (/ --scale), bf16 on
    a GPU (fp32 on the CPU), every token a target."""
    s = args.scale
    D, V, N = 4096 // s, 128256 // s, args.loss_tokens // s
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    hs = torch.randn(1, N + 1, D, device=device, dtype=dtype, generator=gen).requires_grad_()  # (1, N+1, D)
    ht = torch.randn(1, N + 1, D, device=device, dtype=dtype, generator=gen)
    ws = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) / math.sqrt(D)).requires_grad_()
    wt = torch.randn(V, D, device=device, dtype=dtype, generator=gen) / math.sqrt(D)
    y = torch.randint(0, V, (1, N + 1), device=device, generator=gen)
    y[:, 0] = -100
    return hs, ws, ht, wt, y, (D, V, N)


def loss_worker(name, args, device):
    """name: neo_loss@<chunk>, reference, or liger. One forward + backward per call, JSD (beta 0.5)."""
    import neo
    start = 0.0 if device.type == "cuda" else memory_now(device)  # CUDA: the inputs count, as Liger counts
    hs, ws, ht, wt, y, (D, V, N) = loss_inputs(args, device)

    if name.startswith("neo_loss@"):
        chunk = int(name.split("@")[1])

        def run():
            neo.neo_loss(hs, ws, ht, wt, y, alpha=0.0, divergence="jsd", beta=0.5, chunk_size=chunk).loss.backward()
    elif name == "reference":
        def run():
            s_logits, t_logits = hs @ ws.T, ht @ wt.T  # (1, N+1, V) each
            neo.reference_loss(s_logits, t_logits, y, alpha=0.0, divergence="jsd", beta=0.5).loss.backward()
    elif name == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSDLoss
        liger = LigerFusedLinearJSDLoss(jsd_beta=0.5, temperature=1.0)

        def run():
            liger(hs[0, :-1], ws, ht[0, :-1], wt, y[0, 1:]).backward()
    else:
        raise ValueError(f"unknown loss row {name!r}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + max(args.steps, 3)):
        hs.grad = ws.grad = None
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    inputs_gb = sum(t.numel() * t.element_size() for t in (hs, ws, ht, wt, y)) / 2**30
    return {"name": name, "hidden": D, "vocab": V, "tokens": N, "dtype": str(hs.dtype).removeprefix("torch."),
            "time_s": statistics.median(times), "time_s_all": times,
            # CUDA, as Liger counts: everything allocated at the peak, the inputs included; CPU: peak RSS
            # above the runtime's before the inputs existed (so the inputs are included there too)
            "peak_mem_gb": peak_memory(device, start),
            "inputs_gb": inputs_gb}


def liger_available():
    try:
        import liger_kernel.transformers  # noqa: F401
        return True
    except Exception:  # not installed, or installed without a usable Triton
        return False


# -----------------------------------------------------------------------------
# Measuring helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_now(device) -> float:
    """GB allocated now (CUDA), or resident now (CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_memory(device, start) -> float:
    """GB: CUDA max_memory_allocated since the process began (a worker runs one row) less `start`;
    CPU peak RSS less `start` (the runtime before the models existed)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30 - start
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - start


def probe_side(device) -> int:
    """The side of the square matmul that measures a peak: 8192 on a GPU, 1024 on the CPU."""
    return 8192 if device.type == "cuda" else 1024


def measured_matmul(device, dtype) -> float:
    """FLOP/s of the best of 11 n x n x n matmuls in `dtype` (n = probe_side): runkit/mfu.py's probe."""
    n = probe_side(device)
    return mfu.matmul_peak(dtype, device, n, n, n, repeats=11)


def compute_dtype(args, device):
    """The dtype the step's matmuls run in: autocast's, or float32 without it."""
    return choose_dtype(args.dtype, device).compute or torch.float32


def peak_flops(device, dtype) -> tuple[float, str]:
    """(FLOP/s, where it came from): runkit/mfu.py's device_peak, the datasheet's dense bf16 rate for
    known GPUs, else measured on the probe_side square."""
    n = probe_side(device)
    return mfu.device_peak(device, dtype, n, n, n)


# -----------------------------------------------------------------------------
# The parent: a worker per row, then the tables and the targets.


def run_worker(kind, args, argv):
    cmd = [sys.executable, "-m", "benchmarks.bench_gpu", *argv, "--worker", kind]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        try:
            proc = subprocess.run(cmd + ["--result", f.name], capture_output=True, text=True, cwd=ROOT,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s"}
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout)[-1500:]}
        return json.loads(Path(f.name).read_text())


def run_all(args, argv):
    t0 = time.time()
    print(f"bench_gpu: {args.device}, scale 1/{args.scale}, batch {args.batch_size} x {args.max_len}, rank "
          f"{args.rank}, --dtype {args.dtype}, {args.warmup} warm-up + {args.steps} timed steps", flush=True)
    blob = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "result")},
            "command": "python -m benchmarks.bench_gpu " + " ".join(argv), "machine": machine(args.device),
            "steps": {}, "loss": {}, "targets": {}, "wall_s": 0.0}
    if "steps" in args.parts:
        for pair in args.pairs:
            t, s = (load_config(n, args) for n in PAIRS[pair])
            print(f"{pair}: teacher {PAIRS[pair][0]} ({t.num_hidden_layers} x {t.hidden_size}, vocab {t.vocab_size}) "
                  f"-> student {PAIRS[pair][1]} ({s.num_hidden_layers} x {s.hidden_size})", flush=True)
            for method in args.methods:
                r = blob["steps"][f"{pair}/{method}"] = run_worker(f"step:{pair}:{method}", args, argv)
                print("  " + (f"{method:<12} FAILED: {r['error']}" if "error" in r else
                              f"{method:<12} {r['step_s']:7.3f} s/step {r['tokens_per_s']:9.0f} tok/s "
                              f"MFU {100 * r['mfu']:5.1f}%  {r['peak_mem_gb']:7.2f} GB peak  "
                              f"{r['trainable_params']:>13,} trainable"), flush=True)
                save(blob, args, t0)  # after every row: a run stopped by its time limit keeps what it measured
    if "loss" in args.parts:
        names = [f"neo_loss@{c}" for c in LOSS_CHUNKS] + ["reference"] + (["liger"] if liger_available() else [])
        print(f"chunked loss at the Liger shape / {args.scale} (JSD, forward + backward):", flush=True)
        for name in names:
            r = blob["loss"][name] = run_worker(f"loss:{name}", args, argv)
            print("  " + (f"{name:<16} FAILED: {r['error']}" if "error" in r else
                          f"{name:<16} {1e3 * r['time_s']:9.1f} ms  {r['peak_mem_gb']:7.2f} GB peak "
                          f"(inputs {r['inputs_gb']:.2f} GB; hidden {r['hidden']}, vocab {r['vocab']}, "
                          f"{r['tokens']} tokens, {r['dtype']})"), flush=True)
            save(blob, args, t0)
    md = save(blob, args, t0)
    print("\n" + md)
    print(f"results written to {args.output} and {Path(args.output).with_suffix('.md')}")
    return blob


def save(blob, args, t0) -> str:
    """Targets and tables from the rows so far, written to --output (JSON) and beside it (.md)."""
    blob["targets"] = targets(blob["steps"], blob["loss"], args)
    blob["wall_s"] = time.time() - t0
    md = markdown(blob)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(blob, indent=2))
    Path(args.output).with_suffix(".md").write_text(md)
    return md


def targets(steps, losses, args):
    """Issue 14's targets, from the rows this run produced."""
    real = args.scale == 1 and args.device.startswith("cuda")
    note = "" if real else " (not the real shape/GPU: indicative only)"
    out = {}
    for pair in args.pairs:
        neo, kd = steps.get(f"{pair}/neo", {}), steps.get(f"{pair}/kd", {})
        if "mfu" in neo:
            out[f"{pair}: neo MFU{note}"] = {"value": neo["mfu"], "target": f">= {TARGETS['mfu']}",
                                             "met": neo["mfu"] >= TARGETS["mfu"]}
        if "peak_mem_gb" in neo and "peak_mem_gb" in kd:
            v = neo["peak_mem_gb"] / kd["peak_mem_gb"]
            out[f"{pair}: neo peak / kd peak{note}"] = {"value": v, "target": f"<= {TARGETS['neo_vs_kd_peak']}",
                                                        "met": v <= TARGETS["neo_vs_kd_peak"]}
    ours = [r for n, r in losses.items() if n.startswith("neo_loss@") and "time_s" in r]
    if ours:
        liger_s, liger_gb = LIGER["liger fused linear JSD (published, H100)"]
        fits = [r for r in ours if r["peak_mem_gb"] <= liger_gb] or ours
        best = min(fits, key=lambda r: r["time_s"])
        v = best["time_s"] / liger_s
        out[f"chunked loss ({best['name']}) time / Liger's 60.7 ms{note}"] = {
            "value": v, "target": f"<= {TARGETS['loss_time_vs_liger']}", "met": v <= TARGETS["loss_time_vs_liger"]}
        out[f"chunked loss ({best['name']}) peak GB vs Liger's 11.1 GB{note}"] = {
            "value": best["peak_mem_gb"], "target": f"<= {liger_gb}", "met": best["peak_mem_gb"] <= liger_gb}
    return out


def markdown(blob) -> str:
    c = blob["config"]
    lines = [f"# Real shapes, random weights ({c['device']}, scale 1/{c['scale']})", "",
             f"Command: `{blob['command']}`", "", f"Machine: {json.dumps(blob['machine'])}", ""]
    if blob["steps"]:
        lines += [f"One optimizer step, batch {c['batch_size']} x {c['max_len']}, rank {c['rank']}, --dtype {c['dtype']}:", "",
                  "| pair | method | s / step | tokens/s | step TFLOP | MFU | peak GB | trainable |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, r in blob["steps"].items():
            pair, method = key.split("/")
            if "error" in r:
                lines.append(f"| {pair} | {method} | failed: {r['error'].splitlines()[-1][:80]} | | | | | |")
                continue
            lines.append(f"| {pair} | {method} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['step_flops'] / 1e12:.3g} | {100 * r['mfu']:.1f}% | {r['peak_mem_gb']:.2f} | "
                         f"{r['trainable_params']:,} |")
        first = next((r for r in blob["steps"].values() if "error" not in r), None)
        if first:
            lines += ["", f"MFU's peak: {first['peak_flops_source']}; measured matmul in the step's dtype "
                          f"{first['matmul_flops_measured'] / 1e12:.3g} TFLOP/s. Precision: {first['precision']}."]
    if blob["loss"]:
        lines += ["", "Chunked loss alone (JSD, forward + backward into the student's hidden states and head):", "",
                  "| loss | ms | peak GB |", "|---|---:|---:|"]
        for name, r in blob["loss"].items():
            lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} | |" if "error" in r else
                         f"| {name} | {1e3 * r['time_s']:.1f} | {r['peak_mem_gb']:.2f} |")
        for name, (s, gb) in LIGER.items():
            lines.append(f"| {name} | {1e3 * s:.1f} | {gb:.1f} |")
    if blob["targets"]:
        lines += ["", "| target | value | met |", "|---|---:|---|"]
        lines += [f"| {k} {v['target']} | {v['value']:.3f} | {'yes' if v['met'] else 'no'} |"
                  for k, v in blob["targets"].items()]
    return "\n".join(lines) + "\n"


def machine(device):
    info = {"torch": torch.__version__, "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["load_average_1_5_15min"] = os.getloadavg()
    return info


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if args.worker:  # internal: one row in this process
        device = torch.device(args.device)
        kind, *rest = args.worker.split(":")
        r = step_worker(rest[0], rest[1], args, device) if kind == "step" else loss_worker(rest[0], args, device)
        Path(args.result).write_text(json.dumps(r))
        return r
    return run_all(args, argv)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
