"""neo.neo_loss against neo.reference_loss, and reference_loss against the equation by hand.

Random tensors only (no model). First the reference itself: reference_loss (full logits,
F.cross_entropy, F.kl_div) equals the equation written token by token from log_softmax and sums,
and F.cross_entropy alone when there is no teacher, so the chain test -> reference -> chunked loss
does not rest on neo.py alone. Then neo_loss against it: values and gradients for every
α / T / divergence, chunking, the shifted mask, empty batches, frozen heads, teacher isolation,
vocabulary alignment, the global normaliser for gradient accumulation, and ce_mask (on-policy
rows, whose sampled replies get the divergence only).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from neo import count_targets, neo_loss, reference_loss
from runkit.precision import compiler_found
from tolerance import close, close_norm

B, T, D, DT, V = 3, 9, 16, 24, 50


def make_inputs(seed=0, dtype=torch.float64, vocab_t=V):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, D, generator=g, dtype=dtype, requires_grad=True)
    ws = (torch.randn(V, D, generator=g, dtype=dtype) / 2).requires_grad_()
    ht = torch.randn(B, T, DT, generator=g, dtype=dtype)
    wt = torch.randn(vocab_t, DT, generator=g, dtype=dtype) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    labels[2, 0] = -100
    return hs, ws, ht, wt, labels


def reference(hs, ws, ht, wt, labels, **kw):
    """neo.reference_loss on the full logits the hidden states and heads give."""
    return reference_loss(F.linear(hs, ws), F.linear(ht, wt) if ht is not None else None, labels, **kw)


def by_hand(hs, ws, ht, wt, labels, alpha, temp, divergence, beta=0.5, t2_scale=True, ce_mask=None):
    """The equation in neo.py's docstring, one target at a time, from log_softmax and sums only.
    ce_mask: CE only where it is True; the divergence everywhere. Returns (loss, mean CE, mean D)."""
    zs, zt = hs @ ws.T, ht @ wt.T                          # (B, T, V)
    ce, div, n, n_ce = 0.0, 0.0, 0, 0
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):                # the label at t is predicted at t - 1
            y = labels[b, t]
            if y == -100:
                continue
            n += 1
            if ce_mask is None or ce_mask[b, t]:
                n_ce += 1
                ce = ce - torch.log_softmax(zs[b, t - 1], -1)[y]
            log_q = torch.log_softmax(zs[b, t - 1] / temp, -1)
            log_p = torch.log_softmax(zt[b, t - 1] / temp, -1)
            q, p = log_q.exp(), log_p.exp()
            if divergence == "forward_kl":
                div = div + (p * (log_p - log_q)).sum()
            elif divergence == "reverse_kl":
                div = div + (q * (log_q - log_p)).sum()
            else:
                m = beta * p + (1 - beta) * q
                div = div + beta * (p * (log_p - m.log())).sum() + (1 - beta) * (q * (log_q - m.log())).sum()
    scale = temp ** 2 if t2_scale else 1.0
    return (alpha * ce + (1 - alpha) * scale * div) / n, ce / max(n_ce, 1), div / n


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


# ----------------------------------------------------------------------------- the reference itself

@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temp,t2_scale", [(1.0, True), (2.0, True), (2.0, False)])
def test_reference_loss_is_the_equation_token_by_token(temp, t2_scale, divergence):
    hs, ws, ht, wt, labels = make_inputs()
    kw = dict(alpha=0.3, temp=temp, divergence=divergence, beta=0.3, t2_scale=t2_scale)
    ref = reference(hs, ws, ht, wt, labels, alpha=0.3, temperature=temp, divergence=divergence,
                    beta=0.3, t2_scale=t2_scale)
    assert_is_the_equation(ref, by_hand(hs, ws, ht, wt, labels, **kw), labels, hs, ws)


def assert_is_the_equation(ref, by_hand_terms, labels, hs, ws):
    """reference_loss's loss, CE, divergence and gradients equal the equation written token by token."""
    loss, ce, div = by_hand_terms
    close(ref.loss, loss, rtol=1e-10, atol=1e-12)
    close(ref.ce, ce.detach(), rtol=1e-10, atol=1e-12)
    close(ref.kl, div.detach(), rtol=1e-10, atol=1e-12)
    assert ref.n_tokens == count_targets(labels)
    for g, g_ref in zip(grads(ref.loss, hs, ws), grads(loss, hs, ws)):
        close(g, g_ref, rtol=1e-9, atol=1e-12)


