"""The CUDA path, checked on a GPU: bf16 forward against transformers, bf16 steps against the CPU
fp32 step, only ΔW moving, DDP over NCCL, and the memory planner against the allocator.

Every test takes a `device` parameter with two values:

    cuda   marked `gpu`: skipped, with the reason, on a machine without CUDA (conftest.py);
           `pytest -m gpu tests/test_gpu.py` runs only these (benchmarks/gpu.sh does, on a GPU)
    cpu    the same test body on tiny shapes, in the normal suite: a dry run that keeps the
           logic of the GPU tests exercised (and honest) on CI, which has no GPU

Nothing here needs weights, a tokenizer, data, lm-eval or gguf: the models are random, built from
a config in the test, so the tests run on a GPU machine with torch, transformers and pytest alone.
Run on a GPU: pytest -m gpu tests/test_gpu.py -v -rs
"""
import contextlib
import gc

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lora
import model as llama
import neo
import plan
import train
from runkit import flags, precision
from tolerance import close, close_norm

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Per device: the CPU dry run at toy size, the GPU at a size where bf16 kernels, flash attention
# and the chunked loss do real work (and memory is dominated by tensors, not kernel workspaces).
SHAPES = {
    "cpu": dict(vocab=512, hidden=64, inter=128, heads=4, kv=2, teacher_layers=2, student_layers=1,
                batch=2, seq=32, rank=4, chunk=16),
    "cuda": dict(vocab=32000, hidden=1024, inter=2816, heads=16, kv=4, teacher_layers=8, student_layers=4,
                 batch=4, seq=512, rank=16, chunk=256),
}


