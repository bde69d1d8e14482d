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

The file has three parts. `reference_loss` is the equation written the plain way, on full logits
with F.cross_entropy and F.kl_div: read it first; the tests and benchmarks measure against it.
`neo_loss` computes the same numbers without the B×T×V logits, which is what training uses.
A last section, `sparse_neo_loss`, is the same chunked loss against a teacher cached offline as its
top-k tokens plus a tail bucket (teacher_cache.py), with the exact bound on what that loses.

Memory: the full B×T×V fp32 logits of student and teacher are where distillation memory goes.
neo_loss never builds them. It keeps only the valid target positions, then projects the final
hidden states to the vocabulary `chunk_size` rows at a time inside one autograd.Function
(_ChunkedNeoLoss). Each chunk's loss and its gradient with respect to the chunk's logits are
computed in fp32 right away (closed forms below) and folded into ∂L/∂h (N×D) and, only if the
head is trainable, ∂L/∂W (V×D); the chunk's logits are then dropped. So the extra peak memory is
O(chunk_size × V), and the matmul work is the same as the unchunked loss (no recomputation).

Gradient accumulation / data parallel: the loss is a sum over tokens divided by `normalizer`. Pass
normalizer = the number of valid targets in the whole optimizer step (all micro-batches, all
ranks; count_targets + all_reduce) so that accumulating micro-batches gives the gradient of the
one big batch.

Vocabularies: teacher and student heads must have the same number of rows. If they differ only by
padding rows (e.g. 151936 vs 152064), pass vocab_size = the shared tokenizer's size and both heads
are truncated to its rows; otherwise a ValueError names both sizes.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

import lora

IGNORE_INDEX = -100  # label of every token the loss skips (data.py writes it into the labels)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class NeoLoss(NamedTuple):
    loss: torch.Tensor      # scalar to backpropagate: (α·CE_sum + (1−α)·T²·D_sum) / normalizer
    ce: torch.Tensor        # detached mean CE per local CE-counted target (for logging; 0 if none)
    kl: torch.Tensor        # detached mean divergence per local valid target (0 without teacher)
    n_tokens: torch.Tensor  # local number of valid targets (long scalar)
    n_ce: torch.Tensor      # local number of those where CE counts (n_tokens without a ce_mask)


def reference_loss(student_logits, teacher_logits, labels, *, alpha: float = 0.5,
                   temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5,
                   t2_scale: bool = True, normalizer=None, vocab_size: int | None = None,
                   ignore_index: int = IGNORE_INDEX, ce_mask=None) -> NeoLoss:
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
    return NeoLoss(loss, (ce / n_ce.clamp(min=1).to(ce.dtype)).detach(), (div / local).detach(), n, n_ce)


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
    train.py checks the labels once on the host instead (train.check_labels)."""
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


def _normalised(loss_sum, ce_sum, div_sum, n, normalizer, n_ce=None) -> NeoLoss:
    """The summed loss over `normalizer` (default the local target count); CE and the divergence
    as local per-token means, for logging (CE over its n_ce counted targets, default all n)."""
    denom = n if normalizer is None else torch.as_tensor(normalizer, device=loss_sum.device)
    denom = denom.clamp(min=1).to(loss_sum.dtype)                  # all-ignored batch: loss 0, not NaN
    local = n.clamp(min=1).float()
    n_ce = n if n_ce is None else n_ce
    return NeoLoss(loss_sum / denom, (ce_sum / n_ce.clamp(min=1).float()).detach(), (div_sum / local).detach(), n,
                   n_ce)


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


def _saved(ctx, hs, ws, grad_h, grad_w, loss, ce_sum, div_sum):
    """The chunked Functions' forward result; the gradients wait in ctx for backward (_scaled_grads)."""
    ctx.save_for_backward(grad_h, grad_w)
    ctx.dtypes = (hs.dtype, ws.dtype)
    ctx.mark_non_differentiable(ce_sum, div_sum)
    return loss, ce_sum, div_sum