def on_policy_mask():
    """ce_mask of a batch whose row 1 is a sampled reply (no CE anywhere) and where one target of
    row 0 is also left out, so that the chunks below cut through rows of both kinds."""
    ce_mask = torch.ones(B, T, dtype=torch.bool)
    ce_mask[1] = False
    ce_mask[0, 6] = False
    return ce_mask


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_reference_loss_with_ce_mask_is_the_equation_token_by_token(divergence):
    hs, ws, ht, wt, labels = make_inputs()
    ce_mask = on_policy_mask()
    ref = reference(hs, ws, ht, wt, labels, alpha=0.3, temperature=2.0, divergence=divergence, beta=0.3,
                    ce_mask=ce_mask)
    assert_is_the_equation(ref, by_hand(hs, ws, ht, wt, labels, 0.3, 2.0, divergence, beta=0.3, ce_mask=ce_mask),
                           labels, hs, ws)


def test_reference_loss_without_teacher_is_cross_entropy():
    hs, ws, _, _, labels = make_inputs()
    ref = reference(hs, ws, None, None, labels, alpha=0.3)  # alpha ignored without a teacher
    expected = F.cross_entropy((hs @ ws.T)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    close(ref.loss, expected)
    assert ref.kl == 0


# ----------------------------------------------------------------------------- neo_loss against it

@pytest.mark.exact
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_matches_reference_loss(alpha, temp, divergence):
    hs, ws, ht, wt, labels = make_inputs()
    kw = dict(alpha=alpha, temperature=temp, divergence=divergence, beta=0.3)
    out = neo_loss(hs, ws, ht, wt, labels, chunk_size=5, **kw)
    ref = reference(hs, ws, ht, wt, labels, **kw)
    close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    close(out.ce, ref.ce, rtol=1e-10, atol=1e-12)
    close(out.kl, ref.kl, rtol=1e-10, atol=1e-12)
    assert out.n_tokens == ref.n_tokens
    for g, g_ref in zip(grads(out.loss, hs, ws), grads(ref.loss, hs, ws)):
        close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.exact
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [4, 7])
def test_ce_mask_matches_reference_loss(chunk_size, temp, divergence):
    hs, ws, ht, wt, labels = make_inputs()
    kw = dict(alpha=0.4, temperature=temp, divergence=divergence, beta=0.3, ce_mask=on_policy_mask())
    out = neo_loss(hs, ws, ht, wt, labels, chunk_size=chunk_size, **kw)
    ref = reference(hs, ws, ht, wt, labels, **kw)
    close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    close(out.ce, ref.ce, rtol=1e-10, atol=1e-12)
    close(out.kl, ref.kl, rtol=1e-10, atol=1e-12)
    assert out.n_tokens == ref.n_tokens == count_targets(labels)
    for g, g_ref in zip(grads(out.loss, hs, ws), grads(ref.loss, hs, ws)):
        close(g, g_ref, rtol=1e-9, atol=1e-12)
    unmasked = neo_loss(hs, ws, ht, wt, labels, chunk_size=chunk_size, **{**kw, "ce_mask": None})
    assert not torch.allclose(out.loss, unmasked.loss)  # the mask really drops CE terms


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("teacher", [True, False])
def test_ce_mask_all_true_is_no_mask_exactly(teacher, divergence):
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    ht, wt = (ht, wt) if teacher else (None, None)
    everywhere = torch.ones(B, T, dtype=torch.bool)
    for loss, kw in ((neo_loss, dict(chunk_size=5)), (reference, {})):
        kw.update(alpha=0.4, temperature=2.0, divergence=divergence)
        a, b = loss(hs, ws, ht, wt, labels, **kw), loss(hs, ws, ht, wt, labels, ce_mask=everywhere, **kw)
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(a, b))  # hidden_sum: None, no term
        assert all(torch.equal(x, y) for x, y in zip(grads(a.loss, hs, ws), grads(b.loss, hs, ws)))


@pytest.mark.exact
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_ce_mask_all_false_leaves_the_divergence_alone(divergence):
    """Every row sampled: loss = (1 − α)·T²·D·n / normalizer, the divergence keeps its weight."""
    hs, ws, ht, wt, labels = make_inputs()
    alpha, temp, normalizer = 0.3, 2.0, 40
    nowhere = torch.zeros(B, T, dtype=torch.bool)
    for loss in (neo_loss, reference):
        out = loss(hs, ws, ht, wt, labels, alpha=alpha, temperature=temp, divergence=divergence,
                   normalizer=normalizer, ce_mask=nowhere)
        close(out.loss, (1 - alpha) * temp ** 2 * out.kl * out.n_tokens / normalizer,
                                   rtol=1e-12, atol=0)
        assert out.ce == 0 and out.n_tokens == count_targets(labels)


