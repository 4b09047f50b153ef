"""LoRA adapters on disk, in peft's format, so lorakit and peft can load each other's adapters.

A folder holds ``adapter_config.json`` (a ``peft.LoraConfig``) and ``adapter_model.safetensors``
with one ``lora_A`` and one ``lora_B`` tensor per wrapped module, named as peft's
``get_peft_model_state_dict`` names them: ``base_model.model.<module name>.lora_A.weight``
(``PeftModel.base_model`` is the ``LoraModel``, whose ``.model`` is the wrapped model).
A DoRA adapter (``use_dora: true``) also holds each layer's magnitude vector, which peft names
``base_model.model.<module name>.lora_magnitude_vector`` (no ``.weight``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from lorakit._io import atomic_write, atomic_write_text
from lorakit.dora import DoRALinear
from lorakit.lora import ALL_LINEAR, LoRALinear, add_lora, lora_layers


def _is_dora(layer: LoRALinear) -> bool:
    return isinstance(layer, DoRALinear)


CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the wrapped model)
MAGNITUDE = "lora_magnitude_vector"  # peft's name for DoRA's m (saved without ".weight")

# LoraConfig fields whose non-default values mean a LoRA variant lorakit does not implement (use_dora it does).
UNSUPPORTED = {
    "bias": "none",
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "layer_replication": None,
    "exclude_modules": None,
    "modules_to_save": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
}


def adapter_config(model: nn.Module) -> dict:
    """The ``peft.LoraConfig`` fields that describe the model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save; call add_lora(model, targets) first")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        setting = (layer.r, layer.alpha, layer.rslora, _is_dora(layer))
        if setting != (first.r, first.alpha, first.rslora, _is_dora(first)):
            raise ValueError(
                f"LoRA layer {name!r} has r={layer.r}, alpha={layer.alpha}, rslora={layer.rslora}, "
                f"dora={_is_dora(layer)}, unlike the others (r={first.r}, alpha={first.alpha}, "
                f"dora={_is_dora(first)}); one adapter holds one setting"
            )
    # Targets: the short names (q_proj, ...) when they pick exactly the wrapped layers, else full names.
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    picked = {n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in short and not n.endswith("base_layer")}
    targets = short if picked == set(layers) else sorted(layers)
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    # peft's fan_in_fan_out: the base weights are stored (d_in, d_out), as GPT-2's Conv1D stores them.
    # peft reads it per layer anyway (it corrects a wrong value with a warning), so one True suffices.
    fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "use_rslora": first.rslora,
        "target_modules": targets,
        "init_lora_weights": True,
        "fan_in_fan_out": fan_in_fan_out,
        "use_dora": _is_dora(first),
        **UNSUPPORTED,
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's LoRA weights in peft's format to the folder ``path``; returns the folder.

    ``peft.PeftModel.from_pretrained(base_model, path)`` loads the result. Each file is written
    atomically with ``lorakit._io.atomic_write`` (temporary file, then rename; the umask's mode).
    """
    from safetensors.torch import save_file

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(
            f"save_adapter: {str(folder)!r} is an existing file, not a folder; an adapter is a folder holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}. Pass a folder path (new or existing)"
        )
    config = adapter_config(model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()  # (r, d_in)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()  # (d_out, r)
        if _is_dora(layer):
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.magnitude.detach().cpu().contiguous()  # (d_out,)
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``(config, tensors)`` from an adapter folder, with clear errors for missing or corrupt files."""
    from safetensors.torch import load_file

    folder = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"adapter folder {str(folder)!r} has no {name}; an adapter folder (from save_adapter or peft's "
                f"save_pretrained) holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{CONFIG_NAME} in {str(folder)!r} is corrupt (not valid JSON: {e}); save the adapter again"
        ) from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(
            f"{CONFIG_NAME} in {str(folder)!r} has peft_type={found!r}; only 'LORA' adapters can be loaded"
        )
    try:
        tensors = load_file(folder / WEIGHTS_NAME)
    except Exception as e:  # safetensors raises its own SafetensorError for a damaged header or size
        raise ValueError(f"{WEIGHTS_NAME} in {str(folder)!r} is corrupt ({e}); save the adapter again") from e
    return config, tensors


