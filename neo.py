"""The LLM-Neo objective: cross-entropy on the labels plus distillation from a teacher.

LLM-Neo (Yang et al. 2024, arXiv 2411.06839, eq. 1 and 7) trains only the LoRA update ΔW of the
student (lora.py) on

    L = α · CE(p_s, y) + (1 − α) · T² · D(p_t^T ‖ p_s^T)

per valid target token, summed and divided by the number of valid target tokens, where

    p_s   = softmax(z_s)        student distribution (CE uses T = 1)
    p^T   = softmax(z / T)      temperature-softened student / teacher distributions
    D     = forward KL  KL(p_t^T ‖ p_s^T) = Σ p_t (log p_t − log p_s)       (the paper's choice)
            reverse KL  KL(p_s^T ‖ p_t^T)
            JSD(β)      β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m),  m = β·p_t + (1 − β)·p_s
                        (generalised Jensen–Shannon of GKD, Agarwal et al. 2024; TRL's convention)
    T²    keeps the gradient scale independent of T (Hinton et al. 2015); switchable.

Alignment: the hidden state at position t predicts labels[t + 1] (labels are unshifted, −100 marks
prompt and padding). The paper's reference code masks the KL with the unshifted labels, which
skips the first response token and scores the token after the last one; here both terms use the
same shifted mask.

On-policy rows (GKD, Agarwal et al. 2024): a reply the student sampled itself has no ground truth,
only the teacher's scores. `ce_mask` (B, T), aligned with labels, says where CE counts; at a target
where it is False the α·CE term is dropped and the (1 − α)·T²·D term keeps its weight, and the
token still counts in the normaliser (the loss stays a sum over tokens over their number).

The file reads in the order the training loop uses it: `reference_loss`, the equation written the
plain way on full logits with F.cross_entropy and F.kl_div (read it first; the tests and benchmarks
measure against it); `neo_loss`, the same numbers without the B×T×V logits; and `Distiller`, the
module train.py wraps in DDP or FSDP2, which runs teacher and student and returns the two sums that
train.py mixes as α·CE + (1 − α)·T²·D. Distilling from a teacher cached offline as its top-k tokens
(teacher_cache.py) is this project's extension, not the paper's: it lives in cached_loss.py.

Memory: the full B×T×V fp32 logits of student and teacher are where distillation memory goes.
neo_loss never builds them. It keeps only the valid target positions, then projects the final
hidden states to the vocabulary `chunk_size` rows at a time inside one autograd.Function
(_ChunkedNeoLoss). Each chunk's CE and divergence sums and the gradient of α·CE + (1 − α)·T²·D
with respect to the chunk's logits are computed in fp32 right away (closed forms below) and folded
into ∂L/∂h (N×D) and, only if the head is trainable, ∂L/∂W (V×D); the chunk's logits are then
dropped. The Function returns the two sums, and its backward expects them mixed with the weights
it folded (it checks that on the CPU). So the extra peak memory is
O(chunk_size × V), and the matmul work is the same as the unchunked loss (no recomputation).

Gradient accumulation / data parallel: the loss is a sum over tokens divided by `normalizer`. Pass
normalizer = the number of valid targets in the whole optimizer step (all micro-batches, all
ranks; count_targets + all_reduce) so that accumulating micro-batches gives the gradient of the
one big batch.

Vocabularies: teacher and student heads must have the same number of rows. If they differ only by
padding rows (e.g. 151936 vs 152064), pass vocab_size = the shared tokenizer's size and both heads
are truncated to its rows; otherwise a ValueError names both sizes.
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake  # plan.py's memory model runs backward on fake tensors

IGNORE_INDEX = -100  # label of every token the loss skips (data.py writes it into the labels)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class NeoLoss(NamedTuple):
    loss: torch.Tensor      # scalar to backpropagate: (α·CE_sum + (1−α)·T²·D_sum) / normalizer
    ce: torch.Tensor        # detached mean CE per local CE-counted target (for logging; 0 if none)
    kl: torch.Tensor        # detached mean divergence per local valid target (0 without teacher)
    n_tokens: torch.Tensor  # local number of valid targets (long scalar)
    n_ce: torch.Tensor      # local number of those where CE counts (n_tokens without a ce_mask)
    ce_sum: torch.Tensor    # CE summed over the CE-counted targets (differentiable)
    kl_sum: torch.Tensor    # the divergence summed over the valid targets (differentiable)
    hidden_sum: torch.Tensor | None = None  # hidden_state_sum, or None without --hidden-weight


def reference_loss(student_logits, teacher_logits, labels, *, alpha: float = 0.5,
                   temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                   t2_scale: bool = True, normalizer=None, vocab_size: int | None = None,
                   ignore_index: int = IGNORE_INDEX, ce_mask=None, compiled: bool = False) -> NeoLoss:
    """The LLM-Neo loss the plain way: full logits, F.cross_entropy and F.kl_div.

    student_logits (B, T, V); teacher_logits (B, T, V), or None for plain CE (alpha is then
    ignored); labels (B, T) unshifted. The other arguments mean what they mean for neo_loss, which
    returns the same numbers. This is how distillation code is usually written (transformers'
    logits, upcast to fp32): it holds several B×T×V fp32 tensors at once, which is why training
    calls neo_loss. Tests, benchmarks/bench_loss.py and the hf-peft-neo peer in benchmarks/bench.py
    all use this one function.
    """
    if vocab_size is not None:  # drop the heads' padding rows beyond the shared tokenizer
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size] if teacher_logits is not None else None
    T = temperature
    s = student_logits[:, :-1]                                    # (B, T-1, V): position t predicts t + 1
    s = s.to(torch.promote_types(s.dtype, torch.float32))        # bf16 -> fp32; fp32, fp64 stay
    targets = labels[:, 1:]                                       # (B, T-1)
    mask = targets != ignore_index                                # (B, T-1), the shifted mask
    ce_targets = targets                                          # where CE counts (on-policy rows: not there)
    if ce_mask is not None:
        ce_targets = targets.masked_fill(~_checked_ce_mask(ce_mask, labels)[:, 1:], ignore_index)
    ce = F.cross_entropy(s.flatten(0, 1), ce_targets.flatten(), ignore_index=ignore_index, reduction="sum")
    div = torch.zeros_like(ce)
    if teacher_logits is None:
        alpha = 1.0
    else:
        t = teacher_logits[:, :-1].detach()                       # (B, T-1, V); the teacher gets no gradient
        t = t.to(torch.promote_types(t.dtype, torch.float32))
        log_q = F.log_softmax(s / T, dim=-1)                      # log p_s^T, student
        log_p = F.log_softmax(t / T, dim=-1)                      # log p_t^T, teacher

        def kl(log_a, log_b):  # KL(a ‖ b) per position, (B, T-1): F.kl_div(input=log b, target=log a)
            return F.kl_div(log_b, log_a, log_target=True, reduction="none").sum(-1)

        if divergence == "forward_kl":
            per_token = kl(log_p, log_q)
        elif divergence == "reverse_kl":
            per_token = kl(log_q, log_p)
        elif divergence == "jsd":                                 # log m = log(β p_t + (1 − β) p_s)
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
            per_token = beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
        else:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        div = per_token[mask].sum()
    n = mask.sum()
    denom = n if normalizer is None else torch.as_tensor(normalizer, device=ce.device)
    denom = denom.clamp(min=1).to(ce.dtype)                       # all-ignored batch: loss 0, not NaN
    loss = (alpha * ce + (1 - alpha) * (T * T if t2_scale else 1.0) * div) / denom
    local = n.clamp(min=1).to(ce.dtype)
    n_ce = n if ce_mask is None else (ce_targets != ignore_index).sum()
    return NeoLoss(loss, (ce / n_ce.clamp(min=1).to(ce.dtype)).detach(), (div / local).detach(), n, n_ce,
                   ce, div)


# ----------------------------------------------------------------------------- the same numbers
# without the B×T×V logits: helpers, the chunked autograd.Function, and neo_loss, the public entry.

def count_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Number of valid shifted targets: labels[:, 1:] != ignore_index (a long scalar tensor)."""
    return (labels[:, 1:] != ignore_index).sum()


