"""plan.py: where the memory of one distillation step goes, and whether a run fits a GPU.

One optimizer step of train.py holds, at its peak, some of these (all in bytes of live tensors):

    teacher weights          frozen, read by the teacher's no_grad forward (kd, neo)
    frozen student weights   the student's base under the adapters (neo, lora); with RoPE tables
    trainable weights        the adapters (neo, lora) or every student weight (sft, kd), fp32
    gradients                one per trainable weight, the same size
    optimizer state          AdamW's exp_avg and exp_avg_sq: twice the trainable weights
    saved activations        what the student's forward keeps alive for backward
    loss-time transients     neo_loss's chunk logits and the ∂L/∂h (and ∂L/∂W) it builds
    teacher activations      the teacher's final hidden states (and its forward's temporaries; with
                             --hidden-weight also its states after the blocks the student's match)
    other transients         backward's and AdamW's temporaries

KD and Neo differ in the third to fifth rows only: KD trains the whole student, so it carries
gradients and two AdamW moments for every student weight; Neo carries them for the adapters
(rank 128 on all seven projections is about a quarter of the student). The activations, the
teacher and the loss are the same for both. That is the whole of LLM-Neo's memory saving, and
why it shrinks as the activations grow (longer rows, bigger batches).

How it is counted, not guessed: a `Ledger` (a TorchDispatchMode, PyTorch's hook on every aten
operator) sees each tensor every operator returns, notes the storage behind it, its size, and
the phase of the step that made it (teacher forward, student forward, loss, backward,
optimizer; told apart by module and optimizer hooks and by the autograd engine's current node),
and hears of the storage's death through a weakref. Replaying those births and deaths gives
the live bytes after every operator, their peak, and what was alive at the peak. What a
storage *was* is decided at the end: the tensors that became .grad are gradients, those in
optimizer.state are optimizer state, the student-forward tensors still alive when the loss
starts are the saved activations (autograd holds them; tests/test_plan.py checks this against
torch.autograd.graph.saved_tensors_hooks).

Predicting without weights: the very same step runs on fake tensors (FakeTensorMode: shapes,
dtypes and storage sizes, no data), with teacher and student built from their config.json. So
saved activations come from the real forward and backward code, not from a formula. Fake
tensors cannot answer data-dependent questions; the plan assumes the worst case: full rows, no
padding, every position a target.

Scaling out (approximations of PyTorch's engines, stated here and nowhere else):
    DDP (--zero 0, world > 1)  + a gradient bucket copy of the trainable weights' size
    --zero 1                   optimizer state and its step temporaries / world (+ DDP's buckets)
    --zero 2 (FSDP2)           student weights, gradients, optimizer state / world; the student's
                               full weights are gathered for forward and kept to the end of backward
    --zero 3 (FSDP2)           as 2, but only two student layers are gathered at a time, and the
                               teacher's layers are sharded too (two gathered at a time)
GPU-only costs the planner does not see are named in `print_plan` and in the README: the CUDA
context (~0.5 GiB per process), the caching allocator's reserve (nvidia-smi shows reserved, not
allocated), NCCL buffers.

    python plan.py --teacher benchmarks/configs/llama-3.1-8b.json --student benchmarks/configs/llama-3.2-1b.json \
        --method neo --world-size 6 --dtype bfloat16 --gpu-memory 40
    python train.py --plan --gpu-memory 80 --teacher meta-llama/Llama-3.1-8B-Instruct --prune-to 16
    python plan.py --paper          # the paper's Table I and II settings beside its Mem column
"""
import argparse
import contextlib
import io
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lora
import model as llama
import neo
from runkit import flags
from runkit.precision import checkpoint_blocks

GiB = 2**30
CATEGORIES = ("teacher weights", "frozen student weights", "trainable weights", "gradients", "optimizer state",
              "saved activations", "loss-time transients", "teacher activations", "other transients",
              "sharding buffers")
