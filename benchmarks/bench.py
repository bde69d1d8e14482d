"""Time and memory of one optimizer step for each method of the paper's Table I, side by side.

One optimizer step = teacher forward under no_grad (kd, neo) + student forward and backward +
gradient clipping + AdamW step, built from train.py's own pieces (`make_trainable`, `Distiller`,
neo.neo_loss, the pruned student), so it is the step `python train.py` runs:

    method        trains                loss
    sft           every student weight  CE
    lora          LoRA adapters         CE
    kd            every student weight  α·CE + (1-α)·KL(teacher ‖ student)
    neo           LoRA adapters         α·CE + (1-α)·KL(teacher ‖ student)     <- LLM-Neo
    neo-moslora   MoSLoRA adapters      the same
    neo-cache     LoRA adapters         the same with the teacher's top-k read from a cache
                                        (teacher_cache.py, neo.sparse_neo_loss): no teacher in memory
    hf-peft-neo   the Neo step written the way most users write it today: transformers
                  LlamaForCausalLM for teacher and student (the same weights, from the same
                  folders), PEFT LoRA with the same rank/alpha/dropout/targets, and the loss on the
                  full (B, T, V) logits upcast to fp32 (F.cross_entropy + F.kl_div: neo.reference_loss)

Every method runs in its own fresh subprocess, so its peak memory is its own: peak resident set
size (getrusage ru_maxrss, everything the process ever held: weights, optimizer state,
activations, the Python runtime) on CPU, torch.cuda.max_memory_allocated on GPU. The batch is a
fixed (batch_size, max_len) block packed from the same instruction data for every method. The
time is the median over --steps timed steps after --warmup untimed ones.

    python -m benchmarks.bench                                   # SmolLM2-135M teacher -> its pruned half, 512 x 4, r 128
    python -m benchmarks.bench --steps 2 --warmup 1 --methods neo,kd,hf-peft-neo
    python -m benchmarks.bench --device cuda --steps 10 --warmup 3 --output benchmarks/results/bench_gpu.json
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent  # the repository root: workers run as `python -m benchmarks.<name>`

METHODS = ("sft", "lora", "kd", "neo", "neo-moslora", "neo-cache", "hf-peft-neo")
# train.py flags that give each of our methods
TRAIN_FLAGS = {"sft": ["--method", "sft"], "lora": ["--method", "lora"], "kd": ["--method", "kd"],
               "neo": ["--method", "neo"], "neo-moslora": ["--method", "neo", "--adapter", "moslora"],
               "neo-cache": ["--method", "neo"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # models
    p.add_argument("--teacher", default=None, help="teacher folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--student", default=None, help="student folder (default: the teacher pruned to half its layers)")
    p.add_argument("--prune-to", type=int, default=None, help="layers kept when pruning (default: half)")
    # shape
    p.add_argument("--max-len", type=int, default=512, help="tokens per row (rows are packed to exactly this)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step")
    p.add_argument("--rank", type=int, default=128, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter alpha (default: 2 x rank, as train.py)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (train.py's default)")
    p.add_argument("--chunk-size", type=int, default=256, help="neo_loss chunk (train.py's default)")
    p.add_argument("--k", type=int, default=64, help="neo-cache: teacher tokens per position (teacher_cache.py's default)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute student blocks in backward (train.py --grad-checkpoint; transformers' "
                        "gradient_checkpointing_enable() for hf-peft-neo)")
    p.add_argument("--data", default="offline", help="instruction data packed into the batch (train.py's --data)")
    # run
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--work-dir", default="runs/bench", help="where the pruned student and the batch are kept")
    p.add_argument("--output", default="benchmarks/results/bench_cpu.json", help="JSON results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {METHODS}")
    args.lora_alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.rank
    return args


# -----------------------------------------------------------------------------
# Set-up, once in the parent: the student folder and one fixed batch, shared by every method.


def prepare(args) -> tuple[str, str, Path]:
    """-> (teacher folder, student folder, batch file)."""
    import data
    import model as llama
    import train
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    teacher = str(llama.resolve_folder(args.teacher or train.offline_model()))
    tok = data.Tokenizer.from_dir(teacher)
    conversations, _ = data.load_conversations(args.data, None, 0)
    # whole conversations (no truncation), packed back to back into the fixed-shape batch
    examples = data.tokenize_all(tok, conversations[:args.batch_size * args.max_len // 64 + 64], 10**9)
    batch = pack(examples, args.batch_size, args.max_len)
    batch_file = work / f"batch_{args.batch_size}x{args.max_len}.pt"
    torch.save(batch, batch_file)
    if "neo-cache" in args.methods:  # what teacher_cache.py would store for this batch, with its dtypes
        import neo
        teacher_model = llama.Llama.from_pretrained(teacher).eval()
        with torch.no_grad():
            hidden = teacher_model(batch["input_ids"], batch["attention_mask"], return_hidden=True)
        mask = batch["labels"][:, 1:] != -100
        top = neo.teacher_topk(hidden[:, :-1][mask], teacher_model.lm_head.weight, args.k)
        torch.save({"ids": top.ids.to(torch.uint16), "logp": top.logp.half(), "tail_logp": top.tail_logp},
                   batch_file.with_name(batch_file.stem + f"_top{args.k}.pt"))
        del teacher_model, hidden
    student = args.student
    if student is None:  # train.py's pruned half, saved once so every subprocess loads the same weights
        tag = Path(teacher).name + f"-prune{args.prune_to or 'half'}"
        student = str(work / tag)
        if not (Path(student) / "config.json").exists():
            targs = train.parse_args(["--teacher", teacher] + (["--prune-to", str(args.prune_to)]
                                                               if args.prune_to else []))
            train.build_student(targs, teacher, examples[0]["input_ids"], torch.device("cpu")).save_pretrained(student)
    return teacher, student, batch_file


def pack(examples, batch_size, max_len):
    """Concatenate tokenised conversations into `batch_size` full rows of `max_len` tokens."""
    ids, labels = [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [-100] + e["labels"][1:]  # a row's first token is nobody's target
        if len(ids) >= batch_size * max_len:
            break
    if len(ids) < batch_size * max_len:
        raise ValueError(f"not enough data for {batch_size} x {max_len} tokens")
    n = batch_size * max_len
    shape = (batch_size, max_len)
    return {"input_ids": torch.tensor(ids[:n]).view(shape), "labels": torch.tensor(labels[:n]).view(shape),
            "attention_mask": torch.ones(shape, dtype=torch.long)}


# -----------------------------------------------------------------------------
# One method, in its own process.


def rss_gb() -> float:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def ours(method, args, teacher_dir, student_dir, device):
    """train.py's models, trainable set, Distiller and step: returns (step function, trainable params)."""
    import model as llama
    import neo
    import train
    targs = train.parse_args(TRAIN_FLAGS[method] + ["--teacher", teacher_dir, "--student", student_dir,
                                                    "--rank", str(args.rank), "--lora-alpha", str(args.lora_alpha),
                                                    "--lora-dropout", str(args.lora_dropout),
                                                    "--chunk-size", str(args.chunk_size)]
                              + (["--grad-checkpoint"] if args.grad_checkpoint else []))
    use_teacher = targs.method in ("neo", "kd") and method != "neo-cache"
    teacher, cached = None, None
    if method == "neo-cache":  # the rows come from disk; the teacher is never loaded
        rows = torch.load(Path(args.batch_file).with_name(Path(args.batch_file).stem + f"_top{args.k}.pt"))
        cached = neo.TeacherTopK(rows["ids"].long().to(device), rows["logp"].to(device), rows["tail_logp"].to(device))
    if use_teacher:
        teacher = llama.Llama.from_pretrained(teacher_dir, dtype=train.frozen_dtype(targs, device), device=device)
        teacher.eval().requires_grad_(False)
    student = train.build_student(targs, teacher_dir, None, device)  # --student given: just loads it
    student = train.prepare_student(student, targs, device)
    distiller = train.Distiller(student, targs.alpha, targs.temperature, targs.divergence, targs.chunk_size)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, betas=(0.9, 0.999), weight_decay=targs.weight_decay)
    teacher_head = teacher.lm_head.weight if use_teacher else None

    def step(b):
        normalizer = torch.tensor(float(neo.count_targets(b["labels"])), device=device).clamp(min=1)
        teacher_hidden = None
        if use_teacher:
            with torch.no_grad():
                teacher_hidden = teacher(b["input_ids"], b["attention_mask"], return_hidden=True)
        with train.autocast(device, targs):
            res = distiller(b["input_ids"], b["attention_mask"], b["labels"], teacher_hidden, teacher_head, normalizer,
                            cached)
            res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, targs.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return res.loss.item()
    return step, params