def _divergence(log_q: torch.Tensor, log_p: torch.Tensor, kind: str, beta: float, need_grad: bool):
    """Per-row divergence between teacher log-probs log_p and student log-probs log_q, (n, V).

    Returns (div (n,), grad (n, V) = ∂div/∂s where log_q = log_softmax(s), or None).
    For any f(q) with q = softmax(s), ∂q_j/∂s_i = q_j(δ_ij − q_i), so ∂f/∂s = q ⊙ (g − Σ q·g),
    g = ∂f/∂q; a constant added to g cancels (Σ q = 1), which is why the +1s below are dropped.
    """
    if kind == "forward_kl":
        # KL(p ‖ q) = Σ p log p − Σ p (s − logsumexp s)  ⇒  ∂/∂s = −p + q·Σp = q − p
        p = log_p.exp()
        div = (log_p - log_q).mul_(p).sum(-1)
        # q only now, after the (n, V) difference is freed: one chunk-sized buffer fewer at the peak
        return div, (log_q.exp().sub_(p) if need_grad else None)
    q = log_q.exp()
    if kind == "reverse_kl":
        # KL(q ‖ p) = Σ q (log q − log p)  ⇒  g = log q − log p + 1  ⇒  ∂/∂s = q ⊙ (log q − log p − KL)
        g, weight, rest = log_q - log_p, 1.0, 0.0
    else:
        # JSD(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m) with ∂m/∂q = 1 − β:
        # g = (1 − β)(log q − log m + 1 − (β p + (1 − β) q)/m) = (1 − β)(log q − log m)
        #   ⇒  ∂/∂s = (1 − β) q ⊙ (log q − log m − KL(q ‖ m))
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
        rest = beta * (log_p - log_m).mul_(log_p.exp()).sum(-1)
        g, weight = log_q - log_m, 1 - beta
    kl_q = (q * g).sum(-1)      # KL(q ‖ p) or KL(q ‖ m)
    div = weight * kl_q + rest
    if not need_grad:
        return div, None
    return div, g.sub_(kl_q[:, None]).mul_(q).mul_(weight)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax arithmetic in fp32: upcast bf16/fp16, keep fp32 and fp64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _targets(labels, vocab: int, ignore_index: int):
    """(mask, y): position t predicts labels[t + 1]; keep only the positions that have a target.

    A range check reads y back to the host: free on the CPU, a sync per call on a GPU, where
    train.py checks the labels once on the host instead (runkit/tokenized.check_labels)."""
    targets = labels[:, 1:]                                        # (B, T-1)
    mask = targets != ignore_index
    y = targets[mask]                                              # (N,)
    if y.device.type == "cpu" and y.numel() and (y.min() < 0 or y.max() >= vocab):
        raise ValueError(f"label ids must lie in [0, {vocab}) or equal {ignore_index}")
    return mask, y


