"""--hidden-weight β: the pruned student's blocks distilled toward the teacher blocks they came from.

First the term itself against its formula written token by token (values and gradients, float64);
then the Distiller's loss and adapter gradients against a plain autograd computation that reads the
blocks' outputs through forward hooks (not through model.forward's hidden_at); β = 0 against the
loss as it was before the term existed, bit for bit; which weights train; 2 ranks = 1 (DDP, ZeRO-1,
FSDP2) and --pack with β > 0; resume; the block map; the refusals; the memory plan.
"""
import json
import re

import pytest
import torch

import lora
import model as llama
import neo
import train
from test_train import EXACT, adapter, base_args, logged, run_cli, single_runs, stop_then_resume
from tolerance import close, close_norm

B, T, D = 3, 7, 8


def random_states(m, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = [torch.randn(B, T, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(m)]
    ht = [torch.randn(B, T, D, generator=g, dtype=dtype) * 5 for _ in range(m)]
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return hs, ht, labels


def by_hand(hs, ht, labels):
    """Σ_t (1/m) Σ_j (1 − a·b / (‖a‖‖b‖)) over the positions t whose next label is a target."""
    total = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            for a_, b_ in zip(hs, ht):
                a, c = a_[b, t], b_[b, t]
                total = total + (1 - (a * c).sum() / (a.pow(2).sum().sqrt() * c.pow(2).sum().sqrt())) / len(hs)
    return total


# In float64 the two sides add the same terms in another order (~1e-16 each, a few dozen terms):
# 1e-12 is 1e3x above that and far below any real error (a wrong mask or weight moves it by >1e-2).
REORDERED = 1e-12


@pytest.mark.exact
def test_the_term_and_its_gradient_are_the_formula_token_by_token():
    hs, ht, labels = random_states(3)
    got = neo.hidden_state_sum(hs, ht, labels)
    grads = torch.autograd.grad(got, hs)
    want = by_hand(hs, ht, labels)
    expected = torch.autograd.grad(want, hs)
    close(got, want, rtol=REORDERED, atol=0)
    for g, e in zip(grads, expected):
        close(g, e, rtol=0, atol=REORDERED)
    assert all(g[0, :2].abs().sum() == 0 for g in grads)  # positions without a target get nothing


def test_the_term_is_the_same_for_any_scale_and_width():
    hs, ht, labels = random_states(2)
    h = neo.hidden_state_sum(hs, ht, labels)
    scaled = neo.hidden_state_sum([3 * x for x in hs], [100 * x for x in ht], labels)
    close(scaled, h, rtol=REORDERED, atol=0)
    wide = neo.hidden_state_sum([x.repeat(1, 1, 4) for x in hs], [x.repeat(1, 1, 4) for x in ht], labels)
    close(wide, h, rtol=REORDERED, atol=0)  # four copies of every coordinate: the same cosines


# ----------------------------------------------------------------------------- the Distiller

def tiny_pair(teacher_dir, dtype=torch.float64, adapter_="lora", keep=(0, 2)):
    teacher = llama.Llama.from_pretrained(teacher_dir, dtype=dtype).requires_grad_(False)
    torch.manual_seed(0)
    student = lora.apply_lora(llama.prune_layers(teacher, list(keep)), rank=4, alpha=8, variant=adapter_,
                              verbose=False)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("lora_B"):  # B = 0 would leave A without gradient
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.05)
    return teacher, student


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (2, 12), generator=g)
    labels = torch.where(torch.rand(2, 12, generator=g) < 0.6, ids, torch.tensor(-100))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels[1, -3:] = -100
    return ids, mask, labels


