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

Adapter files use PEFT's layout so that `peft.PeftModel.from_pretrained` loads our LoRA
adapters onto a transformers model:
    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha",
                                "target_modules", "lora_dropout", "use_rslora", "base_model_name_or_path", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight   (r, in)
                               base_model.model.<module>.lora_B.weight   (out, r)
                               metadata "base_fingerprint": shapes + weights hash of the base
MoSLoRA adds, in the same layout (PEFT cannot load these; it would drop the mixer):
    adapter_config.json        "use_moslora": true
    adapter_model.safetensors  base_model.model.<module>.lora_M.weight   (r, r)

Usage:
    model = apply_lora(model, rank=128, alpha=256)          # swap, freeze, print counts
    ...train lora_parameters(model)...
    save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    save_merged(model, "out/merged")                        # an ordinary HF folder (needs model.save_pretrained)
"""
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_M")
PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel which wraps the transformers model


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
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        self.lora_M = nn.Parameter(torch.empty(rank, rank, **kw)) if variant == "moslora" else None
        # nn.Linear's own initialisation (as PEFT and the MoSLoRA code do); B = 0 keeps ΔW = 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if self.lora_M is not None:
            nn.init.kaiming_uniform_(self.lora_M, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s·B·M·A (or s·B·A) in fp32, shape (out, in)."""
        A, B = self.lora_A.float(), self.lora_B.float()
        if self.lora_M is not None:
            A = self.lora_M.float() @ A  # (r, in)
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
        return y + (self.scale * F.linear(h, self.lora_B)).to(y.dtype)    # (..., out)

    @torch.no_grad()
    def merge(self):
        """W ← W + ΔW (fp32, cast back). Calling it twice is harmless.

        Meant for inference and export: while merged, the adapters must not be trained, or a
        later unmerge() subtracts a different ΔW than was added.
        """
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W ← W − ΔW. Exact up to fp32 rounding; in bf16 the round trip loses low bits."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
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


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge ΔW into the base weights and replace every LoRALinear by a plain nn.Linear, in place.

    The model is then an ordinary model again (model.save_pretrained writes a plain HF folder);
    the adapters are gone.
    """
    merge_lora(model)
    _swap_to_linear(model, {name: layer.weight.data for name, layer in lora_layers(model).items()})
    return model


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


# ---------------------------------------------------------------------------------------------
# Adapter files (PEFT layout)

def save_adapter(model: nn.Module, folder, base_model_name_or_path: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None, base_fingerprint: dict | None = None):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout (see module doc).

    state_dict: take the adapter tensors from here (names as in model.state_dict()) instead of the
    model's parameters, e.g. the gathered full tensors of a sharded (FSDP) model.
    base_fingerprint: `fingerprint()` of the base, kept in the safetensors metadata (PEFT ignores it
    there, silently; an extra adapter_config.json key would make PEFT warn). Computed from
    base_model_name_or_path when that is a local folder.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to save")
    def settings(layer):
        p = layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0
        return layer.rank, layer.alpha, layer.variant, layer.rslora, p

    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if settings(layer) != settings(first):
            raise ValueError(f"{name} has different LoRA settings than the other layers; "
                             "one adapter_config.json cannot describe it")
    folder = Path(folder)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": settings(first)[4],
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "use_rslora": first.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    if first.variant == "moslora":
        config["use_moslora"] = True  # our extension: lora_M.weight tensors hold the r × r mixer
    tensors = {}
    for name, layer in layers.items():
        for key in ADAPTER_NAMES:
            p = getattr(layer, key)
            if p is not None:
                p = state_dict[f"{name}.{key}"] if state_dict is not None else p
                tensors[f"{PEFT_PREFIX}{name}.{key}.weight"] = p.detach().contiguous().cpu()
    metadata = {"format": "pt"}
    if base_fingerprint is None and base_model_name_or_path and Path(base_model_name_or_path).is_dir():
        base_fingerprint = fingerprint(base_model_name_or_path)
    if base_fingerprint is not None:
        metadata["base_fingerprint"] = json.dumps(base_fingerprint, sort_keys=True)
    # Both files go into a temporary sibling folder that replaces `folder` only when complete: a crash
    # can never leave one run's config beside another run's weights (r=8 next to rank-4 tensors).
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=metadata)
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(new: Path, folder: Path):
    """Put the complete folder `new` at `folder`. An old `folder` is moved aside first and deleted
    only after `new` is in place, so at every instant one complete copy exists under a known name."""
    folder = Path(folder)
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        Path(new).rename(folder)
        shutil.rmtree(old)
    else:
        Path(new).rename(folder)


# ---------------------------------------------------------------------------------------------
# Which base an adapter belongs to

FINGERPRINT_VALUES = 1 << 16  # values per tensor that enter the weights hash


def fingerprint(model_folder) -> dict:
    """A fingerprint of a Hugging Face model folder's weights, read from its safetensors files:

        tensors, parameters   counts
        shapes                sha256 of every tensor's name, dtype and shape
        weights               sha256 of the stored bytes of each tensor's first 65,536 values

    Two bases with the same shapes but other weights (another teacher, another --prune-to choice of
    layers) differ in `weights`; reading only the head of each tensor keeps this fast for 8B models.
    An adapter records its base's fingerprint, and eval.py / train.py --resume compare it.
    """
    from safetensors import safe_open

    folder = Path(model_folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    shapes, weights, tensors, parameters = hashlib.sha256(), hashlib.sha256(), 0, 0
    entries = []
    for f in files:
        try:
            with safe_open(folder / f, framework="pt") as st:
                for name in st.keys():
                    entries.append((name, f))
        except Exception as e:  # a missing or truncated file: name it instead of a raw SafetensorError
            raise ValueError(f"{folder / f}: cannot read its weights ({type(e).__name__}: {e})") from None
    for name, f in sorted(entries):
        with safe_open(folder / f, framework="pt") as st:
            piece = st.get_slice(name)
            shape = piece.get_shape()
            numel = math.prod(shape)
            rows = math.ceil(FINGERPRINT_VALUES / max(1, numel // max(1, shape[0]))) if shape else 1
            head = piece[:rows] if shape else st.get_tensor(name)
        shapes.update(f"{name} {piece.get_dtype()} {list(shape)};".encode())
        weights.update(head.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        tensors, parameters = tensors + 1, parameters + numel
    return {"tensors": tensors, "parameters": parameters,
            "shapes": shapes.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def adapter_base(folder) -> tuple[str | None, dict | None]:
    """(base_model_name_or_path, base fingerprint or None for adapters saved without one)."""
    from safetensors import safe_open

    folder = Path(folder)
    name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as st:
        recorded = (st.metadata() or {}).get("base_fingerprint")
    return name, json.loads(recorded) if recorded else None


def check_base(adapter_folder, model_folder):
    """Refuse a model that is not the base the adapter was trained on, naming both."""
    name, recorded = adapter_base(adapter_folder)
    if recorded is None:
        return
    actual = fingerprint(model_folder)
    if actual != recorded:
        what = "the same shapes but other weights" if actual["shapes"] == recorded["shapes"] else "other shapes"
        describe = lambda fp: f"{fp['tensors']} tensors, {fp['parameters']:,} parameters, weights {fp['weights']}"
        raise ValueError(f"{adapter_folder} was trained on another base: it records {name} ({describe(recorded)}); "
                         f"{model_folder} has {what} ({describe(actual)}). Use the adapter with the model it was "
                         f"trained on (a train.py run's student_base/).")


def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Load a PEFT-layout adapter folder into `model` (applying LoRA first if it has none).

    Every tensor must find its module and shape, and every LoRA layer of the model must be in
    the file; otherwise a ValueError names the module.
    """
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    variant = "moslora" if config.get("use_moslora") else "lora"
    rank, alpha, rslora = config["r"], config["lora_alpha"], config.get("use_rslora", False)
    if not lora_layers(model):
        targets = config["target_modules"]
        targets = [targets] if isinstance(targets, str) else targets
        apply_lora(model, targets, rank, alpha, config.get("lora_dropout", 0.0), variant, rslora)
    layers = lora_layers(model)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    expected = {f"{PEFT_PREFIX}{name}.{key}.weight": (name, key)
                for name, layer in layers.items() for key in ADAPTER_NAMES
                if getattr(layer, key) is not None}
    for k in tensors:
        if k not in expected:
            module = k.removeprefix(PEFT_PREFIX).rsplit(".", 2)[0]
            raise ValueError(f"{folder}: module {module} (tensor {k}) has no matching LoRA layer "
                             "in the model")
    for k, (name, key) in expected.items():
        if k not in tensors:
            raise ValueError(f"{folder}: LoRA module {name} has no {key} in the adapter file")
        p, t = getattr(layers[name], key), tensors[k]
        if p.shape != t.shape:
            raise ValueError(f"{folder}: {key} of {name} has shape {tuple(t.shape)} in the file, "
                             f"{tuple(p.shape)} in the model")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge_lora(model) before loading an adapter")
        if layer.variant != variant:
            raise ValueError(f"{name} is {layer.variant}, the adapter file is {variant}")
        with torch.no_grad():
            for key in ADAPTER_NAMES:
                if getattr(layer, key) is not None:
                    getattr(layer, key).copy_(tensors[f"{PEFT_PREFIX}{name}.{key}.weight"])
        layer.rank, layer.alpha, layer.rslora = rank, alpha, rslora
        layer.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    return model