def _scaled_grads(ctx, grad_loss):
    """The chunked Functions' backward: the gradients their forward already computed, times the
    incoming gradient, in the inputs' dtypes."""
    grad_h, grad_w = ctx.saved_tensors
    grad_h = (grad_h * grad_loss).to(ctx.dtypes[0]) if grad_h is not None else None
    grad_w = (grad_w * grad_loss).to(ctx.dtypes[1]) if grad_w is not None else None
    return grad_h, grad_w


class _ChunkedNeoLoss(torch.autograd.Function):
    """reference_loss's numbers without the B×T×V logits: Σ over rows of α·CE + (1−α)·T²·D,
    projecting to the vocabulary chunk by chunk.

    Inputs are the valid rows only: hs (N, D) student hidden, ws (V, D) student head,
    ht (N, Dt) / wt (V, Dt) teacher (or None), y (N,) targets, ce_rows (N,) bool or None: the
    rows whose CE counts (None: all; False rows keep only their divergence). Gradients for hs and ws are
    computed during forward (the chunk logits never outlive their chunk) and scaled by the
    incoming gradient in backward. The teacher never receives a gradient.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, y, ce_rows, alpha, temperature, kind, beta, t2_scale, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        T = temperature
        kd_weight = (1 - alpha) * (T * T if t2_scale else 1.0)
        acc = _at_least_fp32(hs[:0]).dtype                     # fp32 (fp64 stays fp64, for tests)
        ce_weight = None if ce_rows is None else ce_rows.to(acc)[:, None]  # (N, 1): 1 = CE counts, 0 = not
        ce_sum, div_sum, grad_h, grad_w = _sums_and_grads(hs, ws, need_h, need_w, acc)
        for start in range(0, hs.shape[0], chunk_size):
            rows, yc = slice(start, start + chunk_size), y[start:start + chunk_size]
            z = _at_least_fp32(F.linear(hs[rows], ws))        # (n, V) student logits
            log_q1 = torch.log_softmax(z, dim=-1)             # (n, V) student log-probs at T = 1
            cw = None if ce_weight is None else ce_weight[rows]
            if cw is None:
                ce_sum -= log_q1.gather(1, yc[:, None]).sum()
            else:
                ce_sum -= (log_q1.gather(1, yc[:, None]) * cw).sum()
            log_q = log_q1 if T == 1 or ht is None else torch.log_softmax(z.div_(T), dim=-1)
            del z                                             # before the teacher's (n, V) logits exist
            grad_z = grad_ce = None
            if ht is not None:
                zt = _at_least_fp32(F.linear(ht[rows], wt))   # (n, V) teacher logits
                log_p = torch.log_softmax(zt.div_(T), dim=-1)
                del zt
                div, grad_z = _divergence(log_q, log_p, kind, beta, need_grad)   # grad_z: ∂D/∂s or None
                div_sum += div.sum()
                del log_p
                if need_grad:                                 # s = z / T  ⇒  ∂/∂z = (1/T)·∂/∂s
                    grad_z.mul_(kd_weight / T)
            if need_grad:  # CE = logsumexp(z) − z_y  ⇒  ∂CE/∂z = softmax(z) − onehot(y)
                grad_ce = log_q1.exp_()
                grad_ce[torch.arange(len(yc), device=yc.device), yc] -= 1.0
                if cw is not None:                            # rows without CE: their gradient is D's alone
                    grad_ce.mul_(cw)
                grad_z = grad_ce.mul_(alpha) if grad_z is None else grad_z.add_(grad_ce, alpha=alpha)
            if grad_z is not None:
                _add_chunk_grads(grad_z, rows, hs, ws, grad_h, grad_w, acc)
            # Free this chunk's (n, V) buffers now: left to the next chunk's assignments, two of
            # them would still be alive at that chunk's peak.
            del log_q1, log_q, grad_z, grad_ce
        loss = alpha * ce_sum + (kd_weight * div_sum if ht is not None else 0.0)
        return _saved(ctx, hs, ws, grad_h, grad_w, loss, ce_sum, div_sum)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        return *_scaled_grads(ctx, grad_loss), *[None] * 10  # nothing else the forward took has a gradient


def neo_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels, *,
             alpha: float = 0.5, temperature: float = 1.0, divergence: str = "forward_kl",
             beta: float = 0.5, t2_scale: bool = True, chunk_size: int | None = 256,
             normalizer=None, vocab_size: int | None = None,
             ignore_index: int = IGNORE_INDEX, ce_mask=None) -> NeoLoss:
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
    loss_sum, ce_sum, div_sum = _ChunkedNeoLoss.apply(
        hs, ws, ht, wt, y, ce_rows, alpha, temperature, divergence, beta, t2_scale, chunk)
    return _normalised(loss_sum, ce_sum, div_sum, n, normalizer, None if ce_rows is None else ce_rows.sum())


# ----------------------------------------------------------------------------------------------
# The sparse loss: distillation from a cached top-k teacher (teacher_cache.py writes the cache)
#
# An offline cache cannot keep the teacher's whole distribution (V = 49,152 floats per token is
# 196 KB). It keeps, per target position, the teacher's k most likely tokens K with their
# log-probabilities log p_i at temperature T, and the log of the mass left over,
# log p_tail = log(1 − Σ_{i∈K} p_i). The student's distribution is folded the same way: its own
# probabilities on K, and one tail bucket q_tail = 1 − Σ_{i∈K} q_i. The loss is the forward KL
# between these two (k + 1)-bucket distributions:
#
#     D_K(p ‖ q) = Σ_{i∈K} p_i (log p_i − log q_i)  +  p_tail (log p_tail − log q_tail)
#
# How far this is from the full KL is exact (the chain rule of KL, or the log-sum inequality on
# the tail tokens): with p̃, q̃ the two distributions renormalised over the tail tokens,
#
#     KL(p ‖ q) − D_K(p ‖ q) = p_tail · KL(p̃ ‖ q̃)  ≥ 0,
#
# so D_K is a lower bound that is exact when k = V (p_tail = 0), and its error is the teacher's
# tail mass times how badly the student matches the shape of the tail. The gradient keeps the
# dense loss's form q − r, with the target r = p on K and r_j = p_tail · q_j / q_tail on the tail:
# inside the tail the student is pushed to the right total mass, not to a particular shape.
#
# The tail's shape can be kept too, without its 49k numbers: s tokens j_1..j_s drawn from the
# teacher's tail p̃ (with replacement), plus one exact number, the tail's Σ_{j∉K} p_j log p_j.
# The tail bucket is then replaced by its Monte Carlo form,
#
#     D_S(p ‖ q) = Σ_{i∈K} p_i (log p_i − log q_i)  +  Σ_{j∉K} p_j log p_j  −  p_tail · (1/s) Σ_m log q_{j_m},
#
# whose expectation over the draws is KL(p ‖ q) exactly (E[log q_{j_m}] = Σ_{j∉K} p̃_j log q_j), and so
# is its gradient's: q − r with r = p on K and r_j = p_tail · (count of j among the draws) / s on
# the tail, an unbiased estimate of p there (Anshumann et al. 2025 show that top-k caches bias
# the student and that sampled tokens do not). The price is noise, not bias: s = 32 draws per
# token cost 64 bytes, and the noise averages out over the thousands of tokens of a step.


class TeacherTopK(NamedTuple):
    """The cached teacher, one row per valid target (the order of labels[:, 1:][mask], row-major).

    Rows may keep different numbers of tokens (teacher_topk with k_max > k): row t's buckets are its
    first width[t] columns, and the columns after them repeat the row's first token and its
    log-probability, so that every column is a real token of the row and no index ever points at
    a bucket that is not there; they count nothing. width None: every column counts."""
    ids: torch.Tensor                   # (N, k) token ids of the teacher's most likely tokens at temperature T
    logp: torch.Tensor                  # (N, k) their log-probabilities log softmax(z_t / T)
    tail_logp: torch.Tensor             # (N,)   log(1 − Σ kept probabilities); −inf when nothing is left
    width: torch.Tensor | None = None   # (N,)   columns that count per row; None: all k
    samples: torch.Tensor | None = None     # (N, s) tokens drawn from the teacher's tail; None: the tail bucket
    tail_plogp: torch.Tensor | None = None  # (N,)  Σ over the tail of p_j log p_j (with samples)

    def to(self, device) -> "TeacherTopK":
        return TeacherTopK(*(None if t is None else t.to(device) for t in self))

    def select(self, rows) -> "TeacherTopK":
        """These rows (a slice or an index tensor) of every field."""
        return TeacherTopK(*(None if t is None else t[rows] for t in self))


def padding_columns(width: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, columns) True where a column lies past its row's width: TeacherTopK's padding."""
    return torch.arange(columns, device=width.device)[None, :] >= width[:, None]