def _check_config(config: dict, folder: str) -> None:
    empty = (None, [], {})
    for key, default in UNSUPPORTED.items():
        value = config.get(key, default)
        if value != default and not (value in empty and default in empty):
            raise ValueError(
                f"adapter {folder!r} sets {key}={config[key]!r}; "
                f"lorakit implements plain LoRA and DoRA only ({key}={default!r})"
            )
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{CONFIG_NAME} in {folder!r} lacks {key!r}; it is not a LoRA adapter config")
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() != ALL_LINEAR:
        raise ValueError(
            f"adapter {folder!r} gives target_modules as the regex {config['target_modules']!r}; "
            "lorakit reads a list of module name suffixes only"
        )


def _split_key(key: str, folder: str) -> tuple[str, str]:
    if key.startswith(PREFIX) and key.endswith(f".{MAGNITUDE}"):
        return key[len(PREFIX) : -len(MAGNITUDE) - 1], MAGNITUDE
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.startswith(PREFIX) and key.endswith(suffix):
            return key[len(PREFIX) : -len(suffix)], part
    raise ValueError(
        f"adapter {folder!r} holds the tensor {key!r}; expected names like '{PREFIX}<module>.lora_A.weight'"
    )


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter (lorakit's or peft's) into ``model``; returns the model.

    A model without LoRA layers first gets them from the adapter's config (``add_lora`` with its
    ``target_modules``, ``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``use_dora``). Every tensor
    must fit: same modules, same shapes, same rank. ``fan_in_fan_out`` needs no reading: each LoRA
    layer knows from its base layer (GPT-2's ``Conv1D``) whether its weight is stored transposed.
    """
    folder = str(path)
    config, tensors = read_adapter(path)
    _check_config(config, folder)
    r, alpha, dora = config["r"], config["lora_alpha"], bool(config.get("use_dora", False))
    if not lora_layers(model):
        add_lora(
            model,
            config["target_modules"],
            r=r,
            alpha=alpha,
            dropout=config.get("lora_dropout", 0.0),
            rslora=config.get("use_rslora", False),
            use_dora=dora,
        )
    layers = lora_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"load_adapter: LoRA layer {name!r} is merged; call unmerge_lora(model) before loading")
        if _is_dora(layer) != dora:
            kinds = {True: "DoRA (use_dora=True)", False: "plain LoRA"}
            raise ValueError(
                f"adapter {folder!r} is a {kinds[dora]} adapter, but the model's layer {name!r} is "
                f"{kinds[_is_dora(layer)]}; a DoRA adapter needs its magnitude vectors and DoRA's forward. "
                "Load it into a model without LoRA layers (load_adapter adds the right kind)"
            )
        if (layer.r, layer.alpha, layer.rslora) != (r, alpha, config.get("use_rslora", False)):
            raise ValueError(
                f"adapter {folder!r} has r={r}, lora_alpha={alpha}, but the model's LoRA layer {name!r} "
                f"has r={layer.r}, alpha={layer.alpha}; load it into a model without LoRA layers"
            )
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, part = _split_key(key, folder)
        found.setdefault(name, {})[part] = tensor
    extra = sorted(set(found) - set(layers))
    missing = sorted(set(layers) - set(found))
    if extra or missing:
        raise ValueError(
            f"adapter {folder!r} does not fit {type(model).__name__}: "
            + (
                f"it targets {len(extra)} modules the model has no LoRA layer for (e.g. {extra[0]!r}); "
                if extra
                else ""
            )
            + (
                f"it has no weights for {len(missing)} LoRA layers of the model (e.g. {missing[0]!r}); "
                if missing
                else ""
            )
            + f"the model's LoRA layers are e.g. {sorted(layers)[:3]}"
        )
    for name, layer in layers.items():  # in the model's module order
        parts = found[name]
        for part in ("lora_A", "lora_B", MAGNITUDE) if dora else ("lora_A", "lora_B"):
            if part not in parts:
                raise ValueError(f"adapter {folder!r} has no {part} tensor for {name!r}")
            param = layer.magnitude if part == MAGNITUDE else getattr(layer, part)
            if parts[part].shape != param.shape:
                raise ValueError(
                    f"adapter {folder!r}: {name}.{part} has shape {tuple(parts[part].shape)}, but the model expects "
                    f"{tuple(param.shape)} (lora_A: (r, d_in), lora_B: (d_out, r) with r={layer.r}, "
                    f"d_in={layer.in_features}, d_out={layer.out_features}); was it trained for another model or rank?"
                )
    with torch.no_grad():
        for name, parts in found.items():
            layers[name].lora_A.copy_(parts["lora_A"])
            layers[name].lora_B.copy_(parts["lora_B"])
            if dora:
                layers[name].magnitude.copy_(parts[MAGNITUDE])
    return model
