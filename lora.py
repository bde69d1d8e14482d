"""LoRA and MoSLoRA adapters: the low-rank update ΔW that LLM-Neo trains.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained linear layer W0 and learns a
low-rank update next to it:

            x ──────────────► W0 (frozen, out × in) ─────────┐
            │                                                 (+) ──► y
            └─► dropout ─► A (r × in) ─► [M (r × r)] ─► B (out × r) ─► · s ─┘

    y = W0·x + b + s · B·M·A·x        s = α / r   (rsLoRA: s = α / √r, Kalajdzievski 2023)

A starts Kaiming-uniform and B starts at zero, so at step 0 the adapted model is exactly the
base model, and the first gradient reaches B only (∂L/∂A = s·Bᵀ·… = 0 while B = 0). Only
(in + out)·r numbers per layer train instead of in·out; with r ≪ min(in, out) this is why LoRA
fits in the memory the teacher leaves free. LLM-Neo (arXiv 2411.06839) sends both the
cross-entropy and the distillation gradient into ΔW = s·B·A (see neo.py); its guidelines are
r = 128 and a learning rate near 2e-4.

MoSLoRA (Wu et al. 2024, arXiv 2406.11909) inserts a trainable r × r mixer M between A and B,
mixing the r rank-one subspaces instead of pairing them one to one (M = I is plain LoRA). M is
Kaiming-uniform initialised and B stays zero, so the initial output still equals the base model.

Merging (W ← W0 + ΔW) is an explicit call, never a side effect of train()/eval().

Adapter files: runkit/adapters.py writes and reads them in PEFT's layout (each layer's lora_A (r, in),
lora_B (out, r) and, for MoSLoRA, lora_M (r, r) in adapter_model.safetensors, beside an
adapter_config.json), so `peft.PeftModel.from_pretrained` loads our LoRA adapters onto a
transformers model. That file's docstring draws the layout.

Usage:
    model = apply_lora(model, rank=128, alpha=256)          # swap, freeze, print counts
    ...train lora_parameters(model)...
    adapters.save_adapter(model, "out/adapter")             # runkit/adapters.py: the adapter alone, PEFT's layout
    save_merged(model, "out/merged")                        # an ordinary HF folder (needs model.save_pretrained)
"""
import math
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update s·B·A (or s·B·M·A for MoSLoRA).

    `weight` and `bias` are the base layer's own Parameters under nn.Linear's names, so a base
    checkpoint loads into a LoRA model without renaming and tied weights stay tied. The adapters
    are created in the base weight's dtype and device; they may be cast to fp32 afterwards.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 variant: str = "lora", rslora: bool = False):
        super().__init__()
        if variant not in ("lora", "moslora"):
            raise ValueError(f"variant must be 'lora' or 'moslora', got {variant!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), the same Parameter object
        self.bias = base.bias      # (out,) or None
        self.rank, self.alpha, self.variant, self.rslora = rank, alpha, variant, rslora
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        # nn.Linear's own initialisation (as PEFT and the MoSLoRA code do); B = 0 keeps ΔW = 0. Drawn
        # in fp32 whatever the base's dtype, so an fp64 test run starts from the fp32 run's adapters.
        kw = dict(dtype=torch.float32, device=base.weight.device)
        A = nn.init.kaiming_uniform_(torch.empty(rank, self.in_features, **kw), a=math.sqrt(5))
        M = nn.init.kaiming_uniform_(torch.empty(rank, rank, **kw), a=math.sqrt(5)) if variant == "moslora" else None
        self.lora_A = nn.Parameter(A.to(base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_M = nn.Parameter(M.to(base.weight.dtype)) if M is not None else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·M·A (or s·B·A) in fp32 (fp64 adapters stay fp64), shape (out, in)."""
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)
        A, B = self.lora_A.to(acc), self.lora_B.to(acc)
        if self.lora_M is not None:
            A = self.lora_M.to(acc) @ A  # (r, in)
        return self.scale * (B @ A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # ΔW already lives inside self.weight
            return y
        # The adapters may be kept in fp32 next to a bf16 base (the optimizer's master copy):
        # run the branch in the adapters' dtype, add it back in the base output's dtype. Under
        # autocast the matmul runs in autocast's dtype whatever x is, so x goes in as it is: upcast
        # first, it would be cast back down into a fresh copy that backward keeps, one per projection.
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.lora_A.dtype)
        h = F.linear(h, self.lora_A)                                      # (..., r)
        if self.lora_M is not None:
            h = F.linear(h, self.lora_M)                                  # (..., r)  M·h
        # s scales the rank-sized h, not the output: r numbers per token instead of out, forward and backward
        return y + F.linear(h * self.scale, self.lora_B).to(y.dtype)      # (..., out)

    @torch.no_grad()
    def merge(self):
        """W ← W + ΔW (fp32, cast back). Calling it twice is harmless.

        Meant for inference and export: while merged, the adapters must not be trained, or a
        later unmerge() subtracts a different ΔW than was added.
        """
        if not self.merged:
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W − ΔW. Exact up to fp32 rounding; in bf16 the round trip loses low bits."""
        if self.merged:
            delta = self.delta_weight()
            self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, variant={self.variant}, merged={self.merged}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter tensors (A, B and M): the only parameters LLM-Neo trains."""
    return [p for layer in lora_layers(model).values()
            for p in (layer.lora_A, layer.lora_B, layer.lora_M) if p is not None]


def apply_lora(model: nn.Module, targets=ALL_PROJECTIONS, rank: int = 128, alpha: float | None = None,
               dropout: float = 0.0, variant: str = "lora", rslora: bool = False,
               verbose: bool = True) -> nn.Module:
    """Swap every nn.Linear whose last name part is in `targets` for a LoRALinear, in place.

    alpha defaults to 2·rank (scale 2, LLaMA-Factory's default). Afterwards only adapters are
    trainable: every other parameter (embeddings, norms, LM head, base weights) gets
    requires_grad=False explicitly. Prints trainable / total parameter counts.
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA adapters; apply_lora once per model")
    alpha = 2 * rank if alpha is None else alpha
    targets = tuple(targets.split(",")) if isinstance(targets, str) else tuple(targets)
    swaps = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not swaps:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for name, linear in swaps:  # check everything before changing anything
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"LoRA rank {rank} exceeds the dimensions of {name} "
                             f"(out={linear.out_features}, in={linear.in_features})")
        if shared[id(linear.weight)] > 1:  # e.g. a tied lm_head: merging would change both
            raise ValueError(f"{name}.weight is tied to another parameter; LoRA cannot target it")
    for name, linear in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(linear, rank, alpha, dropout, variant, rslora))
    adapters = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)
    if verbose:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA ({variant}, r={rank}, alpha={alpha:g}{', rsLoRA' if rslora else ''}) on "
              f"{len(swaps)} layers: trainable {trainable:,} / total {total:,} "
              f"({100 * trainable / total:.2f}%)")
    return model


