"""A Llama written from scratch, that loads and saves Hugging Face checkpoints.

This is the model both the teacher and the student of LLM-Neo run on. One decoder block:

    x = x + Attention(RMSNorm(x))        # grouped-query attention with rotary positions
    x = x + SwiGLU(RMSNorm(x))           # down( silu(gate(x)) * up(x) )

and the whole model: token embedding -> N blocks -> RMSNorm -> LM head (optionally tied to the
embedding). The architecture choices, and the checkpoints that need each one:

- RMSNorm (no mean subtraction, no bias), computed in float32 as Hugging Face does.
- Rotary embeddings (RoPE, "rotate half" convention), cos/sin tables precomputed once; optional
  `llama3` frequency scaling (Llama 3.1/3.2 long context).
- Grouped-query attention: `num_key_value_heads` <= `num_attention_heads`; each key/value head
  serves a group of query heads (SmolLM2, Llama 3, Qwen2). Through F.scaled_dot_product_attention.
- Biases on q/k/v (`qwen2`; `llama` with `attention_bias`, which also puts one on o_proj).
- SwiGLU MLP; no biases anywhere else.
Anything in a config.json that would change this math (another rope scaling, a sliding window,
another activation, MLP biases, quantization) is refused by name instead of silently ignored.

Parameter names are exactly Hugging Face's (model.layers.0.self_attn.q_proj.weight, ...), so
checkpoints load without renaming and what we save loads in transformers.

Also here: a KV cache built on demand, `generate()`, and depth pruning (ShortGPT / Shortened
LLaMA: drop the decoder blocks whose output is most similar to their input; or Gromov et al.: drop
the contiguous span whose output is most similar to its input).

    model = Llama.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a local folder
    logits = model(input_ids, attention_mask)                               # (B, T, vocab)
    new_tokens = model.generate([prompt_ids], max_new_tokens=64)            # greedy

tests/test_model.py checks logits and greedy tokens against transformers (pytest tests/test_model.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ----------------------------------------------------------------------------- configuration

@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096               # D, the residual stream width
    intermediate_size: int = 11008        # SwiGLU hidden width
    num_hidden_layers: int = 32           # decoder blocks
    num_attention_heads: int = 32         # query heads
    num_key_value_heads: int | None = None  # key/value heads (GQA); None = num_attention_heads
    head_dim: int | None = None           # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0           # RoPE base
    rope_scaling: dict | None = None      # None or {"rope_type": "llama3", factor, low/high_freq_factor, ...}
    max_position_embeddings: int = 2048   # length of the precomputed RoPE tables
    tie_word_embeddings: bool = False     # lm_head.weight is embed_tokens.weight
    attention_bias: bool = False          # biases on q/k/v (always on for qwen2)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"             # "llama" | "mistral" | "qwen2"
    pruned_from: list[int] | None = None  # the teacher's block each block was cut from (prune_layers)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases; its config has no such field
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def o_proj_bias(self) -> bool:
        # transformers' Llama puts `attention_bias` on all four projections, Qwen2 only on q/k/v.
        return self.attention_bias and self.model_type != "qwen2"

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """Build from a Hugging Face config dict; refuse, by field name, anything that changes the math."""
        def refuse(field, value, expected):
            raise ValueError(f"{source}: unsupported {field}={value!r} (expected {expected})")

        if d.get("model_type") not in ARCHITECTURES:
            refuse("model_type", d.get("model_type"), " or ".join(ARCHITECTURES))
        if d.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", d["hidden_act"], "'silu'")
        if d.get("mlp_bias"):
            refuse("mlp_bias", d["mlp_bias"], "false")
        if d.get("quantization_config"):
            refuse("quantization_config", d["quantization_config"].get("quant_method"), "unquantized weights")
        window_on = d["model_type"] == "mistral" or d.get("use_sliding_window", False)
        if window_on and d.get("sliding_window") is not None:
            refuse("sliding_window", d["sliding_window"], "null: sliding-window attention is not implemented")
        # transformers >= 5 writes "rope_parameters" (theta inside); older files "rope_theta" + "rope_scaling".
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            refuse("rope_scaling.rope_type", rope_type, "'default' or 'llama3'")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", rope["partial_rotary_factor"], "1.0")
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling"}
        return cls(**{k: v for k, v in d.items() if k in known}, rope_theta=theta,
                   rope_scaling={"rope_type": "llama3", **rope} if rope_type == "llama3" else None)

    @classmethod
    def from_json(cls, path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found (a model folder needs one)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: config.json is not readable JSON ({e})") from e
        return cls.from_hf(d, source=str(path))

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A config.json that transformers loads (old-style rope fields, read by transformers 4 and 5)."""
        d = asdict(self)
        d.update(architectures=[ARCHITECTURES[self.model_type]], hidden_act="silu")
        if self.pruned_from is None:
            d.pop("pruned_from")  # a model that was not pruned: transformers' keys only
        if self.model_type == "qwen2":
            d.pop("attention_bias")  # implied by the architecture
        if self.model_type in ("mistral", "qwen2"):
            d.update(sliding_window=None, use_sliding_window=False)
        if dtype is not None:  # "torch_dtype" for transformers 4, "dtype" for 5
            d["torch_dtype"] = d["dtype"] = str(dtype).removeprefix("torch.")
        return d


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, in float32 so bf16 models keep precision (fp64 stays fp64)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), i < d/2, with Llama 3.1's long-context rescaling if asked."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if cfg.rope_scaling is None:
        return inv_freq
    # llama3: low frequencies (long wavelengths) are divided by `factor`, high ones kept, and the
    # band in between interpolated smoothly, so the model extends its context without retraining.
    s = cfg.rope_scaling
    factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)


