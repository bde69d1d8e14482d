"""runkit/tokenized.py: the cached tokenisation equals benchmarks.examples.tokenize_all, is built once and reused, is rebuilt
when its key changes, is never left half-written, and worker processes give the same bytes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.examples import tokenize_all
from data import DataStats, Tokenizer
from runkit import files, tokenized

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_B = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


def chats(n=40):
    """Varied conversations: one and several turns, a system prompt, some long enough to be cut or dropped."""
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": f"Question {i}.{turn}: " + "why " * (i % 7) * 9},
                         {"role": "assistant", "content": f"Answer {i}.{turn} " + "because " * (i % 5)}]
        out.append({"messages": messages})
    return out


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def as_lists(examples):
    return [(list(map(int, e["input_ids"])), list(map(int, e["labels"]))) for e in examples]


def test_cache_equals_tokenize_all_and_is_reused(smol, tmp_path, monkeypatch):
    path = write(tmp_path / "chat.jsonl", chats() + [{"messages": [{"role": "user", "content": "no reply"}]}])
    store = tokenized.load(path, smol, 48, root=tmp_path / "cache")
    stats = store.stats()
    examples = store.select(range(len(store)), stats)
    conversations, ref_stats = files.load_conversations(path)
    reference = tokenize_all(smol, conversations, 48, ref_stats)
    assert as_lists(examples) == as_lists(reference)
    assert stats == ref_stats and stats.truncated > 0 and stats.dropped > 0 and stats.no_assistant == 1
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.int32
    assert np.array_equal(examples.lengths, [len(e["input_ids"]) for e in reference])

    # The second time nothing is tokenised: the same folder is mapped.
    monkeypatch.setattr(tokenized, "build", lambda *a, **k: pytest.fail("rebuilt an existing cache"))
    assert tokenized.load(path, smol, 48, root=tmp_path / "cache").folder == store.folder
    # A subset selects the same examples as tokenising that subset.
    keep = files.sample_indices(len(store), 10, seed=1)
    sub_stats = DataStats()
    assert as_lists(store.select(keep, sub_stats)) == as_lists(
        tokenize_all(smol, [conversations[i] for i in keep], 48, DataStats()))
    assert sub_stats.conversations == 10


def test_any_change_of_the_key_builds_a_new_cache(smol, tmp_path, smollm2_dir):
    path = write(tmp_path / "chat.jsonl", chats(12))
    root = tmp_path / "cache"
    first = tokenized.load(path, smol, 48, root=root).folder
    other_template = Tokenizer.from_dir(smollm2_dir)
    other_template.chat_template = TEMPLATE_B
    write(tmp_path / "edited.jsonl", chats(12)[:-1] + [{"messages": [{"role": "user", "content": "x"},
                                                                   {"role": "assistant", "content": "y"}]}])
    folders = {first,
               tokenized.load(path, smol, 64, root=root).folder,                      # max_len
               tokenized.load(tmp_path / "edited.jsonl", smol, 48, root=root).folder,  # content
               tokenized.load(path, other_template, 48, root=root).folder,            # template
               tokenized.load(path, smol, 48, skip_bad_lines=True, root=root).folder}  # reading rule
    assert len(folders) == 5
    # The same bytes under another name or folder are the same data: the cache is reused.
    (tmp_path / "elsewhere").mkdir()
    path.rename(tmp_path / "elsewhere" / "renamed.jsonl")
    assert tokenized.load(tmp_path / "elsewhere", smol, 48, root=root).folder == first


def test_failed_build_leaves_nothing_and_stale_temporaries_are_cleared(smol, tmp_path):
    root = tmp_path / "cache"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in chats(5)) + "{not json\n")
    with pytest.raises(ValueError, match="malformed JSON line"):
        tokenized.load(bad, smol, 48, root=root)
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    key, _ = tokenized.fingerprint(bad, smol, 48, True)
    (root / f".{key}.tmp-12345").mkdir()  # as a killed build would leave it
    store = tokenized.load(bad, smol, 48, skip_bad_lines=True, root=root)
    assert store.meta["stats"]["bad_lines"] == 1 and len(store) == 5
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [key]


def test_worker_processes_write_the_same_cache(smol, tmp_path, monkeypatch):
    path = write(tmp_path / "chat.jsonl", chats(60))
    monkeypatch.setattr(tokenized, "CHUNK", 8)  # 8 work items for 2 processes
    one = tokenized.load(path, smol, 48, root=tmp_path / "one", workers=1)
    two = tokenized.load(path, smol, 48, root=tmp_path / "two", workers=2)
    for name in ("tokens.npy", "trained.npy", "offsets.npy", "truncated.npy", "dropped.npy"):
        assert (one.folder / name).read_bytes() == (two.folder / name).read_bytes(), name


@pytest.mark.parametrize("workers", [1, 2])
def test_the_stream_is_read_at_most_a_few_chunks_ahead(smol, monkeypatch, workers):
    # A reader that ran ahead of the encoders would hold the whole data set in memory (it once did:
    # 1M conversations cost 2 GB in the reading process). Threads stand in for the worker processes.
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setattr(tokenized, "CHUNK", 4)
    monkeypatch.setattr(tokenized, "ProcessPoolExecutor", lambda n, mp_context, **kw: ThreadPoolExecutor(n, **kw))
    read = written = 0

    def stream():
        nonlocal read
        for record in chats(80):
            read += 1
            yield record["messages"]

    for ids, trained, lengths, truncated in tokenized._encoded_chunks(stream(), smol, 48, workers):
        assert read - written <= 2 * workers * tokenized.CHUNK  # at most 2 chunks per worker in flight
        written += len(lengths)
    assert read == written == 80


# ----------------------------------------------------------------------------- a damaged cache is rebuilt

def _truncate(name):
    def damage(folder):
        path = folder / name
        path.write_bytes(path.read_bytes()[:-40])
    return damage


def _empty(name):
    return lambda folder: (folder / name).write_bytes(b"")


def _shift_offsets(folder):  # the same length and ends, one conversation boundary moved: silently wrong rows
    offsets = np.load(folder / "offsets.npy")
    offsets[1] += 1
    np.save(folder / "offsets.npy", offsets)


DAMAGE = {"truncated tokens": (_truncate("tokens.npy"), "tokens.npy does not open"),
          "emptied offsets": (_empty("offsets.npy"), "offsets.npy does not open"),
          "emptied trained": (_empty("trained.npy"), "trained.npy does not open"),
          "broken meta.json": (lambda f: (f / "meta.json").write_text("{broken"), "meta.json is not this cache"),
          "meta.json lost": (lambda f: (f / "meta.json").unlink(), "meta.json is not this cache"),
          "shifted offsets": (_shift_offsets, "offsets.npy is not the array this cache was built with"),
          "offsets of another length": (lambda f: np.save(f / "offsets.npy", np.arange(3)), "offsets.npy holds")}


@pytest.mark.parametrize("damage, why", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_cache_is_rebuilt_saying_why(smol, tmp_path, capsys, damage, why):
    path = write(tmp_path / "chat.jsonl", chats(12))
    first = tokenized.load(path, smol, 48, root=tmp_path / "cache")
    want = as_lists(first.select(range(len(first))))
    damage(first.folder)
    again = tokenized.load(path, smol, 48, root=tmp_path / "cache")
    said = capsys.readouterr().out
    assert f"tokenised cache {first.folder} is damaged: {why}" in said and "rebuilding it" in said
    assert again.folder == first.folder and as_lists(again.select(range(len(again)))) == want
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == [first.folder.name]


def test_a_full_disk_while_tokenising_is_named_and_leaves_nothing(smol, tmp_path, monkeypatch):
    import errno
    path = write(tmp_path / "chat.jsonl", chats(12))

    def full(self, array):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tokenized._NpyAppender, "write", full)
    with pytest.raises(SystemExit, match=rf"tokenising {path} into the cache: the disk holding {tmp_path / 'cache'} "
                                         r"is full \(this needs about [\d.]+ \w+; .* free now\). Nothing was lost"):
        tokenized.load(path, smol, 48, root=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


# ----------------------------------------------------------------------------- workers end with their parent

def _children(pid: int) -> set[int]:
    """Every live process whose parent is `pid` (read from /proc; zombies count as gone)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux /proc and 2 cores (worker processes start from 2 cores)")
def test_killed_train_leaves_no_tokenising_workers(tiny_teacher_dir, tmp_path):
    # Enough conversations for ~20 chunks over 2 workers; kill -9 once the first chunk is written, so
    # the workers are past their start-up (a worker still starting up dies with the parent anyway).
    path = write(tmp_path / "chat.jsonl", chats(40) * 1000)
    cmd = [sys.executable, str(ROOT / "train.py"), "--teacher", str(tiny_teacher_dir), "--data", str(path),
           "--out", str(tmp_path / "run"), "--max-len", "48", "--prune-to", "2", "--no-report"]
    env = {**os.environ, "NEO_CACHE": str(tmp_path / "neo-cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        written = lambda: any(f.stat().st_size > 128 for f in tmp_path.glob("neo-cache/tokenized/.*.tmp-*/tokens.npy"))
        while not written() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        workers = _children(proc.pid)
        assert len(workers) >= 2, f"no worker processes running: {proc.stderr.read().decode()[-2000:]}"
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "worker processes outlived the killed train.py"
    finally:
        proc.kill()
        for w in locals().get("workers", ()):
            if _alive(w):
                os.kill(w, signal.SIGKILL)