@torch.no_grad()
def teacher_topk(hidden_rows: torch.Tensor, head_weight: torch.Tensor, k: int, temperature: float = 1.0,
                 chunk_size: int = 256, k_max: int | None = None, samples: int = 0,
                 generator: torch.Generator | None = None) -> TeacherTopK:
    """The teacher's most likely tokens per row, from its final hidden states of the valid targets (N, D).

    k_max None (or k): the top-k of every row. k_max > k: k tokens per row on average over the N
    rows, at most k_max in any row, given where they hold the most mass: one probability threshold
    for all N rows, so a confident row (one token holds 99%) keeps a token or two and a row that
    spreads its mass keeps hundreds. Each row keeps at least its top token. For a fixed number of
    kept tokens this leaves the least tail mass in total, and the tail mass bounds what D_K misses
    (section comment above).

    samples > 0: also `samples` tokens per row drawn from the teacher's tail (what is not kept),
    with `generator`, and the tail's Σ p_j log p_j, for D_S (section comment above).

    The tail is computed as the logsumexp of the log-probabilities outside the kept tokens, not as
    1 − Σ kept (which cancels catastrophically when they hold almost all the mass).
    """
    k_max = k if k_max is None else k_max
    if not 0 < k <= k_max <= head_weight.shape[0]:
        raise ValueError(f"need 1 <= k <= k_max <= {head_weight.shape[0]} (the vocabulary), got k = {k}, "
                         f"k_max = {k_max}")
    ids, logp, outside, drawn, plogp = [], [], [], [], []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        z = _at_least_fp32(F.linear(hidden_rows[start:start + chunk_size], head_weight))  # (n, V)
        log_p = torch.log_softmax(z.div_(temperature), dim=-1)
        top = log_p.topk(k_max, dim=-1)                                                 # (n, k_max), sorted
        log_p.scatter_(1, top.indices, -math.inf)                                       # now: outside the k_max
        outside.append(torch.logsumexp(log_p, dim=-1))                                  # (n,)
        if samples:  # draws from outside the k_max candidates (the dropped candidates join below)
            p = log_p.exp()
            plogp.append(torch.xlogy(p, p).sum(-1))
            has = p.sum(-1, keepdim=True) > 0              # k_max = V leaves nothing to draw: draw anything
            drawn.append(torch.multinomial(torch.where(has, p, 1.0), samples, replacement=True, generator=generator))
        ids.append(top.indices)
        logp.append(top.values)
    if not ids:
        empty = hidden_rows.new_empty
        return TeacherTopK(empty((0, k), dtype=torch.long), empty((0, k), dtype=torch.float32),
                           empty((0,), dtype=torch.float32))
    ids, logp, outside = torch.cat(ids), torch.cat(logp), torch.cat(outside)
    if k_max == k:
        if not samples:
            return TeacherTopK(ids, logp, outside)
        return TeacherTopK(ids, logp, outside, None, torch.cat(drawn), torch.cat(plogp))
    # Adaptive: beyond each row's top token, the (k − 1)·N most likely of all the rows' candidates.
    n = logp.shape[0]
    rest = logp[:, 1:].reshape(-1)                                                      # (n·(k_max − 1),)
    chosen = torch.zeros_like(rest, dtype=torch.bool)
    chosen[rest.topk(min((k - 1) * n, rest.numel())).indices] = True
    width = 1 + chosen.view(n, k_max - 1).sum(1)        # rows are sorted, so a row's chosen are a prefix
    w = int(width.max())
    dropped = padding_columns(width, k_max)                                             # (n, k_max)
    # What leaves a row joins its tail: log(exp(outside) + Σ dropped p), then the padding repeats column 0.
    tail = torch.logsumexp(torch.cat([outside[:, None], logp.masked_fill(~dropped, -math.inf)], 1), dim=1)
    tail_draws = tail_plogp = None
    if samples:  # each draw from the whole tail: a dropped candidate with the dropped share of its mass
        p_dropped = logp.exp() * dropped                                                # (n, k_max)
        share = p_dropped.sum(-1) / tail.exp()                                          # (n,)
        has = p_dropped.sum(-1, keepdim=True) > 0
        inside = torch.multinomial(torch.where(has, p_dropped, 1.0), samples, replacement=True, generator=generator)
        take = torch.rand(inside.shape, generator=generator, device=ids.device) < share[:, None]
        tail_draws = torch.where(take, ids.gather(1, inside), torch.cat(drawn))
        tail_plogp = torch.cat(plogp) + torch.xlogy(p_dropped, p_dropped).sum(-1)
    pad = dropped[:, :w]
    ids = torch.where(pad, ids[:, :1], ids[:, :w])
    logp = torch.where(pad, logp[:, :1], logp[:, :w])
    return TeacherTopK(ids, logp, tail, width, tail_draws, tail_plogp)