def rope_tables(cfg: LlamaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, (max_position_embeddings, head_dim), float32.

    Built once per model: 2 x 131072 x 128 floats (134 MB) for Llama 3.1, 8 MB for SmolLM2."""
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = pos[:, None] * rope_frequencies(cfg).to(device)[None, :]   # (P, hd/2)
    angles = torch.cat([freqs, freqs], dim=-1)                          # (P, hd): the two halves rotate together
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x[i], x[i + hd/2]) pair by its position's angle. x: (B, nh, T, hd); cos/sin: (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Keys and values of every position seen so far, for all layers: (L, B, n_kv, max_len, hd)."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer: int, start_pos: int, k, v):
        """Write k, v (B, n_kv, T, hd) at start_pos; return all keys/values up to start_pos + T."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.nh, self.nkv, self.hd = layer_idx, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_proj_bias)

    def forward(self, x, cos, sin, mask, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)   # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)            # (B, nkv, S, hd), S = start_pos + T
        # mask None = plain causal attention over T keys, the fast path used in training.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.nkv != self.nh)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds the parameters under `model.` so the names match Hugging Face's LlamaModel."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.source_dir: str | None = None  # folder loaded from; save_pretrained copies its tokenizer
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)compute the RoPE tables; needed again after building on the meta device."""
        cos, sin = rope_tables(self.config, device or self.lm_head.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, hd), float32
        self.register_buffer("rope_sin", sin, persistent=False)

    def setup_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A KV cache for `batch_size` sequences of up to `max_len` tokens (built on demand only)."""
        c, w = self.config, self.lm_head.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)

    def forward(self, input_ids, attention_mask=None, *, document_ids=None, position_ids=None, return_hidden=False,
                cache=None, start_pos=0, hidden_at=()):
        """input_ids (B, T) -> logits (B, T, vocab) float32, or the final-normed hidden states (B, T, D).

        hidden_at: block indices; when given, forward returns (that, [the residual stream after each
        of those blocks, (B, T, D)]), for distilling a pruned student block by block (neo.py).

        attention_mask (B, start_pos + T), 1 = token, 0 = padding, covers every position seen so far
        (the cache holds the first start_pos). Positions count real tokens only, so a right-padded row
        matches the row alone and a left-padded prompt starts at position 0, as in transformers.

        document_ids (B, T), for packed rows (data.pack): several documents back to back in a row,
        each a run of equal ids. Attention stays inside each run and positions restart at 0 in each,
        so every document gets exactly the logits it gets alone; attention_mask is not needed then.

        position_ids (B, T) with a boolean attention_mask (B, 1, T, T), True where query t sees key s:
        any other pattern, as transformers' 4-D masks. eval.py packs the answer choices of a question
        behind its context this way: each choice sees the context and itself, at the positions it has alone.
        """
        B, T = input_ids.shape
        longest = T if position_ids is None else int(position_ids.max()) + 1
        if start_pos + longest > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start_pos + longest} tokens exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        S = start_pos + T  # number of keys attended to
        if position_ids is not None:
            if cache is not None or attention_mask is None or attention_mask.dim() != 4:
                raise ValueError("position_ids need a (B, 1, T, T) boolean attention_mask, and no cache")
            pos, mask = position_ids, attention_mask
        elif document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids (packed rows) describe whole sequences; generate with a cache unpacked")
            pos, mask = self._documents(document_ids)
        elif attention_mask is None:
            pos = torch.arange(start_pos, S, device=input_ids.device).expand(B, T)
            mask = None if cache is None else self._mask(torch.ones(B, S, dtype=torch.bool, device=input_ids.device), T)
        else:
            keep = attention_mask.bool()
            pos = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:]  # (B, T)
            right_padded = cache is None and not (keep[:, 1:] > keep[:, :-1]).any()
            # Right padding needs no mask: causal attention already keeps real tokens off the pads
            # that follow them, and is_causal lets SDPA use its fastest (flash) kernel in training.
            mask = None if right_padded else self._mask(keep, T)
        dtype = self.lm_head.weight.dtype
        cos = self.rope_cos[pos].to(dtype).unsqueeze(1)  # (B, 1, T, hd)
        sin = self.rope_sin[pos].to(dtype).unsqueeze(1)
        x = self.model.embed_tokens(input_ids)           # (B, T, D)
        states = {}
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, start_pos)
            if i in hidden_at:
                states[i] = x                            # (B, T, D), the block's output
        x = self.model.norm(x)
        if not return_hidden:
            x = self.lm_head(x)
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # logits: bf16 -> fp32; fp64 stays
        return (x, [states[i] for i in hidden_at]) if len(hidden_at) else x

    @staticmethod
    def _documents(document_ids):
        """Positions (B, T) restarting at 0 where each document begins, and the block-diagonal causal
        mask (B, 1, T, T): query t sees key s when s <= t and both lie in the same run of equal ids."""
        t = torch.arange(document_ids.size(1), device=document_ids.device)  # (T,)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]        # (B, T) a new run begins here
        first = torch.where(starts, t, 0).cummax(dim=-1).values              # (B, T) where each token's run begins
        same = first[:, :, None] == first[:, None, :]                         # (B, T, T)
        causal = t[None, :] <= t[:, None]                                     # (T, T)
        return t - first, (same & causal).unsqueeze(1)

    @staticmethod
    def _mask(keep, T):
        """Boolean (B, 1, T, S): query t sees key s when s <= t (causal) and key s is not padding.

        Every query also sees itself, so a padding query never has all keys masked (SDPA would
        return NaN); its output is ignored anyway."""
        S = keep.size(1)
        q_pos = torch.arange(S - T, S, device=keep.device)[:, None]   # (T, 1) absolute query positions
        k_pos = torch.arange(S, device=keep.device)[None, :]          # (1, S)
        causal = k_pos <= q_pos
        return ((causal & keep[:, None, :]) | (k_pos == q_pos)).unsqueeze(1)

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_token_ids=None, seed: int | None = None, use_cache: bool = True,
                 generators: list[torch.Generator] | None = None, keep_stop: bool = False) -> list[list[int]]:
        """Continue each prompt; return the new tokens per prompt, up to (not including) a stop token.

        Prompts of different lengths are left-padded so that every row's next token sits in the last
        column. temperature 0 = greedy; otherwise sample from softmax(logits / temperature) restricted
        to the top-p nucleus. stop_token_ids None = the config's eos_token_id; [] = never stop early.

        Randomness: `seed` seeds one generator for the whole batch, so a row's sample depends on the
        rows beside it. `generators` (one torch.Generator per prompt, on the model's device) makes
        row i draw only from generators[i]: a row's sample is then the same alone or in any batch,
        which on-policy distillation needs so that 2 ranks sample what 1 rank does and a resumed run
        what the uninterrupted one did. Seed a fresh generator per prompt and call (from the run's
        seed, the example and the step, say): a finished row keeps drawing until the whole batch
        is done, so a generator's state afterwards does depend on the batch.

        keep_stop=True also returns the stop token a row emitted (its last token): the end of a reply
        is part of the student's policy, and the teacher scores it.

        No gradient flows through sampling, and the model runs in the mode it is in (this never calls
        train() or eval()): put a LoRA student in eval() first so that adapter dropout is off.
        """
        prompts = [list(map(int, p)) for p in (prompts.tolist() if torch.is_tensor(prompts) else prompts)]
        if generators is not None and seed is not None:
            raise ValueError("give seed or generators, not both")
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"need one generator per prompt: {len(prompts)} prompts, {len(generators)} generators")
        if stop_token_ids is None:
            eos = self.config.eos_token_id
            stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long, device=device)
        mask = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, P - len(p):] = 1
        gen = torch.Generator(device).manual_seed(seed) if seed is not None else generators
        cache = self.setup_cache(B, P + max_new_tokens) if use_cache else None
        out, done = [[] for _ in range(B)], [False] * B
        logits = self(ids, mask[:, :P], cache=cache)[:, -1]                       # (B, V)
        for step in range(max_new_tokens):
            nxt = self._pick(logits, temperature, top_p, gen)                     # (B,)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                done[i] = t in stop_token_ids
                if not done[i] or keep_stop:
                    out[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)                           # (B, P + step + 1)
            if use_cache:
                logits = self(ids[:, -1:], mask[:, :ids.size(1)], cache=cache, start_pos=ids.size(1) - 1)[:, -1]
            else:
                logits = self(ids, mask[:, :ids.size(1)])[:, -1]
        return out

    @staticmethod
    def _pick(logits, temperature, top_p, gen):
        """Next token per row, (B,). gen: None, one generator for the batch, or a list, one per row."""
        if temperature == 0.0:
            return logits.argmax(-1)
        probs = F.softmax(logits.float() / temperature, dim=-1)
        order = None
        if top_p < 1.0:  # nucleus: drop a token once the more probable ones reach top_p (the top one stays)
            probs, order = probs.sort(dim=-1, descending=True)
            probs[(probs.cumsum(-1) - probs) >= top_p] = 0.0
        if isinstance(gen, (list, tuple)):  # each row from its own generator: one draw per row per step
            choice = torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs[:, None], gen)])
        else:
            choice = torch.multinomial(probs, 1, generator=gen)                   # (B, 1), renormalises
        return (choice if order is None else order.gather(-1, choice)).squeeze(-1)

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=torch.float32, device="cpu") -> "Llama":
        """Load a Hugging Face folder (or Hub id) without ever holding the weights twice."""
        folder = resolve_folder(path_or_hub_id)
        config = LlamaConfig.from_json(folder / "config.json")
        state = read_safetensors(folder, dtype, device)
        model = build(config, state, device)
        model.source_dir = str(folder)
        return model.eval()

    def save_pretrained(self, folder, max_shard_size: int | str = "5GB"):
        """Write an ordinary Hugging Face folder; it appears complete or not at all."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # A plain mkdir, not tempfile.mkdtemp (0700): the folder gets the modes of the user's umask.
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed save of this same process id
        tmp.mkdir()
        try:
            dtype = self.lm_head.weight.dtype
            (tmp / "config.json").write_text(json.dumps(self.config.to_hf(dtype), indent=2))
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()
                     if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}  # tied: stored once
            with torch.device("meta"):
                foreign = sorted(set(state) - set(Llama(self.config).state_dict()))
            if foreign:  # e.g. LoRA adapters: nothing could load such a folder
                raise ValueError(f"cannot save tensors a Llama checkpoint does not have: {foreign[:3]} "
                                 "(merge or remove adapters first, e.g. lora.save_merged)")
            # model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
            # when over max_shard_size ("5GB", decimal units), tagged {"format": "pt"}: the files
            # transformers' own save_pretrained writes, with the same shard splitting.
            save_torch_state_dict(state, tmp, max_shard_size=max_shard_size)
            for f in tmp.glob("*.safetensors"):  # written 0600 by safetensors: give them config.json's mode
                os.chmod(f, (tmp / "config.json").stat().st_mode & 0o777)
            src = Path(self.source_dir) if self.source_dir else None
            if src and (src / "generation_config.json").is_file():
                shutil.copy(src / "generation_config.json", tmp)
            else:
                gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
                (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
            for name in TOKENIZER_FILES:
                if src and (src / name).is_file():
                    shutil.copy(src / name, tmp)
            if folder.exists():  # replace an old save only once the new one is complete
                old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.source_dir = str(folder)


def resolve_folder(path_or_hub_id) -> Path:
    """A local folder as is; otherwise download the files we need from the Hugging Face Hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(path_or_hub_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_hub_id}: not a model folder nor a Hugging Face Hub id (owner/name)")
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "generation_config.json", "*.safetensors", *WEIGHT_FILES[1:], *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=patterns))
    except Exception as e:
        raise OSError(f"{path_or_hub_id}: no such local folder, and downloading it from the Hub failed ({e})") from e