def block_outputs(model, ids, mask):
    """(logits, [each block's output]) read with forward hooks, independent of forward's hidden_at."""
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out)) for layer in model.model.layers]
    try:
        logits = model(ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


@pytest.mark.exact
@pytest.mark.parametrize("adapter_", ["lora", "moslora"])
def test_distiller_loss_and_adapter_gradients_equal_plain_autograd(adapter_, tiny_teacher_dir):
    beta = 0.7
    teacher, student = tiny_pair(tiny_teacher_dir, adapter_=adapter_)
    ids, mask, labels = batch()
    normalizer = neo.count_targets(labels).double() + 3  # as if other micro-batches counted targets too
    d = neo.Distiller(student, teacher, alpha=0.3, temperature=2.0, chunk_size=5, hidden_weight=beta,
                      teacher_layers=neo.matched_layers(student.config, teacher.config))
    res = d(ids, mask, labels, normalizer)
    res.loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad()
    # The plain way: full logits, reference_loss, and the formula on the hooked blocks' outputs.
    t_logits, t_blocks = block_outputs(teacher, ids, mask)
    s_logits, s_blocks = block_outputs(student, ids, mask)
    ref = neo.reference_loss(s_logits, t_logits, labels, alpha=0.3, temperature=2.0, normalizer=normalizer)
    h = by_hand(s_blocks, [t_blocks[0], t_blocks[2]], labels)
    (ref.loss + beta * h / normalizer).backward()
    want = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    close(res.loss, ref.loss + beta * h / normalizer, rtol=REORDERED, atol=0)
    close(res.hidden_sum, h, rtol=REORDERED, atol=0)
    close_norm(got, want, REORDERED)


def test_zero_weight_is_the_loss_without_the_term_bit_for_bit(tiny_teacher_dir):
    """β = 0 runs the code path that existed before the term: the same loss and gradients, bit for bit,
    as neo_loss on the two models' final hidden states (how the Distiller computed it before)."""
    teacher, student = tiny_pair(tiny_teacher_dir, dtype=torch.float32)
    ids, mask, labels = batch()
    d = neo.Distiller(student, teacher, alpha=0.5, chunk_size=5, hidden_weight=0.0, teacher_layers=[0, 2])
    res = d(ids, mask, labels)
    res.loss.backward()
    got = [p.grad.clone() for p in student.parameters() if p.requires_grad]
    student.zero_grad()
    with torch.no_grad():
        th = teacher(ids, mask, return_hidden=True)
    before = neo.neo_loss(student(ids, mask, return_hidden=True), student.lm_head.weight, th,
                          teacher.lm_head.weight, labels, alpha=0.5, chunk_size=5)
    before.loss.backward()
    assert res.hidden_sum is None and torch.equal(res.loss, before.loss)
    assert all(torch.equal(g, p.grad) for g, p in zip(got, [p for p in student.parameters() if p.requires_grad]))


def test_forward_returns_the_blocks_outputs_and_the_same_logits(tiny_teacher_dir):
    teacher = llama.Llama.from_pretrained(tiny_teacher_dir)
    ids, mask, _ = batch()
    hooked_logits, hooked = block_outputs(teacher, ids, mask)
    logits, states = teacher(ids, mask, hidden_at=[3, 1])
    assert torch.equal(logits, hooked_logits) and torch.equal(teacher(ids, mask), hooked_logits)
    assert torch.equal(states[0], hooked[3]) and torch.equal(states[1], hooked[1])


# ----------------------------------------------------------------------------- the block map

def test_a_pruned_student_records_its_teacher_blocks_and_others_map_evenly(tiny_teacher_dir, tmp_path):
    teacher = llama.Llama.from_pretrained(tiny_teacher_dir)
    pruned = llama.prune_layers(teacher, [0, 2, 3])
    assert neo.matched_layers(pruned.config, teacher.config) == [0, 2, 3]
    assert llama.prune_layers(pruned, [0, 2]).config.pruned_from == [0, 3]  # pruned twice: still the teacher's
    pruned.save_pretrained(tmp_path / "s")  # saved with the student (resume rebuilds the same map)
    assert llama.LlamaConfig.from_json(tmp_path / "s" / "config.json").pruned_from == [0, 2, 3]
    assert "pruned_from" not in json.loads((tiny_teacher_dir / "config.json").read_text())
    other = llama.LlamaConfig(**{**teacher.config.__dict__, "num_hidden_layers": 2, "pruned_from": None})
    assert neo.matched_layers(other, teacher.config) == [1, 3]                        # evenly, last to last
    twelve = llama.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=32)
    assert neo.matched_layers(llama.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=8),
                              twelve) == [3, 7, 11, 15, 19, 23, 27, 31]


# ----------------------------------------------------------------------------- train.py

def test_only_the_adapters_train_and_the_term_is_logged(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, capsys):
    res = train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "2",
                               "--hidden-weight", "1", "--adapter", "moslora"))
    assert "student block j follows teacher block" in capsys.readouterr().out
    base = llama.Llama.from_pretrained(tmp_path / "student_base")
    after = dict(res["student"].named_parameters())
    assert res["optimized"] and all(".lora_" in n for n in res["optimized"])
    for name, p in base.named_parameters():
        assert torch.equal(after[name], p), f"{name}: a frozen base weight changed"
    assert all(after[n].abs().sum() > 0 for n in after if n.endswith("lora_B"))
    assert all(0 < h < 2 for h in logged(tmp_path, "hidden"))  # a mean cosine distance


