"""data.py: chat templates against transformers, label masks, bad input, batches."""
import json
import re
import shutil

import numpy as np
import pytest
import torch

import data
from benchmarks.examples import tokenize_all, tokenize_batch
from data import IGNORE_INDEX, Batches, DataStats, Tokenizer, tokenize_conversation
from runkit import offline
from runkit.files import load_conversations

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3 style: BOS from the template, headers, <|eot_id|>, and transformers' {% generation %} tag.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
          "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 equals 4."},
    {"role": "user", "content": "And  twice that?\n"},
    {"role": "assistant", "content": "Twice that is 8, since 4 x 2 = 8.\n\nAnything else?"},
]


def tiny_folder(path, template, specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
    """A byte-level BPE tokenizer trained on a few sentences, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for m in CONVERSATION] * 5 + ["the quick brown fox jumps over the lazy dog"] * 5
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "rstrip": False, "normalized": False,
                       "single_word": False, "special": True}  # the AddedToken dict form some folders use
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": added(specials[0]),
              "eos_token": added(specials[1]), "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("llama3"), LLAMA3,
                       ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"))


def trained_runs(tok, example):
    """The decoded text of each contiguous run of trained tokens (special tokens kept)."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template, against transformers

def test_chat_template_and_encoding_match_transformers(smollm2_dir, smol):
    from transformers import PreTrainedTokenizerFast
    ref = PreTrainedTokenizerFast.from_pretrained(str(smollm2_dir))
    for messages in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:4]):
        for gen in (False, True):
            text = smol.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert smol.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert smol.decode(smol.encode("Hello, world! 123")) == "Hello, world! 123"
    assert (smol.bos_token_id, smol.eos_token_id, smol.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)
    assert smol.vocab_size == len(ref) == 49152
    assert smol.tokenizer.token_to_id("<|im_end|>") in smol.stop_token_ids


def test_tiny_llama3_template_matches_transformers(llama3_dir):
    from transformers import PreTrainedTokenizerFast
    tok, ref = Tokenizer.from_dir(llama3_dir), PreTrainedTokenizerFast.from_pretrained(str(llama3_dir))
    for gen in (False, True):
        assert tok.apply_chat_template(CONVERSATION, gen) == ref.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(CONVERSATION).startswith("<|begin_of_text|><|start_header_id|>system")
    assert tok.stop_token_ids == [tok.tokenizer.token_to_id("<|eot_id|>")]


def test_template_helpers_raise_exception_and_tojson(tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be the user') }}{% endif %}"
                "{{ messages | tojson }}{{ strftime_now('%Y') | length }}")
    tok = Tokenizer.from_dir(tiny_folder(tmp_path, template))
    assert tok.apply_chat_template([{"role": "user", "content": "é<b>"}]) == '[{"role": "user", "content": "é<b>"}]4'
    with pytest.raises(Exception, match="first turn must be the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------------------------------------
# Label masks: the trained tokens are exactly the assistant replies and their end-of-turn token

SHAPES = {
    "messages": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                                    "value": m["content"]} for m in CONVERSATION]},
    "alpaca": {"system": "Answer in one sentence.", "instruction": "What is", "input": "2 + 2?",
               "output": "2 + 2 equals 4."},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_is_exactly_the_replies_for_each_shape(tmp_path, smol, shape):
    (tmp_path / "d.jsonl").write_text(json.dumps(SHAPES[shape]) + "\n")
    (messages,), _ = load_conversations(tmp_path / "d.jsonl")
    assert messages[0] == {"role": "system", "content": "Answer in one sentence."}
    example = tokenize_conversation(smol, messages, max_len=512)
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert trained_runs(smol, example) == replies and len(replies) == (1 if shape == "alpaca" else 2)
    assert example["truncated"] is False and len(example["input_ids"]) == len(example["labels"])