aten = torch.ops.aten

# -----------------------------------------------------------------------------
# The ledger: every storage's birth, size, phase and death during one step.


class Ledger(TorchDispatchMode):
    """Counts live tensor bytes during one training step, by storage, phase and (at the end) kind.

    with Ledger(teacher, student, optimizer) as ledger:
        step()
    ledger.peak()  ->  (peak bytes, {category: bytes alive at the peak})

    `teacher` and `student` are the modules whose forward marks the teacher and student phases
    (teacher may be None). Weights and optimizer state alive before the step are counted from
    the modules and the optimizer; everything else as the operators create it.
    """

    def __init__(self, teacher, student, optimizer, fake: bool = False, targets: int | None = None):
        super().__init__()
        self.teacher, self.student, self.optimizer, self.fake = teacher, student, optimizer, fake
        self.targets = targets  # fake tensors: how many positions the target mask keeps (None: all)
        self.key_of = {}     # id(storage) -> key, while the storage lives
        self.size = {}       # key -> bytes
        self.kind = {}       # key -> category, for storages whose kind is known when first seen
        self.born_in = {}    # key -> phase that created it
        self.events = []     # (key, +bytes or -bytes, phase): the step's timeline
        self.phase = "start"
        self.saved = set()   # student-forward storages still alive when the loss starts
        self.grads, self.state = set(), set()
        self.owner = {}      # key -> "teacher.<name>" / "student.<name>" for the weights alive at the start
        self._handles = []

    # -- bookkeeping --------------------------------------------------------------
    def _track(self, t: torch.Tensor, kind=None):
        st = t.untyped_storage()
        if id(st) in self.key_of:
            return
        key = len(self.size)
        self.key_of[id(st)] = key
        self.size[key] = st.nbytes()
        self.born_in[key] = self.phase
        if kind is not None:
            self.kind[key] = kind
        self.events.append((key, st.nbytes(), self.phase))
        weakref.finalize(st, _on_free, weakref.ref(self), id(st), key)  # no strong reference: no leak

    def _free(self, sid, key):
        if self.key_of.get(sid) == key:
            del self.key_of[sid]
            self.events.append((key, -self.size[key], self.phase))

    def _key(self, t):
        return self.key_of.get(id(t.untyped_storage()))

    # -- phases: module and optimizer hooks --------------------------------------
    def _set(self, phase):
        def hook(*_):
            self.phase = phase
            if phase == "loss":  # whatever the student's forward made and is still alive: kept for backward
                self.saved = {k for k, p in self.born_in.items() if p == "student forward" and k in self._alive()}
            if phase == "optimizer":
                self.grads = {self._key(p.grad) for g in self.optimizer.param_groups for p in g["params"]
                              if p.grad is not None}
            if phase == "done":
                self.state = {self._key(v) for s in self.optimizer.state.values() for v in s.values()
                              if isinstance(v, torch.Tensor)}
        return hook

    def _alive(self):
        return set(self.key_of.values())

    def __enter__(self):
        # What is alive before the step: weights (by model and trainability) and optimizer state.
        if self.teacher is not None:
            for name, t in [*self.teacher.named_parameters(), *self.teacher.named_buffers()]:
                self._track(t, "teacher weights")
                self.owner.setdefault(self._key(t), "teacher." + name)
        for name, p in self.student.named_parameters():
            self._track(p, "trainable weights" if p.requires_grad else "frozen student weights")
            self.owner.setdefault(self._key(p), "student." + name)
        for b in self.student.buffers():
            self._track(b, "frozen student weights")
        for s in self.optimizer.state.values():
            for v in s.values():
                if isinstance(v, torch.Tensor):
                    self._track(v, "optimizer state")
        self.phase = "step"
        if self.teacher is not None:
            self._handles += [self.teacher.register_forward_pre_hook(self._set("teacher forward")),
                              self.teacher.register_forward_hook(self._set("step"))]
        self._handles += [self.student.register_forward_pre_hook(self._set("student forward")),
                          self.student.register_forward_hook(self._set("loss")),
                          self.optimizer.register_step_pre_hook(self._set("optimizer")),
                          self.optimizer.register_step_post_hook(self._set("done"))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self.state |= {self._key(v) for s in self.optimizer.state.values() for v in s.values()
                       if isinstance(v, torch.Tensor)}
        self.teacher = self.student = self.optimizer = None  # the counts stay, the models may go
        return super().__exit__(*exc)

    # -- every operator ------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._current_autograd_node() is not None:
            self.phase = "backward"
        out = _assume_full_batch(func, args, kwargs, self.targets) if self.fake else None
        if out is None:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    # -- the answer ------------------------------------------------------------------
    def category(self, key) -> str:
        if key in self.kind:
            return self.kind[key]
        if key in self.grads:
            return "gradients"
        if key in self.state:
            return "optimizer state"
        if key in self.saved:
            return "saved activations"
        return {"loss": "loss-time transients", "teacher forward": "teacher activations"}.get(
            self.born_in[key], "other transients")

    def peak(self, factor=None, extra=None):
        """(peak bytes, {category: bytes alive at the peak}, phase of the peak), replaying the timeline.

        factor(key, category) -> the share of that storage one GPU holds (sharding; default 1);
        extra(phase) -> bytes one GPU holds on top in that phase (gathered shards, DDP buckets).
        """
        factor = factor or (lambda key, cat: 1.0)
        extra = extra or (lambda phase: 0)
        cat = {k: self.category(k) for k in self.size}
        scale = {k: factor(k, cat[k]) for k in self.size}
        live = {c: 0.0 for c in CATEGORIES}
        total, best, best_at, best_phase = 0.0, -1.0, None, None
        for key, nbytes, phase in self.events:
            b = nbytes * scale[key]
            live[cat[key]] += b
            total += b
            now = total + extra(phase)
            if now > best:
                best, best_at, best_phase = now, dict(live), phase
        best_at["sharding buffers"] = best - sum(v for c, v in best_at.items() if c != "sharding buffers")
        return best, best_at, best_phase


def _on_free(ledger_ref, sid, key):
    ledger = ledger_ref()
    if ledger is not None:
        ledger._free(sid, key)


def _assume_full_batch(func, args, kwargs, targets=None):
    """Fake tensors hold no values: answer the few data-dependent questions as a full batch would.

    Every position is a token and a target, so the target mask keeps every position (or
    `targets` of them, when the caller knows its batch), `.item()` on a comparison is False and
    on a count is 1.
    """
    if func is aten._local_scalar_dense.default:
        t = args[0]
        return False if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
    if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
        self, (mask,) = args[0], [i for i in args[1] if i is not None]
        kept = mask.numel() if targets is None else targets
        return self.new_empty((kept,) + tuple(self.shape[mask.dim():]))
    if func in (aten.index_put_.default, aten._index_put_impl_.default) and \
            any(i is not None and i.dtype == torch.bool for i in args[1]):
        return args[0]
    if func is aten.index_put.default and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return args[0].clone()
    if func is aten.nonzero.default:
        return args[0].new_empty((args[0].numel(), args[0].dim()), dtype=torch.long)
    return None


# -----------------------------------------------------------------------------
# One training step, the way train.py's loop runs it, on models built from config.json alone.


@dataclass
class Setup:
    """What decides a step's memory: the method, the shapes and the precision."""
    method: str = "neo"                 # sft | lora | kd | neo
    adapter: str = "lora"               # lora | moslora (neo, lora)
    rank: int = 128
    batch_size: int = 4                 # micro-batch per process
    max_len: int = 512
    chunk_size: int = 256               # neo_loss chunk
    grad_checkpoint: bool = False
    frozen_dtype: torch.dtype = torch.float32  # teacher and the frozen student base
    autocast: bool = False              # bf16 autocast around the student's forward and backward
    targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    n_targets: int | None = None        # valid target tokens per micro-batch (None: every position)
    hidden_weight: float = 0.0          # --hidden-weight: the teacher keeps its states after the matched blocks
    extra_flags: list = field(default_factory=list)

    def train_args(self):
        return flags.parse(["--method", self.method, "--adapter", self.adapter, "--rank", str(self.rank),
                                 "--chunk-size", str(self.chunk_size), "--targets", self.targets,
                                 "--dtype", "float32", *(["--grad-checkpoint"] if self.grad_checkpoint else [])])


def build(setup: Setup, teacher_cfg, student_cfg, fake: bool):
    """(teacher or None, Distiller, AdamW, batch) as train.py builds them; on fake tensors if `fake`."""
    targs = setup.train_args()
    uses_teacher = setup.method in ("kd", "neo")
    with FakeTensorMode() if fake else contextlib.nullcontext(), contextlib.redirect_stdout(io.StringIO()):
        teacher = None
        if uses_teacher:
            teacher = llama.Llama(teacher_cfg).eval().requires_grad_(False)
            for p in teacher.parameters():
                p.data = p.data.to(setup.frozen_dtype)
        student = lora.make_trainable(llama.Llama(student_cfg), targs.method, **flags.lora_options(targs))
        if targs.grad_checkpoint:
            checkpoint_blocks(student)
        for p in student.parameters():  # the frozen base in the frozen dtype; trainable weights stay fp32
            if not p.requires_grad:
                p.data = p.data.to(setup.frozen_dtype)
        hidden = dict(hidden_weight=setup.hidden_weight, teacher_layers=neo.matched_layers(student_cfg, teacher_cfg)) \
            if setup.hidden_weight and teacher is not None else {}
        distiller = neo.Distiller(student, teacher, targs.alpha, targs.temperature, targs.divergence, targs.chunk_size,
                                  **hidden)
        params = [p for p in distiller.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
        shape = (setup.batch_size, setup.max_len)
        ids = torch.randint(0, student_cfg.vocab_size, shape)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(shape, dtype=torch.long)}
    return teacher, distiller, optimizer, batch


def training_step(distiller, optimizer, batch, autocast: bool):
    """One micro-batch of train.py's step: the Distiller's forward (teacher forward, student forward,
    loss), backward, gradient clipping, AdamW."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    normalizer = neo.count_targets(batch["labels"]).float().clamp(min=1)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        res = distiller(batch["input_ids"], batch["attention_mask"], batch["labels"], normalizer)
        res.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ledger_of_step(setup: Setup, teacher_cfg, student_cfg, fake: bool = True) -> Ledger:
    """Build on fake (or real, random) tensors, take one step to create AdamW's state, count the next."""
    teacher, distiller, optimizer, batch = build(setup, teacher_cfg, student_cfg, fake)
    # Fake tensors: factory calls inside the step (torch.zeros in neo_loss) must make fake ones too.
    with next(distiller.parameters()).fake_mode if fake else contextlib.nullcontext():
        with _answers(fake, setup.n_targets):
            training_step(distiller, optimizer, batch, setup.autocast)  # AdamW state now exists
        with Ledger(teacher, distiller.student, optimizer, fake=fake, targets=setup.n_targets) as ledger:
            training_step(distiller, optimizer, batch, setup.autocast)
    return ledger


class _Answers(TorchDispatchMode):
    """`_assume_full_batch` without the counting: for the untracked first step on fake tensors."""

    def __init__(self, targets=None):
        super().__init__()
        self.targets = targets

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _assume_full_batch(func, args, kwargs or {}, self.targets)
        return func(*args, **(kwargs or {})) if out is None else out


def _answers(fake, targets=None):
    return _Answers(targets) if fake else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# From one process to a GPU of many: sharding applied to the ledger's timeline.


def per_gpu(ledger: Ledger, world: int, zero: int):
    """(peak bytes on one GPU, {category: bytes at that peak}, phase) for `world` processes at --zero.

    Replays the one-process ledger, scaling each storage by the share one GPU keeps and adding
    what the engines hold on top (see the module docstring for the engines' rules).
    """
    def size(prefix, trainable=None):
        return sum(ledger.size[k] for k, name in ledger.owner.items() if name.startswith(prefix)
                   and (trainable is None or (ledger.kind[k] == "trainable weights") == trainable))

    student_params = size("student.")
    trainable = size("student.", trainable=True)
    layer = max((size(f"student.model.layers.{i}.") for i in range(_n_layers(ledger, "student"))), default=0)
    teacher_layer = max((size(f"teacher.model.layers.{i}.") for i in range(_n_layers(ledger, "teacher"))),
                        default=0)
    root = student_params - layer * _n_layers(ledger, "student")  # embeddings, final norm, LM head

    def factor(key, category):
        owner = ledger.owner.get(key, "")
        if zero >= 2 and owner.startswith("student."):
            return 1 / world                                  # FSDP2 keeps a shard of every student weight
        if zero == 3 and owner.startswith("teacher.model.layers."):
            return 1 / world                                  # ... and of the teacher's layers at --zero 3
        if category == "gradients" and zero >= 2:
            return 1 / world                                  # reduce-scattered
        if category == "optimizer state" or (zero >= 1 and ledger.born_in[key] == "optimizer"):
            return 1 / world if zero >= 1 else 1.0            # ZeRO-1 and up: each rank steps its shard
        return 1.0

    gathered = 1 - 1 / world
    grad_buckets = trainable if world > 1 and zero <= 1 else 0  # DDP's flat gradient buckets

    def extra(phase):
        add = grad_buckets
        if zero == 2 and phase in ("student forward", "loss", "backward"):
            add += student_params * gathered                  # gathered for forward, kept until backward ends
        if zero == 3 and phase in ("student forward", "loss", "backward"):
            add += (root + 2 * layer) * gathered              # the root's weights + a layer and the next
        if zero == 3 and phase == "teacher forward":
            add += 2 * teacher_layer * gathered
        return add

    return ledger.peak(factor if world > 1 else None, extra if world > 1 else None)


def _n_layers(ledger, who):
    names = {n.split(".")[3] for n in ledger.owner.values() if n.startswith(f"{who}.model.layers.")}
    return len(names)


# -----------------------------------------------------------------------------
# Configs, the plan for one run, and what would make it fit.


def load_config(path_or_hub_id) -> llama.LlamaConfig:
    """A config.json file, a model folder's config.json, or a Hub id's config.json (downloaded alone)."""
    path = Path(str(path_or_hub_id)).expanduser()
    if path.is_file():
        return llama.LlamaConfig.from_json(path)
    if path.is_dir():
        return llama.LlamaConfig.from_json(path / "config.json")
    if str(path_or_hub_id).count("/") == 1 and not path.is_absolute():
        from huggingface_hub import hf_hub_download
        try:
            return llama.LlamaConfig.from_json(hf_hub_download(str(path_or_hub_id), "config.json"))
        except Exception as e:
            raise OSError(f"{path_or_hub_id}: no local config, and downloading its config.json failed ({e})") from e
    raise FileNotFoundError(f"{path_or_hub_id}: not a config.json, a model folder nor a Hub id (owner/name)")


def student_config(teacher_cfg, student=None, prune_to=None) -> llama.LlamaConfig:
    """The given student's config, or train.py's default: the teacher keeping prune_to (or half) layers."""
    if student is not None:
        return load_config(student)
    return llama.LlamaConfig(**{**teacher_cfg.__dict__,
                                "num_hidden_layers": prune_to or teacher_cfg.num_hidden_layers // 2})


CUDA_CONTEXT = 0.5 * GiB  # per process, outside max_memory_allocated
HEADROOM = 0.90           # share of the rest the caching allocator can fill before fragmentation bites


def usable(gpu_gib: float) -> float:
    """Bytes of live tensors a GPU of `gpu_gib` GiB can hold in practice."""
    return HEADROOM * (gpu_gib * GiB - CUDA_CONTEXT)


@dataclass
class Plan:
    setup: Setup
    world: int
    zero: int
    peak: float               # bytes on one GPU
    parts: dict               # category -> bytes on one GPU at its peak
    phase: str

    @property
    def total(self):
        return self.peak * self.world


class Planner:
    """Plans for one teacher/student pair, caching a ledger per (method, shape, checkpointing, precision)."""

    def __init__(self, teacher_cfg, student_cfg):
        self.teacher_cfg, self.student_cfg = teacher_cfg, student_cfg
        self._ledgers = {}

    def ledger(self, setup: Setup) -> Ledger:
        key = repr(setup)
        if key not in self._ledgers:
            self._ledgers[key] = ledger_of_step(setup, self.teacher_cfg, self.student_cfg, fake=True)
        return self._ledgers[key]

    def estimate(self, setup: Setup, world=1, zero=0) -> Plan:
        return Plan(setup, world, zero, *per_gpu(self.ledger(setup), world, zero))

    def make_it_fit(self, setup: Setup, world: int, zero: int, gpu_gib: float):
        """The first of: --grad-checkpoint, a higher --zero, both, a smaller micro-batch, that fits."""
        from dataclasses import replace
        tries = []
        ckpts = [setup.grad_checkpoint] if setup.grad_checkpoint else [False, True]
        zeros = [zero] + ([z for z in (1, 2, 3) if z > zero] if world > 1 else [])
        batches = [setup.batch_size]
        while batches[-1] > 1:
            batches.append(batches[-1] // 2)
        for b in batches:
            for ck in ckpts:
                for z in zeros:
                    tries.append((replace(setup, grad_checkpoint=ck, batch_size=b), z))
        for s, z in tries[1:]:
            p = self.estimate(s, world, z)
            if p.peak <= usable(gpu_gib):
                return p
        return None


def flags_of(p: Plan, base: Plan) -> str:
    """The train.py flags that turn `base` into `p`."""
    out = []
    if p.setup.grad_checkpoint and not base.setup.grad_checkpoint:
        out.append("--grad-checkpoint")
    if p.zero != base.zero:
        out.append(f"--zero {p.zero}")
    if p.setup.batch_size != base.setup.batch_size:
        k = base.setup.batch_size // p.setup.batch_size
        out.append(f"--batch-size {p.setup.batch_size} (and --grad-accum x{k} for the same step)")
    return " ".join(out)


def describe(p: Plan) -> str:
    s = p.setup
    dtype = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[s.frozen_dtype]
    return (f"{s.method}{'-moslora' if s.adapter == 'moslora' and s.method in ('neo', 'lora') else ''}, "
            f"{_layout(p)}, "
            f"batch {s.batch_size} x {s.max_len}, rank {s.rank}, frozen {dtype}"
            f"{' + autocast' if s.autocast else ''}{', --grad-checkpoint' if s.grad_checkpoint else ''}")


def _layout(p: Plan) -> str:
    if p.world == 1 and p.zero == 0:
        return "1 process"
    return f"{p.world} GPUs {'DDP' if p.zero == 0 else f'--zero {p.zero}'}"


def print_plan(planner: Planner, p: Plan, gpu_gib=None):
    print(f"plan: {describe(p)}")
    print(f"  per GPU: {p.peak / GiB:.2f} GiB of live tensors at the peak (during {p.phase}); "
          f"all {p.world}: {p.total / GiB:.1f} GiB")
    for c in CATEGORIES:
        if p.parts.get(c, 0) >= 0.005 * GiB:
            print(f"    {c:<24} {p.parts[c] / GiB:8.2f} GiB")
    print("  not counted: the CUDA context (~0.5 GiB per process), the caching allocator's unused reserve "
          "(nvidia-smi shows reserved memory), NCCL buffers")
    if gpu_gib is None:
        return
    room = usable(gpu_gib)
    if p.peak <= room:
        print(f"  fits a {gpu_gib:g} GiB GPU ({room / GiB:.1f} GiB usable for tensors after the CUDA context "
              f"and {100 - 100 * HEADROOM:.0f}% allocator headroom)")
        return
    print(f"  does NOT fit a {gpu_gib:g} GiB GPU ({room / GiB:.1f} GiB usable for tensors)")
    fix = planner.make_it_fit(p.setup, p.world, p.zero, gpu_gib)
    if fix is None:
        print("  nothing tried fits (checkpointing, ZeRO 1-3, micro-batch down to 1): more GPUs, or a smaller model")
    else:
        print(f"  would fit with: {flags_of(fix, p)}  ->  {fix.peak / GiB:.2f} GiB per GPU")


def setup_from_train_args(args) -> Setup:
    """train.py's flags as a Setup. --dtype auto plans for a GPU, where it means bf16 + autocast."""
    bf16 = args.dtype in ("auto", "bfloat16")
    return Setup(method=args.method, adapter=args.adapter, rank=args.rank, batch_size=args.batch_size,
                 max_len=args.max_len, chunk_size=args.chunk_size, grad_checkpoint=args.grad_checkpoint,
                 frozen_dtype=torch.bfloat16 if bf16 else torch.float32, autocast=bf16, targets=args.targets,
                 hidden_weight=args.hidden_weight)


def plan_from_train_args(args, teacher_path):
    """`python train.py --plan [N] ...`: the plan per GPU for N processes, from config.json alone,
    after every flag check a run would make (flags.check)."""
    teacher_cfg = load_config(teacher_path)
    flags.check(args, teacher_cfg, load_config(args.student) if args.student else None)
    planner = Planner(teacher_cfg, student_config(teacher_cfg, args.student, args.prune_to))
    print_plan(planner, planner.estimate(setup_from_train_args(args), args.plan, args.zero), args.gpu_memory)


# -----------------------------------------------------------------------------
# The paper's settings (6 x A100 40G, batch 4 x 512, bf16, rank 128) beside its Mem column.

CONFIGS = Path(__file__).resolve().parent / "benchmarks" / "configs"  # the paper's models' config.json files
PAPER = [  # (table, teacher, student, method, zero, the paper's Mem in GB over 6 GPUs or None for OOM)
    ("I", "llama-3.1-8b", "llama-3.2-1b", "sft", 0, 63), ("I", "llama-3.1-8b", "llama-3.2-1b", "lora", 0, 68),
    ("I", "llama-3.1-8b", "llama-3.2-1b", "kd", 0, 231), ("I", "llama-3.1-8b", "llama-3.2-1b", "neo", 0, 177),
    ("I", "llama-2-7b", "tinyllama-1.1b", "sft", 0, 66), ("I", "llama-2-7b", "tinyllama-1.1b", "lora", 0, 42),
    ("I", "llama-2-7b", "tinyllama-1.1b", "kd", 0, 167), ("I", "llama-2-7b", "tinyllama-1.1b", "neo", 0, 136),
    ("II", "llama-3.1-8b", "llama-3.1-minitron-4b-width", "sft", 0, 219),
    ("II", "llama-3.1-8b", "llama-3.1-minitron-4b-width", "lora", 0, 103),
    ("II", "llama-3.1-8b", "llama-3.1-minitron-4b-width", "kd", 0, None),
    ("II", "llama-3.1-8b", "llama-3.1-minitron-4b-width", "neo", 1, 224),
    ("II", "llama-3.1-8b", "llama-3.1-minitron-4b-width", "neo", 2, 212),
]


def paper_table(configs=CONFIGS, world=6, gpu_gib=40) -> str:
    lines = ["| table | teacher -> student | method | per GPU (GiB) | 6 GPUs (GiB) | paper Mem (GB, 6 GPUs) | "
             "fits 40G | largest part per GPU |", "|---|---|---|---:|---:|---:|---|---|"]
    planners = {}
    for table, t, s, method, zero, paper in PAPER:
        if (t, s) not in planners:
            planners[t, s] = Planner(load_config(configs / f"{t}.json"), load_config(configs / f"{s}.json"))
        setup = Setup(method=method, frozen_dtype=torch.bfloat16, autocast=True)
        p = planners[t, s].estimate(setup, world, zero)
        top = max(p.parts, key=p.parts.get)
        name = method + (f" + ZeRO-{zero}" if zero else "")
        lines.append(f"| {table} | {t} -> {s} | {name} | {p.peak / GiB:.1f} | {p.total / GiB:.0f} | "
                     f"{paper if paper is not None else 'OOM'} | {'yes' if p.peak <= usable(gpu_gib) else 'no'} | "
                     f"{top} {p.parts[top] / GiB:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's Table I/II settings beside its Mem column")
    p.add_argument("--configs", default=str(CONFIGS), help="folder with the paper's config.json files (--paper)")
    p.add_argument("--teacher", help="teacher config.json, model folder or Hub id")
    p.add_argument("--student", default=None, help="student config (default: the teacher pruned to --prune-to)")
    p.add_argument("--prune-to", type=int, default=None, help="student layers when pruning (default: half)")
    p.add_argument("--method", choices=["sft", "lora", "kd", "neo"], default="neo", help="train.py's --method")
    p.add_argument("--adapter", choices=["lora", "moslora"], default="lora", help="train.py's --adapter")
    p.add_argument("--rank", type=int, default=128, help="adapter rank")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU")
    p.add_argument("--max-len", type=int, default=512, help="tokens per row")
    p.add_argument("--chunk-size", type=int, default=256, help="neo_loss chunk")
    p.add_argument("--grad-checkpoint", action="store_true", help="train.py's --grad-checkpoint")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="frozen weights (auto: bf16 + autocast, as on a GPU)")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (processes)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=0, help="train.py's --zero")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU: say whether it fits")
    args = p.parse_args(argv)
    if args.paper:
        print(paper_table(Path(args.configs)))
        return
    if args.teacher is None:
        p.error("--teacher is required (or --paper)")
    check_flags(args)
    args.targets = Setup().targets
    teacher_cfg = load_config(args.teacher)
    if args.prune_to is not None and not args.prune_to < teacher_cfg.num_hidden_layers:
        raise SystemExit(f"--prune-to {args.prune_to}: the teacher has {teacher_cfg.num_hidden_layers} layers: a "
                         f"student keeps 1..{teacher_cfg.num_hidden_layers - 1} of them")
    planner = Planner(teacher_cfg, student_config(teacher_cfg, args.student, args.prune_to))
    print_plan(planner, planner.estimate(setup_from_train_args(args), args.world_size, args.zero), args.gpu_memory)


def check_flags(args):
    """plan.py's flags, by train.py's rules (runkit/flags.py) for the flags they share."""
    def refuse(flag, why):
        raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {why}")

    for flag in ("rank", "batch_size", "chunk_size", "world_size"):
        if not getattr(args, flag) >= 1:
            refuse(flag, "must be 1 or more")
    if args.prune_to is not None and not args.prune_to >= 1:
        refuse("prune_to", "must be 1 or more")
    if not args.max_len >= 2:
        refuse("max_len", "must be 2 or more (a target is the token after another)")
    flags.check_plan(args, refuse)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as e:  # a missing or broken config.json: say which, no traceback
        sys.exit(f"error: {e}")
