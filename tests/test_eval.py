"""eval.py against lm-evaluation-harness itself.

Reference: lm-eval's built-in `hf` model (HFLM: transformers, fp32, CPU, logits_cache=False) on the
same weights. (The offline tasks' contents are checked against lm-eval's configs in test_offline.py.)
Most tests use a tiny random Llama saved by transformers with SmolLM2's real tokenizer; one test
uses the real SmolLM2-135M-Instruct on a few requests.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as neo_eval
from lm_eval.api.instance import Instance
from runkit import adapters
from tolerance import close

TOL = 1e-4
# A rolling log-likelihood sums hundreds of float32 token log-probs (~500 nats here), rounded in another
# order by HFLM: measured up to 1.1e-7 of the sum apart, so TOL alone had 7-10x. 1e-5 of the sum is
# the worst case of 150 same-sign float32 roundings, ~90x the measured gap; a lost or extra token moves
# a sum by a whole log-prob (>0.1).
SUM_RTOL = 1e-5
MAX_LEN = 32  # small, so that some requests need left truncation and rolling windows

CONTEXTS = ["Question: What is the capital of France?\nAnswer:", "The quick brown fox",
            "A man is sitting on a roof. He", "Long " * 40 + "context that needs truncation", "1234 + 5678 ="]
CONTINUATIONS = [" Paris", " jumps over the lazy dog.", " starts pulling up roofing.", " end", " 6912"]


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


# ----------------------------------------------------------------------------- fixtures

def save_tiny_llama(folder, smollm2_dir, embed_std):
    """A random 2-layer Llama saved by transformers, with SmolLM2's tokenizer (vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, embed_std)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(smollm2_dir) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """Larger embeddings than a fresh model's: peaked distributions, so greedy tokens are well defined."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_dir, embed_std=0.3)


@pytest.fixture(scope="module")
def hf_lm(tiny_dir):
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", batch_size=4, max_length=MAX_LEN,
                logits_cache=False)


@pytest.fixture(scope="module")
def neo_lm(tiny_dir):
    return neo_eval.NeoLM(str(tiny_dir), device="cpu", dtype="float32", batch_size=3, max_length=MAX_LEN)


# ----------------------------------------------------------------------------- task sources

def test_unknown_task_lists_offline_tasks():
    manager = neo_eval.task_manager("offline")
    with pytest.raises(ValueError, match="offline tasks available: arc_easy, arc_challenge"):
        neo_eval.check_tasks(["arc_easy", "no_such_task"], manager, "offline")


# ----------------------------------------------------------------------------- the model adapter

def greedy_pairs(hf_lm):
    """(context, the model's own greedy continuation): requests whose is_greedy must be True."""
    gens = hf_lm.generate_until([Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 4}), i)
                                 for i, c in enumerate(CONTEXTS[:3])], disable_tqdm=True)
    return list(zip(CONTEXTS[:3], gens))


def test_loglikelihood_matches_hf(hf_lm, neo_lm):
    pairs = [(c, x) for c in CONTEXTS for x in CONTINUATIONS] + [("", "Hello world")] + greedy_pairs(hf_lm)
    requests = ll_requests(pairs)
    before = neo_lm.n_truncated
    theirs = hf_lm.loglikelihood(requests, disable_tqdm=True)
    ours = neo_lm.loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b), pair in zip(theirs, ours, pairs):
        close(a, b, atol=TOL, rtol=0, msg=str(pair))
        assert greedy_a == greedy_b, pair
    assert neo_lm.n_truncated - before == len(CONTINUATIONS)  # the long context, with every continuation
    assert sum(g for _, g in ours) >= 3                         # the greedy continuations are recognised


def test_loglikelihood_rolling_matches_hf(hf_lm, neo_lm):
    texts = [c * 3 for c in CONTEXTS] + ["x"]  # several windows of MAX_LEN tokens each, and a single token
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = hf_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    ours = neo_lm.loglikelihood_rolling(requests, disable_tqdm=True)
    for a, b in zip(theirs, ours):
        close(a, b, atol=TOL, rtol=SUM_RTOL)


