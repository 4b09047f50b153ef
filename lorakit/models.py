"""Loading the base model (the offline SmolLM2 copy by default, any hub id for online users), text
generation (greedy or sampled) and parameter counts. Timing lives in :mod:`lorakit.timing`, byte
counts in :mod:`lorakit.memory`.

Importing this module (``import lorakit`` does) installs lorakit's narrow stderr filters
(:mod:`lorakit._quiet`): bitsandbytes' note about an optional kernel package and one transformers
deprecation that peft triggers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorakit import _quiet
from lorakit.assets import ASSETS, require
from lorakit.loss import use_chunked_loss

_quiet.install()

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

    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; try 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    source = str(require(name)) if name in ASSETS else name
    if name in ASSETS and ASSETS[name].kind != "model":
        raise ValueError(f"asset {name!r} is a {ASSETS[name].kind}, not a model")
    tokenizer = AutoTokenizer.from_pretrained(source)
    with _quiet.loading():  # a 4-second load needs no "Loading weights" bar in every notebook
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if device is not None:
        model = model.to(device)
    use_chunked_loss(model)  # .loss in chunks of rows: transformers' numbers with less memory (lorakit.loss)
    model.eval()
    return model, tokenizer


def chat_prompt(tokenizer, prompt: str) -> str:
    """The exact text :func:`generate` feeds the model for ``prompt`` when ``chat=True``.

    The tokenizer's chat template wraps ``prompt`` as one user turn and opens the assistant's turn
    (``add_generation_prompt=True``), which is the format an Instruct model was tuned to answer.
    SmolLM2-135M-Instruct's template is ChatML, and it adds a system turn of its own when the
    conversation has none: ``<|im_start|>system\\nYou are a helpful AI assistant named SmolLM,
    trained by Hugging Face<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
    A tokenizer without a template (a base model's) gets ``prompt`` back unchanged, as in ``generate``.
    """
    if not tokenizer.chat_template:
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 40,
    chat: bool = True,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    num_samples: int | None = None,
    seed: int = 0,
) -> str | list[str]:
    """The model's continuation of ``prompt``: the new text only, without special tokens.

    - **Template.** ``chat=True`` (the default) wraps ``prompt`` in the tokenizer's chat template
      (:func:`chat_prompt` returns the exact text), the format an Instruct model answers in.
      ``chat=False`` continues the raw text, as a base model, or one fine-tuned on plain text
      (notebook 06's Shakespeare), expects.
    - **Greedy** (``temperature=0``, the default) takes the most likely token at every step: the
      same text on every run, which an ``assert`` on an answer ("Paris") needs. A small model's
      greedy text often falls into a loop, because once a phrase repeats, repeating it again
      becomes the most likely continuation.
    - **Sampling** (``temperature > 0``) draws each token from the softmax of logits / temperature,
      restricted to the smallest set of tokens whose probabilities sum to ``top_p`` (nucleus
      sampling, Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"): it shows
      what the model typically writes rather than its single most likely path. It is seeded by
      ``seed`` and leaves torch's global random state as it was.
    - ``repetition_penalty > 1`` divides the positive logits (multiplies the negative ones) of every
      token already in the text (Keskar et al. 2019, CTRL §4.1), greedy or sampled.
    - Generation **stops** at the tokenizer's EOS token (and the model's configured EOS) or after
      ``max_new_tokens`` new tokens.
    - ``num_samples=None`` returns one string; an integer ``k`` returns a list of ``k`` samples
      drawn in one batch (``k > 1`` needs ``temperature > 0``: greedy text is the same every time).

    The settings are transformers' ``model.generate`` arguments (``do_sample``, ``temperature``,
    ``top_p``, ``repetition_penalty``, ``num_return_sequences``, ``eos_token_id``), with ``top_k=0``
    so that transformers' default top-50 cut does not act behind ``top_p``'s back.
    """
    _check_generation(max_new_tokens, temperature, top_p, repetition_penalty, num_samples)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt").to(model.device)
    eos_ids = _eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    settings = dict(
        max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    if temperature == 0:
        out = model.generate(**inputs, do_sample=False, **settings)  # (1, P + new)
    else:
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                num_return_sequences=num_samples or 1,
                **settings,
            )  # (k, P + new)
    texts = [
        t.strip() for t in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    return texts[0] if num_samples is None else texts


def _check_generation(max_new_tokens, temperature, top_p, repetition_penalty, num_samples) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"generate: temperature must be 0 (greedy) or a positive number, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty must be positive (1.0: no penalty), got {repetition_penalty}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"generate: num_samples must be None (one string) or at least 1, got {num_samples}")
    if temperature == 0 and top_p != 1:
        raise ValueError(
            f"generate: top_p={top_p} only acts when sampling; pass a temperature > 0 (0.7, say) or top_p=1"
        )
    if temperature == 0 and (num_samples or 1) > 1:
        raise ValueError(
            f"generate: num_samples={num_samples} with temperature=0 would give {num_samples} copies of the "
            "greedy text; pass a temperature > 0 (0.7, say) to sample"
        )


def _eos_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS (the one lorakit.data puts between documents) first, then the model's configured ones."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if i is not None))


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