def _checked_ce_mask(ce_mask, labels) -> torch.Tensor:
    """ce_mask as given, once it is a bool tensor shaped like labels (it is aligned with them)."""
    if not torch.is_tensor(ce_mask) or ce_mask.dtype != torch.bool or ce_mask.shape != labels.shape:
        what = f"{ce_mask.dtype} {tuple(ce_mask.shape)}" if torch.is_tensor(ce_mask) else type(ce_mask).__name__
        raise ValueError(f"ce_mask must be a bool tensor shaped like labels {tuple(labels.shape)}, got {what}")
    return ce_mask


def _normalised(ce_sum, div_sum, alpha, kd_weight, n, normalizer, n_ce=None) -> NeoLoss:
    """α·CE_sum + kd_weight·D_sum over `normalizer` (default the local target count); CE and the
    divergence as local per-token means, for logging (CE over its n_ce counted targets, default n)."""
    denom = n if normalizer is None else torch.as_tensor(normalizer, device=ce_sum.device)
    denom = denom.clamp(min=1).to(ce_sum.dtype)                    # all-ignored batch: loss 0, not NaN
    loss = (alpha * ce_sum + kd_weight * div_sum) / denom
    local = n.clamp(min=1).float()
    n_ce = n if n_ce is None else n_ce
    return NeoLoss(loss, (ce_sum / n_ce.clamp(min=1).float()).detach(), (div_sum / local).detach(), n,
                   n_ce, ce_sum, div_sum)


def _sums_and_grads(hs, ws, need_h, need_w, acc):
    """What the chunked Functions fill chunk by chunk: the CE and divergence sums, and ∂L/∂hs (N, D)
    and ∂L/∂ws (V, D) where asked for."""
    return (torch.zeros((), dtype=acc, device=hs.device), torch.zeros((), dtype=acc, device=hs.device),
            torch.zeros(hs.shape, dtype=acc, device=hs.device) if need_h else None,
            torch.zeros(ws.shape, dtype=acc, device=ws.device) if need_w else None)


