"""teacher_cache.py and train.py --teacher-cache on a tiny random teacher: the rows are the teacher's,
looked up by example id; training never loads the teacher; a cache of another run, a missing or a
truncated shard is refused by name; a killed write resumes without rewriting finished shards."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cached_loss
import data
import model as llama
import teacher_cache
import train
from conftest import make_tiny_llama
from runkit import cache_store, flags, tokenized
from tolerance import close

ROOT = Path(__file__).resolve().parent.parent


def run_flags(teacher, chat, *extra):
    return ["--teacher", str(teacher), "--data", str(chat), "--max-len", "48", "--batch-size", "2", "--heldout", "4",
            "--dtype", "float32",  # the exact comparisons below are in fp32
            *extra]


@pytest.fixture(scope="module")
def cache_dir(tiny_teacher_dir, tiny_chat_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    teacher_cache.main(["--cache", str(out), "--k", "16", "--shard-examples", "16",
                        *run_flags(tiny_teacher_dir, tiny_chat_jsonl)])
    return out


def shard_tensors(folder):
    return {p.name: load_file(str(p)) for p in sorted(Path(folder).glob("*.safetensors"))}


def own_tokens(top: cached_loss.TeacherTopK):
    """Each row's own tokens, row after row (padding dropped), its widths and its tails."""
    keep = torch.arange(top.ids.shape[1])[None, :] < top.width[:, None]
    return top.ids[keep], top.logp[keep], top.width.long(), top.tail_logp


def test_rows_are_the_teacher_top_k_of_each_shuffled_batch(cache_dir, tiny_teacher_dir, tiny_chat_jsonl):
    """The loader's shuffled batches find their own examples' rows (by id, not by position), and
    those rows are the teacher's: 16 tokens per position on average over each batch of 2 examples
    the cache was written in (teacher_topk with k_max), decoded from their uint8 codes, with the
    tail draws of that batch's seed."""
    args = flags.parse(run_flags(tiny_teacher_dir, tiny_chat_jsonl))
    tok = data.Tokenizer.from_dir(tiny_teacher_dir)
    train_set, _ = tokenized.load_splits(args, tok)
    teacher = llama.Llama.from_pretrained(tiny_teacher_dir).eval()
    per_example = cache_store.targets_per_example(train_set)
    live = {}   # example id -> its rows, computed here as teacher_cache.py does: 2 examples at a time
    for start in range(0, len(train_set), 2):
        b = data.Batches(train_set, 1, pad_id=0, shuffle=False).collate(train_set[start:start + 2])
        with torch.no_grad():
            hidden = teacher(b["input_ids"], b["attention_mask"], return_hidden=True)
        top = cached_loss.teacher_topk(hidden[:, :-1][b["labels"][:, 1:] != -100], teacher.lm_head.weight, 16,
                               k_max=cache_store.K_MAX, samples=cache_store.TAIL_SAMPLES,
                               generator=torch.Generator().manual_seed(args.seed * 1_000_003 + start))
        assert top.width is not None and top.width.float().mean() == 16
        first = 0
        for i in range(start, min(start + 2, len(train_set))):
            live[i] = top.select(slice(first, first + per_example[i]))
            first += per_example[i]
    cache = cache_store.TeacherCache(cache_dir)
    loader = data.Batches(train_set, 2, pad_id=tok.pad_token_id, seed=0)
    for _, b in zip(range(3), loader):
        assert b["example_ids"].tolist() != list(range(b["example_ids"][0], b["example_ids"][0] + 2))  # shuffled
        rows = cache.rows("train", b["example_ids"])
        assert torch.equal(rows.samples, torch.cat([live[i].samples for i in b["example_ids"].tolist()]))
        close(rows.tail_plogp, torch.cat([live[i].tail_plogp for i in b["example_ids"].tolist()]))
        got = own_tokens(rows)
        want = [own_tokens(live[i]) for i in b["example_ids"].tolist()]
        want_codes = [own_tokens(cache_store.decoded(cache_store.stored(live[i], "uint16")))
                      for i in b["example_ids"].tolist()]
        ids, logp, width, tail = (torch.cat(parts) for parts in zip(*want))
        assert torch.equal(got[0], ids) and torch.equal(got[2], width)
        close(got[3], tail)
        assert torch.equal(got[1], torch.cat([w[1] for w in want_codes]))
        # Not a rounding tolerance: the stored code puts log p on a grid of LOGP_STEP, so the error is
        # at most one step by construction on any CPU (measured 0.04 of 0.0625, margin 1.5x).
        close(got[1], logp, rtol=0, atol=cache_store.LOGP_STEP)


