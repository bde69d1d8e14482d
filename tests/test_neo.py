"""neo.neo_loss against a naive full-logits reference built from torch.nn.functional.

Random tensors only (no model): values and gradients for every α / T / divergence, chunking,
the shifted mask, empty batches, frozen heads, teacher isolation, vocabulary alignment and the
global normaliser for gradient accumulation.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from neo import count_targets, neo_loss

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


def reference(hs, ws, ht, wt, labels, alpha, temp, divergence, beta=0.5, t2_scale=True):
    """The textbook computation: full logits, F.cross_entropy and F.kl_div, shifted mask."""
    logits = (hs @ ws.T)[:, :-1]                         # (B, T-1, V): position t predicts t+1
    targets = labels[:, 1:]
    mask = targets != -100
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    log_q = F.log_softmax(logits[mask] / temp, dim=-1)
    log_p = F.log_softmax((ht @ wt.T)[:, :-1][mask] / temp, dim=-1)
    if divergence == "forward_kl":
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    elif divergence == "reverse_kl":
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    else:
        log_m = torch.log(beta * log_p.exp() + (1 - beta) * log_q.exp())
        kl = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="sum")
              + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="sum"))
    n = mask.sum()
    scale = temp ** 2 if t2_scale else 1.0
    return (alpha * ce + (1 - alpha) * scale * kl) / n, ce / n, kl / n


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_matches_naive_reference(alpha, temp, divergence):
    hs, ws, ht, wt, labels = make_inputs()
    beta = 0.3
    out = neo_loss(hs, ws, ht, wt, labels, alpha=alpha, temperature=temp, divergence=divergence,
                   beta=beta, chunk_size=5)
    ref, ref_ce, ref_kl = reference(hs, ws, ht, wt, labels, alpha, temp, divergence, beta)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.ce, ref_ce.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kl, ref_kl.detach(), rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads(out.loss, hs, ws), grads(ref, hs, ws)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_matches_reference_in_fp32_without_t2():
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    out = neo_loss(hs, ws, ht, wt, labels, alpha=0.5, temperature=2.0, t2_scale=False, chunk_size=4)
    ref = reference(hs, ws, ht, wt, labels, 0.5, 2.0, "forward_kl", t2_scale=False)[0]
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads(out.loss, hs, ws), grads(ref, hs, ws)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_equals_unchunked(chunk_size):
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    whole = neo_loss(hs, ws, ht, wt, labels, chunk_size=None, divergence="jsd")
    part = neo_loss(hs, ws, ht, wt, labels, chunk_size=chunk_size, divergence="jsd")
    torch.testing.assert_close(part.loss, whole.loss, rtol=1e-6, atol=0)
    for g, g_ref in zip(grads(part.loss, hs, ws), grads(whole.loss, hs, ws)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_ce_only_equals_cross_entropy():
    hs, ws, _, _, labels = make_inputs()
    out = neo_loss(hs, ws, None, None, labels, alpha=0.3)  # alpha ignored without a teacher
    ref = F.cross_entropy((hs @ ws.T)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ref)
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
        torch.testing.assert_close(out.loss, ref)


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    hs, ws, ht, wt, _ = make_inputs()
    labels = torch.full((B, T), -100)
    labels[:, 0] = 5  # position 0 is never a target: nothing valid after the shift
    out = neo_loss(hs, ws, ht, wt, labels)
    assert out.loss.item() == 0 and math.isfinite(out.ce.item()) and out.n_tokens == 0
    g_h, g_w = grads(out.loss, hs, ws)
    assert torch.all(g_h == 0) and torch.all(g_w == 0)


def test_frozen_head_and_teacher_get_no_gradient():
    hs, ws, ht, wt, labels = make_inputs()
    ws.requires_grad_(False)
    ht.requires_grad_(True)   # even a teacher graph left attached receives nothing
    wt.requires_grad_(True)
    neo_loss(hs, ws, ht, wt, labels).loss.backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert ws.grad is None and ht.grad is None and wt.grad is None


def test_global_normalizer_makes_accumulation_exact():
    """Micro-batches normalised by the global count sum to the gradient of the whole batch."""
    hs, ws, ht, wt, labels = make_inputs()
    whole = neo_loss(hs, ws, ht, wt, labels)
    g_whole = grads(whole.loss, hs, ws)
    n_global = count_targets(labels)
    assert n_global == whole.n_tokens
    total = sum(neo_loss(hs[i:i + 1], ws, ht[i:i + 1], wt, labels[i:i + 1], normalizer=n_global).loss
                for i in range(B))
    torch.testing.assert_close(total, whole.loss)
    for g, g_ref in zip(grads(total, hs, ws), g_whole):
        torch.testing.assert_close(g, g_ref)


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
    ref = reference(hs, ws[:shared], ht, wt[:shared], labels, 0.5, 1.0, "forward_kl")[0]
    torch.testing.assert_close(out.loss, ref)
    (g_w,) = grads(out.loss, ws)
    assert torch.all(g_w[shared:] == 0)


def test_bf16_inputs_give_fp32_softmax_close_to_fp32():
    hs, ws, ht, wt, labels = make_inputs(dtype=torch.float32)
    ref = neo_loss(hs, ws, ht, wt, labels).loss
    out = neo_loss(hs.bfloat16(), ws.bfloat16(), ht.bfloat16(), wt.bfloat16(), labels)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=3e-2, atol=0)
