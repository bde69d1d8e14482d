"""plan.py: where the memory of one distillation step goes, and whether a run fits a GPU.

One optimizer step of train.py holds, at its peak, some of these (all in bytes of live tensors):

    teacher weights          frozen, read by the teacher's no_grad forward (kd, neo)
    frozen student weights   the student's base under the adapters (neo, lora); with RoPE tables
    trainable weights        the adapters (neo, lora) or every student weight (sft, kd), fp32
    gradients                one per trainable weight, the same size
    optimizer state          AdamW's exp_avg and exp_avg_sq: twice the trainable weights
    saved activations        what the student's forward keeps alive for backward
    loss-time transients     neo_loss's chunk logits and the ∂L/∂h (and ∂L/∂W) it builds
    teacher activations      the teacher's final hidden states (and its forward's temporaries)
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

    python plan.py --teacher ../shared/configs/llama-3.1-8b.json --student ../shared/configs/llama-3.2-1b.json \
        --method neo --world-size 6 --dtype bfloat16 --gpu-memory 40
    python train.py --plan --gpu-memory 80 --teacher meta-llama/Llama-3.1-8B-Instruct --prune-to 16
    python plan.py --paper          # the paper's Table I and II settings beside its Mem column
"""
import argparse
import contextlib
import io
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model as llama

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

    def __init__(self, teacher, student, optimizer, fake: bool = False):
        super().__init__()
        self.teacher, self.student, self.optimizer, self.fake = teacher, student, optimizer, fake
        self.key_of = {}     # id(storage) -> key, while the storage lives
        self.size = {}       # key -> bytes
        self.kind = {}       # key -> category, for storages whose kind is known when first seen
        self.born_in = {}    # key -> phase that created it
        self.events = []     # (key, +bytes or -bytes, phase): the step's timeline
        self.phase = "start"
        self.saved = set()   # student-forward storages still alive when the loss starts
        self.grads, self.state = set(), set()
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
            for t in [*self.teacher.parameters(), *self.teacher.buffers()]:
                self._track(t, "teacher weights")
        for p in self.student.parameters():
            self._track(p, "trainable weights" if p.requires_grad else "frozen student weights")
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
        out = _assume_full_batch(func, args, kwargs) if self.fake else None
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


def _assume_full_batch(func, args, kwargs):
    """Fake tensors hold no values: answer the few data-dependent questions as a full batch would.

    Every position is a token and a target, so boolean masks are all True (masked selection keeps
    every element), `.item()` on a comparison is False and on a count is 1.
    """
    if func is aten._local_scalar_dense.default:
        t = args[0]
        return False if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
    if func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
        self, (mask,) = args[0], [i for i in args[1] if i is not None]
        return self.new_empty((mask.numel(),) + tuple(self.shape[mask.dim():]))
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
    extra_flags: list = field(default_factory=list)

    def train_args(self):
        import train
        return train.parse_args(["--method", self.method, "--adapter", self.adapter, "--rank", str(self.rank),
                                 "--chunk-size", str(self.chunk_size), "--targets", self.targets,
                                 "--dtype", "float32", *(["--grad-checkpoint"] if self.grad_checkpoint else [])])


def build(setup: Setup, teacher_cfg, student_cfg, fake: bool):
    """(teacher or None, Distiller, AdamW, batch) as train.py builds them; on fake tensors if `fake`."""
    import train
    targs = setup.train_args()
    uses_teacher = setup.method in ("kd", "neo")
    with FakeTensorMode() if fake else contextlib.nullcontext(), contextlib.redirect_stdout(io.StringIO()):
        teacher = None
        if uses_teacher:
            teacher = llama.Llama(teacher_cfg).eval().requires_grad_(False)
            for p in teacher.parameters():
                p.data = p.data.to(setup.frozen_dtype)
        student = train.prepare_student(llama.Llama(student_cfg), targs, torch.device("cpu"))
        for p in student.parameters():  # the frozen base in the frozen dtype; trainable weights stay fp32
            if not p.requires_grad:
                p.data = p.data.to(setup.frozen_dtype)
        distiller = train.Distiller(student, targs.alpha, targs.temperature, targs.divergence, targs.chunk_size)
        params = [p for p in distiller.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
        shape = (setup.batch_size, setup.max_len)
        ids = torch.randint(0, student_cfg.vocab_size, shape)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(shape, dtype=torch.long)}
    return teacher, distiller, optimizer, batch


def training_step(teacher, distiller, optimizer, batch, autocast: bool):
    """train.py's step for one micro-batch: teacher forward, student forward + loss, backward,
    gradient clipping, AdamW."""
    import neo
    params = [p for p in distiller.parameters() if p.requires_grad]
    normalizer = neo.count_targets(batch["labels"]).float().clamp(min=1)
    teacher_hidden = teacher_head = None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = teacher(batch["input_ids"], batch["attention_mask"], return_hidden=True)
        teacher_head = teacher.lm_head.weight
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        res = distiller(batch["input_ids"], batch["attention_mask"], batch["labels"], teacher_hidden,
                        teacher_head, normalizer)
        res.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ledger_of_step(setup: Setup, teacher_cfg, student_cfg, fake: bool = True) -> Ledger:
    """Build on fake (or real, random) tensors, take one step to create AdamW's state, count the next."""
    teacher, distiller, optimizer, batch = build(setup, teacher_cfg, student_cfg, fake)
    # Fake tensors: factory calls inside the step (torch.zeros in neo_loss) must make fake ones too.
    with next(distiller.parameters()).fake_mode if fake else contextlib.nullcontext():
        with _answers(fake):
            training_step(teacher, distiller, optimizer, batch, setup.autocast)  # AdamW state now exists
        with Ledger(teacher, distiller.student, optimizer, fake=fake) as ledger:
            training_step(teacher, distiller, optimizer, batch, setup.autocast)
    return ledger


class _Answers(TorchDispatchMode):
    """`_assume_full_batch` without the counting: for the untracked first step on fake tensors."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = _assume_full_batch(func, args, kwargs or {})
        return func(*args, **(kwargs or {})) if out is None else out


def _answers(fake):
    return _Answers() if fake else contextlib.nullcontext()
