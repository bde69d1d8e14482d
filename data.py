"""Instruction data for LLM-Neo: tokenizer + chat template, label masks, batches.

The paper fine-tunes on instruction data (BAAI Infinity-Instruct, 10k-1M samples) and trains
only on the assistant's replies. This file turns conversations into batches:

    files / Hub id --runkit/files.py--> [{"role", "content"}, ...] per conversation
        --encode_conversations (batched) / tokenize_conversation (one)--> input_ids + labels
          (-100 except assistant tokens); runkit/tokenized.py keeps the result on disk, memory-mapped
        --pack (optional)--> rows of several whole examples, with document ids
        --Batches--> right-padded {input_ids, attention_mask, labels[, document_ids]}, sharded per rank

1. `Tokenizer` reads a Hugging Face model folder (tokenizer.json with the `tokenizers` library,
   tokenizer_config.json for the chat template and special tokens) and renders chat templates
   with jinja2 exactly as transformers' `apply_chat_template` does.
2. Reading data sets (OpenAI `messages`, ShareGPT, Alpaca; JSONL, JSON or Parquet files, a Hub
   id, or the built-in offline set) and checking every field is runkit/files.py's job.
3. Labels: the conversation is rendered once; each assistant reply's character span is found by
   rendering the prefix before it (with the generation prompt) and the prefix up to it, and the
   tokens inside that span, up to and including the end-of-turn token, keep their ids. Everything
   else (system, user, the "<|im_start|>assistant" header, padding) is -100. `encode_conversations`
   applies the same rule to many conversations at once (the `tokenizers` batch encoder, numpy).
4. `Batches`: one global order of examples per epoch (seeded shuffle, optional sort by length
   within windows). Global micro-step i takes examples [i*G, (i+1)*G) of that order, G = batch
   size x world size, and rank r takes its r-th slice of B. So the union over ranks of a micro-step
   is exactly the batch a single process with batch size G sees, and the order never depends on
   how the global batch is split. The position (epoch, step) is saved in checkpoints.
   `pack` (train.py --pack) first fills rows of max_len with whole examples; the rows then take the
   examples' place, and their document ids keep attention and positions inside each example.
5. On-policy rows (GKD, Agarwal et al. 2024): `prompts` cuts each row of a batch to what comes
   before its first reply, and `with_replies` builds the batch in which chosen rows hold that prompt
   plus a reply the student sampled, with only the sampled tokens as targets.
"""
import json
import random
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from neo import IGNORE_INDEX  # label of every token the loss must skip
# Strings that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, Phi-3, ...).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

def _token_str(value):
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return value.get("content") if isinstance(value, dict) else value


@lru_cache(maxsize=16)
def _compile_template(source: str):
    """The Jinja environment transformers uses for chat templates (utils/chat_template_utils.py)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' own masks;
        # we find assistant spans ourselves, so the tag just renders its body.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json) plus its chat template and special tokens."""

    def __init__(self, tokenizer, config: dict, chat_template: str | None, folder: str, eos_ids=()):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.folder = folder
        self.chat_template = chat_template
        # Named special tokens as strings; templates see them as variables (bos_token, eos_token, ...).
        self.special_tokens = {k: _token_str(config[k]) for k in
                               ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
                               if _token_str(config.get(k)) is not None}
        tid = lambda name: tokenizer.token_to_id(self.special_tokens[name]) if name in self.special_tokens else None
        self.bos_token_id = tid("bos_token")
        self.eos_token_id = tid("eos_token")
        # Padding positions are masked out everywhere, so any id works: fall back to eos.
        self.pad_token_id = tid("pad_token") if tid("pad_token") is not None else self.eos_token_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Generation stops at eos, at generation_config's eos ids, and at any end-of-turn token.
        stops = [self.eos_token_id, *eos_ids, *(tokenizer.token_to_id(s) for s in END_OF_TURN)]
        self.stop_token_ids = list(dict.fromkeys(i for i in stops if i is not None))
        self.stop_strings = [tokenizer.id_to_token(i) for i in self.stop_token_ids]

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}: a Hugging Face tokenizer folder needs "
                                        f"tokenizer.json and tokenizer_config.json")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        if (folder / "special_tokens_map.json").is_file():  # older folders keep the named tokens here
            config = {**json.loads((folder / "special_tokens_map.json").read_text()), **config}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves it separately
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # several named templates: use the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        eos_ids = []
        if (folder / "generation_config.json").is_file():
            eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
            eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")), config, template, str(folder), eos_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.folder}: tokenizer_config.json has no chat_template")
        return _compile_template(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens)


# ----------------------------------------------------------------------------------------------
# Tokenisation and label masks