def hf_peft(args, teacher_dir, student_dir, device):
    """The common way: transformers + PEFT LoRA + a full-logits CE + KL loss (fp32 upcast)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    import neo
    import train
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = LlamaForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval().requires_grad_(False)
    student = LlamaForCausalLM.from_pretrained(student_dir, dtype=dtype).to(device)
    targs = train.parse_args(["--method", "neo"])  # the same α, T, targets, lr as ours
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targs.targets.split(","), task_type="CAUSAL_LM")
    student = get_peft_model(student, config)
    if args.grad_checkpoint:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=targs.lr, betas=(0.9, 0.999), weight_decay=targs.weight_decay)
    alpha, T = targs.alpha, targs.temperature

    def step(b):
        with torch.no_grad():
            t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, T, V)
        s_logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits      # (B, T, V)
        # F.cross_entropy + F.kl_div on the full logits, upcast to fp32 (neo.reference_loss)
        loss = neo.reference_loss(s_logits, t_logits, b["labels"], alpha=alpha, temperature=T).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, targs.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step, params


def worker(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "hf-peft-neo":  # import first, so the baseline holds the libraries' own memory
        import peft, transformers  # noqa: F401
    else:
        import train  # noqa: F401
    rss_start = rss_gb()  # the runtime alone: Python, torch and the libraries, no weights yet
    batch = {k: v.to(device) for k, v in torch.load(args.batch_file).items()}
    if args.worker == "hf-peft-neo":
        step, params = hf_peft(args, args.teacher, args.student, device)
    else:
        step, params = ours(args.worker, args, args.teacher, args.student, device)
    rss_models = rss_gb()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch["input_ids"].numel()
    peak = peak_gb(device)
    return {"method": args.worker, "step_s": step_s, "step_s_all": times, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "peak_mem_gb": peak,
            # CPU: the peak less the runtime's own RSS (weights + optimizer state + activations)
            "peak_above_runtime_gb": peak - rss_start if device.type == "cpu" else peak,
            "rss_at_start_gb": rss_start, "rss_models_loaded_gb": rss_models,
            "trainable_params": sum(p.numel() for p in params), "losses": losses}


# -----------------------------------------------------------------------------
# The parent: one subprocess per method, then the table.


def run_all(args):
    t0 = time.time()
    teacher, student, batch_file = prepare(args)
    print(f"teacher {teacher}\nstudent {student}\nbatch {args.batch_size} x {args.max_len}, rank {args.rank}, "
          f"alpha {args.lora_alpha}, dropout {args.lora_dropout}, {args.device}, {args.warmup} warm-up + "
          f"{args.steps} timed steps", flush=True)
    rows = {}
    for method in args.methods:
        cmd = [sys.executable, "-m", "benchmarks.bench", "--worker", method, "--teacher", teacher,
               "--student", student, "--batch-file", str(batch_file), "--rank", str(args.rank),
               "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
               "--chunk-size", str(args.chunk_size), "--k", str(args.k), *(["--grad-checkpoint"] if args.grad_checkpoint else []),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            proc = subprocess.run(cmd + ["--result", f.name], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows[method] = json.loads(Path(f.name).read_text())
        r = rows[method]
        print(f"  {method:<12} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8.0f} tok/s  "
              f"{r['peak_mem_gb']:6.2f} GB peak ({r['peak_above_runtime_gb']:.2f} above the runtime)  "
              f"{r['trainable_params']:>12,} trainable", flush=True)
    ratios = targets(rows)
    table = markdown(rows, args)
    print("\n" + table)
    for name, r in ratios.items():
        print(f"{name}: {r['value']:.2f} (target {r['target']}) -> {'met' if r['met'] else 'MISSED'}")
    blob = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "batch_file", "result")},
            "teacher": teacher, "student": student, "machine": machine(args.device), "results": rows,
            "targets": ratios, "table_markdown": table, "wall_s": time.time() - t0}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(blob, indent=2))
    Path(args.output).with_suffix(".md").write_text(report_markdown(blob))
    print(f"results written to {args.output} and {Path(args.output).with_suffix('.md')}")
    return blob


def targets(rows):
    """Issue 6's targets, where the methods they compare were run (memory: whole peak, and above the runtime)."""
    out = {}
    for key, tag in (("peak_mem_gb", ""), ("peak_above_runtime_gb", " (above runtime)")):
        if "neo" in rows and "kd" in rows:
            v = rows["neo"][key] / rows["kd"][key]
            out["neo_mem / kd_mem" + tag] = {"value": v, "target": "<= 0.5", "met": v <= 0.5}
        if "neo" in rows and "hf-peft-neo" in rows:
            v = rows["neo"][key] / rows["hf-peft-neo"][key]
            out["neo_mem / hf_peft_mem" + tag] = {"value": v, "target": "<= 0.6", "met": v <= 0.6}
    if "neo" in rows and "neo-cache" in rows:
        v = rows["neo-cache"]["tokens_per_s"] / rows["neo"]["tokens_per_s"]
        out["neo_cache_tok_s / neo_tok_s"] = {"value": v, "target": ">= 1.8", "met": v >= 1.8}
    if "neo" in rows and "hf-peft-neo" in rows:
        v = rows["neo"]["tokens_per_s"] / rows["hf-peft-neo"]["tokens_per_s"]
        out["neo_tok_s / hf_peft_tok_s"] = {"value": v, "target": ">= 1.2", "met": v >= 1.2}
    return out