def test_mask_matches_transformers_generation_mask(llama3_dir):
    """Independent reference: transformers' return_assistant_tokens_mask from the {% generation %} tag."""
    from transformers import PreTrainedTokenizerFast
    tok, ref = Tokenizer.from_dir(llama3_dir), PreTrainedTokenizerFast.from_pretrained(str(llama3_dir))
    example = tokenize_conversation(tok, CONVERSATION, max_len=512)
    out = ref.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == out["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in example["labels"]] == out["assistant_masks"]
    assert trained_runs(tok, example) == ["2 + 2 equals 4.<|eot_id|>",
                                          "Twice that is 8, since 4 x 2 = 8.\n\nAnything else?<|eot_id|>"]


def test_smollm2_mask_matches_transformers_on_offline_conversations(smollm2_dir, smol, tmp_path):
    """The real tokenizer, SmolLM2's template with {% generation %} around each reply and its <|im_end|>."""
    from transformers import PreTrainedTokenizerFast
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    turn = "'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'"
    assert "{{" + turn + "}}" in config["chat_template"]
    config["chat_template"] = config["chat_template"].replace("{{" + turn + "}}", (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}{{" + turn + "}}{% endif %}"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    heldout = offline.chat_dataset("heldout")
    chats = [CONVERSATION] + [r["messages"] for r in heldout if r["source"] == "coqa"][:3] + \
            [r["messages"] for r in heldout[::50]]
    for messages in chats:
        example = tokenize_conversation(smol, messages, max_len=4096)
        out = ref.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert example["input_ids"] == out["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in example["labels"]] == out["assistant_masks"]


def test_reply_before_any_prompt(smol):
    messages = [{"role": "assistant", "content": "Hi, ask me anything."}, *CONVERSATION[1:3]]
    example = tokenize_conversation(smol, messages, max_len=512)
    assert trained_runs(smol, example) == ["Hi, ask me anything.<|im_end|>", "2 + 2 equals 4.<|im_end|>"]


def test_mask_with_tiny_chatml_tokenizer(tmp_path):
    tok = Tokenizer.from_dir(tiny_folder(tmp_path, CHATML))
    example = tokenize_conversation(tok, CONVERSATION[1:], max_len=512)  # default system prompt from the template
    assert trained_runs(tok, example) == [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]


def test_truncation_is_counted_and_empty_examples_dropped(smol):
    long = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "Fine."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]
    full = tokenize_conversation(smol, short, max_len=10**6)
    n = len(full["input_ids"])
    cut = tokenize_conversation(smol, short, max_len=n - 2)  # cuts "<|im_end|>" and "\n"
    assert cut["truncated"] and not full["truncated"] and len(cut["input_ids"]) == n - 2
    assert cut["labels"] == full["labels"][:n - 2] and trained_runs(smol, cut) == ["Hello there, friend."]
    stats = DataStats()
    examples = tokenize_all(smol, [long, short, short], max_len=n, stats=stats)
    assert (len(examples), stats.truncated, stats.dropped, stats.examples) == (2, 1, 1, 2)
    with pytest.raises(ValueError, match="no example keeps an assistant token"):
        tokenize_all(smol, [long], max_len=n)


@pytest.mark.parametrize("template", ["smollm2", "chatml", "llama3"])
def test_batched_tokenization_equals_one_by_one(template, smol, llama3_dir, tmp_path):
    """The fast path (one encode_batch call, vectorised labels) gives exactly tokenize_conversation's
    ids, labels and truncation flag: multi-turn, system prompts, a reply before any prompt, cuts."""
    tok = {"smollm2": lambda: smol, "llama3": lambda: Tokenizer.from_dir(llama3_dir),
           "chatml": lambda: Tokenizer.from_dir(tiny_folder(tmp_path, CHATML))}[template]()
    heldout = offline.chat_dataset("heldout")
    chats = [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3],
             [{"role": "assistant", "content": "Hi, ask me anything."}, *CONVERSATION[1:3]],
             [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Fine. " * 40}]]
    chats += [r["messages"] for r in heldout if r["source"] == "coqa"][:3] + [r["messages"] for r in heldout[::40]]
    for max_len in (4096, 40, 7):
        batched = tokenize_batch(tok, chats, max_len)
        assert batched == [tokenize_conversation(tok, m, max_len) for m in chats]
    assert any(e["truncated"] for e in batched) and sum(len(m) > 2 for m in chats) >= 4


# ---------------------------------------------------------------------------------------------
# Reading files, and bad input

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_json_parquet_folder_and_max_samples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    records = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(30)]
    (tmp_path / "a.json").write_text(json.dumps(records[:10]))
    (tmp_path / "b.json").write_text(json.dumps({"data": records[10:20]}))
    pq.write_table(pa.Table.from_pylist([{"messages": to} for to in
                                         [[{"role": "user", "content": r["instruction"]},
                                           {"role": "assistant", "content": r["output"]}] for r in records[20:]]]),
                   tmp_path / "c.parquet")
    (tmp_path / "dataset_info.json").write_text("{}")  # metadata next to the data is ignored
    conversations, stats = load_conversations(tmp_path)
    assert stats.files == 3 and len(conversations) == 30
    assert [c[-1]["content"] for c in conversations] == [str(i) for i in range(30)]
    subset, _ = load_conversations(tmp_path, max_samples=7, seed=1)
    assert len(subset) == 7 and subset == load_conversations(tmp_path, max_samples=7, seed=1)[0]
    assert subset != load_conversations(tmp_path, max_samples=7, seed=2)[0]


def test_json_lines_in_a_json_file_gzip_and_line_separators(tmp_path):
    import gzip
    record = {"instruction": "Say a\u2028b", "output": "a\u2028b"}  # U+2028 may sit unescaped in JSON strings
    (tmp_path / "a.json").write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(record) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    conversations, stats = load_conversations(tmp_path)
    assert stats.files == 2 and len(conversations) == 3
    assert all(c[-1]["content"] == "a\u2028b" for c in conversations)


def test_missing_file_and_unreachable_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_conversations(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="neither a local path nor a Hub data set"):
        load_conversations("no-such-owner/no-such-dataset")  # HF_HUB_OFFLINE=1 in conftest
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        load_conversations(tmp_path)


def test_unknown_shape_lists_shapes_and_keys(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(ValueError, match=r"d.jsonl:1: unknown data shape.*'messages'.*'conversations'.*'instruction'"
                                         r".*found keys \['completion', 'prompt'\]"):
        load_conversations(path)


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text(f"{good}\n\n{{not json\n{good}\n")
    with pytest.raises(ValueError, match=r"d.jsonl:3: malformed JSON line"):
        load_conversations(path)
    conversations, stats = load_conversations(path, skip_bad_lines=True)
    assert len(conversations) == 2 and stats.bad_lines == 1 and "1 malformed" in stats.summary()


def test_no_assistant_turn_is_skipped_and_empty_data_is_an_error(tmp_path):
    only_user = {"messages": [{"role": "user", "content": "hello?"}]}
    empty_reply = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}
    path = write_jsonl(tmp_path / "d.jsonl", [only_user, SHAPES["alpaca"], empty_reply])
    conversations, stats = load_conversations(path)
    assert len(conversations) == 1 and stats.no_assistant == 2
    write_jsonl(path, [only_user, empty_reply])
    with pytest.raises(ValueError, match="no usable conversations.*2 conversations without an assistant reply"):
        load_conversations(path)
    write_jsonl(path, [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(ValueError, match="unknown ShareGPT speaker 'robot'"):
        load_conversations(path)


# Every malformed record in every shape and file type: named with file and line (or record index) and
# what was expected, or skipped and counted under skip_bad_lines.

GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
BAD_RECORDS = {
    # (contents of one type within a record, so that Parquet can hold it too)
    "content is a dict": ({"messages": [{"role": "user", "content": {"text": "q"}},
                                        {"role": "assistant", "content": {"text": "a"}}]},
                          r"messages\[0\]: content is a dict \(\{'text': 'q'\}\); expected a string or a list"),
    "image content part": ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": None}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]},
                           r"messages\[0\]: content part 0 is .*'image_url'.*expected \{\"type\": \"text\""),
    "ShareGPT role in messages": ({"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]},
                                  r"messages\[0\] has unknown role 'human'.*ShareGPT speaker name: write role 'user'"),
    "messages not a list": ({"messages": "q and a"}, r"'messages' is 'q and a'; expected a list"),
    "message not an object": ({"messages": ["q", "a"]}, r"messages\[0\] is 'q'; expected \{\"role\""),
    "conversations not a list": ({"conversations": {"from": "human"}}, r"'conversations' is .*expected a list"),
    "ShareGPT value is a dict": ({"conversations": [{"from": "human", "value": {"t": "q"}},
                                                    {"from": "gpt", "value": {"t": "a"}}]},
                                 r"conversations\[0\]: content is a dict"),
    "ShareGPT turn not an object": ({"conversations": ["q", "a"]}, r"conversations\[0\] is 'q'; expected \{\"from\""),
    "Alpaca output is a dict": ({"instruction": "q", "output": {"text": "a"}}, r"'output': content is a dict"),
    "Alpaca instruction is a number": ({"instruction": 5, "output": "a"}, r"'instruction' is 5; expected a string"),
    "Alpaca history is not pairs": ({"instruction": "q", "output": "a", "history": [["only one"]]},
                                    r"history\[0\] is \['only one'\]; expected a \[query, answer\] pair"),
}


def parquet_table(records):
    """A table whose columns are inferred from every record (from_pylist would use the first one only)."""
    import pyarrow as pa
    return pa.Table.from_struct_array(pa.array(records))


def write_records(path, records):
    """records in the file type of path's suffix: JSON Lines, a JSON list, Parquet, or gzip'd JSON Lines."""
    import gzip
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq
        pq.write_table(parquet_table(records), path)
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(records, indent=1))
    else:
        write_jsonl(path, records)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".jsonl.gz"])
@pytest.mark.parametrize("case", BAD_RECORDS)
def test_malformed_record_names_where_and_what_or_is_skipped(tmp_path, case, suffix):
    bad, expected = BAD_RECORDS[case]
    records = [GOOD, bad, GOOD]
    if suffix == ".parquet":
        import pyarrow as pa
        try:  # Parquet columns have one type: a record that mixes types cannot be written at all
            parquet_table(records)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            records = [bad, bad]  # then the bad record alone (twice, so one skipped still leaves one)
            try:
                parquet_table(records)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                pytest.skip(f"{case}: not representable in Parquet")
    path = write_records(tmp_path / f"d{suffix}", records)
    index = records.index(bad)
    where = f"d{re.escape(suffix)}" + (f":{index + 1}" if suffix.startswith(".jsonl") else rf"\[{index}\]")
    with pytest.raises(ValueError, match=rf"{where}: .*{expected}.*--skip-bad-lines"):
        load_conversations(path)
    if records.count(GOOD):
        conversations, stats = load_conversations(path, skip_bad_lines=True)
        assert len(conversations) == 2 and stats.bad_lines == 1 and stats.records == 3
        assert "skipped 1 malformed lines or records" in stats.summary()
    else:
        with pytest.raises(ValueError, match="no usable conversations.*skipped 2 malformed"):
            load_conversations(path, skip_bad_lines=True)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".jsonl.gz"])
