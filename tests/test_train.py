"""train.py end to end on a tiny random teacher: which weights train, data-parallel and sharded runs
equal one process, a killed run resumes exactly, and bad input stops with a clear message."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import model as llama
import train

ROOT = Path(__file__).resolve().parent.parent


def base_args(teacher, data, out, *extra):
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--max-len", "48",
            "--batch-size", "2", "--grad-accum", "2", "--epochs", "1", "--rank", "4", "--prune-to", "2",
            "--heldout", "4", "--no-report", "--lora-dropout", "0", "--lr", "1e-2", *extra]


def run_cli(args, nproc=1, timeout=300):
    """train.py in fresh processes: torchrun (gloo on CPU) when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(launcher + [str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def adapter(out: Path):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_close(a: dict, b: dict, rel=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)
        assert err <= rel, f"{k}: relative difference {err:.2e}"


# ----------------------------------------------------------------------------- which weights train

@pytest.mark.parametrize("method", ["neo", "lora", "kd", "sft"])
def test_each_method_trains_exactly_its_parameters(method, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    res = train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--method", method,
                               "--max-steps", "2"))
    base = llama.Llama.from_pretrained(tmp_path / "student_base")  # the pruned student before training
    after = dict(res["student"].named_parameters())
    if method in ("neo", "lora"):
        assert res["optimized"] and all(".lora_" in n for n in res["optimized"])
        assert set(res["optimized"]) == {n for n in after if ".lora_" in n}
        for name, p in base.named_parameters():
            assert torch.equal(after[name], p), f"{name}: a frozen base weight changed"
        assert all(after[n].abs().sum() > 0 for n in after if n.endswith("lora_B"))  # B moved off zero
    else:
        assert set(res["optimized"]) == {n for n, _ in base.named_parameters()}
        for name, p in base.named_parameters():
            assert not torch.equal(after[name], p), f"{name}: a trained weight did not change"
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    uses_teacher = method in ("neo", "kd")
    assert all((r["kl"] > 0) == uses_teacher for r in rows)  # the KL term is on only for neo and kd
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    # The final folder is an ordinary model: the merged student (or the full one) loads back.
    reloaded = llama.Llama.from_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 5, 9, 200]])
    res["student"].eval()
    torch.testing.assert_close(reloaded(ids), res["student"](ids), atol=1e-4, rtol=0)