def test_uint8_log_probs_decode_to_a_distribution_within_a_step():
    """Rounding moves each log-probability by at most one step (half a step, plus the rescaling);
    the decoded k buckets and the exact tail sum to 1; the order is kept; k = V has no tail."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 300, generator=g, dtype=torch.float64) * 3
    for k in (1, 20, 300):
        top = cached_loss.teacher_topk(z, torch.eye(300, dtype=torch.float64), k)
        codes = cache_store.quantise_logp(top.logp)
        assert codes.dtype == torch.uint8 and (codes[:, 0] == 0).all()
        logp = cache_store.dequantise_logp(codes, top.tail_logp)
        close(logp.exp().sum(-1) + top.tail_logp.float().exp(), torch.ones(50))
        assert (logp[:, :-1] >= logp[:, 1:]).all()
        if k < 300:  # a row's last tokens fall below the codes' 15.9-nat span when k = V
            assert (logp - top.logp).abs().max() <= cache_store.LOGP_STEP


def test_rows_of_different_widths_survive_the_disk_layout():
    """Adaptive rows (k = 20 on average, up to 200) through stored -> flat -> unflat -> decoded: the
    same tokens per row, the padding again copies of column 0, each row a distribution again."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 300, generator=g, dtype=torch.float64) * torch.linspace(0.5, 6, 50, dtype=torch.float64)[:, None]
    top = cached_loss.teacher_topk(z, torch.eye(300, dtype=torch.float64), 20, k_max=200)
    assert top.width.min() < 20 < top.width.max()
    on_disk = cache_store.flat(cache_store.stored(top, "uint16"))
    assert on_disk["ids"].shape == (20 * 50,) and on_disk["width"].dtype == torch.uint16
    back = cache_store.decoded(cache_store.unflat(**on_disk))
    keep = torch.arange(top.ids.shape[1])[None, :] < top.width[:, None]
    assert torch.equal(back.ids, top.ids) and torch.equal(back.width, top.width)
    # At most one grid step by construction (the quantiser's bound, not a measured rounding: margin 1.6x).
    close(back.logp[keep], top.logp[keep].float(), rtol=0, atol=cache_store.LOGP_STEP)
    assert torch.equal(back.logp[~keep], back.logp[:, :1].expand_as(back.logp)[~keep])
    close((back.logp.exp() * keep).sum(-1) + back.tail_logp.float().exp(), torch.ones(50))