def test_openai_text_parts_are_joined(tmp_path, suffix):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world."}]
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                           {"role": "assistant", "content": parts}]}
    (conversation,), _ = load_conversations(write_records(tmp_path / f"d{suffix}", [record]))
    assert conversation == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world."}]


def test_unreadable_files_are_named_in_one_line(tmp_path):
    import gzip
    good = json.dumps(GOOD) + "\n"
    (tmp_path / "garbage.jsonl.gz").write_bytes(b"this is not gzip at all\n")
    whole = gzip.compress(good.encode() * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 truncated")
    for name, expected in (("garbage.jsonl.gz", "not a complete gzip file"), ("cut.jsonl.gz", "not a complete gzip file"),
                           ("cut.parquet", "not a readable Parquet file")):
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: {expected}"):
            load_conversations(tmp_path / name)
    # A line that is not UTF-8 is one malformed line, named or skipped; the lines after it still count.
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + '{"x": "caf\xe9"}\n'.encode("latin-1") + good.encode())
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: malformed JSON line"):
        load_conversations(tmp_path / "latin1.jsonl")
    conversations, stats = load_conversations(tmp_path / "latin1.jsonl", skip_bad_lines=True)
    assert len(conversations) == 2 and stats.bad_lines == 1


# ---------------------------------------------------------------------------------------------
# Batches: shards, padding, resume

