"""plan.py's memory model against the allocator, at toy size (issue 10).

The plan runs a step on fake tensors built from config.json; the measurement runs the same step on
real tensors and reads the allocator's peak (benchmarks/memory.py: the profiler's memory events on
the CPU). They must agree within 10% for every method, and the ledger's components must add up to
the measured peak within 5%.
"""
import argparse
import json
from pathlib import Path

import pytest
import torch

import model as llama
import plan
from benchmarks import memory
from tolerance import close

TEACHER = llama.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=True)
STUDENT = plan.student_config(TEACHER)  # train.py's default: half the layers
CPU = torch.device("cpu")


def measured(setup):
    teacher, distiller, optimizer, batch = plan.build(setup, TEACHER, STUDENT, fake=False)

    def run():
        plan.training_step(distiller, optimizer, batch, setup.autocast)
    run()  # AdamW's state exists from here on, as in every step but the first
    return memory.measure(run, teacher, distiller.student, optimizer, CPU)


@pytest.mark.parametrize("method,adapter,ckpt,bf16", [
    ("sft", "lora", False, False), ("lora", "lora", False, False), ("kd", "lora", False, False),
    ("neo", "lora", False, False), ("neo", "moslora", False, False), ("kd", "lora", True, False),
    ("neo", "lora", True, True), ("kd", "lora", False, True)])
def test_plan_predicts_the_measured_peak(method, adapter, ckpt, bf16):
    setup = plan.Setup(method=method, adapter=adapter, rank=8, batch_size=2, max_len=96, chunk_size=64,
                       grad_checkpoint=ckpt, frozen_dtype=torch.bfloat16 if bf16 else torch.float32, autocast=bf16)
    m = measured(setup)
    predicted, parts, _ = plan.ledger_of_step(setup, TEACHER, STUDENT, fake=True).peak()
    peak = m["measured_peak_bytes"]
    assert abs(sum(m["components_bytes"].values()) - peak) <= 0.05 * peak, memory.breakdown_line(m)
    assert abs(predicted - peak) <= 0.10 * peak, (predicted, memory.breakdown_line(m))
    assert m["components_bytes"]["optimizer state"] > 0


def test_plan_predicts_hf_peft_baseline(tiny_teacher_dir):
    from benchmarks import peers
    args = argparse.Namespace(rank=4, lora_alpha=8.0, lora_dropout=0.0, grad_checkpoint=False, batch_size=2,
                              max_len=64, chunk_size=256, dtype="float32", compile=False)
    step, _, parts = peers.hf_peft(args, tiny_teacher_dir, tiny_teacher_dir, CPU)
    ids = torch.randint(0, 49152, (2, 64))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    step(batch)
    m = memory.measure(lambda: step(batch), *parts, CPU)
    p = memory.predict("hf-peft-neo", args, tiny_teacher_dir, tiny_teacher_dir, CPU)
    assert abs(p["predicted_peak_bytes"] - m["measured_peak_bytes"]) <= 0.10 * m["measured_peak_bytes"]


def test_saved_activations_are_what_autograd_saves():
    """The ledger's 'saved activations' (student-forward storages alive when the loss starts) are the
    storages torch.autograd.graph.saved_tensors_hooks sees packed, plus the student's output."""
    setup = plan.Setup(method="lora", rank=8, batch_size=2, max_len=64)
    teacher, distiller, optimizer, batch = plan.build(setup, TEACHER, STUDENT, fake=False)
    weights = {p.untyped_storage().data_ptr() for p in [*distiller.parameters(), *distiller.buffers()]}
    packed, out, during = {}, {}, []

    def pack(t):  # what autograd keeps for backward during the student's forward (not the loss's own)
        st = t.untyped_storage()
        if during and st.data_ptr() not in weights and st.data_ptr() != batch["input_ids"].untyped_storage().data_ptr():
            packed[st.data_ptr()] = st.nbytes()
        return t

    def keep_size(module, args, output):  # returns None: the output is left alone
        out["bytes"] = output.untyped_storage().nbytes()
        during.clear()
    distiller.student.register_forward_pre_hook(lambda *_: during.append(1))
    distiller.student.register_forward_hook(keep_size)
    with plan.Ledger(None, distiller.student, optimizer) as ledger, \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plan.training_step(distiller, optimizer, batch, False)
    saved = sum(ledger.size[k] for k in ledger.saved)
    assert saved == sum(packed.values()) + out["bytes"]


