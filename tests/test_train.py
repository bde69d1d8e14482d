"""train.py end to end on a tiny random teacher: which weights train, data-parallel and sharded runs
equal one process, a killed run resumes exactly, and bad input stops with a clear message."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
import model as llama
import train
from runkit import adapters, checkpoint, flags, precision, report, tokenized
from tolerance import close, close_norm

ROOT = Path(__file__).resolve().parent.parent


def base_args(teacher, data, out, *extra):
    """A tiny run in float32, so that the equalities below are exact on any CPU (a later --dtype in
    `extra` wins: argparse keeps the last; test_precision.py reruns some of them in bfloat16), eager
    (test_precision.py checks that the compiled step computes the same)."""
    return ["--teacher", str(teacher), "--data", str(data), "--out", str(out), "--max-len", "48",
            "--batch-size", "2", "--grad-accum", "2", "--epochs", "1", "--rank", "4", "--prune-to", "2",
            "--heldout", "4", "--no-report", "--lora-dropout", "0", "--lr", "1e-2", "--dtype", "float32",
            "--compile", "off", *extra]


def run_cli(args, nproc=1, timeout=300):
    """train.py in fresh processes: torchrun (gloo on CPU) when nproc > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(launcher + [str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def adapter(out: Path):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def logged(out: Path, key="loss"):
    return [json.loads(x)[key] for x in (out / "metrics.jsonl").read_text().splitlines()]


# Two runs that are equal mathematically (2 ranks and 1) run in float64 and agree to EXACT. Their float64
# difference is ~1e-15 (7.6e-16 measured for 3 steps): the reductions of 2 ranks only reorder additions,
# each off by ~1e-16, and Adam amplifies that ~50x where a gradient is near 0. 1e-10 leaves 1e5x for
# any CPU's kernels, and still fails on a real bug (a wrong scale or a lost row moves the result by >1e-3).
EXACT = 1e-10


def twin_tolerance(fp32: Path, fp64: Path, key=None):
    """The tolerance a float32 twin of an exact comparison gets: 10x how far the float32 run lies from
    the float64 run of the same flags (or a bf16 run from the float32 one: the same reasoning one
    precision down). Two float32 runs that reduce in another order each lie about that far from the
    exact result, so they differ by ~2x it; 10x leaves 5x for a CPU that rounds worse, and it is
    measured on the CPU running the test, not fixed from the last digits one machine printed.
    Floored at 10 float32 units (1.2e-6): a loss is a sum over hundreds of tokens, so two float32 runs
    can differ by several units even where this one run landed within one unit of float64 by luck
    (measured: 8 units between 2 ranks and 1 on-policy, where the float32-float64 gap was 1)."""
    if key is None:
        a, b = adapter(fp32), adapter(fp64)
        gap = max(((a[k].double() - b[k]).norm() / b[k].norm()).item() for k in b)
    else:
        gap = max(abs(x - y) / abs(y) for x, y in zip(logged(fp32, key), logged(fp64, key)) if y)
    return 10 * max(gap, FLOAT32_FLOOR)


FLOAT32_FLOOR = 10 * torch.finfo(torch.float32).eps


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
    assert all(0 < r["mfu"] < 10 for r in rows)  # runkit/mfu.py's FLOPs over a probed peak (its count: test_bench)
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    # The final folder is an ordinary model: the merged student (or the full one) loads back.
    reloaded = llama.Llama.from_pretrained(tmp_path / "model")
    ids = torch.tensor([[1, 5, 9, 200]])
    res["student"].eval()
    close(reloaded(ids), res["student"](ids), atol=1e-4, rtol=0)


def test_adapter_folder_loads_onto_its_base(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    res = train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "2"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = llama.Llama.from_pretrained(config["base_model_name_or_path"])
    adapters.load_adapter(base, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 200]])
    res["student"].eval()
    close(base.eval()(ids), res["student"](ids), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- data parallel

@pytest.fixture(scope="module")
def single_process_run(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    """One process with micro-batch 4: the same global batch as 2 processes x 2. dtype -> its folder."""
    return single_runs(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory, "single", "--max-steps", "3")


def single_runs(teacher, data, tmp_path_factory, name, *flags):
    """dtype -> the folder of one run of `flags` with micro-batch 4, each dtype trained once, on first use."""
    runs = {}

    def run(dtype):
        if dtype not in runs:
            out = tmp_path_factory.mktemp(f"{name}-{dtype}")
            args = base_args(teacher, data, out, *flags, "--dtype", dtype)
            args[args.index("--batch-size") + 1] = "4"
            r = run_cli(args)
            assert r.returncode == 0, r.stderr[-3000:]
            runs[dtype] = out
        return runs[dtype]
    return run


@pytest.mark.exact
@pytest.mark.parametrize("flags", [["--zero", "0"], ["--zero", "1"], ["--zero", "2"], ["--zero", "3"],
                                   ["--zero", "3", "--grad-checkpoint"]], ids=" ".join)
def test_two_processes_equal_one(flags, single_process_run, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    one = single_process_run("float64")
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "3", "--dtype", "float64",
                          *flags), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    close_norm(adapter(tmp_path), adapter(one), EXACT)
    # The last checkpoint holds the same adapter in PEFT's layout, gathered from every rank.
    close_norm(adapter(tmp_path / "checkpoints" / "step-0000003"), adapter(tmp_path), 0)
    # Adam hides a wrongly scaled gradient; the logged gradient norm does not.
    for key in ("loss", "grad_norm"):
        close(logged(tmp_path, key), logged(one, key), rtol=EXACT, atol=0)


@pytest.mark.parametrize("zero", ["1", "3"], ids=["zero1", "fsdp2-zero3"])
def test_two_processes_equal_one_in_float32(zero, single_process_run, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """The float32 twin: what users run, within 10x the float32 run's own distance from float64."""
    one, exact = single_process_run("float32"), single_process_run("float64")
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "3", "--zero", zero), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    close_norm(adapter(tmp_path), adapter(one), twin_tolerance(one, exact))
    for key in ("loss", "grad_norm"):
        close(logged(tmp_path, key), logged(one, key), rtol=twin_tolerance(one, exact, key), atol=0)


# ----------------------------------------------------------------------------- kill and resume

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_killed_run_resumes_exactly(dtype, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    # bfloat16: the bf16 frozen base is rebuilt from the same weights on resume, and bf16 arithmetic
    # is as deterministic as fp32, so the resumed run must again match bit for bit.
    args = lambda out, *x: base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--epochs", "3",
                                     "--save-every", "2", "--lora-dropout", "0.1", "--dtype", dtype, *x)
    whole = run_cli(args(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    total = len((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
    assert total >= 20

    # The same run, killed outright (SIGKILL, no clean-up) once it has logged step 5: after its second
    # checkpoint (step 4) and one step past it, so that the resume also redoes a logged step. The kill
    # comes from inside the run at that step, not from a poller racing it, so load cannot move it.
    cut = tmp_path / "cut"
    kill_at_step_5 = ("import os, signal, sys, train\n"
                      "from runkit import report\n"
                      "log_step = report.log_step\n"
                      "def log_then_die(row, *rest):\n"
                      "    log_step(row, *rest)\n"
                      "    if row['step'] == 5:\n"
                      "        os.kill(os.getpid(), signal.SIGKILL)\n"
                      "report.log_step = log_then_die\n"
                      "train.main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", kill_at_step_5, *args(cut)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert not (cut / "model").exists()
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 5 < total

    resumed = run_cli(args(cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    curve = lambda out: [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert curve(cut) == curve(tmp_path / "whole")  # same steps, same losses, bit for bit
    close_norm(adapter(cut), adapter(tmp_path / "whole"), 0)


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
        train.main(base_args(tiny_teacher_dir, data, tmp_path / "run"))


def test_malformed_line_is_named_or_skipped(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, capsys):
    lines = tiny_chat_jsonl.read_text().splitlines()
    data = write_lines(tmp_path / "d.jsonl", lines[:5] + ['{"messages": [broken'] + lines[5:])
    with pytest.raises(ValueError, match="d.jsonl:6: malformed JSON line"):
        train.main(base_args(tiny_teacher_dir, data, tmp_path / "run"))
    train.main(base_args(tiny_teacher_dir, data, tmp_path / "ok", "--skip-bad-lines", "--max-steps", "1"))
    assert "skipped 1 malformed lines" in capsys.readouterr().out


def test_conversation_without_assistant_is_skipped_and_counted(tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                               capsys):
    lonely = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    data = write_lines(tmp_path / "d.jsonl", tiny_chat_jsonl.read_text().splitlines() + [lonely] * 3)
    train.main(base_args(tiny_teacher_dir, data, tmp_path / "run", "--max-steps", "1"))
    assert "3 conversations without an assistant reply" in capsys.readouterr().out


def test_empty_data_set(tiny_teacher_dir, tmp_path):
    lonely = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    with pytest.raises(ValueError, match="no usable conversations"):
        train.main(base_args(tiny_teacher_dir, write_lines(tmp_path / "d.jsonl", [lonely] * 4), tmp_path / "run"))


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
        args = base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "run", "--student", str(student))
        i = args.index("--prune-to")
        train.main(args[:i] + args[i + 2:])  # --student and --prune-to together are refused


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
    scores = json.loads((tmp_path / "report.json").read_text())
    (ce0, kl0), (ce1, kl1) = scores["before"], scores["after"]
    assert kl1 < kl0  # three steps on the KL term alone move the student towards the teacher
    printed = capsys.readouterr().out
    assert f"student before training  {ce0:8.4f}   {kl0:8.4f}" in printed
    assert f"student after  training  {ce1:8.4f}   {kl1:8.4f}" in printed
    close(scores["kl_recovered"], 1 - kl1 / kl0, rtol=1e-6, atol=0)  # the share of the KL gap training closed
    assert f"KL recovered: {100 * (1 - kl1 / kl0):.1f}%" in printed
    for name in ("teacher", "student", "trained student"):
        assert f"[{name:>16}]" in printed
    assert printed.count("Q: ") == len(report.PROMPTS)


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
    precision.checkpoint_blocks(m)
    assert [n for n, _ in m.named_parameters()] == names  # Hugging Face names kept
    recomputed, recomputed_bytes = grads_and_saved_bytes()
    for name in plain:
        close(recomputed[name], plain[name], rtol=0, atol=1e-6, msg=name)
    assert recomputed_bytes < plain_bytes / 2


def test_label_outside_the_vocabulary_is_refused_before_training():
    tokenized.check_labels([{"labels": [-100, 3, 99]}], n_rows=100)  # the last row is fine
    with pytest.raises(ValueError, match="token id 100 is outside the model's vocabulary of 100 rows"):
        tokenized.check_labels([{"labels": [-100, 3]}, {"labels": [-100, 100]}], n_rows=100)


# ----------------------------------------------------------------------------- packing

@pytest.mark.exact
def test_packed_batch_has_the_loss_and_gradients_of_the_documents_unpacked(tiny_teacher_dir):
    """Teacher and student both see packed rows with document_ids: the neo loss (normalised by real
    targets) and the adapter gradients equal those of the same documents, one per padded row. In float64
    to EXACT; then in float32 within 10x float32's own distance from float64 (see float32_tolerance)."""
    import data
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 14, 5, 20, 7, 11):
        ids = torch.randint(3, 49152, (n,), generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.6, ids, torch.tensor(-100))
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    unpacked = data.Batches(examples, 6, pad_id=0, shuffle=False).collate(examples)
    packed_rows = data.pack(examples, max_len=32, seed=0)
    packed = data.Batches(packed_rows, 1, pad_id=0).collate([packed_rows[j] for j in range(len(packed_rows))])
    assert packed["input_ids"].shape[0] < 6 and "document_ids" in packed

    def loss_and_grads(b, dtype):
        teacher = llama.Llama.from_pretrained(tiny_teacher_dir, dtype=dtype).requires_grad_(False)
        torch.manual_seed(0)  # the same adapters A each time
        student = lora.apply_lora(llama.prune_layers(teacher, [0, 2]), rank=4, alpha=8, verbose=False)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name.endswith("lora_B"):  # B = 0 would leave A without gradient
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        distiller = import_neo().Distiller(student, teacher, alpha=0.5, temperature=2.0, divergence="forward_kl",
                                           chunk_size=16)
        normalizer = import_neo().count_targets(b["labels"]).to(dtype)
        res = distiller(b["input_ids"], b["attention_mask"], b["labels"], normalizer, b.get("document_ids"))
        res.loss.backward()
        return res.loss.detach(), normalizer, {n: p.grad for n, p in student.named_parameters() if p.requires_grad}

    loss_u, n_u, grads_u = loss_and_grads(unpacked, torch.float64)
    loss_p, n_p, grads_p = loss_and_grads(packed, torch.float64)
    assert n_u == n_p  # the same real target tokens
    close(loss_p, loss_u, rtol=EXACT, atol=0)
    close_norm(grads_p, grads_u, EXACT)

    loss_u32, _, grads_u32 = loss_and_grads(unpacked, torch.float32)
    loss_p32, _, grads_p32 = loss_and_grads(packed, torch.float32)
    loss_gap = (abs(loss_u32.double() - loss_u) / loss_u).item()
    grad_gap = max(((grads_u32[k].double() - grads_u[k]).norm() / grads_u[k].norm()).item() for k in grads_u)
    close(loss_p32, loss_u32, rtol=10 * max(loss_gap, FLOAT32_FLOOR), atol=0)
    close_norm(grads_p32, grads_u32, 10 * max(grad_gap, FLOAT32_FLOOR))


def import_neo():
    import neo
    return neo


def stop_then_resume(args, out, step, monkeypatch):
    """train.main(args(out)) stopped right after its checkpoint of `step` is written, then resumed."""
    save = checkpoint.save_checkpoint

    def save_then_stop(out, at, *a, **k):
        save(out, at, *a, **k)
        if at == step:
            raise KeyboardInterrupt(f"stopped after the checkpoint of step {step}")
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(out))
    monkeypatch.undo()
    train.main(args(out, "--resume"))


def test_packed_run_resumes_exactly(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, monkeypatch, capsys):
    """--pack: a run stopped after its second checkpoint and resumed ends exactly as an unbroken run."""
    args = lambda out, *x: base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--pack", "--max-len", "160",
                                     "--epochs", "2", "--save-every", "2", "--lora-dropout", "0.1", *x)
    train.main(args(tmp_path / "whole"))
    packed = re.search(r"packed (\d+) examples into (\d+) rows", capsys.readouterr().out)
    assert packed and int(packed[2]) < int(packed[1]) / 2  # rows really hold several examples

    stop_then_resume(args, tmp_path / "cut", 4, monkeypatch)
    curve = lambda out: [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(curve(tmp_path / "whole")) > 4
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")
    close_norm(adapter(tmp_path / "cut"), adapter(tmp_path / "whole"), 0)
    with pytest.raises(SystemExit, match="--pack=True"):  # packing decides the data order
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "cut", "--max-len", "160",
                             "--epochs", "2", "--save-every", "2", "--lora-dropout", "0.1", "--resume"))


# ----------------------------------------------------------------------------- the output folder is the user's

def test_a_folder_with_files_is_refused_before_anything_is_loaded(tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                                  monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "important.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)  # nothing may be loaded before the refusal
    with pytest.raises(SystemExit, match=r"already holds files \(model, notes.txt\).*--resume.*--overwrite"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1"))
    assert (tmp_path / "model" / "important.txt").read_text() == "mine"
    monkeypatch.undo()
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1", "--overwrite"))
    assert (tmp_path / "notes.txt").read_text() == "mine too"  # --overwrite replaces train.py's outputs only
    assert not (tmp_path / "model" / "important.txt").exists() and (tmp_path / "model" / "config.json").exists()
    with pytest.raises(SystemExit, match="already holds files"):  # a finished run is not re-run over either
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1"))


def test_a_second_run_in_the_same_folder_is_refused_with_the_first_ones_pid(tiny_teacher_dir, tiny_chat_jsonl,
                                                                          tmp_path):
    from runkit import run_folder
    with run_folder.RunLock(tmp_path):  # as another run holds it
        with pytest.raises(SystemExit, match=rf"in use by another train.py run \(PID {os.getpid()} on "):
            train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.lock"]  # nothing written


@pytest.mark.exact
def test_student_base_is_always_this_runs(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """Training again into the folder with another --prune-to: student_base + adapter == model. In
    float64: merging reorders the sums (in float32 the logits moved by 6e-6, a 2.7x margin on 1e-5)."""
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1", "--dtype", "float64"))
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1", "--overwrite",
                         "--prune-to", "3", "--dtype", "float64"))
    base = llama.Llama.from_pretrained(tmp_path / "student_base", dtype=torch.float64)
    assert base.config.num_hidden_layers == 3
    adapters.load_adapter(base, tmp_path / "adapter")
    merged = llama.Llama.from_pretrained(tmp_path / "model", dtype=torch.float64)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        close(base(ids), merged(ids), atol=EXACT, rtol=0)


# ----------------------------------------------------------------------------- every flag checked before work

BAD_FLAGS = [
    (["--lora-alpha", "0"], "--lora-alpha 0.0: must be above 0"),
    (["--lr", "0"], "--lr 0.0: must be above 0"),
    (["--lr", "nan"], "--lr nan: must be above 0"),
    (["--alpha", "2"], r"--alpha 2.0: must lie in \[0, 1\]"),
    (["--heldout", "-1"], "--heldout -1: must be 0 or more"),
    (["--prune-to", "0"], r"--prune-to 0: the teacher has 4 layers: a student keeps 1..3"),
    (["--prune-to", "4"], r"--prune-to 4: the teacher has 4 layers"),
    (["--student", "{teacher}"], "--prune-to 2: prunes the teacher .* but --student gives the student"),
    (["--max-len", "-5"], "--max-len -5: must be 2 or more"),
    (["--max-len", "513"], r"--max-len 513: the teacher handles at most 512 positions"),
    (["--max-steps", "-1"], "--max-steps -1: must be 1 or more"),
    (["--rank", "0"], "--rank 0: must be 1 or more"),
    (["--grad-accum", "0"], "--grad-accum 0: must be 1 or more"),
    (["--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["--lora-dropout", "1"], r"--lora-dropout 1.0: must lie in \[0, 1\)"),
    (["--min-lr", "1"], r"--min-lr 1.0: must lie in \[0, --lr 0.01\]"),
    (["--targets", "q_proj,qproj"], r"--targets q_proj,qproj: unknown layer\(s\) \['qproj'\]"),
    (["--resume", "--overwrite"], "--overwrite True: would delete the checkpoints that --resume continues from"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_meaningless_flags_are_refused_before_any_model_is_loaded(tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                                  monkeypatch, flags, message):
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)  # loading anything would fail differently
    flags = [f.format(teacher=tiny_teacher_dir) for f in flags]
    with pytest.raises(SystemExit, match=message):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()  # not even the output folder was created


def test_flags_a_method_ignores_are_named(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, capsys):
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--method", "lora", "--max-steps", "1",
                         "--alpha", "0.3"))
    assert "note: --alpha has no effect with --method lora (no teacher term: CE only)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def finished_run(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    """A finished two-step run with a checkpoint at every step, its teacher and student copied alongside."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(tiny_teacher_dir, root / "teacher")
    args = base_args(root / "teacher", tiny_chat_jsonl, root / "run", "--max-steps", "2", "--save-every", "1")
    train.main(args)
    return root, args


def copy_run(finished_run, tmp_path):
    root, args = finished_run
    shutil.copytree(root / "run", tmp_path / "run")
    return [str(tmp_path / "run") if a == str(root / "run") else a for a in args]


@pytest.mark.parametrize("flag, value", [("--lr", "2e-2"), ("--min-lr", "0"), ("--warmup", "0.5"),
                                         ("--lora-dropout", "0.1"), ("--dtype", "bfloat16"), ("--max-steps", "3"),
                                         ("--heldout", "5"), ("--weight-decay", "0.1"), ("--hidden-weight", "1"),
                                         ("--calibration", "2")])
def test_resume_checks_every_flag_that_changes_the_result_before_loading(finished_run, tmp_path, monkeypatch,
                                                                         flag, value):
    args = copy_run(finished_run, tmp_path)
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)
    with pytest.raises(SystemExit, match=rf"--resume: the checkpoint was made with {flag}="):
        train.main(args + ["--resume", flag, value])


def test_resume_refuses_another_teacher_naming_both(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, monkeypatch):
    shutil.copytree(tiny_teacher_dir, tmp_path / "teacher")
    args = base_args(tmp_path / "teacher", tiny_chat_jsonl, tmp_path / "run", "--max-steps", "1")
    train.main(args)
    teacher = llama.Llama.from_pretrained(tmp_path / "teacher")
    with torch.no_grad():
        teacher.model.norm.weight[0] += 1e-3  # the same flag, the same shapes, other weights
    teacher.save_pretrained(tmp_path / "teacher")
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)
    with pytest.raises(SystemExit, match=r"--resume: the teacher is not the model the checkpoint was trained from: "
                                         r"the checkpoint records \{.*'weights': '(\w+)'\}, .*teacher is \{.*\}"):
        train.main(args + ["--resume"])


# ----------------------------------------------------------------------------- crash windows and fallback

def run_with_fault(args, fault: str, tmp_path):
    """train.py in a subprocess whose `fault` code (run after imports) makes it die at one exact point."""
    code = f"import os, sys\nfrom pathlib import Path\nimport train\nfrom runkit import adapters\n{fault}\ntrain.main(sys.argv[1:])\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def test_killed_inside_a_checkpoint_resave_loses_nothing(finished_run, tmp_path):
    """Resuming a finished run re-saves its last step; die after the old copy was moved aside and before
    the new one is in place. The next --resume reads the moved-aside copy and ends with the same adapter."""
    args = copy_run(finished_run, tmp_path)
    out = tmp_path / "run"
    before = adapter(out)
    fault = """
real = Path.rename
def rename(self, target):
    if self.name.startswith(".step-") and self.name.endswith(".tmp"):  # moving the new copy into place
        os._exit(9)
    return real(self, target)
Path.rename = rename
"""
    died = run_with_fault(args + ["--resume"], fault, tmp_path)
    assert died.returncode == 9, died.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-0000002" and not (ckpts / "step-0000002").exists()
    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from .step-0000002.old-" in resumed.stdout
    assert (ckpts / "step-0000002" / "state.pt").exists()
    close_norm(adapter(out), before, 0)


def test_killed_inside_the_adapter_export_loses_nothing(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """Die after the exported adapter's config is written, before its weights: no adapter/ at all (never a
    config beside other weights), and --resume exports the trained adapter from the checkpoint."""
    out = tmp_path / "run"
    args = base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--max-steps", "2")
    fault = f"""
real = adapters.save_file
def save_file(tensors, path, **kw):
    if Path(path).parent.parent == Path({str(out)!r}):  # the export (checkpoint adapters sit deeper)
        os._exit(9)
    return real(tensors, path, **kw)
adapters.save_file = save_file
"""
    died = run_with_fault(args, fault, tmp_path)
    assert died.returncode == 9, died.stderr[-2000:]
    assert not (out / "adapter").exists() and not (out / "model").exists()
    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    close_norm(adapter(out), load_file(str(out / "checkpoints" / "step-0000002" / "adapter" /
                                            "adapter_model.safetensors")), 0)


def test_damaged_latest_checkpoint_falls_back_and_resumes_exactly(finished_run, tmp_path, capsys):
    args = copy_run(finished_run, tmp_path)
    out = tmp_path / "run"
    before = adapter(out)
    state_pt = out / "checkpoints" / "step-0000002" / "state.pt"
    state_pt.write_bytes(state_pt.read_bytes()[:1000])  # truncated
    train.main(args + ["--resume"])
    printed = capsys.readouterr().out
    assert "skipped damaged checkpoint(s) step-0000002" in printed and "continuing from step-0000001" in printed
    close_norm(adapter(out), before, 0)  # step 2 redone from step 1: the same adapter


# ----------------------------------------------------------------------------- defaults

def test_demo_and_paper_defaults(monkeypatch):
    """No --teacher on a CPU machine: the demo's budget (packed, adapters at 2e-3, hidden states at β = 10
    where a live teacher and a pruned student allow them); any --teacher: the paper's (unpacked,
    2e-4 / 2e-5, β = 0); a teacher cache turns the demo's packing off; a given flag wins."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    demo = flags.parse([])
    assert demo.demo and demo.pack and demo.lr == flags.DEMO_ADAPTER_LR and demo.max_samples == flags.DEMO["max_samples"]
    assert flags.parse(["--method", "kd"]).lr == 2e-5  # the demo's rate is for adapters only
    assert not flags.parse(["--teacher-cache", "somewhere"]).pack
    assert not flags.parse(["--no-pack"]).pack and flags.parse(["--lr", "5e-4"]).lr == 5e-4
    assert demo.hidden_weight == flags.DEMO_HIDDEN_WEIGHT and demo.calibration == 16
    for no_hidden_states in (["--method", "lora"], ["--teacher-cache", "somewhere"], ["--student", "some/folder"]):
        assert flags.parse(no_hidden_states).hidden_weight == 0  # no live teacher, or no pruned student
    assert flags.parse(["--hidden-weight", "0"]).hidden_weight == 0
    paper = flags.parse(["--teacher", "some/model"])
    assert not paper.demo and not paper.pack and paper.lr == 2e-4 and paper.grad_accum == 16
    assert paper.hidden_weight == 0
    assert flags.parse(["--teacher", "some/model", "--pack"]).pack


# ----------------------------------------------------------------------------- on-policy (--on-policy λ)

ON_POLICY = ["--on-policy-max-new", "6", "--divergence", "reverse_kl"]


def test_on_policy_zero_is_the_off_policy_run_bit_for_bit(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "off", "--max-steps", "2"))
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "zero", "--max-steps", "2", "--on-policy", "0",
                         *ON_POLICY[:2]))
    curve = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in curve(tmp_path / "zero")] == [r["loss"] for r in curve(tmp_path / "off")]
    assert "gen_tokens" not in curve(tmp_path / "zero")[0]
    close_norm(adapter(tmp_path / "zero"), adapter(tmp_path / "off"), 0)


@pytest.mark.parametrize("method", [[], ["--adapter", "moslora"], ["--method", "kd"]], ids=" ".join)
def test_on_policy_samples_and_trains_on_the_divergence(method, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "off", "--max-steps", "2", "--divergence",
                         "reverse_kl", *method))
    res = train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "on", "--max-steps", "2",
                               "--on-policy", "1", *ON_POLICY, *method))
    rows = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gen_tokens"] > 0 and r["gen_s"] > 0 and r["kl"] > 0 for r in rows)
    assert all(r["ce"] == 0 for r in rows)  # every row sampled: no CE target anywhere
    off = [json.loads(x)["loss"] for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] != off  # other rows: the student's own replies
    if method == ["--method", "kd"]:  # every student weight trains on the samples
        assert set(res["optimized"]) == {n for n, _ in res["student"].named_parameters()}
    else:
        assert res["optimized"] and all(".lora_" in n for n in res["optimized"])
        assert any(n.endswith("lora_M") for n in res["optimized"]) == (method == ["--adapter", "moslora"])


def test_on_policy_start_trains_off_policy_first(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """--on-policy-start 0.5 of 4 steps: steps 1-2 are the off-policy run's, bit for bit; then the
    student samples."""
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "off", "--max-steps", "4", *ON_POLICY[2:]))
    train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "late", "--max-steps", "4", "--on-policy", "1",
                         "--on-policy-start", "0.5", *ON_POLICY))
    curve = lambda out: [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    off, late = curve(tmp_path / "off"), curve(tmp_path / "late")
    assert [r["loss"] for r in late[:2]] == [r["loss"] for r in off[:2]]
    assert ["gen_tokens" in r for r in late] == [False, False, True, True]
    assert all(r["gen_tokens"] > 0 and r["ce"] == 0 for r in late[2:])


# Greedy across world sizes: the reductions of 2 ranks differ from 1 in the last bits, which can flip a
# temperature-1 draw that sits on a boundary; the row/example keying is what is tested.
ON_POLICY_DP = ["--max-steps", "4", "--on-policy", "0.5", "--on-policy-temperature", "0", *ON_POLICY]


@pytest.fixture(scope="module")
def on_policy_single_run(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    """One process with micro-batch 4 sampling on-policy. dtype -> its folder."""
    return single_runs(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory, "on-policy-single", *ON_POLICY_DP)


@pytest.mark.exact
@pytest.mark.parametrize("zero", ["1", "2", "3"], ids=["zero1", "fsdp2-zero2", "fsdp2-zero3"])
def test_on_policy_two_processes_equal_one(zero, on_policy_single_run, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """Which rows are sampled and what they sample is keyed by (seed, step, example): a world of 2
    samples what a world of 1 does. Under FSDP2 the ranks generate in lockstep (every row, past its
    stop token, then cut there): the same replies as DDP's."""
    one = on_policy_single_run("float64")
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, *ON_POLICY_DP, "--zero", zero,
                          "--dtype", "float64"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    close_norm(adapter(tmp_path), adapter(one), EXACT)
    assert logged(tmp_path, "gen_tokens") == logged(one, "gen_tokens")  # the same replies, token for token
    close(logged(tmp_path), logged(one), rtol=EXACT, atol=0)


def test_on_policy_two_processes_equal_one_in_float32(on_policy_single_run, tiny_teacher_dir, tiny_chat_jsonl,
                                                      tmp_path):
    """The float32 twin (ZeRO-1), within 10x the float32 run's own distance from float64."""
    one, exact = on_policy_single_run("float32"), on_policy_single_run("float64")
    r = run_cli(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, *ON_POLICY_DP, "--zero", "1"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    close_norm(adapter(tmp_path), adapter(one), twin_tolerance(one, exact))
    assert logged(tmp_path, "gen_tokens") == logged(one, "gen_tokens")
    close(logged(tmp_path), logged(one), rtol=twin_tolerance(one, exact, "loss"), atol=0)


def test_on_policy_resume_is_exact(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """Sampling at temperature 1 needs no saved sampler state: a run stopped after a checkpoint resumes
    to the same adapter, bit for bit (its first step off-policy: --on-policy-start holds on resume)."""
    whole = base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "whole", "--max-steps", "4", "--on-policy", "0.5",
                      "--on-policy-start", "0.25", *ON_POLICY)
    assert run_cli(whole).returncode == 0
    cut = whole[:]
    cut[cut.index("--out") + 1] = str(tmp_path / "cut")
    assert run_cli(cut + ["--save-every", "2"]).returncode == 0
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000004")
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-0000002\n")
    shutil.rmtree(tmp_path / "cut" / "model")
    resumed = run_cli(cut + ["--save-every", "2", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    close_norm(adapter(tmp_path / "cut"), adapter(tmp_path / "whole"), 0)


@pytest.mark.parametrize("extra, why", [
    (["--method", "lora"], "has no teacher term"), (["--alpha", "1"], "--alpha 1"),
    (["--pack"], "train on-policy unpacked"), (["--on-policy", "1.5"], r"must lie in \[0, 1\]"),
    (["--teacher-cache", "somewhere"], "the live teacher must score"),
    (["--on-policy-start", "1"], r"must lie in \[0, 1\)"), (["--on-policy", "0", "--on-policy-start", "0.5"],
                                                             "needs --on-policy above 0")])
def test_on_policy_refuses_what_it_cannot_do(extra, why, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    with pytest.raises(SystemExit, match=why):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--on-policy", "1", *extra))


@pytest.mark.exact
def test_on_policy_batch_loss_and_gradient_equal_the_plain_autograd_loss(tiny_teacher_dir, tiny_chat_jsonl):
    """The Distiller's loss on a batch whose rows 0 and 2 hold the student's sampled replies (keyed
    generators, the adapters active) equals neo.reference_loss on full logits, reverse KL, CE only on
    the data-set rows, and so do the adapter gradients: labels, ce_mask and the teacher line up."""
    import data
    import neo
    args = flags.parse(base_args(tiny_teacher_dir, tiny_chat_jsonl, "unused", "--divergence", "reverse_kl"))
    tok = data.Tokenizer.from_dir(tiny_teacher_dir)
    examples, _ = tokenized.load_splits(args, tok)
    b = data.Batches(examples, 4, pad_id=tok.pad_token_id, shuffle=False).collate(examples[:4])
    # float64: the chunked loss and the full-logits reference are equal mathematically (in float32 the
    # adapter gradients differed by 3.6e-7 against 1e-4·|g| + 1e-6, a 6.5x margin)
    teacher = llama.Llama.from_pretrained(tiny_teacher_dir, dtype=torch.float64).requires_grad_(False)
    student = lora.apply_lora(llama.prune_layers(llama.Llama.from_pretrained(tiny_teacher_dir, dtype=torch.float64),
                                                 [0, 2]), rank=4, alpha=8, verbose=False)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    prompts = data.prompts(b)
    replies = student.eval().generate([prompts[0], prompts[2]], 6, temperature=1.0, stop_token_ids=tok.stop_token_ids,
                                      generators=[torch.Generator().manual_seed(i) for i in (0, 2)], keep_stop=True)
    student.train()
    on = data.with_replies(b, [0, 2], replies, 48, tok.pad_token_id)
    ce_mask = ~on["sampled"][:, None].expand_as(on["labels"])
    assert not on["labels"][0, :len(prompts[0])].ne(-100).any()
    assert on["labels"][0, len(prompts[0]):len(prompts[0]) + len(replies[0])].tolist() == replies[0]
    distiller = neo.Distiller(student, teacher, alpha=0.5, temperature=1.0, divergence="reverse_kl", chunk_size=5)
    n = neo.count_targets(on["labels"]).float()
    ours = distiller(on["input_ids"], on["attention_mask"], on["labels"], n, ce_mask=ce_mask)
    g_ours = torch.autograd.grad(ours.loss, lora.lora_parameters(student))
    logits = student(on["input_ids"], on["attention_mask"])
    with torch.no_grad():
        t_logits = teacher(on["input_ids"], on["attention_mask"])
    ref = neo.reference_loss(logits, t_logits, on["labels"], alpha=0.5, divergence="reverse_kl", normalizer=n,
                             ce_mask=ce_mask)
    g_ref = torch.autograd.grad(ref.loss, lora.lora_parameters(student))
    close(ours.loss, ref.loss, rtol=EXACT, atol=0)
    close(ours.ce, ref.ce, rtol=EXACT, atol=0)
    for g, r in zip(g_ours, g_ref):  # in norm: elements near 0 carry only rounding, ~1e-16 absolute
        close_norm(g, r, EXACT)


# ----------------------------------------------------------------------------- issue 27: nothing silently wrong

@pytest.mark.parametrize("flags, message", [(["--plan", "0"], "--plan 0: is the number of GPUs to plan for"),
                                            (["--plan", "-1"], "--plan -1: is the number of GPUs"),
                                            (["--plan", "--rank", "0"], "--rank 0: must be 1 or more"),
                                            (["--plan", "--gpu-memory", "0"], "--gpu-memory 0.0: is the memory"),
                                            (["--gpu-memory", "-5"], "--gpu-memory -5.0: is the memory")])
def test_a_dry_run_never_trains_and_checks_every_flag(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, monkeypatch,
                                                      flags, message):
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)  # loading any weights would fail differently
    with pytest.raises(SystemExit, match=message):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path / "run", *flags))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_new_bytes_at_the_same_data_path(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, monkeypatch):
    data = tmp_path / "chat.jsonl"
    shutil.copy(tiny_chat_jsonl, data)
    args = base_args(tiny_teacher_dir, data, tmp_path / "run", "--max-steps", "1")
    train.main(args)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0].replace("plus", "and")] + lines[1:]) + "\n")  # edited in place
    monkeypatch.setattr(llama.Llama, "from_pretrained", None)
    with pytest.raises(SystemExit, match=rf"--resume: the data changed since the checkpoint: {data} has other "
                                         r"bytes \(sha256 \w+\.\.\. then, \w+\.\.\. now\)"):
        train.main(args + ["--resume"])


def test_saved_folders_follow_the_umask(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    umask = os.umask(0o022)
    try:
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, tmp_path, "--max-steps", "1"))
    finally:
        os.umask(umask)
    saved = [tmp_path / name for name in ("student_base", "adapter", "model", "checkpoints")]
    saved += [p for folder in saved for p in folder.rglob("*")]
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in saved}
    assert {p: m for p, m in modes.items() if m != (0o755 if Path(tmp_path / p).is_dir() else 0o644)} == {}
    assert "adapter/adapter_model.safetensors" in modes and "model/model.safetensors" in modes


def full_disk(tensors, filename, **k):
    """safetensors on a full disk; the checkpoints' own adapters are written (so the export meets it)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    if "checkpoints" in str(filename):
        return save_file(tensors, filename, **k)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("writer, what", [
    ("runkit.adapters.save_file", r"saving the trained student: the disk holding {out} is full"),
    ("model.save_torch_state_dict", r"saving the pruned student: the disk holding {out}/student_base is full"),
    ("torch.save", r"saving the checkpoint of step 1: the disk holding {out}/checkpoints is full")])
def test_a_full_disk_is_named_and_loses_nothing(writer, what, tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                monkeypatch):
    import errno
    module, name = writer.rsplit(".", 1)
    def fault(*a, **k):
        if writer != "torch.save":
            return full_disk(*a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sys.modules[module] if module in sys.modules else __import__(module), name, fault)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=what.format(out=out) + r" \(this needs about [\d.]+ \w+; .* free now\)\. "
                                                                r"Nothing was lost"):
        train.main(base_args(tiny_teacher_dir, tiny_chat_jsonl, out, "--max-steps", "1"))
    assert not [p for p in out.rglob(".*") if p.name != ".train.lock"]  # no temporary left behind