def fake_examples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g).tolist()
    return [{"input_ids": [100 + i] * n_tok, "labels": [IGNORE_INDEX] + [100 + i] * (n_tok - 1)}
            for i, n_tok in enumerate(lengths)]


def rows(batch):
    """Each row's example id (input_ids[0] - 100) and unpadded length."""
    return [(int(ids[0]) - 100, int(mask.sum())) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


@pytest.mark.parametrize("sort_window", [0, 8])
def test_rank_shards_are_disjoint_and_union_is_the_global_batch(sort_window):
    examples, world, b = fake_examples(50), 3, 2
    single = list(Batches(examples, b * world, pad_id=0, seed=5, sort_window=sort_window))
    shards = [list(Batches(examples, b, pad_id=0, rank=r, world_size=world, seed=5, sort_window=sort_window))
              for r in range(world)]
    micro = list(Batches(examples, b, pad_id=0, seed=5, sort_window=sort_window))
    assert len(single) == 50 // 6 == len(Batches(examples, b, pad_id=0, world_size=world))
    seen = []
    for step, batch in enumerate(single):
        parts = [rows(shards[r][step]) for r in range(world)]
        assert sum(parts, []) == rows(batch)  # rank r holds the r-th slice of the global batch
        # one process accumulating `world` micro-batches of b sees the same examples too
        assert sum((rows(m) for m in micro[step * world:(step + 1) * world]), []) == rows(batch)
        seen += [i for i, _ in rows(batch)]
    assert len(seen) == len(set(seen)) == 48
    if sort_window:  # within a window of 8 examples, longest first
        lengths = [n for batch in single for _, n in rows(batch)]
        assert all(lengths[w:w + 8] == sorted(lengths[w:w + 8], reverse=True) for w in range(0, 48, 8))


def test_padding_is_right_with_pad_id_and_ignored_labels():
    batch = next(iter(Batches(fake_examples(8), 8, pad_id=7, shuffle=False)))
    for row, (ids, mask, labels) in enumerate(zip(batch["input_ids"], batch["attention_mask"], batch["labels"])):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == 7).all() and (labels[n:] == IGNORE_INDEX).all() and (ids[:n] == 100 + row).all()
    assert all(t.dtype == torch.long for t in batch.values())