def config(s, layers) -> dict:
    """A Llama-3-style config.json dict (GQA, llama3 RoPE scaling, untied head)."""
    return dict(model_type="llama", vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=2 * s["seq"], rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": s["seq"] // 2},
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def random_llama(cfg: dict, seed: int) -> llama.Llama:
    """Random fp32 weights on the CPU (the same on every machine): norms near 1, each matrix row
    N(0, 1/in) times a scale in [0.5, 1.5), so every layer keeps the activations' size at any width
    and the logits are not uniform."""
    gen = torch.Generator().manual_seed(seed)
    m = llama.Llama(llama.LlamaConfig.from_hf(cfg))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                row_scale = 0.5 + torch.rand(p.shape[0], 1, generator=gen)
                p.copy_(torch.randn(p.shape, generator=gen) * row_scale / p.shape[1] ** 0.5)
    return m


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Per device shape: a teacher and a (shallower, same-vocabulary) student as Hugging Face folders,
    so every test loads them the way train.py does."""
    made = {}

    def get(device):
        if device not in made:
            s = SHAPES[device]
            root = tmp_path_factory.mktemp(f"models_{device}")
            random_llama(config(s, s["teacher_layers"]), seed=0).save_pretrained(root / "teacher")
            random_llama(config(s, s["student_layers"]), seed=1).save_pretrained(root / "student")
            made[device] = (root / "teacher", root / "student")
        return made[device]
    return get


def batch(s, seed, device):
    """Full rows of random tokens; every position after the first is a target."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, s["vocab"], (s["batch"], s["seq"]), generator=gen)
    labels = ids.clone()
    labels[:, 0] = neo.IGNORE_INDEX
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def train_args(method, s, dtype, teacher, student):
    return flags.parse(["--method", method, "--teacher", str(teacher), "--student", str(student),
                             "--rank", str(s["rank"]), "--chunk-size", str(s["chunk"]), "--dtype", dtype])


def build(method, device, dtype, folders_of_device, s, adapter_seed=0):
    """(args, teacher or None, Distiller) exactly as train.py builds them for `--dtype dtype`, with
    every adapter set from a seeded CPU generator (so the CPU and the GPU start from the same ΔW,
    and B ≠ 0 so that A gets a gradient too)."""
    teacher_dir, student_dir = folders_of_device
    dev = torch.device(device)
    args = train_args(method, s, dtype, teacher_dir, student_dir)
    teacher = None
    if method in ("neo", "kd"):
        teacher = llama.Llama.from_pretrained(teacher_dir, dtype=precision.frozen_dtype(args, dev), device=dev)
        teacher.eval().requires_grad_(False)
    student = train.prepare_student(train.build_student(args, str(teacher_dir), None, dev), args, dev)
    gen = torch.Generator().manual_seed(adapter_seed)
    with torch.no_grad():
        for p in lora.lora_parameters(student):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return args, teacher, neo.Distiller(student, teacher, args.alpha, args.temperature, args.divergence,
                                        args.chunk_size)


def forward_backward(args, teacher, distiller, b, device, normalizer=None):
    """train.py's micro-batch: the Distiller's forward (teacher forward under no_grad, student forward +
    chunked loss) under the precision's autocast, then backward."""
    dev = torch.device(device)
    normalizer = normalizer if normalizer is not None else neo.count_targets(b["labels"]).float().clamp(min=1)
    b = {k: v.to(dev) for k, v in b.items()}
    with precision.autocast(dev, args):
        res = distiller(b["input_ids"], b["attention_mask"], b["labels"], normalizer, b.get("document_ids"))
        res.loss.backward()
    return res


def gradients(distiller) -> dict:
    s = distiller.module if isinstance(distiller, DDP) else distiller
    return {n: p.grad.detach().float().cpu() for n, p in s.named_parameters() if p.requires_grad}


def rel(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over the concatenation of every tensor."""
    va, vb = torch.cat([a[k].flatten() for k in sorted(b)]), torch.cat([b[k].flatten() for k in sorted(b)])
    return ((va - vb).norm() / vb.norm()).item()


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- model vs transformers

@pytest.mark.parametrize("device", DEVICES)
def test_llama_bf16_matches_transformers(device, folders):
    """Our Llama in bf16 on `device` against transformers' LlamaForCausalLM on the same random
    weights. First in fp32, where the two must agree to 1e-4 (the weights and the maths are the
    same). Then in bf16, where neither is exact: each rounds weights, matmul outputs and attention
    differently, so the fair bar is the fp32 logits. Ours in bf16 must be as close to them as
    transformers in bf16 is (within 1.5x, plus 1e-3 of the logits' norm for slack), and within 5%
    of transformers' bf16 logits. Measured on the CPU dry run: fp32 diff 0; bf16 relative error
    1.3% for both (the same kernels there); RoPE's cos scaled by 1.02 in bf16 only gives ours 4.0%
    and fails."""
    import transformers
    s, dev = SHAPES[device], torch.device(device)
    teacher_dir, _ = folders(device)
    b = batch(s, seed=3, device=dev)
    ids, mask = b["input_ids"], b["attention_mask"]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours = llama.Llama.from_pretrained(teacher_dir, dtype=dtype, device=dev)
        hf = transformers.LlamaForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(dev).eval()
        with torch.no_grad():
            logits["ours", dtype] = ours(ids, mask).float()
            logits["hf", dtype] = hf(input_ids=ids, attention_mask=mask).logits.float()
        del ours, hf
        free(device)
    fp32 = logits["hf", torch.float32]
    diff32 = (logits["ours", torch.float32] - fp32).abs().max().item()
    err = {who: ((logits[who, torch.bfloat16] - fp32).norm() / fp32.norm()).item() for who in ("ours", "hf")}
    between = ((logits["ours", torch.bfloat16] - logits["hf", torch.bfloat16]).norm()
               / logits["hf", torch.bfloat16].norm()).item()
    print(f"\n{device}: fp32 max |diff| {diff32:.2e}; bf16 relative error vs fp32: ours {err['ours']:.4f}, "
          f"transformers {err['hf']:.4f}; ours vs transformers in bf16 {between:.4f}")
    close(logits["ours", torch.float32], fp32, atol=1e-4, rtol=0)
    assert err["ours"] <= 1.5 * err["hf"] + 1e-3
    assert between <= 0.05


# ----------------------------------------------------------------------------- bf16 steps vs the CPU fp32 step

# bf16 keeps 8 significant bits, so every rounded weight and matmul output is off by up to
# u = 2^-8 ≈ 0.4%; a gradient carried back through the blocks and the softmax differences of the
# loss collects a multiple of u. The bound below is ~20 u (issue 10 measured 3.1%
# for a whole bf16 step on the CPU, with 2.5x margin); a gradient of another batch is ~150% off.
# The CPU dry run (the same bf16 path: bf16 weights and CPU autocast) measures 1.7% (neo) and 1.2%
# (kd); halving the LoRA scale on a bf16 base only makes neo 50% off and fails.
GRAD_TOL = 0.08


@pytest.mark.parametrize("method", ["neo", "kd"])
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_gradients_match_cpu_fp32(method, device, folders):
    """One micro-batch of train.py's step in bf16 (--dtype bfloat16: bf16 teacher, bf16 frozen
    student base for neo, bf16 autocast; fp32 trainables) on `device`, against the same step in
    fp32 on the CPU. neo: the adapter gradients (A and B, B ≠ 0); kd: every student weight's.
    The relative difference of the whole gradient vector must stay under GRAD_TOL (8%), while the
    gradient of a different batch must be ten times further away (the bound has teeth)."""
    s = SHAPES[device]
    b = batch(s, seed=0, device=device)
    args, teacher, distiller = build(method, device, "bfloat16", folders(device), s)
    forward_backward(args, teacher, distiller, b, device)
    g16 = gradients(distiller)
    assert all(p.grad.dtype == torch.float32 for p in distiller.parameters() if p.requires_grad)
    del args, teacher, distiller
    free(device)

    ref = {}
    for seed in (0, 1):  # the fp32 reference on the CPU, and a wrong batch for scale
        args, teacher, distiller = build(method, "cpu", "float32", folders(device), s)
        forward_backward(args, teacher, distiller, batch(s, seed=seed, device="cpu"), "cpu")
        ref[seed] = gradients(distiller)
    assert g16.keys() == ref[0].keys() and len(g16) > 0
    if method == "neo":
        assert all(".lora_" in n for n in g16)
    err, wrong = rel(g16, ref[0]), rel(ref[1], ref[0])
    print(f"\n{method} on {device} in bf16: gradient {err:.4f} from the CPU fp32 one (another batch: {wrong:.2f})")
    assert err < GRAD_TOL
    assert wrong > 10 * GRAD_TOL


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_neo_steps_move_only_delta_w(device, folders):
    """Three AdamW steps of neo in bf16 (every parameter handed to AdamW with weight decay, so
    only freezing keeps the base still): the frozen base is bf16, gets no gradient and is bit for
    bit unchanged; the teacher too; every adapter (fp32) moves."""
    s = SHAPES[device]
    args, teacher, distiller = build("neo", device, "bfloat16", folders(device), s)
    student = distiller.student
    adapters = {id(p) for p in lora.lora_parameters(student)}
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(3):
        forward_backward(args, teacher, distiller, batch(s, seed=step, device=device), device)
        for n, p in student.named_parameters():
            assert (p.grad is not None) == (id(p) in adapters), n
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in student.named_parameters():
        if id(p) in adapters:
            assert p.dtype == torch.float32 and not torch.equal(p, before[n]), f"{n}: an adapter did not move"
        else:
            assert torch.equal(p, before[n]), f"{n}: a frozen weight changed"
            assert p.dtype == torch.bfloat16, f"{n}: frozen base in {p.dtype}"
    for n, p in teacher.named_parameters():
        assert torch.equal(p, teacher_before[n]), f"teacher {n} changed"


# ----------------------------------------------------------------------------- DDP over NCCL

@pytest.mark.parametrize("device", DEVICES)
def test_ddp_one_process_equals_no_ddp(device, folders, tmp_path):
    """train.py's data-parallel path with one process: DDP over NCCL (gloo on the CPU dry run),
    two accumulated micro-batches with the gradient all-reduce skipped on the first (no_sync),
    against the same two micro-batches without DDP. One rank's all-reduce is the identity, so the
    adapter gradients must agree to fp32 summation order (1e-5 relative; flash/efficient attention
    backward may sum in another order). DDP that dropped the first micro-batch is 65% off."""
    s = SHAPES[device]
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None)
    try:
        micro = [batch(s, seed=i, device=device) for i in (0, 1)]
        normalizer = sum(neo.count_targets(b["labels"]) for b in micro).float()
        grads = {}
        for use_ddp in (False, True):
            args, teacher, distiller = build("neo", device, "float32", folders(device), s)
            wrapped = DDP(distiller, device_ids=[torch.cuda.current_device()] if device == "cuda" else None) \
                if use_ddp else distiller
            for i, b in enumerate(micro):
                with wrapped.no_sync() if use_ddp and i < len(micro) - 1 else contextlib.nullcontext():
                    forward_backward(args, teacher, wrapped, b, device, normalizer)
            grads[use_ddp] = gradients(wrapped)
            del args, teacher, distiller, wrapped
            free(device)
        args, teacher, distiller = build("neo", device, "float32", folders(device), s)
        forward_backward(args, teacher, distiller, micro[1], device, normalizer)  # the second micro-batch alone
        last_only = gradients(distiller)
    finally:
        dist.destroy_process_group()
    err = rel(grads[True], grads[False])
    print(f"\nDDP ({backend}, 1 process) vs no DDP: {err:.2e}; the last micro-batch alone: {rel(last_only, grads[False]):.2f}")
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(grads[False])])
    close_norm(flat(grads[True]), flat(grads[False]), 1e-5)
    assert rel(last_only, grads[False]) > 0.1


# ----------------------------------------------------------------------------- the memory planner

# The planner counts live tensor bytes on fake tensors with the CPU's autocast rules; the CUDA
# allocator rounds each block to 512 bytes and also holds cuBLAS workspaces (tens of MiB) and
# flash attention's small buffers. So: within 10% of the measured peak, plus 64 MiB. (A known
# difference to look at first if kd misses: AdamW on CUDA defaults to foreach, whose temporaries
# are the size of the trainable weights; the planner replays the CPU's per-tensor AdamW.)
PLAN_REL, PLAN_ABS = 0.10, 64 * 2**20


def one_step(args, teacher, distiller, optimizer, b, device):
    forward_backward(args, teacher, distiller, b, device)
    params = [p for p in distiller.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", ["neo", "kd"])
@pytest.mark.parametrize("device", DEVICES)
def test_planner_predicts_the_peak_of_one_step(method, device, folders):
    """plan.py's prediction (fake tensors, from the config.json files alone) against the peak of one
    real bf16 step (after a warm-up step, so AdamW's moments exist, as the plan assumes): on CUDA
    torch.cuda.max_memory_allocated above what was allocated before the models were built; on
    the CPU dry run, plan.Ledger counting the real step (the CPU allocator keeps no peak)."""
    s, dev = SHAPES[device], torch.device(device)
    teacher_dir, student_dir = folders(device)
    setup = plan.Setup(method=method, rank=s["rank"], batch_size=s["batch"], max_len=s["seq"], chunk_size=s["chunk"],
                       frozen_dtype=torch.bfloat16, autocast=True)
    planner = plan.Planner(plan.load_config(teacher_dir), plan.load_config(student_dir))
    predicted = planner.estimate(setup).peak

    free(device)
    start = torch.cuda.memory_allocated(dev) if device == "cuda" else 0
    args, teacher, distiller = build(method, device, "bfloat16", folders(device), s)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    b = batch(s, seed=0, device=device)
    one_step(args, teacher, distiller, optimizer, b, device)  # AdamW's state now exists
    if device == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        one_step(args, teacher, distiller, optimizer, b, device)
        torch.cuda.synchronize(dev)
        measured = torch.cuda.max_memory_allocated(dev) - start
    else:
        with plan.Ledger(teacher, distiller.student, optimizer) as ledger:
            one_step(args, teacher, distiller, optimizer, b, device)
        measured = ledger.peak()[0]
    del args, teacher, distiller, optimizer, params
    free(device)
    print(f"\n{method} on {device}: planner {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
          f"({predicted / measured:.3f}x)")
    slack = PLAN_ABS if device == "cuda" else 0  # the CPU dry run compares two ledgers: no allocator extras
    assert abs(predicted - measured) <= PLAN_REL * measured + slack


# ----------------------------------------------------------------------------- what the GPU machine lacks

def test_gpu_modules_import_without_lm_eval_or_gguf():
    """The GPU machine has torch, transformers and PEFT but no lm-eval and no gguf: the modules the
    GPU tests and benchmarks/gpu.sh import must not need them at import time."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.modules['lm_eval'] = None; sys.modules['gguf'] = None\n"  # None: ImportError on import
            f"sys.path[:0] = [{str(root)!r}, {str(root / 'tests')!r}]\n"
            "import model, lora, neo, data, train, plan, test_gpu\n"
            "from runkit import offline\n"
            "from benchmarks import bench, bench_gpu\n"
            "try:\n    import eval\nexcept ImportError:\n    pass\nelse:\n    sys.exit('the blocker did not block')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