def _sparse_chunk(z, ids, log_p_k, log_p_tail, width, draws, tail_plogp, y, alpha: float, T: float,
                  kd_weight: float, need_grad: bool):
    """One chunk of α·CE + kd_weight·D_K from the student's logits z (n, V), which it consumes
    (bf16 logits are upcast by the log_softmax that reads them, not by a separate copy).

    ids, log_p_k (n, k), log_p_tail (n,) and width (n,) or None are the cached teacher rows (TeacherTopK),
    y (n,) the targets. A row's padding columns repeat its first token with the same values, so the
    gather and the two scatters below are the same with or without them; only D_K's sum skips them.
    draws (n, s) and tail_plogp (n,), when not None, replace the tail bucket by D_S's draws.
    Returns (ce (n,), div (n,), ∂/∂z of α·CE + kd_weight·D_K (n, V) or None), with s = z / T:

        ∂CE/∂z  = softmax(z) − onehot(y)
        ∂D_K/∂z = (q − r) / T,   q = softmax(s), r = p on K, r_j = q_j · p_tail / q_tail on the tail

    The (n, V) tensors are the cost here, not the matmuls, so it makes few passes over them: one
    log_softmax, one exp in place, one sum for the student's tail mass under D_K (the tail entries of q
    summed directly: no 1 − Σ_K q cancellation, and no second logsumexp), one scale, and at T = 1
    the CE gradient shares q (softmax(z) = q) instead of a second exp. In fp32 the tail mass is
    floored at the smallest normal float (a student that puts under 1e-38 on all 49k tail tokens).
    """
    acc = _at_least_fp32(z[:0]).dtype                                             # bf16 logits are read as fp32
    log_q1 = torch.log_softmax(z, dim=-1, dtype=acc)                              # (n, V) at T = 1, for CE
    ce = -log_q1.gather(1, y[:, None]).squeeze(1)
    log_q = log_q1 if T == 1 else torch.log_softmax(z.to(acc).div_(T), dim=-1)  # (n, V) log q at T
    del z
    log_q_k = log_q.gather(1, ids)                                                # (n, k)
    log_q_s = None if draws is None else log_q.gather(1, draws)                   # (n, s)
    q = log_q.exp_()                                                              # at T = 1 log_q1 is gone too
    q_k = log_q_k.exp()
    p_k = log_p_k.exp()
    terms = (log_p_k - log_q_k).mul_(p_k)                                         # (n, k)
    if width is not None:                                                         # padding counts nothing
        terms.masked_fill_(padding_columns(width, ids.shape[1]), 0.0)
    div = terms.sum(-1)
    p_tail = log_p_tail.exp()                                                     # 0 where nothing is left
    if draws is None:  # D_K: the tail as one bucket, against the student's own tail mass
        q_tail = q.scatter_(1, ids, 0.0).sum(-1)                                  # Σ over the tail of q
        log_q_tail = q_tail.clamp_min(torch.finfo(q.dtype).tiny).log()
        has_tail = log_p_tail > -math.inf                                         # 0·log 0 = 0
        div += torch.where(has_tail, p_tail * (log_p_tail - log_q_tail), 0.0)
        ratio = torch.where(has_tail, (log_p_tail - log_q_tail).exp(), 0.0)       # p_tail / q_tail
    else:              # D_S: the tail by its draws (no pass over q for a tail mass)
        div += tail_plogp - p_tail * log_q_s.mean(-1)
        ratio = torch.zeros_like(p_tail)
    if not need_grad:
        return ce, div, None
    # On the tail q_j − r_j = q_j (1 − p_tail / q_tail) for D_K, q_j for D_S before the draws' −r_j
    # below; on K it is q_i − p_i, written over q's K entries by the scatter.
    c = kd_weight / T                                                             # chain rule through s = z / T
    if T == 1:  # softmax(z) = q: the CE gradient rides on the same tensor
        grad = q.mul_((alpha + c * (1 - ratio))[:, None])
        grad.scatter_(1, ids, alpha * q_k + c * (q_k - p_k))
    else:
        grad = q.mul_((c * (1 - ratio))[:, None])
        grad.scatter_(1, ids, c * (q_k - p_k))
        grad.add_(log_q1.exp_(), alpha=alpha)
    if draws is not None:                                                         # − c·r on the drawn tokens
        grad.scatter_add_(1, draws, (-c / draws.shape[1] * p_tail)[:, None].expand_as(draws))
    grad[torch.arange(len(y), device=y.device), y] -= alpha                      # − α·onehot(y)
    return ce, div, grad