def test_resume_from_state_dict_continues_exactly():
    examples = fake_examples(40)
    full = Batches(examples, 4, pad_id=0, seed=3, sort_window=8)
    reference = [rows(b) for _ in range(3) for b in full]  # three epochs, uninterrupted
    assert reference[:10] != reference[10:20]  # each epoch has its own order

    first = Batches(examples, 4, pad_id=0, seed=3, sort_window=8)
    got = [rows(b) for b in first]  # epoch 0, then stop in the middle of epoch 1
    for batch in first:
        got.append(rows(batch))
        if len(got) == 13:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert (state["epoch"], state["step"]) == (1, 3)
    resumed = Batches(examples, 4, pad_id=0, seed=3, sort_window=8)
    resumed.load_state_dict(state)
    while resumed.epoch < 3:
        got += [rows(b) for b in resumed]
    assert got == reference
    with pytest.raises(ValueError, match="global_batch=4, but now global_batch=8"):
        Batches(examples, 8, pad_id=0, seed=3, sort_window=8).load_state_dict(state)


def test_resume_saved_after_the_last_batch_of_an_epoch():
    examples = fake_examples(12)
    a = Batches(examples, 4, pad_id=0, seed=1)
    list(a)
    first_epoch_end = {**a.state_dict(), "epoch": 0, "step": len(a)}  # saved inside the loop, after batch 3
    b = Batches(examples, 4, pad_id=0, seed=1)
    b.load_state_dict(first_epoch_end)
    assert [rows(x) for x in b] == [rows(x) for x in a] and b.epoch == 2