def test_loglikelihood_rolling_bos_quirk(tiny_dir, tmp_path):
    """With a tokenizer that adds BOS itself, HFLM also scores log P(BOS | BOS) (lm-eval #3333); we
    don't: ours equals HFLM with add_bos_token=False, and HFLM's default is reproduced exactly by
    scoring the doubled BOS explicitly."""
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / "tiny-bos"
    shutil.copytree(tiny_dir, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))

    ours = neo_eval.NeoLM(str(folder), device="cpu", max_length=MAX_LEN)
    assert ours.tok_encode("Hello")[0] == 1 == ours.prefix_token_id
    texts = CONTEXTS[:3] + [c * 3 for c in CONTEXTS[:3]]  # one window each, then several windows each
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    kw = dict(pretrained=str(folder), device="cpu", dtype="float32", batch_size=2, max_length=MAX_LEN, logits_cache=False)
    hf_default = HFLM(**kw).loglikelihood_rolling(requests, disable_tqdm=True)
    hf_no_bos = HFLM(**kw, add_bos_token=False).loglikelihood_rolling(requests, disable_tqdm=True)
    scores = ours.loglikelihood_rolling(requests, disable_tqdm=True)
    for a, b in zip(hf_no_bos, scores):
        close(a, b, atol=TOL, rtol=SUM_RTOL)
    # Within one window, HFLM's default scores [BOS, t1, ..., tn] after the prefix BOS: the extra
    # P(BOS | BOS) term, and every text token sees two BOS tokens before it.
    for text, theirs in zip(texts[:3], hf_default[:3]):
        tokens = ours.tok_encode(text, add_special_tokens=False)
        (with_quirk, _), = ours._loglikelihood_tokens([(None, [1], [1] + tokens)], disable_tqdm=True)
        close(theirs, with_quirk, atol=TOL, rtol=SUM_RTOL)


def test_generate_until_matches_hf(hf_lm, neo_lm):
    requests = [Instance("generate_until", {}, (c, {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}), i)
                for i, c in enumerate(CONTEXTS)]
    requests.append(Instance("generate_until", {}, (CONTEXTS[0], {"until": [" fox", "Paris"], "max_gen_toks": 8}), 5))
    theirs = hf_lm.generate_until(requests, disable_tqdm=True)
    assert neo_lm.generate_until(requests, disable_tqdm=True) == theirs


def test_cli_table_and_accuracies_match_hf(tiny_dir, tmp_path, capsys):
    """eval.py's command line on offline tasks, with lm-eval's hf model as a second column:
    identical accuracies, a paper-layout table, lm-eval's results JSON."""
    out = tmp_path / "results.json"
    columns = neo_eval.main(["--model", str(tiny_dir), "--hf-reference", "--tasks", "piqa,winogrande,arc_easy",
                             "--task-source", "offline", "--limit", "6", "--batch-size", "4", "--device", "cpu",
                             "--output", str(out)])
    ours, theirs = columns.values()
    for task in ("piqa", "winogrande", "arc_easy"):
        for metric in ("acc,none", "acc_norm,none"):
            assert ours["results"][task].get(metric) == theirs["results"][task].get(metric), (task, metric)
    table = capsys.readouterr().out
    assert "PIQA" in table and "WinoGrande" in table and "ARC-e" in table and "Avg" in table
    saved = json.loads(out.read_text())
    assert set(saved) == set(columns) and "piqa" in saved[f"hf:{tiny_dir.name}"]["results"]


# ----------------------------------------------------------------------------- shared contexts, on lm-eval's tasks

OFFLINE_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa",
                 "mmlu_abstract_algebra", "mmlu_high_school_biology"]  # two MMLU subjects: one-token answers
TASK_DOCS = 3


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, smollm2_dir):
    """Embeddings as transformers initialises them: log-probabilities of a realistic size (up to ~400 nats
    per continuation here), where the 0.3 of tiny_dir makes float32's own log-softmax 5e-4 off float64."""
    return save_tiny_llama(tmp_path_factory.mktemp("task") / "tiny-llama", smollm2_dir, embed_std=0.02)


def hf_for_tasks(task_dir, max_length, **kwargs):
    """HFLM with its log-softmax and sums in float64: its default float32 rounds its own sums of a few
    hundred nats by up to 3e-5, which would hide ours (2.8e-6 from this float64 reference)."""
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=str(task_dir), device="cpu", dtype="float32", batch_size=4, max_length=max_length,
                logits_cache=False, softmax_dtype="float64", **kwargs)