def test_ce_mask_of_the_wrong_shape_is_refused():
    hs, ws, ht, wt, labels = make_inputs()
    for loss in (neo_loss, reference):
        with pytest.raises(ValueError, match=rf"ce_mask must be a bool tensor shaped like labels \({B}, {T}\)"):
            loss(hs, ws, ht, wt, labels, ce_mask=torch.ones(B, T - 1, dtype=torch.bool))
        with pytest.raises(ValueError, match="torch.int64"):
            loss(hs, ws, ht, wt, labels, ce_mask=torch.ones(B, T, dtype=torch.long))


def test_matches_reference_in_fp32_without_t2():
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    kw = dict(alpha=0.5, temperature=2.0, t2_scale=False)
    out = neo_loss(hs, ws, ht, wt, labels, chunk_size=4, **kw)
    ref = reference(hs, ws, ht, wt, labels, **kw).loss
    close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads(out.loss, hs, ws), grads(ref, hs, ws)):
        close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_equals_unchunked(chunk_size):
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    whole = neo_loss(hs, ws, ht, wt, labels, chunk_size=None, divergence="jsd")
    part = neo_loss(hs, ws, ht, wt, labels, chunk_size=chunk_size, divergence="jsd")
    close(part.loss, whole.loss, rtol=1e-6, atol=0)
    for g, g_ref in zip(grads(part.loss, hs, ws), grads(whole.loss, hs, ws)):
        close(g, g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not compiler_found(torch.device("cpu"))[0], reason="torch.compile's inductor needs a C++ compiler")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_compiled_chunks_equal_eager(divergence):
    """compiled=True (train.py --compile) runs each chunk's arithmetic through torch.compile: the same
    loss and gradients as eager in fp32, up to the order inductor sums in (u = 2^-24 per rounding over
    V = 50 terms; bound 1e-5 relative), at T = 1 and 2, with a ce_mask, without a teacher, and on a
    last chunk shorter than the others (a second shape). Dropping a term moves the loss by O(1)."""
    torch._dynamo.reset()
    for temp, ce_mask, teacher in [(1.0, None, True), (2.0, on_policy_mask(), True), (1.0, None, False)]:
        hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
        ht, wt = (ht, wt) if teacher else (None, None)
        kw = dict(alpha=0.5, temperature=temp, divergence=divergence, chunk_size=7, ce_mask=ce_mask)
        eager, compiled = (neo_loss(hs, ws, ht, wt, labels, compiled=c, **kw) for c in (False, True))
        close(compiled.loss, eager.loss, rtol=1e-5, atol=0)
        close(torch.stack([compiled.ce, compiled.kl]), torch.stack([eager.ce, eager.kl]), rtol=1e-5, atol=1e-6)
        for g, g_ref in zip(grads(compiled.loss, hs, ws), grads(eager.loss, hs, ws)):
            close_norm(g, g_ref, 1e-5)


