"""Distillation from a teacher cached offline (teacher_cache.py writes the cache, train.py
--teacher-cache reads it): neo.py's chunked loss with the teacher's logits replaced by its top-k
rows. This is this project's extension, not the paper's; neo.py is the paper's loss.

An offline cache cannot keep the teacher's whole distribution (V = 49,152 floats per token is
196 KB). It keeps, per target position, the teacher's k most likely tokens K with their
log-probabilities log p_i at temperature T, and the log of the mass left over,
log p_tail = log(1 − Σ_{i∈K} p_i). The student's distribution is folded the same way: its own
probabilities on K, and one tail bucket q_tail = 1 − Σ_{i∈K} q_i. The loss is the forward KL
between these two (k + 1)-bucket distributions:

    D_K(p ‖ q) = Σ_{i∈K} p_i (log p_i − log q_i)  +  p_tail (log p_tail − log q_tail)

How far this is from the full KL is exact (the chain rule of KL, or the log-sum inequality on
the tail tokens): with p̃, q̃ the two distributions renormalised over the tail tokens,

    KL(p ‖ q) − D_K(p ‖ q) = p_tail · KL(p̃ ‖ q̃)  ≥ 0,

so D_K is a lower bound that is exact when k = V (p_tail = 0), and its error is the teacher's
tail mass times how badly the student matches the shape of the tail. The gradient keeps the
dense loss's form q − r, with the target r = p on K and r_j = p_tail · q_j / q_tail on the tail:
inside the tail the student is pushed to the right total mass, not to a particular shape.

The tail's shape can be kept too, without its 49k numbers: s tokens j_1..j_s drawn from the
teacher's tail p̃ (with replacement), plus one exact number, the tail's Σ_{j∉K} p_j log p_j.
The tail bucket is then replaced by its Monte Carlo form,

    D_S(p ‖ q) = Σ_{i∈K} p_i (log p_i − log q_i)  +  Σ_{j∉K} p_j log p_j  −  p_tail · (1/s) Σ_m log q_{j_m},

whose expectation over the draws is KL(p ‖ q) exactly (E[log q_{j_m}] = Σ_{j∉K} p̃_j log q_j), and so
is its gradient's: q − r with r = p on K and r_j = p_tail · (count of j among the draws) / s on
the tail, an unbiased estimate of p there (Anshumann et al. 2025 show that top-k caches bias
the student and that sampled tokens do not). The price is noise, not bias: s = 32 draws per
token cost 64 bytes, and the noise averages out over the thousands of tokens of a step.

The file: TeacherTopK (the cached rows), teacher_topk (how teacher_cache.py makes them), the
chunked sparse loss and sparse_neo_loss, and CachedDistiller, neo.Distiller's student half
against these rows.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from neo import (IGNORE_INDEX, Distiller, NeoLoss, _add_chunk_grads, _at_least_fp32, _normalised, _saved,
                 _scaled_grads, _sums_and_grads, _targets)


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
    (module docstring).

    samples > 0: also `samples` tokens per row drawn from the teacher's tail (what is not kept),
    with `generator`, and the tail's Σ p_j log p_j, for D_S (module docstring).

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
    def forward(fn_ctx, hs, ws, ids, log_p_k, log_p_tail, width, draws, tail_plogp, y, alpha, temperature,
                t2_scale, chunk_size):
        need_h, need_w = fn_ctx.needs_input_grad[0], fn_ctx.needs_input_grad[1]
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
        return _saved(fn_ctx, hs, ws, grad_h, grad_w, ce_sum, div_sum, alpha, kd_weight)

    @staticmethod
    def backward(fn_ctx, grad_ce, grad_div):
        return *_scaled_grads(fn_ctx, grad_ce, grad_div), *[None] * 11  # nothing else has a gradient


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
    ce_sum, div_sum = _ChunkedSparseNeoLoss.apply(
        hs, ws, teacher.ids.long(), teacher.logp, teacher.tail_logp, teacher.width,
        None if teacher.samples is None else teacher.samples.long(), teacher.tail_plogp, y, alpha, temperature,
        t2_scale, chunk)
    kd_weight = (1 - alpha) * (temperature * temperature if t2_scale else 1.0)
    return _normalised(ce_sum, div_sum, alpha, kd_weight, n, normalizer)


class CachedDistiller(Distiller):
    """neo.Distiller for kd/neo from a teacher cache: no teacher in memory; forward takes the batch's
    cached rows (teacher_rows, one per valid target) and returns sparse_neo_loss against them. The
    cache holds no rows for sampled replies, so ce_mask is not used (the flags forbid --on-policy)."""

    def forward(self, input_ids, attention_mask, labels, normalizer=None, document_ids=None, ce_mask=None,
                teacher_rows: TeacherTopK | None = None):
        hidden = self.student(input_ids, attention_mask, document_ids=document_ids,
                              return_hidden=True)                                       # (B, T, D)
        return sparse_neo_loss(hidden, self.student.lm_head.weight, teacher_rows, labels, alpha=self.alpha,
                               temperature=self.temperature, chunk_size=self.chunk_size,
                               normalizer=normalizer, vocab_size=self.vocab_size)