@pytest.fixture(scope="module")
def task_requests(task_dir):
    """{task: lm-eval's own loglikelihood requests for its first TASK_DOCS documents}, plus per task one
    request continuing a document's context with the model's greedy tokens (so is_greedy is True there)."""
    hf = hf_for_tasks(task_dir, 256)
    tasks = neo_eval.task_manager("offline").load(OFFLINE_TASKS)["tasks"]
    requests = {}
    for name in OFFLINE_TASKS:
        tasks[name].build_all_requests(limit=TASK_DOCS)
        requests[name] = [inst for inst in tasks[name].instances if inst.request_type == "loglikelihood"]
        context = requests[name][0].args[0]
        gen = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 3}), 0)
        greedy = hf.generate_until([gen], disable_tqdm=True)[0]
        if greedy and hf._encode_pair(context, greedy)[1]:  # not when it is EOS or merges into the context
            requests[name].append(Instance("loglikelihood", None, (context, greedy), len(requests[name])))
    return requests


def assert_same_scores(theirs, ours, requests):
    """Request by request: log-probabilities within TOL, is_greedy identical."""
    for (a, greedy_a), (b, greedy_b), req in zip(theirs, ours, requests, strict=True):
        close(a, b, atol=TOL, rtol=0, msg=str(req.args))
        assert greedy_a == greedy_b, req.args


@pytest.fixture(scope="module")
def hf_task_scores(task_dir, task_requests):
    """{max_length: (requests, HFLM's scores)}: with room for every request, and with MAX_LEN, where most
    contexts are left-truncated (continuations longer than MAX_LEN, which HFLM refuses, left out)."""
    every = [r for requests in task_requests.values() for r in requests]
    short = hf_for_tasks(task_dir, MAX_LEN)
    fits = [r for r in every if len(short._encode_pair(*r.args)[1]) <= MAX_LEN]
    return {256: (every, hf_for_tasks(task_dir, 256).loglikelihood(every, disable_tqdm=True)),
            MAX_LEN: (fits, short.loglikelihood(fits, disable_tqdm=True))}


# Measured on these requests, fp32 model, against HFLM's float64 log-softmax: the largest |ours - HFLM|
# is 2.8e-6 here and 3.4e-6 with the adapter below (our float32 log-softmax on continuations of up to
# ~400 nats), so TOL = 1e-4 is a margin of 29x or more.
@pytest.mark.parametrize("batch_size", [1, 3, 64])
@pytest.mark.parametrize("max_length", [256, MAX_LEN])
def test_tasks_match_hf_request_by_request(task_dir, hf_task_scores, batch_size, max_length):
    """Every offline task: each request's log-probability and is_greedy equal HFLM's, at batch sizes
    1, 3 and 64, with the context shared by the choices (and cut as HFLM cuts it when too long)."""
    requests, theirs = hf_task_scores[max_length]
    neo = neo_eval.NeoLM(str(task_dir), device="cpu", batch_size=batch_size, max_length=max_length)
    ours = neo.loglikelihood(requests, disable_tqdm=True)
    assert_same_scores(theirs, ours, requests)
    assert {r.task_name for r in requests} - {None} == set(OFFLINE_TASKS)  # requests of every task
    assert (neo.n_truncated > 0) == (max_length == MAX_LEN)
    assert sum(g for _, g in ours) >= 3  # the greedy continuations are recognised


def test_each_question_context_runs_once(task_dir, task_requests):
    """With room for every request, share_prefixes makes one group per document: the choices of a
    question share its context, WinoGrande's two sentences their words up to the blank."""
    neo = neo_eval.NeoLM(str(task_dir), device="cpu", max_length=256)
    for name, requests in task_requests.items():
        questions = [r for r in requests if r.doc is not None]  # not the added greedy request
        inputs = [(c + x)[:-1] for c, x in (neo._encode_pair(*r.args) for r in questions)]
        groups = neo_eval.share_prefixes(inputs, max_row=neo.max_length)
        group_of = {i: k for k, g in enumerate(groups) for i in g}
        per_doc = len(inputs) // TASK_DOCS  # lm-eval lists a document's requests together
        for d in range(TASK_DOCS):  # a document is never split (WinoGrande's twin sentences may even join)
            assert len({group_of[i] for i in range(d * per_doc, (d + 1) * per_doc)}) == 1, name
        shared = sum(neo_eval.row_length(inputs, g) for g in groups)
        assert shared < sum(map(len, inputs)), name


