"""Loading the base model (the offline SmolLM2 copy by default, any hub id for online users), greedy
generation and parameter counts. Timing lives in :mod:`lorakit.timing`, byte counts in :mod:`lorakit.memory`."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorakit.assets import ASSETS, require

DEFAULT_MODEL = "smollm2-135m-instruct"


def load_base_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, the model in eval mode.

    ``name`` is an offline asset (``"smollm2-135m-instruct"``, fetched by
    ``python -m lorakit.assets fetch``), a local folder, or, for online users (on Colab, say),
    a model hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``. ``dtype`` defaults to
    float32; ``device`` to the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; try 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    source = str(require(name)) if name in ASSETS else name
    if name in ASSETS and ASSETS[name].kind != "model":
        raise ValueError(f"asset {name!r} is a {ASSETS[name].kind}, not a model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 4-second load needs no bar in every notebook
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40, chat: bool = True) -> str:
    """Greedy-decode an answer to ``prompt`` (wrapped in the chat template when ``chat``)."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class ParameterCount(NamedTuple):
    trainable: int
    total: int
    percent: float  # 100 * trainable / total

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters, counted as peft's ``print_trainable_parameters`` does.

    Tied weights are counted once (``model.parameters()`` yields each tensor once).
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCount(trainable, total, 100.0 * trainable / total if total else 0.0)


def keep_bnb_reference_path(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit Linear of ``model`` on its dequantize-then-matmul path.

    On CPUs with AVX512-BF16 (Intel Sapphire Rapids and later), bitsandbytes 0.50 repacks a 4-bit
    weight in place for a fused bfloat16 kernel at the layer's first forward in eval mode without
    gradients. That kernel rounds the absmax constants to bfloat16 and has no backward: after one
    evaluation, training gets no gradient through the 4-bit layers (measured on a tiny Llama: peft's
    LoRA on q_proj and v_proj got no gradient at all, on down_proj one 73% off), and a layer
    narrower than one block fails to repack. QLoRA trains through the reference path, and lorakit
    matches it bit for bit, so lorakit's peft + bitsandbytes runs switch the repacking off.
    Returns the number of layers switched (0 where bitsandbytes is absent or has no such switch).
    """
    try:
        from bitsandbytes.nn import Linear4bit as BnbLinear4bit
    except ImportError:
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, BnbLinear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched
