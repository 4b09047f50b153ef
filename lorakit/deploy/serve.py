"""Adapters served unmerged over one 4-bit base, switched per request without reloading the base.

Two ways, both measured in notebook 08:

* **peft + bitsandbytes** (:class:`PeftAdapterServer`): one bitsandbytes NF4 base (QLoRA's storage, the
  weights the adapters were trained against), every adapter loaded with ``PeftModel.load_adapter`` and
  chosen per request with ``set_adapter``.
* **ONNX Runtime GenAI**: :func:`lorakit.deploy.onnx.export_onnx_adapters` exports the base once (INT4)
  with LoRA inputs and each adapter as an ``.onnx_adapter``; :class:`lorakit.deploy.onnx.OnnxLM` loads them
  with ``og.Adapters`` and a request names its adapter (``generator.set_active_adapter``).

Memory: the base once plus each adapter's A and B, against one merged model per adapter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from lorakit.models import DEFAULT_MODEL, generate, keep_bnb_reference_path


def load_bnb_4bit(
    base: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    double_quant: bool = True,
    device: torch.device | str = "cpu",
):
    """The base as QLoRA stores it, with bitsandbytes: NF4 codes (blocks of 64, double-quantized constants),
    computing in ``dtype``; ``(model, tokenizer)`` on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit import _quiet
    from lorakit.assets import ASSETS, require

    source = str(require(base)) if base in ASSETS else base
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    with _quiet.loading():
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=config, dtype=dtype, device_map={"": str(device)}
        )
    keep_bnb_reference_path(model)  # the dequantize-then-matmul path QLoRA trained through
    return model.eval(), AutoTokenizer.from_pretrained(source)


class PeftAdapterServer:
    """One 4-bit base, several peft adapters: ``generate(..., adapter=name)`` or ``logits(ids, adapter=name)``
    switch with ``set_adapter`` per request; the base is loaded once."""

    def __init__(self, base_model, adapters: Mapping[str, str | os.PathLike]):
        from peft import PeftModel

        if not adapters:
            raise ValueError("PeftAdapterServer needs at least one adapter: {name: adapter folder}")
        (first, folder), *rest = adapters.items()
        self.model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=first)
        for name, folder in rest:
            self.model.load_adapter(str(folder), adapter_name=name)
        keep_bnb_reference_path(self.model)
        self.model.eval()
        self.names = list(adapters)

    def add(self, name: str, folder: str | os.PathLike) -> None:
        """Load one more adapter next to the others (``PeftModel.load_adapter``); the base is not reloaded."""
        self.model.load_adapter(str(folder), adapter_name=name)
        keep_bnb_reference_path(self.model)
        self.model.eval()
        self.names.append(name)

    def use(self, adapter: str) -> None:
        if adapter not in self.names:
            raise ValueError(f"adapter {adapter!r} is not loaded; this server has {self.names}")
        self.model.set_adapter(adapter)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, adapter: str) -> torch.Tensor:
        self.use(adapter)
        return self.model(input_ids=input_ids).logits

    def generate(self, tokenizer, prompt: str, adapter: str, **settings) -> str:
        """:func:`lorakit.generate` with the named adapter active."""
        self.use(adapter)
        return generate(self.model, tokenizer, prompt, **settings)


def adapter_bytes(model: torch.nn.Module) -> int:
    """Bytes of every LoRA A and B (peft's ``lora_A`` / ``lora_B`` modules, all adapters) held by ``model``."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