def test_share_prefixes_joins_only_when_it_saves_tokens():
    a, b = [5, 6, 7, 8, 1], [5, 6, 7, 8, 2, 3]  # one context, two answers
    c = [5, 9, 9, 9]                             # another question that only begins alike
    assert sorted(map(sorted, neo_eval.share_prefixes([c, a, b], max_row=100))) == [[0], [1, 2]]
    assert neo_eval.row_length([a, b], [0, 1]) == 4 + 1 + 2
    assert neo_eval.share_prefixes([a, b], max_row=6) == [[0], [1]]  # the row would not fit
    ids, position, members = neo_eval.pack([a, b], [[0, 1]])
    assert ids == [5, 6, 7, 8, 1, 2, 3] and position == [0, 1, 2, 3, 4, 4, 5]
    assert members == [(0, [0, 1, 2, 3, 4]), (1, [0, 1, 2, 3, 5, 6])]


def test_pack_is_a_trie_and_fill_rows_fills_padding():
    """Answers that begin alike share those tokens too; a duplicate adds nothing; two groups in one row
    stay apart; fill_rows places every group once, in rows no longer than its batch's longest group."""
    x, y, z = [1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]  # after context 1 2: answers 3 4 / 3 5 6 / 7
    other = [9, 8]
    ids, position, members = neo_eval.pack([x, y, z, x, other], [[2, 0, 1, 3], [4]])
    assert ids == [1, 2, 3, 4, 5, 6, 7, 9, 8] and position == [0, 1, 2, 3, 3, 4, 2, 0, 1]
    assert dict(members) == {0: [0, 1, 2, 3], 3: [0, 1, 2, 3], 1: [0, 1, 2, 4, 5], 2: [0, 1, 6], 4: [7, 8]}
    assert neo_eval.trie_length([x, y, z, x], [0, 1, 2, 3]) == 7
    lengths = [9, 1, 4, 4, 3, 8, 2, 9, 5, 1]
    batches = neo_eval.fill_rows(lengths, budget=18)
    placed = [g for batch in batches for row in batch for g in row]
    assert sorted(placed) == list(range(len(lengths)))
    longest = [max(lengths[g] for row in batch for g in row) for batch in batches]
    assert longest == sorted(longest, reverse=True)
    for batch, T in zip(batches, longest):
        assert len(batch) * T <= 18 and all(sum(lengths[g] for g in row) <= T for row in batch)
    # 9|9, then 8|5+3, then rows of 4: 4|4|2+1+1 (padded rows, two a batch: 5 passes, 90 slots for 46 tokens)
    assert batches == [[[7], [0]], [[5], [8, 4]], [[3], [2], [6, 9, 1]]]
    assert neo_eval.fill_rows([30, 5, 5], budget=18) == [[[0]], [[2], [1]]]  # a group longer than the budget: alone


def test_answers_that_begin_alike_match_hf(task_dir):
    """Requests whose answers share first tokens, repeat, or extend one another (trie rows, several
    groups per row) score as HFLM scores each alone."""
    context = "The cat sat on the"
    answers = [" mat", " mat and purred", " mat and slept", " hat", " mat", " mat and", " chair by the door"]
    requests = [Instance("loglikelihood", None, (c, a), k) for k, (c, a) in enumerate(
        [(context, a) for a in answers] + [("A dog ran", " home"), ("A dog ran", " away fast"), ("Yes", " no")])]
    theirs = hf_for_tasks(task_dir, 256).loglikelihood(requests, disable_tqdm=True)
    for batch_size in (1, 2, 16):
        neo = neo_eval.NeoLM(str(task_dir), device="cpu", batch_size=batch_size, max_length=256)
        assert_same_scores(theirs, neo.loglikelihood(requests, disable_tqdm=True), requests)


