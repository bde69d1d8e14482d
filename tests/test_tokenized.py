"""runkit/tokenized.py: the cached tokenisation equals data.tokenize_all, is built once and reused, is rebuilt
when its key changes, is never left half-written, and worker processes give the same bytes."""
import json

import numpy as np
import pytest

import data
from data import DataStats, Tokenizer
from runkit import files, tokenized

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
    reference = data.tokenize_all(smol, conversations, 48, ref_stats)
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
        data.tokenize_all(smol, [conversations[i] for i in keep], 48, DataStats()))
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