def make_trainable(model: nn.Module, method: str, say=None, **lora_options) -> nn.Module:
    """What each method of train.py trains: sft/kd every weight; neo/lora the adapters of
    apply_lora(**lora_options), every other weight frozen. say: print the trainable count with it
    (None: silent)."""
    if method in ("sft", "kd"):
        model.requires_grad_(True)
        if say is not None:
            n = sum(p.numel() for p in model.parameters())
            say(f"trainable parameters: {n:,} / {n:,} (100%)")
        return model
    return apply_lora(model, **lora_options, verbose=say is not None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge ΔW into every base weight (idempotent)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (idempotent)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def _swap_to_linear(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, LoRALinear]:
    """Replace each LoRALinear by a plain nn.Linear with the given weight; return the originals."""
    originals = lora_layers(model)
    for name, layer in originals.items():
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")
        plain.weight = nn.Parameter(weights[name], requires_grad=False)
        plain.bias = layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return originals


def save_merged(model: nn.Module, folder, **save_kwargs):
    """Write W0 + ΔW as an ordinary HF folder via model.save_pretrained, leaving `model` untouched.

    Merged weights are computed into fresh tensors (the base weights are never modified), the
    LoRA layers are swapped for plain nn.Linear for the save, then swapped back.
    """
    merged = {name: (layer.weight.float() + (0 if layer.merged else layer.delta_weight()))
              .to(layer.weight.dtype).detach()
              for name, layer in lora_layers(model).items()}
    originals = _swap_to_linear(model, merged)
    try:
        model.save_pretrained(folder, **save_kwargs)
    finally:
        for name, layer in originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
