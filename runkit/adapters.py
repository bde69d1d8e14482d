"""Adapter files: a trained LoRA or MoSLoRA adapter on disk, and the base it belongs to.

lora.py holds the layers; this file writes and reads their tensors in PEFT's layout, so that
`peft.PeftModel.from_pretrained` loads our LoRA adapters onto a transformers model:

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r", "lora_alpha",
                                "target_modules", "lora_dropout", "use_rslora", "base_model_name_or_path", ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight   (r, in)
                               base_model.model.<module>.lora_B.weight   (out, r)
                               metadata "base_fingerprint": shapes + weights hash of the base
MoSLoRA adds, in the same layout (PEFT cannot load these; it would drop the mixer):
    adapter_config.json        "use_moslora": true
    adapter_model.safetensors  base_model.model.<module>.lora_M.weight   (r, r)

An adapter means something only on the base it was trained on, so the file records that base's
`fingerprint` (its tensor shapes and a hash of each tensor's first values); eval.py and
train.py --resume call `check_base`, which refuses another base and names both.

    adapters.save_adapter(model, "out/adapter", base_model_name_or_path="out/student_base")
    adapters.load_adapter(model, "out/adapter")   # applies LoRA first when the model has none
"""
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import apply_lora, lora_layers
from runkit import disk

ADAPTER_NAMES = ("lora_A", "lora_B", "lora_M")  # LoRALinear's adapter tensors, in file order
PEFT_PREFIX = "base_model.model."  # PeftModel wraps a LoraModel which wraps the transformers model


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
        with disk.room_for(folder, disk.nbytes(tensors), f"saving the adapter {folder}",
                           kept="any earlier adapter there is untouched"):
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata=metadata)
        disk.follow_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 shut out everyone else
        disk.replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