def markdown(rows, args):
    mem = "peak RSS (GB)" if args.device == "cpu" else "peak CUDA alloc (GB)"
    lines = [f"| method | step (s, median) | tokens/s | {mem} | above runtime (GB) | trainable params |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.2f} | "
                     f"{r['peak_above_runtime_gb']:.2f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def report_markdown(blob) -> str:
    c = blob["config"]
    flags = (f"--max-len {c['max_len']} --batch-size {c['batch_size']} --rank {c['rank']} --steps {c['steps']} "
             f"--warmup {c['warmup']} --device {c['device']} --lora-dropout {c.get('lora_dropout', 0.05)}"
             f" --chunk-size {c.get('chunk_size', 1024)}" + (" --grad-checkpoint" if c.get("grad_checkpoint") else ""))
    lines = [f"# One optimizer step per method ({c['device']})", "",
             f"Command: `python -m benchmarks.bench {flags} --methods {','.join(c['methods'])} --output {c['output']}`", "",
             f"Teacher `{blob['teacher']}`, student `{blob['student']}`; machine {json.dumps(blob['machine'])}.", "",
             blob["table_markdown"], "", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {k} {v['target']} | {v['value']:.2f} | {'yes' if v['met'] else 'no'} |"
              for k, v in blob["targets"].items()]
    return "\n".join(lines) + "\n"


def machine(device):
    info = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_1_5_15min_at_end": os.getloadavg()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p_args = argv if argv is not None else sys.argv[1:]
    if "--worker" in p_args:  # internal: the subprocess of one method
        p = argparse.ArgumentParser()
        for flag in ("--worker", "--teacher", "--student", "--batch-file", "--result", "--device"):
            p.add_argument(flag)
        for flag in ("--rank", "--chunk-size", "--steps", "--warmup", "--threads", "--k"):
            p.add_argument(flag, type=int)
        p.add_argument("--lora-alpha", type=float)
        p.add_argument("--lora-dropout", type=float, default=0.0)
        p.add_argument("--grad-checkpoint", action="store_true")
        args = p.parse_args(p_args)
        Path(args.result).write_text(json.dumps(worker(args)))
        return None
    return run_all(parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