def test_unmerged_adapter_matches_peft_on_tasks(task_dir, tmp_path, task_requests):
    """--no-merge: the adapter run beside the weights, with shared contexts, equals HFLM + PEFT."""
    import lora
    import model as model_lib

    base = model_lib.Llama.from_pretrained(task_dir)
    lora.apply_lora(base, rank=4, alpha=8, verbose=False)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora.lora_layers(base).values():
            layer.lora_B.normal_(0.0, 0.5)
    adapters.save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(task_dir))
    requests = [r for reqs in task_requests.values() for r in reqs]
    peft = hf_for_tasks(task_dir, 256, peft=str(tmp_path / "adapter")).loglikelihood(requests, disable_tqdm=True)
    unmerged = neo_eval.NeoLM(str(task_dir), adapter=str(tmp_path / "adapter"), merge_adapter=False, device="cpu",
                              batch_size=16, max_length=256)
    assert_same_scores(peft, unmerged.loglikelihood(requests, disable_tqdm=True), requests)


# ----------------------------------------------------------------------------- adapters and bad input

def test_adapter_merged_equals_unmerged_and_peft(tiny_dir, tmp_path):
    import lora
    import model as model_lib

    base = model_lib.Llama.from_pretrained(tiny_dir)
    lora.apply_lora(base, rank=4, alpha=8, verbose=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora.lora_layers(base).values():
            layer.lora_B.normal_(0.0, 0.5)  # a non-trivial update (B starts at zero)
    adapters.save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(tiny_dir))

    requests = ll_requests([(c, x) for c in CONTEXTS[:3] for x in CONTINUATIONS[:3]])
    plain = neo_eval.NeoLM(str(tiny_dir), device="cpu").loglikelihood(requests, disable_tqdm=True)
    merged = neo_eval.NeoLM(str(tiny_dir), adapter=str(tmp_path / "adapter"), merge_adapter=True,
                            device="cpu").loglikelihood(requests, disable_tqdm=True)
    unmerged = neo_eval.NeoLM(str(tiny_dir), adapter=str(tmp_path / "adapter"), merge_adapter=False,
                              device="cpu").loglikelihood(requests, disable_tqdm=True)
    from lm_eval.models.huggingface import HFLM
    peft = HFLM(pretrained=str(tiny_dir), peft=str(tmp_path / "adapter"), device="cpu", dtype="float32",
                logits_cache=False).loglikelihood(requests, disable_tqdm=True)  # the adapter through PEFT
    for (m, gm), (u, gu), (r, gr) in zip(merged, unmerged, peft):
        close(m, u, atol=TOL, rtol=0)
        close(m, r, atol=TOL, rtol=0)
        assert gm == gu and gm == gr
    assert max(abs(m - p) for (m, _), (p, _) in zip(merged, plain)) > 0.1  # the adapter does change scores