def test_offline_source_reads_the_builtin_chat_data(smol):
    """load_conversations("offline:heldout") is offline.chat_dataset("heldout"), and it fits 512 tokens."""
    conversations, stats = load_conversations("offline:heldout")
    assert conversations == [r["messages"] for r in offline.chat_dataset("heldout")]
    conversations, stats = load_conversations("offline:heldout", max_samples=100)
    examples = tokenize_all(smol, conversations, 512, stats)
    assert len(examples) == 100 and stats.truncated <= 5


# ---------------------------------------------------------------------------------------------
# Packing

def test_pack_places_every_example_once_within_max_len():
    examples = [{"input_ids": list(range(100 * i, 100 * i + n)), "labels": [7] * n}
                for i, n in enumerate(torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(0)).tolist())]
    packed = data.pack(examples, max_len=64, seed=3, window=50)
    seen = []
    for j in range(len(packed)):
        row = packed[j]
        assert len(row["input_ids"]) <= 64 and len(row["labels"]) == len(row["document_ids"]) == len(row["input_ids"])
        for d in np.unique(row["document_ids"]):
            ids = row["input_ids"][row["document_ids"] == d].tolist()
            labels = row["labels"][row["document_ids"] == d].tolist()
            i = ids[0] // 100
            assert ids == examples[i]["input_ids"]  # whole, in order, contiguous (unique doc ids per row)
            assert labels == [IGNORE_INDEX] + examples[i]["labels"][1:]  # nothing trains across a boundary
            seen.append(i)
        assert (np.diff(row["document_ids"]) >= 0).all()
    assert sorted(seen) == list(range(len(examples)))
    total = sum(len(e["input_ids"]) for e in examples)
    assert total / (64 * len(packed)) > 0.85  # best-fit decreasing: most rows full (lengths up to 60 of 64)
    assert [r.tolist() for r in data.pack(examples, 64, seed=3, window=50).rows] == [r.tolist() for r in packed.rows]
    with pytest.raises(ValueError, match="more than the packed row length"):
        data.pack(examples, max_len=32)


def test_packed_rows_collate_with_document_ids():
    examples = [{"input_ids": [5] * n, "labels": [6] * n} for n in (3, 4, 8, 2)]
    packed = data.pack(examples, max_len=8, seed=0)
    batch = Batches(packed, batch_size=len(packed), pad_id=0, shuffle=False).collate([packed[j] for j in range(len(packed))])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "document_ids"}
    assert ((batch["document_ids"] == -1) == (batch["attention_mask"] == 0)).all()
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == sum(n - 1 for n in (3, 4, 8, 2))


def test_a_fixed_width_pads_every_batch_to_it():
    """width (train.py sets --max-len for packed rows it compiles): every batch has that many columns,
    the extra ones padding (pad id, no label, document -1), the rows' own tokens as without it."""
    examples = [{"input_ids": [5] * n, "labels": [6] * n} for n in (3, 4, 2, 1)]
    packed = data.pack(examples, max_len=5, seed=0)
    rows_ = [packed[j] for j in range(len(packed))]
    plain = Batches(packed, batch_size=len(packed), pad_id=0, shuffle=False).collate(rows_)
    wide = Batches(packed, batch_size=len(packed), pad_id=0, shuffle=False, width=8).collate(rows_)
    T = plain["input_ids"].shape[1]
    assert T < 8 and wide["input_ids"].shape == (len(packed), 8)
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("document_ids", -1)):
        assert torch.equal(wide[key][:, :T], plain[key]) and (wide[key][:, T:] == pad).all()


# ---------------------------------------------------------------------------------------------
# On-policy rows