def test_training_from_the_cache_never_loads_the_teacher(cache_dir, tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                         monkeypatch, smollm2_dir):
    student = make_tiny_llama(tmp_path / "student", smollm2_dir, layers=2, seed=1)
    loaded = []
    real = llama.Llama.from_pretrained.__func__
    monkeypatch.setattr(llama.Llama, "from_pretrained",
                        classmethod(lambda cls, path, *a, **k: loaded.append(str(path)) or real(cls, path, *a, **k)))
    res = train.main(run_flags(tiny_teacher_dir, tiny_chat_jsonl, "--teacher-cache", str(cache_dir), "--student",
                           str(student), "--out", str(tmp_path / "run"), "--grad-accum", "2", "--rank", "4",
                           "--max-steps", "2", "--lr", "1e-2"))
    assert loaded and all(Path(p).resolve() != Path(tiny_teacher_dir).resolve() for p in loaded)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["kl"] > 0 for r in rows)
    assert all(".lora_" in n for n in res["optimized"])
    # Step 1's KL is the sparse KL of the untrained student against the cached rows of the same two
    # shuffled micro-batches' examples (those rows are the teacher's: the test above): the run read
    # the rows of its own examples.
    args = flags.parse(run_flags(tiny_teacher_dir, tiny_chat_jsonl))
    tok = data.Tokenizer.from_dir(tiny_teacher_dir)
    train_set, _ = tokenized.load_splits(args, tok)
    base = real(llama.Llama, student).eval()
    kl = n = 0.0
    for _, b in zip(range(2), data.Batches(train_set, 2, pad_id=tok.pad_token_id, seed=0)):
        with torch.no_grad():
            top = cache_store.TeacherCache(cache_dir).rows("train", b["example_ids"])   # its examples' rows
            out = cached_loss.sparse_neo_loss(base(b["input_ids"], b["attention_mask"], return_hidden=True),
                                      base.lm_head.weight, top, b["labels"])
        kl, n = kl + out.kl * out.n_tokens, n + out.n_tokens
    close(rows[0]["kl"], (kl / n).item(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("change, field", [(["--max-len", "40"], "max_len"), (["--temperature", "2"], "temperature"),
                                           (["--max-samples", "40"], "data (train split, examples)"),
                                           (["--seed", "1", "--heldout", "4"], "data"),
                                           (["--dtype", "bfloat16"], "teacher_dtype: cache 'float32', this run 'bfloat16'")])
def test_a_cache_of_another_run_is_refused_by_field(change, field, cache_dir, tiny_teacher_dir, tiny_chat_jsonl,
                                                    tmp_path):
    argv = run_flags(tiny_teacher_dir, tiny_chat_jsonl) + change + ["--teacher-cache", str(cache_dir), "--out",
                                                                str(tmp_path), "--prune-to", "2", "--no-report"]
    with pytest.raises(SystemExit, match=rf"made for another run; {field.replace('(', '.').replace(')', '.')}"):
        train.main(argv)


def test_missing_or_truncated_shard_is_named(cache_dir, tmp_path):
    import shutil
    broken = tmp_path / "c"
    shutil.copytree(cache_dir, broken)
    (broken / "train-00001.safetensors").unlink()
    with pytest.raises(SystemExit, match="train-00001.safetensors is missing"):
        cache_store.TeacherCache(broken)
    shutil.copy(cache_dir / "train-00001.safetensors", broken / "train-00001.safetensors")
    whole = (broken / "heldout-00000.safetensors").read_bytes()
    (broken / "heldout-00000.safetensors").write_bytes(whole[:-100])
    with pytest.raises(SystemExit, match="heldout-00000.safetensors is truncated"):
        cache_store.TeacherCache(broken)


def test_a_killed_write_resumes_without_rewriting_finished_shards(cache_dir, tiny_teacher_dir, tiny_chat_jsonl,
                                                                  tmp_path, monkeypatch):
    out = tmp_path / "c"
    argv = ["--cache", str(out), "--k", "16", "--shard-examples", "16", *run_flags(tiny_teacher_dir, tiny_chat_jsonl)]
    real, written = teacher_cache.write_shard, []

    def dies_after_two(path, *a, **k):
        if len(written) == 2:
            path.with_name(f".{path.name}.tmp").write_bytes(b"half a shard")  # the kill, mid-write
            raise KeyboardInterrupt
        real(path, *a, **k)
        written.append(path.name)

    monkeypatch.setattr(teacher_cache, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.main(argv)
    with pytest.raises(SystemExit, match="is missing"):   # a half-written cache is not usable
        cache_store.TeacherCache(out)
    first = {n: (out / n).stat().st_mtime_ns for n in written}
    damaged = out / "heldout-00000.safetensors"
    monkeypatch.setattr(teacher_cache, "write_shard", real)
    teacher_cache.main(argv)                              # resume
    assert {n: (out / n).stat().st_mtime_ns for n in written} == first
    damaged.write_bytes(damaged.read_bytes()[:-8])        # a damaged finished shard is written again
    teacher_cache.main(argv)
    want, got = shard_tensors(cache_dir), shard_tensors(out)
    assert want.keys() == got.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), f"{name}/{key}"
    with pytest.raises(SystemExit, match="another run; k: cache 16, this run 8"):
        teacher_cache.main(argv[:3] + ["8"] + argv[4:])


def test_torchrun_ranks_write_the_same_cache(cache_dir, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29600 + os.getpid() % 1000), str(ROOT / "teacher_cache.py"), "--cache", str(out), "--k", "16",
           "--shard-examples", "16", *run_flags(tiny_teacher_dir, tiny_chat_jsonl)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, got = shard_tensors(cache_dir), shard_tensors(out)
    assert want.keys() == got.keys()
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), f"{name}/{key}"


def test_packing_and_the_cache_are_refused_together(cache_dir, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """A cache row belongs to one example and a packed row holds several: the pair stops before any work."""
    argv = run_flags(tiny_teacher_dir, tiny_chat_jsonl) + ["--teacher-cache", str(cache_dir), "--pack",
                                                       "--out", str(tmp_path / "run"), "--prune-to", "2"]
    with pytest.raises(SystemExit, match="--pack True: the teacher cache holds one row per example"):
        train.main(argv)
    assert not (tmp_path / "run").exists()  # refused before the output folder was claimed


# ----------------------------------------------------------------------------- damaged, foreign or changed input

def copy_cache(cache_dir, tmp_path):
    import shutil
    shutil.copytree(cache_dir, tmp_path / "c")
    return tmp_path / "c"


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.pop("shards"), r"'shards' is missing; expected a list"),
    (lambda m: m["shards"][1].pop("rows"), r"'shards\[1\].rows' is missing; expected an integer"),
    (lambda m: m.update(k="16"), r"'k' is '16'; expected an integer"),
])
def test_a_damaged_manifest_is_named(edit, why, cache_dir, tmp_path):
    broken = copy_cache(cache_dir, tmp_path)
    manifest = json.loads((broken / "manifest.json").read_text())
    edit(manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=rf"{broken / 'manifest.json'} is damaged: {why}"):
        cache_store.TeacherCache(broken)
    (broken / "manifest.json").write_text('{"k": 16, "shards": [')
    with pytest.raises(SystemExit, match=rf"{broken / 'manifest.json'} is damaged: not readable JSON"):
        cache_store.TeacherCache(broken)