class _ChunkedSparseNeoLoss(torch.autograd.Function):
    """_ChunkedNeoLoss with the teacher's logits replaced by its cached top-k rows (forward KL only)."""

    @staticmethod
    def forward(ctx, hs, ws, ids, log_p_k, log_p_tail, width, draws, tail_plogp, y, alpha, temperature, t2_scale,
                chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        T = temperature
        kd_weight = (1 - alpha) * (T * T if t2_scale else 1.0)
        acc = _at_least_fp32(hs[:0]).dtype
        ce_sum, div_sum, grad_h, grad_w = _sums_and_grads(hs, ws, need_h, need_w, acc)
        for start in range(0, hs.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            z = F.linear(hs[rows], ws)                        # (n, V) student logits, upcast inside
            ce, div, grad_z = _sparse_chunk(z, ids[rows], log_p_k[rows].to(acc), log_p_tail[rows].to(acc),
                                            None if width is None else width[rows],
                                            None if draws is None else draws[rows],
                                            None if tail_plogp is None else tail_plogp[rows].to(acc), y[rows],
                                            alpha, T, kd_weight, need_grad)
            del z
            ce_sum += ce.sum()
            div_sum += div.sum()
            if grad_z is not None:
                _add_chunk_grads(grad_z, rows, hs, ws, grad_h, grad_w, acc)
            del grad_z                                        # freed before the next chunk, as in _ChunkedNeoLoss
        loss = alpha * ce_sum + kd_weight * div_sum
        return _saved(ctx, hs, ws, grad_h, grad_w, loss, ce_sum, div_sum)

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div):
        return *_scaled_grads(ctx, grad_loss), *[None] * 11  # nothing else the forward took has a gradient


def sparse_neo_loss(student_hidden, student_head_weight, teacher: TeacherTopK, labels, *,
                    alpha: float = 0.5, temperature: float = 1.0, t2_scale: bool = True,
                    chunk_size: int | None = 256, normalizer=None, vocab_size: int | None = None,
                    ignore_index: int = IGNORE_INDEX) -> NeoLoss:
    """neo_loss with a cached top-k teacher: α·CE + (1 − α)·T²·D_K(p ‖ q) per valid target, or D_S
    when the rows carry tail draws (teacher.samples).

    student_hidden (B, T, D), student_head_weight (V, D), labels (B, T) as in neo_loss; `teacher`
    holds one row per valid target, in the order of labels[:, 1:][mask] (row-major), made with the
    same temperature. D_K is the forward KL over the top-k buckets plus the tail bucket (section
    comment above: a lower bound of the full KL, equal when k = V). normalizer and chunk_size as in
    neo_loss; the student's logits never exist for more than chunk_size rows at once.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ws = student_head_weight if vocab_size is None else student_head_weight[:vocab_size]
    mask, y = _targets(labels, ws.shape[0], ignore_index)
    if teacher.ids.shape[0] != y.shape[0] or teacher.logp.shape != teacher.ids.shape \
            or teacher.tail_logp.shape != teacher.ids.shape[:1] \
            or (teacher.width is not None and teacher.width.shape != teacher.ids.shape[:1]) \
            or (teacher.samples is not None and (teacher.samples.shape[0] != teacher.ids.shape[0]
                                                 or teacher.tail_plogp is None
                                                 or teacher.tail_plogp.shape != teacher.ids.shape[:1])):
        raise ValueError(f"the cached teacher has {teacher.ids.shape[0]} rows (ids {tuple(teacher.ids.shape)}, "
                         f"logp {tuple(teacher.logp.shape)}, tail {tuple(teacher.tail_logp.shape)}"
                         + "".join(f", {name} {tuple(getattr(teacher, name).shape)}"
                                   for name in ("width", "samples", "tail_plogp") if getattr(teacher, name) is not None)
                         + f") but the batch has {y.shape[0]} valid targets: the cache does not belong to this batch")
    if teacher.ids.device.type == "cpu" and teacher.ids.numel() and teacher.ids.max() >= ws.shape[0]:
        raise ValueError(f"cached token ids reach {int(teacher.ids.max())}, beyond the student's {ws.shape[0]} rows")
    hs = student_hidden[:, :-1][mask]                              # (N, D)
    if not torch.is_grad_enabled():
        hs, ws = hs.detach(), ws.detach()
    n = mask.sum()
    chunk = chunk_size or max(1, hs.shape[0])
    loss_sum, ce_sum, div_sum = _ChunkedSparseNeoLoss.apply(
        hs, ws, teacher.ids.long(), teacher.logp, teacher.tail_logp, teacher.width,
        None if teacher.samples is None else teacher.samples.long(), teacher.tail_plogp, y, alpha, temperature,
        t2_scale, chunk)
    return _normalised(loss_sum, ce_sum, div_sum, n, normalizer)



# ----------------------------------------------------------------------------------------------
# The trained module: the student plus the objective. Wrapping the loss inside forward() lets DDP
# and FSDP2 see one module: FSDP2 gathers the student's LM head for the chunked projection. The
# teacher is held beside it, not inside it: DDP and FSDP2 wrap the student only, and the module's
# state dict (checkpoints, adapters) holds the student's weights only.


def make_trainable(student, args, say=None):
    """What each method trains: sft/kd every weight; neo/lora adapters on the --targets linears, every
    other weight frozen (lora.apply_lora). say: print the trainable count with it (None: silent)."""
    if args.method in ("sft", "kd"):
        student.requires_grad_(True)
        if say is not None:
            n = sum(p.numel() for p in student.parameters())
            say(f"trainable parameters: {n:,} / {n:,} (100%)")
        return student
    return lora.apply_lora(student, targets=tuple(args.targets.split(",")), rank=args.rank, alpha=args.lora_alpha,
                           dropout=args.lora_dropout, variant=args.adapter, verbose=say is not None)


def distill_loss(student_hidden, student_head_weight, labels, *, teacher_hidden=None, teacher_head_weight=None,
                 teacher_topk: "TeacherTopK | None" = None, alpha: float = 0.5, temperature: float = 1.0,
                 divergence: str = "forward_kl", chunk_size: int | None = 256, normalizer=None,
                 vocab_size: int | None = None, ce_mask=None) -> NeoLoss:
    """The one place that picks the loss: against the teacher's cached top-k rows (sparse_neo_loss,
    forward KL) when given, else against its hidden states (neo_loss; CE only without a teacher).
    ce_mask (B, T): where CE counts (neo_loss; a cache holds no rows for sampled replies)."""
    if teacher_topk is not None:
        return sparse_neo_loss(student_hidden, student_head_weight, teacher_topk, labels, alpha=alpha,
                               temperature=temperature, chunk_size=chunk_size, normalizer=normalizer,
                               vocab_size=vocab_size)
    return neo_loss(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels, alpha=alpha,
                    temperature=temperature, divergence=divergence, chunk_size=chunk_size, normalizer=normalizer,
                    vocab_size=vocab_size, ce_mask=ce_mask)


class Distiller(torch.nn.Module):
    """forward(batch) -> NeoLoss: the frozen teacher's hidden states (no_grad, outside any autocast:
    it runs in its own dtype), the student's, and α·CE + (1 − α)·T²·D between them. teacher None:
    sft/lora (CE only), or kd/neo from a teacher cache (pass the rows as teacher_topk). ce_mask:
    where CE counts (False on the student's own sampled replies, which have no ground truth)."""

    def __init__(self, student, teacher=None, alpha=0.5, temperature=1.0, divergence="forward_kl", chunk_size=256,
                 vocab_size=None):
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher  # beside the module, not a submodule (section comment above)
        self.alpha, self.temperature, self.divergence = alpha, temperature, divergence
        self.chunk_size, self.vocab_size = chunk_size, vocab_size

    def forward(self, input_ids, attention_mask, labels, normalizer, document_ids=None, teacher_topk=None,
                ce_mask=None):
        teacher_hidden = None
        if self.teacher is not None and teacher_topk is None:
            with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                teacher_hidden = self.teacher(input_ids, attention_mask, document_ids=document_ids,
                                              return_hidden=True)                                   # (B, T, Dt)
        hidden = self.student(input_ids, attention_mask, document_ids=document_ids, return_hidden=True)  # (B, T, D)
        return distill_loss(hidden, self.student.lm_head.weight, labels, teacher_hidden=teacher_hidden,
                            teacher_head_weight=None if self.teacher is None else self.teacher.lm_head.weight,
                            teacher_topk=teacher_topk, alpha=self.alpha, temperature=self.temperature,
                            divergence=self.divergence, chunk_size=self.chunk_size, normalizer=normalizer,
                            vocab_size=self.vocab_size, ce_mask=ce_mask)

    def generate(self, *args, **kwargs):
        """The student's model.generate (on-policy replies). A method of the wrapped module, so that
        FSDP2 gathers the student's sharded weights for it as it does for forward."""
        return self.student.generate(*args, **kwargs)


@torch.no_grad()
def sampled_tail_se(student_hidden, student_head_weight, teacher: TeacherTopK, labels, *, temperature: float = 1.0,
                    vocab_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> float:
    """The standard error, over the tail draws, of D_S's mean per valid target (the `kl` that
    sparse_neo_loss reports), estimated from the draws themselves.

    Only the tail term of D_S is random: −p_tail · (1/s) Σ_m log q_{j_m}. Its variance per row is
    p_tail² · Var_j(log q_j) / s, estimated by the draws' sample variance; rows are independent, so the
    mean over N rows has variance Σ_rows / N². Held-out sets of a few dozen tokens make this large
    (tests/test_bench.py measures against it); a training step's thousands of tokens make it small.
    """
    if teacher.samples is None or teacher.samples.shape[1] < 2:
        raise ValueError("the cached rows carry fewer than 2 tail draws: D_S's spread cannot be estimated")
    ws = student_head_weight if vocab_size is None else student_head_weight[:vocab_size]
    mask, _ = _targets(labels, ws.shape[0], ignore_index)
    z = F.linear(student_hidden[:, :-1][mask].float(), ws.float()) / temperature          # (N, V)
    log_q_s = torch.log_softmax(z, dim=-1).gather(1, teacher.samples.long())               # (N, s)
    row_var = teacher.tail_logp.float().exp() ** 2 * log_q_s.var(-1) / log_q_s.shape[1]   # (N,)
    return float(row_var.sum().sqrt() / max(1, row_var.shape[0]))