def test_adapter_shape_mismatch_names_module(tiny_dir, tmp_path):
    import lora
    import model as model_lib
    from safetensors.torch import load_file, save_file

    base = model_lib.Llama.from_pretrained(tiny_dir)
    lora.apply_lora(base, rank=4, alpha=8, verbose=False)
    adapters.save_adapter(base, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    weights[key] = torch.zeros(4, 99)  # as if trained on a model of another width
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        neo_eval.NeoLM(str(tiny_dir), adapter=str(tmp_path / "adapter"), device="cpu")


def test_model_folder_without_tokenizer(tiny_dir, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, folder / name)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        neo_eval.NeoLM(str(folder), device="cpu")


def copy_with_other_weights(tiny_dir, folder, keep_layers=None):
    """tiny_dir's model with its first weight matrix nudged (same shapes), or with fewer layers."""
    import model as model_lib
    other = model_lib.Llama.from_pretrained(tiny_dir)
    if keep_layers is not None:
        other = model_lib.prune_layers(other, keep_layers)
    else:
        with torch.no_grad():
            other.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    other.save_pretrained(folder)
    return folder


def adapter_for(base_dir, folder):
    import lora
    import model as model_lib
    base = model_lib.Llama.from_pretrained(base_dir)
    lora.apply_lora(base, rank=4, alpha=8, verbose=False)
    adapters.save_adapter(base, folder, base_model_name_or_path=str(base_dir))
    return folder


def test_adapter_for_another_base_is_refused_naming_both(tiny_dir, tmp_path):
    adapter = adapter_for(tiny_dir, tmp_path / "adapter")
    neo_eval.NeoLM(str(tiny_dir), adapter=str(adapter), device="cpu")  # its own base: accepted
    nudged = copy_with_other_weights(tiny_dir, tmp_path / "nudged")
    with pytest.raises(ValueError, match=rf"adapter was trained on another base: it records .*{tiny_dir.name}.*"
                                         rf"nudged has the same shapes but other weights"):
        neo_eval.NeoLM(str(nudged), adapter=str(adapter), device="cpu")
    pruned = copy_with_other_weights(tiny_dir, tmp_path / "pruned", keep_layers=[1])
    with pytest.raises(ValueError, match=r"pruned has other shapes"):
        neo_eval.NeoLM(str(pruned), adapter=str(adapter), device="cpu")


@pytest.mark.parametrize("flags, message", [
    (["--model", "{tmp}/missing/model"], "--model .*missing/model: no such model folder"),
    (["--model", "{tiny}", "--adapter", "{tmp}/no-adapter"], "--adapter .*no-adapter: no adapter folder"),
    (["--model", "{tiny}", "--limit", "0"], "--limit 0.0: must be above 0"),
    (["--model", "{tiny}", "--limit", "-3"], "--limit -3.0: must be above 0"),
    (["--model", "{tiny}", "--batch-size", "0"], "--batch-size 0: must be above 0"),
    (["--model", "{tiny}", "--max-length", "-1"], "--max-length -1: must be above 0"),
])
def test_cli_refuses_bad_input_by_name(tiny_dir, tmp_path, capsys, flags, message):
    flags = [f.format(tmp=tmp_path, tiny=tiny_dir) for f in flags]
    with pytest.raises(SystemExit):
        neo_eval.main([*flags, "--tasks", "piqa", "--task-source", "offline"])
    assert re.search(message, capsys.readouterr().err)


def test_cli_adapter_for_another_base_is_one_line(tiny_dir, tmp_path):
    """Through the command line: one line naming both, and no traceback."""
    adapter = adapter_for(tiny_dir, tmp_path / "adapter")
    other = copy_with_other_weights(tiny_dir, tmp_path / "other")
    run = subprocess.run([sys.executable, str(Path(neo_eval.__file__)), "--model", str(other), "--adapter",
                          str(adapter), "--tasks", "piqa", "--task-source", "offline", "--limit", "2"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert re.fullmatch(r"eval.py: error: \S*adapter was trained on another base: .*/other has the same shapes "
                        r"but other weights .*\n", run.stderr.splitlines(keepends=True)[-1])


# ----------------------------------------------------------------------------- the real SmolLM2

def test_smollm2_matches_hf(smollm2_dir):
    """A few real requests (PIQA's first question, a rolling text, a generation) on SmolLM2-135M-Instruct."""
    from lm_eval.models.huggingface import HFLM

    theirs_lm = HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", batch_size=4, logits_cache=False)
    ours_lm = neo_eval.NeoLM(str(smollm2_dir), device="cpu", dtype="float32", batch_size=4)
    goal = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    pairs = [(goal, " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips."),
             (goal, " Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material."),
             ("The capital of France is", " Paris"), ("The capital of France is", " Berlin")]
    for (a, ga), (b, gb) in zip(theirs_lm.loglikelihood(ll_requests(pairs), disable_tqdm=True),
                                ours_lm.loglikelihood(ll_requests(pairs), disable_tqdm=True)):
        # Sums of ~20 token log-probs (~50 nats) after 30 float32 layers: measured 1.4e-5 apart under
        # ATEN_CPU_CAPABILITY=avx2 (7x on TOL alone), hence the sum's share too (~50x)
        close(a, b, atol=TOL, rtol=SUM_RTOL)
        assert ga == gb
    text = [Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog. " * 3,), 0)]
    close(theirs_lm.loglikelihood_rolling(text, disable_tqdm=True)[0],
          ours_lm.loglikelihood_rolling(text, disable_tqdm=True)[0], atol=TOL, rtol=SUM_RTOL)
    gen = [Instance("generate_until", {}, ("The capital of France is", {"until": ["."], "max_gen_toks": 10}), 0)]
    assert ours_lm.generate_until(gen, disable_tqdm=True) == theirs_lm.generate_until(gen, disable_tqdm=True)