def first_prompt(tok, messages):
    """The conversation up to its first assistant reply, rendered with the generation prompt."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tok.encode(tok.apply_chat_template(messages[:first], add_generation_prompt=True))


def test_prompts_are_the_conversation_up_to_the_first_reply(smol):
    """Against the chat template rendered on its own: system and user turns plus the assistant
    header, nothing of the reply, and only the first exchange of a multi-turn conversation."""
    conversations = [CONVERSATION, [{"role": "user", "content": "Name a colour."},
                                    {"role": "assistant", "content": "Blue."}]]
    batch = collate(tokenize_batch(smol, conversations, 512))
    got = data.prompts(batch)
    assert got == [first_prompt(smol, c) for c in conversations]
    assert smol.decode(got[0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    batch["labels"][1] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"row 1 \(example 8\) has no target"):
        data.prompts({**batch, "example_ids": torch.tensor([7, 8])})


def collate(rows):
    """Batches' right-padded tensors of exactly these rows."""
    return Batches(rows, len(rows), pad_id=0, shuffle=False).collate(rows)


def on_policy_batch():
    """Three right-padded rows: prompt tokens 1xx (no label), then reply tokens 2xx (labelled);
    row 2 has a second exchange after its reply."""
    rows = [{"input_ids": [101, 102, 103, 201, 202], "labels": [IGNORE_INDEX] * 3 + [201, 202]},
            {"input_ids": [111, 112, 211, 212, 213, 214], "labels": [IGNORE_INDEX] * 2 + [211, 212, 213, 214]},
            {"input_ids": [121, 221, 122, 222], "labels": [IGNORE_INDEX, 221, IGNORE_INDEX, 222]}]
    return {**collate(rows), "example_ids": torch.tensor([4, 5, 6])}


def test_with_replies_marks_exactly_the_sampled_tokens():
    batch = on_policy_batch()
    before = {k: v.clone() for k, v in batch.items()}
    replies = [[301, 302, 303, 304, 305], [321]]
    out = data.with_replies(batch, [0, 2], replies, max_len=16, pad_id=9)
    assert out["sampled"].tolist() == [True, False, True] and torch.equal(out["example_ids"], before["example_ids"])
    assert all(torch.equal(batch[k], before[k]) for k in before)  # the batch given is left alone
    assert data.prompts(out) == data.prompts(before)               # prompts kept token for token
    for row, prompt, reply in ((0, [101, 102, 103], replies[0]), (2, [121], replies[1])):
        n = len(prompt) + len(reply)
        assert out["input_ids"][row, :n].tolist() == prompt + reply
        assert out["labels"][row].tolist() == [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * (8 - n)
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (8 - n)
        assert out["input_ids"][row, n:].eq(9).all()
    assert out["input_ids"].shape == (3, 8)                        # right padded to the longest row
    for key in ("input_ids", "labels", "attention_mask"):         # the untouched row, as it was
        assert torch.equal(out[key][1, :6], before[key][1])
    assert out["labels"][1, 6:].eq(IGNORE_INDEX).all() and not out["attention_mask"][1, 6:].any()
    assert int((out["labels"][:, 1:] != IGNORE_INDEX).sum()) == 5 + 1 + 4
    unchanged = data.with_replies(batch, [], [], max_len=16, pad_id=0)
    assert not unchanged["sampled"].any() and all(torch.equal(unchanged[k], batch[k]) for k in before)


def test_with_replies_cuts_replies_to_max_len():
    batch = on_policy_batch()
    out = data.with_replies(batch, [0, 1], [list(range(300, 320)), [7, 8]], max_len=7, pad_id=0)
    assert out["input_ids"].shape == (3, 7)
    assert out["input_ids"][0].tolist() == [101, 102, 103, 300, 301, 302, 303]
    assert out["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [300, 301, 302, 303]
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * 2 + [7, 8] + [IGNORE_INDEX] * 3
    with pytest.raises(ValueError, match="row 0: its prompt of 3 tokens leaves no room"):
        data.with_replies(batch, [0], [[300]], max_len=3, pad_id=0)