def test_sharding_divides_what_the_engines_divide():
    setup = plan.Setup(method="kd", rank=8, batch_size=2, max_len=64)
    ledger = plan.ledger_of_step(setup, TEACHER, STUDENT, fake=True)
    one, one_parts, _ = plan.per_gpu(ledger, 1, 0)
    ddp, ddp_parts, _ = plan.per_gpu(ledger, 4, 0)
    z1, z1_parts, _ = plan.per_gpu(ledger, 4, 1)
    z3, z3_parts, _ = plan.per_gpu(ledger, 4, 3)
    trainable = one_parts["trainable weights"]
    close(ddp, one + trainable, rtol=1e-6, atol=0)       # DDP: + its gradient buckets
    close(ddp_parts["sharding buffers"], trainable, rtol=1e-6, atol=0)
    close(z1_parts["optimizer state"], one_parts["optimizer state"] / 4, rtol=1e-6, atol=0)
    close(z3_parts["trainable weights"], trainable / 4, rtol=1e-6, atol=0)
    assert z3 < z1 < ddp


def test_train_plan_reads_configs_only(tiny_teacher_dir, monkeypatch, capsys):
    import train
    monkeypatch.setattr(llama.Llama, "from_pretrained", lambda *a, **k: pytest.fail("--plan loaded weights"))
    train.main(["--plan", "2", "--zero", "1", "--teacher", str(tiny_teacher_dir), "--method", "kd",
                "--gpu-memory", "80", "--max-len", "64"])
    text = capsys.readouterr().out
    assert "plan: kd, 2 GPUs --zero 1, batch 4 x 64" in text and "fits a 80 GiB GPU" in text


def test_plan_suggests_a_flag_that_fits():
    planner = plan.Planner(TEACHER, STUDENT)
    setup = plan.Setup(method="kd", rank=8, batch_size=4, max_len=128)
    base = planner.estimate(setup, world=4, zero=0)
    gib = (base.peak * 0.8 / plan.HEADROOM + plan.CUDA_CONTEXT) / plan.GiB  # 80% of what it needs
    fix = planner.make_it_fit(setup, 4, 0, gib)
    assert fix is not None and fix.peak <= plan.usable(gib) < base.peak
    assert plan.flags_of(fix, base)


@pytest.mark.parametrize("bad, message", [
    (["--world-size", "0"], "--world-size 0: must be 1 or more"),
    (["--gpu-memory", "0"], "--gpu-memory 0.0: is the memory of one GPU"),
    (["--rank", "0"], "--rank 0: must be 1 or more"),
    (["--max-len", "1"], "--max-len 1: must be 2 or more"),
    (["--prune-to", "30"], "--prune-to 30: the teacher has 4 layers"),
    (["--teacher", "{missing}"], "error: {missing}: not a config.json, a model folder nor a Hub id"),
    (["--teacher", "{broken}"], "error: {broken}: config.json is not readable JSON"),
    (["--student", "{broken}"], "error: {broken}: config.json is not readable JSON")])
def test_plan_cli_names_bad_input_without_a_traceback(bad, message, tmp_path):
    import subprocess
    import sys
    teacher, broken = tmp_path / "teacher.json", tmp_path / "broken.json"
    teacher.write_text(json.dumps(TEACHER.to_hf()))
    broken.write_text('{"hidden_size": 64,')
    names = {"missing": tmp_path / "nope.json", "broken": broken}
    bad = [b.format(**names) for b in bad]
    proc = subprocess.run([sys.executable, str(Path(plan.__file__)), "--teacher", str(teacher), *bad],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message.format(**names) in proc.stderr