def assistant_spans(tok: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the [start, end) character span of each reply.

    A reply starts where the rendered prefix plus generation prompt ends, and ends after the first
    end-of-turn token inside it (the "\\n" after <|im_end|> is never generated, so never trained).
    """
    text = tok.apply_chat_template(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The whole conversation usually ends with this reply: its render is `text`, no need to redo it.
        upto = text if i == len(messages) - 1 else tok.apply_chat_template(messages[:i + 1])
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else None
        if prompt is not None and upto.startswith(prompt):
            start = len(prompt)
        else:  # e.g. a reply before any prompt, after a default system prompt: find the reply itself
            start = upto.rfind(message["content"].strip())
        if start < 0 or not text.startswith(upto):
            raise ValueError(f"{tok.folder}: the chat template renders earlier turns differently once later "
                             f"turns are added, so assistant reply {i} cannot be located")
        reply = text[start:len(upto)]
        ends = [reply.find(s) + len(s) for s in tok.stop_strings if s in reply]
        spans.append((start, start + (min(ends) if ends else len(reply.rstrip()))))
    return text, spans


def tokenize_conversation(tok: Tokenizer, messages: list[dict], max_len: int) -> dict:
    """-> {"input_ids", "labels", "truncated"}: labels are the ids of assistant tokens, else -100.

    The label rule, written for one conversation: the rendered text is tokenised once
    (add_special_tokens=False: the template already holds any BOS, as in transformers), and a token
    is trained when its character offsets overlap a reply. Training runs the same rule batched
    (encode_conversations, called by runkit/tokenized.py); tests/test_data.py
    (test_batched_tokenization_equals_one_by_one) checks that both give these exact labels.
    """
    text, spans = assistant_spans(tok, messages)
    encoding = tok.tokenizer.encode(text, add_special_tokens=False)
    ids, labels = encoding.ids, []
    for token_id, (start, end) in zip(ids, encoding.offsets):
        end = max(end, start + 1)  # a token whose offsets were trimmed to nothing sits at `start`
        inside = any(start < b and end > a for a, b in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}


def encode_conversations(tok: Tokenizer, conversations: list, max_len: int):
    """Many conversations at once -> (ids, trained, lengths, truncated), the rows back to back.

    ids int32 (N,) and trained bool (N,) (True: the label is the token) hold every conversation cut
    to max_len, one after the other; lengths (n,) and truncated (n,) are per conversation. The
    templates are rendered in Python (assistant_spans), all texts go through the `tokenizers`
    library's batch encoder in one call (Rust, on all threads it is allowed), and the label rule of
    tokenize_conversation (a token trains when its character offsets overlap a reply) runs as one
    vectorised test per reply. Same labels, a few times faster (tests/test_data.py checks equality);
    this is what training runs (runkit/tokenized.py).
    """
    rendered = [assistant_spans(tok, messages) for messages in conversations]
    encodings = tok.tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    full = np.array([len(e) for e in encodings], dtype=np.int64)
    lengths = np.minimum(full, max_len)
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids[:max_len] for e in encodings), np.int32, count=total)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets[:max_len]) for e in encodings),
                          np.int64, count=2 * total).reshape(total, 2)
    start = offsets[:, 0]
    end = np.maximum(offsets[:, 1], start + 1)  # a token whose offsets were trimmed to nothing sits at `start`
    trained = np.zeros(total, dtype=bool)
    row_end = np.cumsum(lengths)
    for (_, spans), i, j in zip(rendered, row_end - lengths, row_end):
        for a, b in spans:
            trained[i:j] |= (start[i:j] < b) & (end[i:j] > a)
    return ids, trained, lengths, full > max_len


@dataclass
class DataStats:
    """What happened to the data on its way to batches: runkit/files.py counts the reading,
    the tokenising the cuts; runkit/tokenized.load_splits prints `summary()`."""
    files: int = 0
    records: int = 0         # records read
    bad_lines: int = 0       # malformed JSON lines and records skipped (skip_bad_lines=True)
    no_assistant: int = 0    # conversations without an assistant reply, skipped
    conversations: int = 0   # kept after filtering and max_samples
    truncated: int = 0       # examples cut to max_len
    dropped: int = 0         # examples with no assistant token left after truncation
    examples: int = 0        # tokenised examples that reach the batches

    def summary(self) -> str:
        files = f" from {self.files} file(s)" if self.files else ""
        return (f"{self.records} records{files}; skipped {self.bad_lines} malformed lines or records and "
                f"{self.no_assistant} conversations without an assistant reply; kept {self.conversations}; "
                f"{self.truncated} truncated to max-len, {self.dropped} dropped (nothing left to train on); "
                f"{self.examples} examples")


# ----------------------------------------------------------------------------------------------
# Batches

class Batches:
    """Right-padded micro-batches of one data-parallel rank, with a resumable position.

    Epoch e has one global order of all examples (seeded by seed and e; with sort_window > 0,
    each window of that many examples is sorted longest first, so batches hold similar lengths).
    Global micro-step i covers order[i*G : (i+1)*G], G = batch_size * world_size, and rank r gets
    order[i*G + r*B : i*G + (r+1)*B]. The order depends only on (seed, epoch, sort_window), so any
    split of the same global batch into ranks x micro-batches x accumulation sees the same examples
    per optimizer step. The last incomplete global batch of an epoch is dropped, so all ranks run
    the same number of steps.

        for batch in batches:   # from the saved position to the end of the current epoch
            ...                 # batches.state_dict() here points at the next batch
    """

    def __init__(self, examples: list[dict], batch_size: int, *, pad_id: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, sort_window: int = 0, width: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.sort_window = seed, shuffle, sort_window
        self.width = width  # pad every batch to this many columns (None: to its longest row)
        self.global_batch = batch_size * world_size
        if len(examples) < self.global_batch:
            raise ValueError(f"{len(examples)} examples are fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks)")
        self.epoch, self.step = 0, 0  # position: the next micro-batch is (epoch, step)

    def __len__(self) -> int:
        """Micro-batches per epoch (the same on every rank)."""
        return len(self.examples) // self.global_batch

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        if self.sort_window:
            length = lambda i: len(self.examples[i]["input_ids"])
            order = [i for w in range(0, len(order), self.sort_window)
                     for i in sorted(order[w:w + self.sort_window], key=length, reverse=True)]
        return order

    def __iter__(self):
        if self.step >= len(self):  # saved right after the last batch of an epoch
            self.epoch, self.step = self.epoch + 1, 0
        order = self.order(self.epoch)
        while self.step < len(self):
            first = self.step * self.global_batch + self.rank * self.batch_size
            ids = order[first:first + self.batch_size]
            self.step += 1
            # example_ids: each row's index in `examples`, the key of per-example side data (teacher cache)
            yield {**self.collate([self.examples[i] for i in ids]), "example_ids": torch.tensor(ids)}
        self.epoch, self.step = self.epoch + 1, 0

    def collate(self, rows: list[dict]) -> dict:
        """Right-padded tensors; packed rows (see `pack`) also bring their document ids (-1 on padding)."""
        width = max([len(r["input_ids"]) for r in rows] + [self.width or 0])
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)    # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)         # (B, T)
        packed = "document_ids" in rows[0]
        document_ids = torch.full((len(rows), width), -1, dtype=torch.long)        # (B, T)
        for j, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[j, :n] = torch.as_tensor(r["input_ids"])
            labels[j, :n] = torch.as_tensor(r["labels"])
            attention_mask[j, :n] = 1
            if packed:
                document_ids[j, :n] = torch.as_tensor(r["document_ids"])
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {**batch, "document_ids": document_ids} if packed else batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "examples": len(self.examples),
                "global_batch": self.global_batch, "sort_window": self.sort_window}

    def load_state_dict(self, state: dict):
        for key, now in (("examples", len(self.examples)), ("global_batch", self.global_batch),
                         ("seed", self.seed), ("sort_window", self.sort_window)):
            if state[key] != now:
                raise ValueError(f"data position was saved with {key}={state[key]}, but now {key}={now}")
        self.epoch, self.step = state["epoch"], state["step"]


def pack(examples, max_len: int, seed: int = 0, window: int = 1000) -> "Packed":
    """Pack examples into rows of at most max_len tokens, so a batch holds little padding.

    The examples are shuffled (seeded) and cut into windows of `window`; inside each window, the
    longest example goes first into the open row with the least room that still fits it
    (best-fit decreasing), or into a new row. Windows bound the cost (1M examples pack in
    seconds) and keep each row a random mix; rows are then ordered by Batches like examples.
    """
    lengths = getattr(examples, "lengths", None)
    lengths = np.asarray([len(e["input_ids"]) for e in examples] if lengths is None else lengths)
    if len(lengths) and lengths.max() > max_len:
        raise ValueError(f"an example has {lengths.max()} tokens, more than the packed row length {max_len}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    rows = []
    for w in range(0, len(order), window):
        chunk = order[w:w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        room, members = np.empty(0, dtype=np.int64), []  # free tokens and example indices per open row
        for i in chunk:
            fits = np.flatnonzero(room >= lengths[i])
            if len(fits):
                r = fits[np.argmin(room[fits])]
                room[r] -= lengths[i]
                members[r].append(i)
            else:
                room = np.append(room, max_len - lengths[i])
                members.append([i])
        rows += [np.array(m) for m in members]
    return Packed(examples, rows)


class Packed:
    """Rows of several examples, back to back: input_ids, labels, and document_ids (0, 1, ... per row).

    The model uses document_ids to keep attention inside each document and to restart RoPE
    positions (model.py); the first token of every document gets no label, as when it starts a
    row alone, so no target crosses a boundary and the loss counts the same tokens as unpacked.
    """

    def __init__(self, examples, rows: list[np.ndarray]):
        self.examples, self.rows = examples, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict:
        docs = [self.examples[int(i)] for i in self.rows[j]]
        labels = [np.asarray(d["labels"]).copy() for d in docs]
        for label in labels:
            label[0] = IGNORE_INDEX
        return {"input_ids": np.concatenate([np.asarray(d["input_ids"]) for d in docs]),
                "labels": np.concatenate(labels),
                "document_ids": np.repeat(np.arange(len(docs)), [len(d["input_ids"]) for d in docs])}


# ----------------------------------------------------------------------------------------------
# On-policy rows: a row's reply replaced by one the student samples (GKD)

def _prompt(batch: dict, i: int) -> list[int]:
    """Row i's tokens before its first target; ValueError naming the row when it has none."""
    targets = (batch["labels"][i, 1:] != IGNORE_INDEX).nonzero()   # position 0 is never a target
    if not len(targets):
        example = f" (example {int(batch['example_ids'][i])})" if "example_ids" in batch else ""
        raise ValueError(f"row {i}{example} has no target, so no reply to replace")
    return batch["input_ids"][i, :int(targets[0]) + 1].tolist()


def prompts(batch: dict) -> list[list[int]]:
    """Each row's tokens before its first target: the conversation up to the start of its first
    assistant reply (system and user turns, the assistant header), as the row has it tokenised.

    This is the prompt the student continues in on-policy distillation. A row without a target
    raises ValueError naming it; packed rows (several conversations each) are refused.
    """
    if "document_ids" in batch:
        raise ValueError("on-policy rows need an unpacked batch: a packed row holds several conversations")
    return [_prompt(batch, i) for i in range(batch["labels"].shape[0])]


def with_replies(batch: dict, rows, replies, max_len: int, pad_id: int) -> dict:
    """A new batch in which row rows[k] is its prompt followed by replies[k] (token ids the student
    sampled, e.g. from model.generate), and every other row is kept as it was.

    A replaced row's labels are -100 on the prompt and the reply's tokens on the reply: only the
    sampled tokens are targets, as GKD trains on the student's own replies; turns after the first
    reply are dropped. Replies are cut so that no replaced row exceeds max_len. Rows are right padded
    with pad_id to the longest; other keys (example_ids) are kept, and "sampled" (B,) bool says which
    rows were replaced (neo.neo_loss's ce_mask is False on them: a sampled reply has no ground truth).
    """
    rows = [int(i) for i in rows]
    if len(rows) != len(replies) or len(set(rows)) != len(rows):
        raise ValueError(f"need one reply per distinct row: rows {rows}, {len(replies)} replies")
    if "document_ids" in batch:
        raise ValueError("on-policy rows need an unpacked batch: a packed row holds several conversations")
    lengths = batch["attention_mask"].sum(1).tolist()                # right padding: real tokens come first
    new = [(batch["input_ids"][i, :n].tolist(), batch["labels"][i, :n].tolist()) for i, n in enumerate(lengths)]
    for i, reply in zip(rows, replies):
        prompt = _prompt(batch, i)
        if len(prompt) >= max_len:
            raise ValueError(f"row {i}: its prompt of {len(prompt)} tokens leaves no room for a reply "
                             f"within max_len={max_len}")
        reply = [int(t) for t in reply][:max_len - len(prompt)]
        new[i] = (prompt + reply, [IGNORE_INDEX] * len(prompt) + reply)
    B, width = len(new), max(len(ids) for ids, _ in new)
    device = batch["input_ids"].device
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)      # (B, T')
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)   # (B, T')
    attention_mask = torch.zeros((B, width), dtype=torch.long)        # (B, T')
    for j, (ids, row_labels) in enumerate(new):
        input_ids[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[j, :len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        attention_mask[j, :len(ids)] = 1
    sampled = torch.zeros(B, dtype=torch.bool)
    sampled[rows] = True
    return {**batch, "input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": labels.to(device), "sampled": sampled.to(device)}