def read_safetensors(folder: Path, dtype, device) -> dict[str, tuple[torch.Tensor, str]]:
    """{tensor name: (tensor, file it came from)} from model.safetensors or a sharded index."""
    index = folder / WEIGHT_FILES[1]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder / f}: shard listed in {index.name} is missing")
    elif (folder / WEIGHT_FILES[0]).is_file():
        files = [WEIGHT_FILES[0]]
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHT_FILES[0]} or {WEIGHT_FILES[1]}")
    state = {}
    for f in files:
        try:
            st = safe_open(folder / f, framework="pt", device=str(device))
        except Exception as e:  # SafetensorError: a truncated or damaged file (a download cut short)
            raise ValueError(f"{folder / f}: not a readable safetensors file ({e}; {(folder / f).stat().st_size:,} "
                             f"bytes); it is damaged or incomplete: copy or download it again") from None
        with st:
            for name in st.keys():
                state[name] = (st.get_tensor(name).to(dtype), str(folder / f))  # one tensor converted at a time
    return state


def build(config: LlamaConfig, state: dict[str, tuple[torch.Tensor, str]], device) -> Llama:
    """Create the model on the meta device (no memory) and adopt the given tensors as its parameters."""
    with torch.device("meta"):
        model = Llama(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    for name in [n for n in state if n.endswith("rotary_emb.inv_freq")]:
        state.pop(name)                    # older checkpoints store RoPE frequencies; we compute them
    where = sorted({f for _, f in state.values()}) or ["(no weights)"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"{', '.join(where)}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise KeyError(f"{state[unexpected[0]][1]}: unexpected tensors {unexpected[:5]} for this config.json")
    for name, (t, f) in state.items():
        if t.shape != expected[name]:
            raise ValueError(f"{f}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")
    model.load_state_dict({k: t for k, (t, _) in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced embed_tokens.weight: tie the head to the new one
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_rope(torch.device(device))
    return model


# ----------------------------------------------------------------------------- depth pruning

def prune_layers(model: Llama, keep: list[int]) -> Llama:
    """A new, smaller model with only the decoder layers `keep` (in that order); the rest is copied.
    Its config records where each block came from (`pruned_from`, the original model's indices).

    Tensors are cloned, so training the student never changes the model it was cut from."""
    n = model.config.num_hidden_layers
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep}: need distinct layer indices in [0, {n})")
    origin = model.config.pruned_from or list(range(n))
    config = LlamaConfig(**{**asdict(model.config), "num_hidden_layers": len(keep),
                            "pruned_from": [origin[i] for i in keep]})
    new_index = {str(old): str(new) for new, old in enumerate(keep)}
    state = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:  # model.layers.<old>.… -> model.layers.<new>.…
            if parts[2] not in new_index:
                continue
            parts[2] = new_index[parts[2]]
        state[".".join(parts)] = (t.detach().clone(), "pruned model")
    device = model.lm_head.weight.device
    pruned = build(config, state, device)
    pruned.source_dir = model.source_dir  # same tokenizer
    return pruned.train(model.training)


@torch.no_grad()
def block_importance(model: Llama, input_ids, attention_mask=None) -> list[float]:
    """Block Influence of each decoder layer: 1 - cos(input, output), averaged over tokens.

    ShortGPT (Men et al. 2024) / Shortened LLaMA (Kim et al. 2024): a block whose output is nearly
    its input (cosine similarity near 1) changes little and is the safest to remove. Higher = keep."""
    sims = []

    def measure(layer, args, output):
        x_in, x_out = args[0].float(), output.float()
        cos = F.cosine_similarity(x_in, x_out, dim=-1)                  # (B, T)
        valid = torch.ones_like(cos) if attention_mask is None else attention_mask.to(cos)
        sims.append(((cos * valid).sum() / valid.sum()).item())

    hooks = [layer.register_forward_hook(measure) for layer in model.model.layers]
    try:
        model(input_ids, attention_mask, return_hidden=True)
    finally:
        for h in hooks:
            h.remove()
    return [1.0 - s for s in sims]


def most_important_layers(importance: list[float], n: int) -> list[int]:
    """Indices of the n layers with the highest importance, in their original order."""
    return sorted(sorted(range(len(importance)), key=lambda i: -importance[i])[:n])


@torch.no_grad()
@torch.no_grad()  # as block_importance: a measurement, nothing to backpropagate
def span_to_keep(model: Llama, input_ids, n: int, attention_mask=None) -> list[int]:
    """The n layers left when the most redundant contiguous span of the others is removed.

    Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): the span of
    k = L − n blocks starting at ℓ whose input x_ℓ and output x_(ℓ+k) are closest in angle,
    arccos(cos(x_ℓ, x_(ℓ+k))) / π averaged over tokens, changes the residual stream least."""
    L = len(model.model.layers)
    k = L - n
    x0 = model.model.embed_tokens(input_ids)
    _, states = model(input_ids, attention_mask, return_hidden=True, hidden_at=range(L))
    xs = [x0] + states                                                  # x_ℓ: the input of block ℓ
    valid = torch.ones(input_ids.shape) if attention_mask is None else attention_mask.float().cpu()

    def angle(a, b):
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1, 1).cpu()   # (B, T)
        return ((torch.arccos(cos) / math.pi * valid).sum() / valid.sum()).item()

    start = min(range(L - k + 1), key=lambda s: angle(xs[s], xs[s + k]))
    return [i for i in range(L) if not start <= i < start + k]


def layers_to_keep(model: Llama, input_ids, n: int, attention_mask=None, by: str = "importance") -> list[int]:
    """The n layers a pruned student keeps, measured on input_ids: by "importance", the n most
    important blocks one by one (block_importance); by "span", what is left when the most redundant
    contiguous span goes (span_to_keep)."""
    if by == "span":
        return span_to_keep(model, input_ids, n, attention_mask)
    return most_important_layers(block_importance(model, input_ids, attention_mask), n)