def test_ce_only_equals_cross_entropy():
    hs, ws, _, _, labels = make_inputs()
    out = neo_loss(hs, ws, None, None, labels, alpha=0.3)  # alpha ignored without a teacher
    ref = F.cross_entropy((hs @ ws.T)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    close(out.loss, ref)
    assert out.kl == 0


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_mask_is_shifted_by_one(alpha):
    """Only the hidden state at t - 1 may receive gradient for a label at t (CE and KL alike).

    The paper's reference code masks the KL with unshifted labels, which would put the gradient
    on position t instead; this pins the alignment.
    """
    hs, ws, ht, wt, _ = make_inputs()
    labels = torch.full((B, T), -100)
    labels[0, 3], labels[1, 1], labels[2, T - 1] = 7, 8, 9
    out = neo_loss(hs, ws, ht, wt, labels, alpha=alpha)
    (g,) = grads(out.loss, hs)
    touched = g.abs().sum(-1) > 0
    expected = torch.zeros(B, T, dtype=torch.bool)
    expected[0, 2] = expected[1, 0] = expected[2, T - 2] = True
    assert torch.equal(touched, expected)
    assert out.n_tokens == 3
    if alpha == 1.0:  # the value too: CE of position 2 predicting token 7, etc.
        logp = torch.log_softmax(hs @ ws.T, -1)
        ref = -(logp[0, 2, 7] + logp[1, 0, 8] + logp[2, T - 2, 9]) / 3
        close(out.loss, ref)


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    hs, ws, ht, wt, _ = make_inputs()
    labels = torch.full((B, T), -100)
    labels[:, 0] = 5  # position 0 is never a target: nothing valid after the shift
    for out in (neo_loss(hs, ws, ht, wt, labels), reference(hs, ws, ht, wt, labels)):
        assert out.loss.item() == 0 and math.isfinite(out.ce.item()) and out.n_tokens == 0
        g_h, g_w = grads(out.loss, hs, ws)
        assert torch.all(g_h == 0) and torch.all(g_w == 0)


def test_frozen_head_and_teacher_get_no_gradient():
    hs, ws, ht, wt, labels = make_inputs()
    ws.requires_grad_(False)
    ht.requires_grad_(True)   # even a teacher graph left attached receives nothing
    wt.requires_grad_(True)
    for loss in (neo_loss, reference):
        loss(hs, ws, ht, wt, labels).loss.backward()
        assert hs.grad is not None and hs.grad.abs().sum() > 0
        assert ws.grad is None and ht.grad is None and wt.grad is None
        hs.grad = None


@pytest.mark.exact
def test_global_normalizer_makes_accumulation_exact():
    """Micro-batches normalised by the global count sum to the gradient of the whole batch."""
    hs, ws, ht, wt, labels = make_inputs()
    whole = neo_loss(hs, ws, ht, wt, labels)
    g_whole = grads(whole.loss, hs, ws)
    n_global = count_targets(labels)
    assert n_global == whole.n_tokens
    total = sum(neo_loss(hs[i:i + 1], ws, ht[i:i + 1], wt, labels[i:i + 1], normalizer=n_global).loss
                for i in range(B))
    close(total, whole.loss)
    for g, g_ref in zip(grads(total, hs, ws), g_whole):
        close(g, g_ref)
    micro = neo_loss(hs[:1], ws, ht[:1], wt, labels[:1], normalizer=n_global).loss
    close(micro, reference(hs[:1], ws, ht[:1], wt, labels[:1], normalizer=n_global).loss)


def test_unknown_divergence_is_named():
    hs, ws, ht, wt, labels = make_inputs()
    for loss in (neo_loss, reference):
        with pytest.raises(ValueError, match="'kl'"):
            loss(hs, ws, ht, wt, labels, divergence="kl")


def test_vocab_mismatch_error_names_both_sizes():
    hs, ws, ht, wt, labels = make_inputs(vocab_t=V + 14)
    with pytest.raises(ValueError, match=rf"{V + 14}.*{V}"):
        neo_loss(hs, ws, ht, wt, labels)
    with pytest.raises(ValueError, match=str(V + 14)):
        neo_loss(hs, ws, ht, wt, labels, vocab_size=V + 1)


def test_vocab_padding_rows_are_truncated_to_shared_size():
    hs, ws, ht, wt, labels = make_inputs(vocab_t=V + 14)
    shared = V - 2
    labels = labels.clamp(max=shared - 1).masked_fill(labels == -100, -100)
    out = neo_loss(hs, ws, ht, wt, labels, vocab_size=shared)
    ref = reference(hs, ws, ht, wt, labels, vocab_size=shared)   # logits of V and V + 14 columns
    close(out.loss, ref.loss)
    close(out.loss, reference(hs, ws[:shared], ht, wt[:shared], labels).loss)
    (g_w,) = grads(out.loss, ws)
    assert torch.all(g_w[shared:] == 0)


def test_bf16_inputs_give_fp32_softmax_close_to_fp32():
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    ref = neo_loss(hs, ws, ht, wt, labels).loss
    out = neo_loss(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), labels)
    assert out.loss.dtype == torch.float32
    close(out.loss, ref, rtol=3e-2, atol=0)


def test_the_chunked_sums_refuse_a_mix_other_than_their_own():
    """neo_loss's chunked Function folds the gradient of α·CE + (1 − α)·T²·D in its forward, so its
    two sums carry that gradient only when mixed with those weights (train.py's α-mix): backpropagating
    another mix must fail, not train on a wrong gradient."""
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ws, wt = torch.randn(11, 8, generator=g, dtype=torch.float64), torch.randn(11, 8, generator=g, dtype=torch.float64)
    ht = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    res = neo_loss(hs, ws, ht, wt, labels, alpha=0.3, temperature=2.0)
    grad_ours, = torch.autograd.grad(0.3 * res.ce_sum + 0.7 * 4.0 * res.kl_sum, hs, retain_graph=True)
    grad_res, = torch.autograd.grad(res.loss * res.n_tokens, hs, retain_graph=True)
    close(grad_ours, grad_res, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="must be mixed as"):
        torch.autograd.grad(res.ce_sum + res.kl_sum, hs)
