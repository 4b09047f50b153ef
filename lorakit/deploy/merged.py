"""The ``merged`` route: a saved adapter folded into its base, written as a plain transformers checkpoint.

Every other route starts here. ``merge_adapter`` rebuilds the model the adapter was trained on (the base,
quantized to NF4 as QLoRA stored it, for a QLoRA adapter) and merges with strategy (a) of
:mod:`lorakit.merge`: ``W = dequant(W_nf4) + (alpha / r) B A``, the trained model up to float rounding.
``check_adapter`` refuses an adapter that cannot be merged into the base (missing or corrupt files,
another base: modules it does not have, or other shapes) before anything is loaded.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapter import _check_config, _split_key, load_adapter, read_adapter
from lorakit.lora import LORA_BASE_TYPES, linear_features, unload_lora
from lorakit.merge import merge_qlora
from lorakit.models import DEFAULT_MODEL, load_base_model


class DeployError(ValueError):
    """A deployment refused before any work: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class BaseSpec:
    """The base an adapter was trained on: the model, and how QLoRA quantized it (``quant_type=None``: LoRA)."""

    model: str = DEFAULT_MODEL
    quant_type: str | None = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dtype: str = "float32"  # the dtype the base was quantized in (a bfloat16 run quantized bfloat16 weights)


def base_of(adapter_dir: str | os.PathLike) -> BaseSpec:
    """The base recorded by ``lorakit.finetune`` beside the adapter (``run.json``, ``metrics.json`` in the
    run folder), or the default (SmolLM2, NF4 with double quantization, blocksize 64) when there is none."""
    from lorakit.finetune.output import METRICS_FILE, RUN_FILE

    run = Path(adapter_dir).resolve().parent
    try:
        settings = json.loads((run / RUN_FILE).read_text())
    except (OSError, ValueError):
        return BaseSpec()
    try:
        dtype = json.loads((run / METRICS_FILE).read_text()).get("dtype") or "float32"
    except (OSError, ValueError):
        dtype = "float32"
    quantized = settings.get("method", "qlora") == "qlora"
    return BaseSpec(
        model=settings.get("model", DEFAULT_MODEL),
        quant_type=f"{settings.get('kind', 'nf')}{settings.get('bits', 4)}" if quantized else None,
        blocksize=settings.get("blocksize", 64),
        double_quant=settings.get("double_quant", True),
        dtype=dtype,
    )


def _base_source(name: str) -> str:
    from lorakit.assets import ASSETS, require

    return str(require(name)) if name in ASSETS else name


def check_adapter(adapter_dir: str | os.PathLike, base: str = DEFAULT_MODEL) -> dict:
    """Check, without loading a weight, that the adapter folder can be merged into ``base``; returns its config.

    Refuses (``DeployError``) a missing folder or file, a corrupt config or weights file, a LoRA variant
    lorakit does not merge, target modules the base does not have, and tensors of other shapes than the
    base's layers need (an adapter trained for another model or rank).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = str(adapter_dir)
    if not Path(folder).is_dir():
        raise DeployError(
            f"--adapter {folder!r} is not a folder; pass the adapter folder (adapter_config.json and "
            "adapter_model.safetensors), e.g. the adapter/ folder of a lorakit.finetune run"
        )
    try:
        config, tensors = read_adapter(folder)
        _check_config(config, folder)
    except (FileNotFoundError, ValueError) as e:
        raise DeployError(str(e)) from e
    with torch.device("meta"):  # the base's layers and shapes, without reading a weight
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(_base_source(base)))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, LORA_BASE_TYPES)}
    targets = config["target_modules"]
    if isinstance(targets, list):
        absent = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in modules)]
        if absent:
            raise DeployError(
                f"adapter {folder!r} targets {absent} but the base {base!r} has no such linear layer "
                f"(its layers end in {sorted({n.rsplit('.', 1)[-1] for n in modules})}); was it made for another base?"
            )
    r = config["r"]
    for key, tensor in tensors.items():
        try:
            name, part = _split_key(key, folder)
        except ValueError as e:
            raise DeployError(str(e)) from e
        if name not in modules:
            raise DeployError(
                f"adapter {folder!r} holds weights for {name!r}, which the base {base!r} does not have; "
                "was it made for another base?"
            )
        d_in, d_out = linear_features(modules[name])
        expected = (r, d_in) if part == "lora_A" else (d_out, r)
        if tuple(tensor.shape) != expected:
            raise DeployError(
                f"adapter {folder!r}: {name}.{part} has shape {tuple(tensor.shape)}, but the base {base!r} needs "
                f"{expected} (r={r}, d_in={d_in}, d_out={d_out}); was it made for another base?"
            )
    return config


def merge_adapter(
    adapter_dir: str | os.PathLike, spec: BaseSpec | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, object]:
    """``(model, tokenizer)``: the base the adapter was trained on, with the adapter merged in.

    For a QLoRA adapter (``spec.quant_type`` set) the base is quantized as in training and merged with
    :func:`lorakit.merge_qlora` strategy ``"dequantized"``; for a LoRA adapter merged into the float base.
    The result holds only ``nn.Linear`` layers, in ``dtype`` (default: the dtype the base was quantized in).
    """
    spec = spec or base_of(adapter_dir)
    check_adapter(adapter_dir, spec.model)
    work = getattr(torch, spec.dtype)
    model, tokenizer = load_base_model(spec.model, dtype=work)
    if spec.quant_type:
        from lorakit.linear4bit import quantize_model

        quantize_model(model, quant_type=spec.quant_type, blocksize=spec.blocksize, double_quant=spec.double_quant)
        load_adapter(model, adapter_dir)
        merge_qlora(model, "dequantized")
    else:
        load_adapter(model, adapter_dir)
        unload_lora(model)
    if dtype is not None and dtype != work:
        model = model.to(dtype)
    return model.eval(), tokenizer


def save_merged(model: torch.nn.Module, tokenizer, folder: str | os.PathLike) -> Path:
    """Write the merged model in float32 with its tokenizer: the input the ONNX and GGUF routes read."""
    folder = Path(folder)
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # a copy: casting the model itself would round its buffers (RoPE's)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