def _add_chunk_grads(grad_z, rows, hs, ws, grad_h, grad_w, acc):
    """A chunk's ∂L/∂z (n, V) through z = hs·wsᵀ: into its rows of ∂L/∂hs and into ∂L/∂ws."""
    if grad_h is not None:
        grad_h[rows] = grad_z.to(ws.dtype) @ ws   # (n, D)
    if grad_w is not None:
        grad_w += grad_z.t() @ hs[rows].to(acc)   # (V, D)


def _saved(fn_ctx, hs, ws, grad_h, grad_w, ce_sum, div_sum, alpha, kd_weight):
    """The chunked Functions' forward result, the two sums; the gradients of α·CE + kd_weight·D
    wait in the autograd context for backward (_scaled_grads)."""
    fn_ctx.save_for_backward(grad_h, grad_w)
    fn_ctx.dtypes = (hs.dtype, ws.dtype)
    fn_ctx.weights = (alpha, kd_weight)
    return ce_sum, div_sum


def _scaled_grads(fn_ctx, grad_ce, grad_div):
    """The chunked Functions' backward: the gradients their forward already computed, in the inputs'
    dtypes. They are the gradients of α·CE + kd_weight·D, so the incoming gradients must be
    (α·c, kd_weight·c), the sums mixed with the forward's weights (train.py, _normalised): c scales
    them. Checked on the CPU, where reading c back costs nothing (not on plan.py's fake tensors)."""
    grad_h, grad_w = fn_ctx.saved_tensors
    alpha, kd_weight = fn_ctx.weights
    c = grad_ce / alpha if alpha else grad_div / kd_weight
    sent, expected = torch.stack([grad_ce, grad_div]).to(c.dtype), torch.stack([alpha * c, kd_weight * c])
    if c.device.type == "cpu" and not is_fake(c) and not torch.allclose(sent, expected, rtol=1e-5, atol=0):
        raise RuntimeError(f"the chunked loss's sums must be mixed as {alpha}·ce_sum + {kd_weight}·kl_sum, "
                           "the weights its gradient was computed for")
    grad_h = (grad_h * c).to(fn_ctx.dtypes[0]) if grad_h is not None else None
    grad_w = (grad_w * c).to(fn_ctx.dtypes[1]) if grad_w is not None else None
    return grad_h, grad_w


def chunk_terms(hs, ws, ht, wt, y, cw, alpha, T, kind, beta, kd_weight, need_grad):
    """One chunk of n target rows -> (its CE sum, its divergence sum, ∂(α·CE + kd_weight·D)/∂z (n, V)
    or None), z = hs·wsᵀ the chunk's student logits. cw (n, 1): the rows' CE weights, or None (all 1).
    _ChunkedNeoLoss runs it eagerly, or compiled (--compile, compiled_chunk_terms): the same code,
    its passes over the (n, V) chunk fused into a few loops."""
    z = _at_least_fp32(F.linear(hs, ws))               # (n, V) student logits
    log_q1 = torch.log_softmax(z, dim=-1)              # (n, V) student log-probs at T = 1
    picked = log_q1.gather(1, y[:, None])              # (n, 1)
    ce = -(picked if cw is None else picked * cw).sum()
    log_q = log_q1 if T == 1 or ht is None else torch.log_softmax(z.div_(T), dim=-1)
    del z                                              # before the teacher's (n, V) logits exist
    div = torch.zeros((), dtype=log_q1.dtype, device=hs.device)
    grad_z = grad_ce = None
    if ht is not None:
        zt = _at_least_fp32(F.linear(ht, wt))          # (n, V) teacher logits
        log_p = torch.log_softmax(zt.div_(T), dim=-1)
        del zt
        div_rows, grad_z = _divergence(log_q, log_p, kind, beta, need_grad)   # grad_z: ∂D/∂s or None
        div = div_rows.sum()
        del log_p
        if need_grad:                                  # s = z / T  ⇒  ∂/∂z = (1/T)·∂/∂s
            grad_z.mul_(kd_weight / T)
    if need_grad:  # CE = logsumexp(z) − z_y  ⇒  ∂CE/∂z = softmax(z) − onehot(y)
        grad_ce = log_q1.exp_()
        grad_ce[torch.arange(len(y), device=y.device), y] -= 1.0
        if cw is not None:                             # rows without CE: their gradient is D's alone
            grad_ce.mul_(cw)
        grad_z = grad_ce.mul_(alpha) if grad_z is None else grad_z.add_(grad_ce, alpha=alpha)
    return ce, div, grad_z