def rewrite_shard(path, **changes):
    """The shard at `path` with some tensors changed, its header and metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file({**load_file(str(path)), **changes}, str(path), metadata=meta)


def test_a_tail_that_would_make_the_loss_nan_is_named_before_training(cache_dir, tiny_teacher_dir,
                                                                      tiny_chat_jsonl, tmp_path):
    broken = copy_cache(cache_dir, tmp_path)
    tail = load_file(str(broken / "train-00001.safetensors"))["tail"].clone()
    tail[3] = float("nan")
    rewrite_shard(broken / "train-00001.safetensors", tail=tail)
    argv = run_flags(tiny_teacher_dir, tiny_chat_jsonl) + ["--teacher-cache", str(broken), "--out",
                                                       str(tmp_path / "run"), "--prune-to", "2", "--no-report"]
    with pytest.raises(SystemExit, match=r"train-00001.safetensors is damaged: tail of row 3 is nan"):
        train.main(argv)
    tail[3] = 0.5  # a tail mass above 1: log(1 - p) of a negative number
    rewrite_shard(broken / "train-00001.safetensors", tail=tail)
    with pytest.raises(SystemExit, match=r"train-00001.safetensors is damaged: tail of row 3 is 0.5"):
        cache_store.TeacherCache(broken)


def test_a_token_id_outside_the_vocabulary_is_named_when_read(cache_dir, tmp_path):
    broken = copy_cache(cache_dir, tmp_path)
    ids = load_file(str(broken / "train-00000.safetensors"))["ids"].clone()
    ids[0] = 60000  # uint16 holds it; the teacher's vocabulary has 49152 tokens
    rewrite_shard(broken / "train-00000.safetensors", ids=ids)
    cache = cache_store.TeacherCache(broken)
    cache.rows("train", [5])  # another example's rows read as before
    with pytest.raises(SystemExit, match=r"train-00000.safetensors is damaged: example 0 holds token id 60000 in "
                                         r"'ids', outside the vocabulary of 49152"):
        cache.rows("train", [0])


def test_a_shard_of_another_cache_is_refused(cache_dir, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    """The same layout at another temperature: the shapes fit, the rows are another teacher distribution."""
    other = tmp_path / "other"
    umask = os.umask(0o027)  # and written under a set umask, its files get the umask's modes (not 0600)
    try:
        teacher_cache.main(["--cache", str(other), "--k", "16", "--shard-examples", "16",
                            *run_flags(tiny_teacher_dir, tiny_chat_jsonl, "--temperature", "2")])
    finally:
        os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in other.glob("*.safetensors")} == {0o640}
    mixed = copy_cache(cache_dir, tmp_path)
    (mixed / "train-00001.safetensors").write_bytes((other / "train-00001.safetensors").read_bytes())
    with pytest.raises(SystemExit, match=r"train-00001.safetensors belongs to another cache"):
        cache_store.TeacherCache(mixed)


def test_changed_data_bytes_are_named_by_the_cache_and_its_resume(cache_dir, tiny_teacher_dir, tiny_chat_jsonl,
                                                                   tmp_path):
    import shutil
    data_file = tmp_path / "chat.jsonl"
    shutil.copy(tiny_chat_jsonl, data_file)
    out = tmp_path / "c"
    argv = ["--cache", str(out), "--k", "16", "--shard-examples", "16", *run_flags(tiny_teacher_dir, data_file)]
    teacher_cache.main(argv)
    lines = data_file.read_text().splitlines()
    data_file.write_text("\n".join(lines[:-1] + [lines[-1].replace("plus", "and")]) + "\n")  # same path
    with pytest.raises(SystemExit, match=rf"another run; data .*\({data_file} has other bytes"):
        teacher_cache.main(argv)
    with pytest.raises(SystemExit, match=rf"made for another run; data .*\({data_file} has other bytes"):
        train.main(run_flags(tiny_teacher_dir, data_file) + ["--teacher-cache", str(out), "--out",
                                                             str(tmp_path / "run"), "--prune-to", "2"])


@pytest.mark.parametrize("bad, message", [(["--temperature", "0"], "--temperature 0.0: must be above 0"),
                                          (["--max-len", "1"], "--max-len 1: must be 2 or more"),
                                          (["--data", "nope.jsonl"], "error: .*nope.jsonl")])
def test_teacher_cache_checks_its_flags_before_any_work(bad, message, tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "teacher_cache.py"), "--cache", str(tmp_path / "c"),
                           *run_flags(tiny_teacher_dir, tiny_chat_jsonl), *bad], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "c").exists()


def test_a_folder_that_is_not_a_cache_is_never_written_into(tiny_teacher_dir, tiny_chat_jsonl, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit, match=r"already holds files \(notes.txt\) and no manifest.json"):
        teacher_cache.main(["--cache", str(tmp_path / "mine"), *run_flags(tiny_teacher_dir, tiny_chat_jsonl)])
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_full_disk_while_writing_a_shard_is_named(cache_dir, tiny_teacher_dir, tiny_chat_jsonl, tmp_path,
                                                    monkeypatch):
    from safetensors import SafetensorError
    out = tmp_path / "c"

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves behind
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(cache_store, "save_file", full)
    with pytest.raises(SystemExit, match=rf"writing the teacher cache shard train-00000.safetensors: the disk holding "
                                         rf"{out} is full \(this needs about [\d.]+ KiB; .*Nothing was lost"):
        teacher_cache.main(["--cache", str(out), "--k", "16", "--shard-examples", "16",
                            *run_flags(tiny_teacher_dir, tiny_chat_jsonl)])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # no temporary left

