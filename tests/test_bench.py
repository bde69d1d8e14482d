"""benchmarks/bench.py and benchmarks/experiment.py end to end at a toy size, so they cannot rot.

A 4-layer random teacher (conftest's tiny_teacher_dir) and 48 short conversations; every number is
meaningless, only the plumbing is checked: each command runs and writes its table and JSON with
sane fields.
"""
import json
import math

import pytest
from runkit import flags
from tolerance import close


@pytest.fixture(scope="module")
def toy_flags(tiny_teacher_dir, tiny_chat_jsonl):
    return ["--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat_jsonl)]


def test_bench_writes_table_and_targets(tmp_path, toy_flags):
    from benchmarks import bench
    out = tmp_path / "bench.json"
    blob = bench.main(toy_flags + ["--methods", "neo,neo-cache,hf-peft-neo", "--max-len", "32", "--batch-size", "2",
                                   "--rank", "4", "--steps", "1", "--warmup", "0", "--dtype", "float32",
                                   "--work-dir", str(tmp_path / "work"), "--output", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"neo", "neo-cache", "hf-peft-neo"}
    for r in saved["results"].values():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["tokens_per_step"] == 2 * 32
        assert r["peak_mem_gb"] > 0 and r["peak_above_runtime_gb"] >= 0
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["frozen_dtype"] == "float32" and r["precision"].startswith("float32")
        assert r["step_flops"] > 0 and r["matmul_peak_flops"] > 0 and 0 < r["mfu"]
        close(r["mfu"], r["step_flops"] / r["step_s"] / r["matmul_peak_flops"], rtol=1e-6, atol=0)
    res = saved["results"]
    # the same adapters (rank, targets) in both steps: the same trainable count
    assert res["neo"]["trainable_params"] == res["hf-peft-neo"]["trainable_params"]
    # both steps start from the same weights and data with B = 0 adapters: the same first loss
    close(res["neo"]["losses"][0], res["hf-peft-neo"]["losses"][0], rtol=1e-3, atol=0)
    # from the cache: the same step with D_S, the kept tokens exact and the tail by its draws, an
    # unbiased estimate of the full KL (neo.py): near the live loss, not equal to it
    assert res["neo-cache"]["trainable_params"] == res["neo"]["trainable_params"]
    # A statistical bound, not a rounding one: the tail's draws are seeded, the same on every CPU, and
    # put the estimate 1.2% from the live loss (margin 4x); rounding moves it by ~1e-7.
    close(res["neo-cache"]["losses"][0], res["neo"]["losses"][0], rtol=0.05, atol=0)
    assert "neo_cache_tok_s / neo_tok_s" in saved["targets"]
    assert {"neo_tok_s / hf_peft_tok_s", "neo_mem / hf_peft_mem"} <= set(saved["targets"])
    assert (tmp_path / "bench.md").read_text().count("| neo") >= 1
    assert "| neo |" in blob["table_markdown"]
    # issue 10: a counted step per method, its components adding up to the allocator's peak, the plan beside it
    for name, r in res.items():
        if name == "neo-cache":  # its top-k rows are made outside the counted step: not reconciled, not planned
            continue
        parts = sum(r["components_bytes"].values())
        assert abs(parts - r["measured_peak_bytes"]) <= 0.05 * r["measured_peak_bytes"]
        assert abs(r["predicted_peak_bytes"] - r["measured_peak_bytes"]) <= 0.10 * r["measured_peak_bytes"]
    assert "live peak (GiB)" in blob["table_markdown"]


@pytest.mark.parametrize("method", ["neo", "neo-moslora", "kd", "sft", "lora"])
def test_step_flops_match_torch_flop_counter(method, tiny_teacher_dir, tmp_path):
    """bench.step_flops' formula against torch.utils.flop_counter counting the matmuls the step
    really runs, at a shape where the blocks' matmuls and attention outweigh the LM head. It is
    0.2-1.3% above: autograd skips the first block's input gradient where nothing below it trains."""
    import types
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    import train
    from benchmarks import bench
    student = tmp_path / "student"
    targs = flags.parse(["--teacher", str(tiny_teacher_dir), "--prune-to", "2"])
    train.build_student(targs, str(tiny_teacher_dir), [{"input_ids": list(range(1, 40)), "labels": list(range(1, 40))}], torch.device("cpu")).save_pretrained(student)
    args = types.SimpleNamespace(teacher=str(tiny_teacher_dir), student=str(student), rank=4, lora_alpha=8.0,
                                 lora_dropout=0.0, chunk_size=256, grad_checkpoint=False, dtype="float32",
                                 compile=False)
    ids = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]  # a long prompt, 3 targets a row: the blocks' FLOPs outweigh the head's
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    step, _, _ = bench.ours(method, args, args.teacher, args.student, torch.device("cpu"))
    # The math attention kernel runs QKᵀ and AV as matmuls the counter sees (the fused CPU kernel
    # is invisible to it); it computes the full T x T square, as step_flops counts.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step(batch)
    # Integer counts, the same on every CPU: the formula counts the first block's input gradient that
    # autograd skips (0.2-1.3% above, margin 1.6x); 2% bounds that model of the step, not a rounding.
    close(bench.step_flops(method, args, batch), counter.get_total_flops(), rtol=0.02, atol=0)


def test_experiment_run_and_sweep(tmp_path, toy_flags):
    from benchmarks import experiment
    common = toy_flags + ["--scale", "toy", "--runs-dir", str(tmp_path / "runs"),
                          "--results-dir", str(tmp_path / "results"), "--in-process"]
    blob = experiment.main(["run", "--methods", "neo,sft", "--seeds", "0,1", "--lrs", "neo=1e-4,1e-3 sft=1e-4"]
                           + common)
    md = (tmp_path / "results" / "experiment_toy.md").read_text()
    saved = json.loads((tmp_path / "results" / "experiment_toy.json").read_text())
    assert (tmp_path / "results" / "experiment_toy_loss.png").stat().st_size > 0
    assert set(saved["rows"]) == {"teacher", "student_base", "neo", "sft"}
    assert [r["seed"] for r in saved["rows"]["neo"]] == [0, 1]
    assert [r["seed"] for r in saved["rows"]["sft"]] == [0]
    # the sweep trains each rate once (seed 0); the best by held-out (CE + KL) / 2 is the one every seed uses
    sweep_runs = saved["sweep"]["neo"]
    assert [r["lr"] for r in sweep_runs] == [1e-4, 1e-3] and saved["sweep"]["sft"][0]["lr"] == 1e-4
    best = min(sweep_runs, key=lambda r: r["scores"]["heldout_ce"] + r["scores"]["heldout_kl"])
    assert saved["best_lr"]["neo"] == best["lr"] and {r["lr"] for r in saved["rows"]["neo"]} == {best["lr"]}
    assert saved["rows"]["neo"][0]["run"] == best["run"]  # the sweep's seed-0 run is reused, not retrained
    assert "Learning-rate sweep" in md and any("LLM-Neo" in v and "SFT" in v for v in saved["verdicts"])
    for r in saved["rows"]["neo"]:
        assert r["steps"] == 2 and r["mem_gb"] > 0 and r["time_s"] > 0
        s = r["scores"]
        assert set(s["acc"]) == set(experiment.TASKS) and all(0 <= a <= 1 for a in s["acc"].values())
        assert s["heldout_kl"] >= 0 and s["lambada_ppl"] > 1
    close(saved["rows"]["teacher"][0]["scores"]["heldout_kl"], 0.0, atol=1e-6, rtol=0)
    for name in ("Teacher", "Pruned student", "LLM-Neo", "Mem (GiB)", "Time (s)", "ARC-e", "WinoGrande", "Avg"):
        assert name in md
    assert blob["budget"]["seeds"] == [0, 1]

    # Both sweeps in float32 on every machine (--dtype auto would pick bf16 only where the CPU has it, and
    # with it other teacher probabilities, so other tail draws), 4 held-out conversations (~50 targets).
    grid = ["sweep", "--sweep-ranks", "4", "--sweep-lrs", "1e-4,1e-3", "--dtype", "float32", "--max-samples", "48",
            "--heldout", "8"]
    sweep = experiment.main(grid + common)
    assert (tmp_path / "results" / "sweep_toy.png").stat().st_size > 0
    assert set(sweep["grid"]) == {"4,0.0001", "4,0.001"}
    assert all(cell["heldout_kl"] >= 0 and "heldout_kl_se" not in cell for cell in sweep["grid"].values())
    cached = experiment.main(grid + ["--teacher-cache"] + common[:-5] + ["--runs-dir", str(tmp_path / "runs_cached")]
                             + common[-3:])
    assert cached["teacher_cache"] and (tmp_path / "runs_cached" / "sweep_cache" / "teacher_cache" /
                                        "manifest.json").exists()
    assert (tmp_path / "results" / "sweep_toy_cache.png").stat().st_size > 0   # beside the live sweep's, not over it
    for key, cell in cached["grid"].items():
        # D_S is an unbiased estimate of the live sweep's full KL whose noise, over a few dozen held-out
        # targets, is several percent: 12% of the KL at the 12 targets of 1 conversation, measured over
        # 200 draw seeds (issue 20). The cell's own standard error over its draws sets the tolerance.
        live, se = sweep["grid"][key]["heldout_kl"], cell["heldout_kl_se"]
        assert 0 < se < 0.25 * live
        assert abs(cell["heldout_kl"] - live) < 4 * se


# ----------------------------------------------------------------------------- benchmarks/bench_gpu.py

def test_bench_gpu_runs_at_toy_scale(tmp_path):
    """The real-shape benchmark's plumbing on the CPU at 1/64 scale: a step per method in its own
    worker, the chunked loss rows, the targets and the tables. Our adapters and PEFT's (rank,
    targets) must give the same trainable count."""
    import torch
    from benchmarks import bench_gpu
    out = tmp_path / "bg.json"
    flags = ["--device", "cpu", "--scale", "64", "--pairs", "llama3", "--batch-size", "1", "--max-len", "32",
             "--steps", "1", "--warmup", "0", "--loss-tokens", "2048", "--output", str(out)]
    blob = bench_gpu.main(flags + ["--methods", "neo,hf-peft-neo", "--parts", "steps"])
    saved = json.loads(out.read_text())
    rows = saved["steps"]
    assert set(rows) == {"llama3/neo", "llama3/hf-peft-neo"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["step_s"] > 0 and r["tokens_per_step"] == 32 and r["peak_mem_gb"] > 0 and 0 < r["mfu"]
        assert all(math.isfinite(x) for x in r["losses"])
    assert rows["llama3/neo"]["trainable_params"] == rows["llama3/hf-peft-neo"]["trainable_params"]
    assert any(k.startswith("llama3: neo MFU") for k in saved["targets"])
    assert blob["steps"].keys() == rows.keys() and "| llama3 | neo |" in out.with_suffix(".md").read_text()
    args = bench_gpu.parse_args(flags)
    for name in ("neo_loss@256", "reference"):  # in this process: the rows' code, not their timing
        r = bench_gpu.loss_worker(name, args, torch.device("cpu"))
        assert r["tokens"] == 2048 // 64 and r["vocab"] == 128256 // 64 and r["time_s"] > 0


# ----------------------------------------------------------------------------- benchmarks/bench_onpolicy.py

def test_onpolicy_repetition_counts_token_4grams(smollm2_dir):
    """An answer repeats itself when a token 4-gram comes back: a repeated phrase, and a run of digits
    (SmolLM2 writes each digit as a token), which a word-level count would miss."""
    import data
    from benchmarks import bench_onpolicy
    tok = data.Tokenizer.from_dir(smollm2_dir)
    assert bench_onpolicy.rep4("The capital of France is Paris.", tok) == 0
    assert bench_onpolicy.rep4("the color of a color, the color of a color, the color of a color", tok) > 0.3
    assert bench_onpolicy.rep4("The answer is 100000000000000000000.", tok) > 0.5
    rep = bench_onpolicy.repetition(["Paris.", "48 of 48 of 48 of 48 of 48 of 48"], tok)
    assert rep["repeating"] == 0.5 and 0 < rep["rep4"] < 0.5


def test_onpolicy_reuse_takes_only_a_run_with_the_same_flags(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    import train
    from benchmarks import bench_onpolicy
    out = tmp_path / "lam0.5_s3"
    assert not bench_onpolicy.finished_with(out, {"seed": 3})  # nothing there yet
    train.main(["--teacher", str(tiny_teacher_dir), "--data", str(tiny_chat_jsonl), "--out", str(out), "--max-len", "48",
                "--batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--rank", "4", "--prune-to", "2",
                "--heldout", "4", "--dtype", "float32", "--seed", "3", "--on-policy", "0.5", "--on-policy-max-new", "4"])
    assert bench_onpolicy.finished_with(out, {"seed": 3, "on_policy": 0.5, "on_policy_max_new": 4})
    with pytest.raises(SystemExit, match="on_policy_max_new: 4, not 32"):
        bench_onpolicy.finished_with(out, {"seed": 3, "on_policy": 0.5, "on_policy_max_new": 32})
