"""Tokenising conversations into a Python list of examples, in memory: what the tests and
benchmarks compare runkit/tokenized.py's on-disk store against. Training never calls these; it
reads the store, which data.encode_conversations fills with the same rule."""
import numpy as np

from data import IGNORE_INDEX, DataStats, Tokenizer, encode_conversations


def tokenize_batch(tok: Tokenizer, conversations: list, max_len: int) -> list[dict]:
    """data.tokenize_conversation for a list of conversations, through the batched encoder."""
    ids, trained, lengths, truncated = encode_conversations(tok, conversations, max_len)
    labels = np.where(trained, ids, IGNORE_INDEX)
    bounds = np.cumsum(lengths)
    return [{"input_ids": ids[j - n:j].tolist(), "labels": labels[j - n:j].tolist(), "truncated": bool(cut)}
            for n, j, cut in zip(lengths, bounds, truncated)]



def tokenize_all(tok: Tokenizer, conversations: list, max_len: int, stats: DataStats | None = None) -> list[dict]:
    """Tokenise every conversation; count truncations and drop examples left with nothing to train."""
    stats = stats or DataStats()
    examples = []
    for example in tokenize_batch(tok, conversations, max_len):
        stats.truncated += example["truncated"]
        if all(label == IGNORE_INDEX for label in example["labels"][1:]):  # labels[0] is never a target
            stats.dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise ValueError(f"no example keeps an assistant token within max_len={max_len} ({stats.summary()})")
    stats.examples = len(examples)
    return examples