@functools.cache
def compiled_chunk_terms():
    """chunk_terms under torch.compile (made once per process; shapes after the first are dynamic,
    as the last chunk of a batch is shorter)."""
    return torch.compile(chunk_terms)


class _ChunkedNeoLoss(torch.autograd.Function):
    """reference_loss's numbers without the B×T×V logits: the sums of CE and of D over the rows,
    projecting to the vocabulary chunk by chunk; the gradient is that of α·CE + (1−α)·T²·D.

    Inputs are the valid rows only: hs (N, D) student hidden, ws (V, D) student head,
    ht (N, Dt) / wt (V, Dt) teacher (or None), y (N,) targets, ce_rows (N,) bool or None: the
    rows whose CE counts (None: all; False rows keep only their divergence). Gradients for hs and ws are
    computed during forward (the chunk logits never outlive their chunk) and scaled by the
    incoming gradient in backward. The teacher never receives a gradient. chunk_fn: chunk_terms,
    or the same compiled.
    """

    @staticmethod
    def forward(fn_ctx, hs, ws, ht, wt, y, ce_rows, alpha, temperature, kind, beta, t2_scale, chunk_size, chunk_fn):
        need_h, need_w = fn_ctx.needs_input_grad[0], fn_ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        T = temperature
        kd_weight = (1 - alpha) * (T * T if t2_scale else 1.0)
        acc = _at_least_fp32(hs[:0]).dtype                     # fp32 (fp64 stays fp64, for tests)
        ce_weight = None if ce_rows is None else ce_rows.to(acc)[:, None]  # (N, 1): 1 = CE counts, 0 = not
        ce_sum, div_sum, grad_h, grad_w = _sums_and_grads(hs, ws, need_h, need_w, acc)
        for start in range(0, hs.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            ce, div, grad_z = chunk_fn(hs[rows], ws, None if ht is None else ht[rows], wt, y[rows],
                                       None if ce_weight is None else ce_weight[rows],
                                       alpha, T, kind, beta, kd_weight, need_grad)
            ce_sum += ce
            div_sum += div
            if grad_z is not None:
                _add_chunk_grads(grad_z, rows, hs, ws, grad_h, grad_w, acc)
            del grad_z  # before the next chunk's logits exist
        return _saved(fn_ctx, hs, ws, grad_h, grad_w, ce_sum, div_sum, alpha, kd_weight)

    @staticmethod
    def backward(fn_ctx, grad_ce, grad_div):
        return *_scaled_grads(fn_ctx, grad_ce, grad_div), *[None] * 11  # nothing else has a gradient


def neo_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels, *,
             alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl",
             beta: float = 0.5, t2_scale: bool = True, chunk_size: int | None = 256,
             normalizer=None, vocab_size: int | None = None,
             ignore_index: int = IGNORE_INDEX, ce_mask=None, compiled: bool = False) -> NeoLoss:
    """LLM-Neo loss from final hidden states and LM head weights (see the module docstring).

    student_hidden (B, T, D), student_head_weight (V, D); teacher_hidden (B, T, Dt) and
    teacher_head_weight (Vt, Dt), or both None for plain CE (alpha is then ignored: loss =
    CE_sum / normalizer). labels (B, T) unshifted, ignore_index where there is no target.
    chunk_size: target rows projected to the vocabulary at once; extra memory is about
    4 × chunk_size × V fp32 values for the forward KL at T = 1, a few more for the other
    divergences or T ≠ 1 (None: all rows in one chunk, i.e. the unchunked computation).
    normalizer: divide the summed loss by this (e.g. the global count of valid targets);
    default the local count. vocab_size: the shared tokenizer size when the heads differ.
    ce_mask: None, or (B, T) bool aligned with labels: CE counts only at valid targets where it is
    True (False on replies the student sampled, which have no ground truth); the divergence counts
    at every valid target, and so does n_tokens. Applied as a per-row CE weight inside the chunks.
    compiled: run each chunk's arithmetic through torch.compile (chunk_terms; train.py --compile).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 (use forward_kl / reverse_kl for the limits), got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if (teacher_hidden is None) != (teacher_head_weight is None):
        raise ValueError("give both teacher_hidden and teacher_head_weight, or neither")
    if teacher_hidden is None:
        alpha = 1.0
    ws, wt = student_head_weight, teacher_head_weight
    if vocab_size is not None:  # drop padding rows of the heads beyond the shared tokenizer
        sizes = [ws.shape[0]] + ([wt.shape[0]] if wt is not None else [])
        if vocab_size > min(sizes):
            raise ValueError(f"vocab_size {vocab_size} exceeds a head: student {ws.shape[0]} rows"
                             + (f", teacher {wt.shape[0]} rows" if wt is not None else ""))
        ws = ws[:vocab_size]
        wt = wt[:vocab_size] if wt is not None else None
    elif wt is not None and wt.shape[0] != ws.shape[0]:
        raise ValueError(f"teacher vocabulary ({wt.shape[0]} rows) differs from student vocabulary "
                         f"({ws.shape[0]} rows); pass vocab_size=<shared tokenizer size> to compare "
                         "only the shared rows, if the extra rows are padding")

    mask, y = _targets(labels, ws.shape[0], ignore_index)
    hs = student_hidden[:, :-1][mask]                              # (N, D)
    ht = teacher_hidden[:, :-1][mask].detach() if teacher_hidden is not None else None  # (N, Dt)
    wt = wt.detach() if wt is not None else None
    if not torch.is_grad_enabled():  # evaluation: skip the gradient work inside the chunk loop
        hs, ws = hs.detach(), ws.detach()
    ce_rows = None if ce_mask is None else _checked_ce_mask(ce_mask, labels)[:, 1:][mask]   # (N,)
    n = mask.sum()
    chunk = chunk_size or max(1, hs.shape[0])
    ce_sum, div_sum = _ChunkedNeoLoss.apply(
        hs, ws, ht, wt, y, ce_rows, alpha, temperature, divergence, beta, t2_scale, chunk,
        compiled_chunk_terms() if compiled else chunk_terms)
    kd_weight = (1 - alpha) * (temperature * temperature if t2_scale else 1.0)
    return _normalised(ce_sum, div_sum, alpha, kd_weight, n, normalizer,
                       None if ce_rows is None else ce_rows.sum())




# ----------------------------------------------------------------------------------------------
# Intermediate states: a pruned student's blocks follow the teacher blocks they were cut from.

def hidden_state_sum(student_states, teacher_states, labels, ignore_index: int = IGNORE_INDEX):
    """Σ over the valid targets t of the mean over the m matched blocks of a cosine distance:

        H_sum = Σ_t (1/m) Σ_j (1 − cos(h_s^j(t), h_t^π(j)(t)))

    h_s^j (B, T, D) is the student's residual stream after its block j, h_t^π(j) the teacher's
    after the block π(j) that block j was cut from (teacher_states, in the same order). Minitron
    (Muralidharan et al. 2024, arXiv 2407.14679) distils such intermediate states beside the logits.
    train.py adds β·H_sum to the α-mix over the same normaliser (--hidden-weight β).

    Why a cosine, not a squared error: the residual stream's norm grows along the depth, so a
    squared error does too. In the demo's untrained student it is 9 per coordinate after teacher
    block 8 and 896 after block 29 (the stream's median norm 121 -> 759), so one β would weigh the
    last block 100x the first, and differently for every model. 1 − cos lies in [0, 2] at any
    depth, width and scale (0.13-0.44 per block there), and direction is what the next block
    reads: each one enters through an RMSNorm, as does the LM head. The mean over the blocks
    keeps β independent of the depth (benchmarks/results/hidden_states.md, "scale").
    Positions are the loss's own: t where labels[t + 1] is a target (the shifted mask).
    Gradients: ∂/∂a (1 − cos(a, b)) = −(b/‖b‖ − cos·a/‖a‖)/‖a‖, through autograd."""
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"{len(student_states)} student states but {len(teacher_states)} teacher states")
    mask = labels[:, 1:] != ignore_index                               # (B, T-1), the shifted mask
    total = 0.0
    for hs, ht in zip(student_states, teacher_states):
        a = _at_least_fp32(hs[:, :-1][mask])                           # (N, D)
        b = _at_least_fp32(ht[:, :-1][mask].detach()).to(a.dtype)      # (N, D)
        total = total + (1 - F.cosine_similarity(a, b, dim=-1)).sum()
    return total / len(student_states)


def matched_layers(student_config, teacher_config) -> list[int]:
    """π: the teacher block each student block distils from. A student pruned from the teacher
    (model.prune_layers) knows where its blocks came from; another student of the same width is
    mapped evenly along the depth, as Minitron does (its last block to the teacher's last)."""
    if student_config.hidden_size != teacher_config.hidden_size:
        raise ValueError(f"the student's hidden states are {student_config.hidden_size} wide and the "
                         f"teacher's {teacher_config.hidden_size}: no block of one compares with the other's")
    m, n = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    if student_config.pruned_from is not None and max(student_config.pruned_from) < n:
        return list(student_config.pruned_from)
    return [(j + 1) * n // m - 1 for j in range(m)]


# ----------------------------------------------------------------------------------------------
# The trained module: the student plus the objective. Wrapping the loss inside forward() lets DDP
# and FSDP2 see one module: FSDP2 gathers the student's LM head for the chunked projection. The
# teacher is held beside it, not inside it: DDP and FSDP2 wrap the student only, and the module's
# state dict (checkpoints, adapters) holds the student's weights only.


class Distiller(torch.nn.Module):
    """forward(batch) -> NeoLoss: the frozen teacher's hidden states (no_grad, outside any autocast:
    it runs in its own dtype), the student's, and neo_loss between them; train.py backpropagates
    α·ce_sum + (1 − α)·T²·kl_sum over the step's target count. teacher None: sft/lora (CE only;
    cached_loss.CachedDistiller distils from a teacher cache). ce_mask: where CE counts (False on
    the student's own sampled replies, which have no ground truth).

    hidden_weight β > 0 (a teacher needed): the teacher also returns its residual stream after
    the blocks `teacher_layers` (π, matched_layers; only those, in its frozen dtype), the student
    after each of its blocks, and hidden_sum = hidden_state_sum between them joins the result;
    train.py adds β·hidden_sum to the mix (NeoLoss.loss includes it too)."""

    def __init__(self, student, teacher=None, alpha=0.5, temperature=1.0, divergence="forward_kl",
                 chunk_size=256, vocab_size=None, hidden_weight=0.0, teacher_layers=None, compiled=False):
        super().__init__()
        self.compiled = compiled  # --compile: the loss's chunk arithmetic through torch.compile (neo_loss)
        self.student = student
        self.__dict__["teacher"] = teacher  # beside the module, not a submodule (section comment above)
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        self.chunk_size, self.vocab_size = chunk_size, vocab_size
        self.hidden_weight = hidden_weight
        self.teacher_layers = teacher_layers if hidden_weight and teacher is not None else ()  # π(j), block j

    def forward(self, input_ids, attention_mask, labels, normalizer=None, document_ids=None, ce_mask=None):
        teacher_hidden = teacher_head = teacher_states = student_states = None
        if self.teacher is not None:
            with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                teacher_hidden = self.teacher(input_ids, attention_mask, document_ids=document_ids,
                                              return_hidden=True, hidden_at=self.teacher_layers)  # (B, T, Dt)
            teacher_head = self.teacher.lm_head.weight
        student_blocks = range(len(self.student.model.layers)) if self.teacher_layers else ()
        hidden = self.student(input_ids, attention_mask, document_ids=document_ids,
                              return_hidden=True, hidden_at=student_blocks)              # (B, T, D)
        if self.teacher_layers:  # (final, [after block j]) pairs
            (teacher_hidden, teacher_states), (hidden, student_states) = teacher_hidden, hidden
        res = neo_loss(hidden, self.student.lm_head.weight, teacher_hidden, teacher_head, labels,
                       alpha=self.alpha, temperature=self.temperature, divergence=self.divergence,
                       chunk_size=self.chunk_size, normalizer=normalizer, vocab_size=self.vocab_size,
                       ce_mask=ce_mask, compiled=self.compiled)
        if not self.teacher_layers:
            return res
        h = hidden_state_sum(student_states, teacher_states, labels)
        denom = (res.n_tokens if normalizer is None else torch.as_tensor(normalizer)).clamp(min=1)
        return res._replace(loss=res.loss + self.hidden_weight * h / denom.to(h.dtype), hidden_sum=h)

    def generate(self, *args, **kwargs):
        """The student's model.generate (on-policy replies). A method of the wrapped module, so that
        FSDP2 gathers the student's sharded weights for it as it does for forward."""
        return self.student.generate(*args, **kwargs)