def test_adapter_folder_loads_onto_its_base(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    res = train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "2"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = llama.Llama.from_pretrained(config["base_model_name_or_path"])
    lora.load_adapter(base, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 200]])
    res["student"].eval()
    torch.testing.assert_close(base.eval()(ids), res["student"](ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- data parallel

@pytest.fixture(scope="module")
def single_process_run(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    """One process with micro-batch 4: the same global batch as 2 processes x 2."""
    out = tmp_path_factory.mktemp("single")
    args = base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--max-steps", "3")
    args[args.index("--batch-size") + 1] = "4"
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("flags", [["--zero", "0"], ["--zero", "1"], ["--zero", "2"], ["--zero", "3"],
                                   ["--zero", "3", "--grad-checkpoint"]], ids=" ".join)
def test_two_processes_equal_one(flags, single_process_run, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "3", *flags), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_close(adapter(tmp_path), adapter(single_process_run))
    # The last checkpoint holds the same adapter in PEFT's layout, gathered from every rank.
    assert_close(adapter(tmp_path / "checkpoints" / "step-0000003"), adapter(tmp_path), rel=0)
    # Adam hides a wrongly scaled gradient; the logged gradient norm does not.
    for key in ("loss", "grad_norm"):
        one = [json.loads(x)[key] for x in (single_process_run / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(x)[key] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert two == pytest.approx(one, rel=1e-5), key


# ----------------------------------------------------------------------------- kill and resume

def test_killed_run_resumes_exactly(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    args = lambda out, *x: base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--epochs", "3",
                                     "--save-every", "2", "--lora-dropout", "0.1", *x)
    whole = run_cli(args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    total = len((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
    assert total >= 20

    # Start the same run, wait for its second checkpoint, then kill it outright.
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "cut.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(cut)], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not (latest.exists() and latest.read_text() >= "step-0000004") and time.time() < deadline:
        assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'cut.log').read_text()[-2000:]}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "model").exists(), "the run finished before the kill"
    killed_at = len((cut / "metrics.jsonl").read_text().splitlines())
    assert killed_at < total

    resumed = run_cli(args(cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    curve = lambda out: [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert curve(cut) == curve(tmp_path / "whole")  # same steps, same losses, bit for bit
    assert_close(adapter(cut), adapter(tmp_path / "whole"), rel=0)


def test_resume_with_other_flags_is_refused(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1"))
    with pytest.raises(SystemExit, match="--rank=4"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--resume", "--rank", "8"))


def test_resume_without_checkpoint_says_so(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--resume"))


# ----------------------------------------------------------------------------- bad input

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_missing_data_file(tiny_teacher_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        train.main(base_args(tiny_teacher_dir, tmp_path / "nope.jsonl", tmp_path))


def test_unknown_shape_lists_accepted_shapes(tiny_teacher_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", ['{"question": "q", "reply": "a"}'] * 20)
    with pytest.raises(ValueError, match=r"(?s)messages.*conversations.*instruction.*question"):
        train.main(base_args(tiny_teacher_dir, data, tmp_path))


def test_malformed_line_is_named_or_skipped(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, capsys):
    lines = tiny_chat_jsonl.read_text().splitlines()
    data = write_lines(tmp_path / "d.jsonl", lines[:5] + ['{"messages": [broken'] + lines[5:])
    with pytest.raises(ValueError, match="d.jsonl:6: malformed JSON line"):
        train.main(base_args(tiny_teacher_dir, data, tmp_path))
    train.main(base_args(tiny_teacher_dir, data, tmp_path / "ok", "--skip-bad-lines", "--max-steps", "1"))
    assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_conversation_without_assistant_is_skipped_and_counted(tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                               capsys):
    lonely = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    data = write_lines(tmp_path / "d.jsonl", tiny_chat_jsonl.read_text().splitlines() + [lonely] * 3)
    train.main(base_args(tiny_teacher_dir, data, tmp_path, "--max-steps", "1"))
    assert "3 conversations without an assistant reply" in capsys.readouterr().out


def test_empty_data_set(tiny_teacher_dir, tmp_path):
    lonely = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    with pytest.raises(ValueError, match="no usable conversations"):
        train.main(base_args(tiny_teacher_dir, write_lines(tmp_path / "d.jsonl", [lonely] * 4), tmp_path))


def test_rank_larger_than_a_layer(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"rank 64.*k_proj"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--rank", "64",
                             "--targets", "k_proj"))


def test_teacher_and_student_vocabularies_must_match(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    student = tmp_path / "student"
    config = llama.LlamaConfig.from_json(tiny_teacher_dir / "config.json")
    config.vocab_size, config.num_hidden_layers = 32000, 2
    other = llama.Llama(config)
    other.source_dir = str(tiny_teacher_dir)
    other.save_pretrained(student)
    with pytest.raises(SystemExit, match=r"teacher head 49152 rows, student head 32000"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "run", "--student", str(student)))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    # An absurd learning rate blows the weights up within a few steps: a loss turns non-finite.
    with pytest.raises(SystemExit, match=r"non-finite loss at step \d+, micro-batch \d") as stop:
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--method", "sft", "--lr", "1e30",
                             "--grad-clip", "0", "--save-every", "1"))
    bad_step = int(re.search(r"at step (\d+)", str(stop.value)).group(1))
    assert bad_step > 1
    last_good = f"step-{bad_step - 1:07d}"  # saved every step: the one before the bad step is kept
    assert f"the last good checkpoint is {last_good}" in str(stop.value)
    assert (tmp_path / "checkpoints" / "latest").read_text() == last_good
    assert (tmp_path / "checkpoints" / last_good / "state.pt").exists()
    assert not (tmp_path / "model").exists()  # nothing exported from a broken run


def test_report_scores_heldout_and_prints_answers(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, capsys):
    args = [a for a in base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "3", "--alpha", "0")
            if a != "--no-report"]
    train.main(args)
    report = json.loads((tmp_path / "report.json").read_text())
    (ce0, kl0), (ce1, kl1) = report["before"], report["after"]
    assert kl1 < kl0  # three steps on the KL term alone move the student towards the teacher
    printed = capsys.readouterr().out
    assert f"student before training  {ce0:8.4f}   {kl0:8.4f}" in printed
    assert f"student after  training  {ce1:8.4f}   {kl1:8.4f}" in printed
    for name in ("teacher", "student", "trained student"):
        assert f"[{name:>16}]" in printed
    assert printed.count("Q: ") == len(train.PROMPTS)


# ----------------------------------------------------------------------------- activation checkpointing

def test_checkpointed_blocks_give_the_same_gradients_with_less_saved():
    torch.manual_seed(0)
    config = llama.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    m = llama.Llama(config).train()
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 20:] = 0  # padding goes through the recomputation too

    def grads_and_saved_bytes():
        m.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = m(ids, mask).logsumexp(-1).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}, sum(saved)

    plain, plain_bytes = grads_and_saved_bytes()
    names = [n for n, _ in m.named_parameters()]
    train.checkpoint_blocks(m)
    assert [n for n, _ in m.named_parameters()] == names  # Hugging Face names kept
    recomputed, recomputed_bytes = grads_and_saved_bytes()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert recomputed_bytes < plain_bytes / 2


def test_label_outside_the_vocabulary_is_refused_before_training():
    train.check_labels([{"labels": [-100, 3, 99]}], n_rows=100)  # the last row is fine
    with pytest.raises(ValueError, match="token id 100 is outside the model's vocabulary of 100 rows"):
        train.check_labels([{"labels": [-100, 3]}, {"labels": [-100, 100]}], n_rows=100)