@pytest.fixture(scope="module")
def hidden_single_run(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    return single_runs(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory, "hidden-single", "--max-steps", "3",
                       "--hidden-weight", "0.5")


@pytest.mark.exact
@pytest.mark.parametrize("zero", ["0", "1", "3"], ids=["ddp", "zero1", "fsdp2-zero3"])
def test_two_processes_equal_one(zero, hidden_single_run, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    one = hidden_single_run("float64")
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "3", "--dtype", "float64",
                          "--hidden-weight", "0.5", "--zero", zero), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    close_norm(adapter(tmp_path), adapter(one), EXACT)  # EXACT: test_train.py says why
    for key in ("loss", "hidden", "grad_norm"):
        close(logged(tmp_path, key), logged(one, key), rtol=EXACT, atol=0)


@pytest.mark.exact
def test_packed_rows_have_the_loss_and_gradients_of_the_documents_alone(tiny_teacher_dir):
    import data
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 14, 5, 20, 7, 11):
        ids = torch.randint(3, 49152, (n,), generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.6, ids, torch.tensor(-100))
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    unpacked = data.Batches(examples, 6, pad_id=0, shuffle=False).collate(examples)
    rows = data.pack(examples, max_len=32, seed=0)
    packed = data.Batches(rows, 1, pad_id=0).collate(list(rows))
    assert packed["input_ids"].shape[0] < 6 and "document_ids" in packed

    def loss_and_grads(b):
        teacher, student = tiny_pair(tiny_teacher_dir)
        d = neo.Distiller(student, teacher, chunk_size=16, hidden_weight=2.0, teacher_layers=[0, 2])
        normalizer = neo.count_targets(b["labels"]).double()
        res = d(b["input_ids"], b["attention_mask"], b["labels"], normalizer, b.get("document_ids"))
        res.loss.backward()
        return res.loss.detach(), res.hidden_sum.detach(), {n: p.grad for n, p in student.named_parameters()
                                                            if p.requires_grad}
    loss_u, h_u, grads_u = loss_and_grads(unpacked)
    loss_p, h_p, grads_p = loss_and_grads(packed)
    close(h_p, h_u, rtol=EXACT, atol=0)
    close(loss_p, loss_u, rtol=EXACT, atol=0)
    close_norm(grads_p, grads_u, EXACT)


def test_a_stopped_run_resumes_exactly(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, monkeypatch):
    args = lambda out, *x: base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--max-steps", "4", "--save-every",
                                     "2", "--hidden-weight", "0.5", *x)
    train.main(args(tmp_path / "whole"))
    stop_then_resume(args, tmp_path / "cut", 2, monkeypatch)
    assert logged(tmp_path / "cut") == logged(tmp_path / "whole")
    assert logged(tmp_path / "cut", "hidden") == logged(tmp_path / "whole", "hidden")
    close_norm(adapter(tmp_path / "cut"), adapter(tmp_path / "whole"), 0)
    with pytest.raises(SystemExit, match="--hidden-weight"):  # the objective must not change on resume
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "cut", "--max-steps", "4",
                             "--save-every", "2", "--resume"))


@pytest.mark.parametrize("extra,why", [
    (["--method", "lora"], "has no teacher: use neo or kd"),
    (["--teacher-cache", "somewhere"], "does not hold .* drop --teacher-cache or --hidden-weight"),
    (["--hidden-weight", "-1"], "must be 0 or more"),
])
def test_refused_with_a_reason(extra, why, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    with pytest.raises(SystemExit, match=why):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--hidden-weight", "1", *extra))


def test_a_student_of_another_width_is_refused(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, smollm2_dir):
    from conftest import make_tiny_llama
    narrow = make_tiny_llama(tmp_path / "narrow", smollm2_dir, layers=2, hidden=16)
    with pytest.raises(SystemExit, match=re.escape("student's are 16 wide and the teacher's 32") +
                       ".*use a student of the teacher's width"):
        args = base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "out", "--student", str(narrow),
                         "--hidden-weight", "1")
        i = args.index("--prune-to")
        train.main(args[:i] + args[i + 2:])


def test_the_plan_counts_the_teachers_states(tiny_teacher_dir):
    """The teacher's states at the matched blocks are alive from its forward to the loss: the planner
    (which measures the real step) sees about m × B × T × D of them more."""
    import plan
    cfg = plan.load_config(tiny_teacher_dir)
    student_cfg = plan.student_config(cfg, prune_to=2)
    peak = lambda w: plan.Planner(cfg, student_cfg).estimate(plan.Setup(hidden_weight=w, batch_size=2, max_len=64, rank=4),
                                                              1, 0).peak
    states = 2 * 2 * 64 * cfg.hidden_size * 4  # two blocks, float32
    assert peak(1.0) - peak(0.0) >= states
