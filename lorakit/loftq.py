"""LoftQ: LoRA-fine-tuning-aware quantization (Li et al. 2023, "LoftQ", §3, Algorithm 1).

QLoRA quantizes ``W`` and starts the adapter at ``B A = 0``, so training starts from ``Q = q(W)``,
not from ``W``: at 4 bits the gap is small, at 2 bits the model starts broken. LoftQ picks the
quantized base *and* the adapter together, so that ``Q + s B A`` starts close to ``W``. It
alternates two steps, ``T`` times (§3.2):

    Q_t        = q(W - s B_{t-1} A_{t-1})             quantize what the adapter does not hold
    B_t, A_t   = SVD_r(W - Q_t)                       the adapter holds the rank-r part of the error

starting from ``B_0 A_0 = 0`` (so ``Q_1`` is QLoRA's base). ``q`` is lorakit's blockwise quantizer
(NF-k, equal to bitsandbytes' NF4 at k = 4); ``SVD_r`` keeps the top r singular triples, split
evenly between the factors as in PiSSA (lorakit.pissa.principal_factors). The error
``||W - Q - s B A||_F`` after step t can only be at most ``||W - Q_t||_F`` (the SVD removes its best
rank-r part), and it is what :func:`loftq_errors` reports.

peft's ``loftq_init`` (``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``)
follows the same Algorithm 1 with bitsandbytes' NF4 (``compress_statistics=False``), but stores the
SVD factors as ``B = U sqrt(S)``, ``A = sqrt(S) V^T`` without dividing by the scaling, so it holds
``Q + B A ~ W`` only when ``alpha = r``. lorakit divides by ``s`` (as PiSSA does), so any alpha works;
at ``alpha = r`` the two agree (tests/test_variants.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorakit.blockwise import QuantState, dequantize_blockwise, quantize_blockwise
from lorakit.codebooks import check_codebook
from lorakit.linear4bit import Linear4bit
from lorakit.lora import lora_layers
from lorakit.pissa import principal_factors


def check_loftq_bits(quant_type: str, bits: int) -> None:
    """Refuse a width the quantizer has no codebook for, naming the ones it has."""
    try:
        check_codebook(quant_type, bits)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"LoftQ: lorakit's quantizer has no {quant_type!r} codebook with bits={bits!r} ({e}). "
            "NF and INT codebooks exist for 2 to 8 bits, FP for 4 bits only; LoftQ's paper uses NF4 and NF2"
        ) from None


@torch.no_grad()
def loftq_step(
    weight: torch.Tensor, lora: torch.Tensor, r: int, scaling: float, bits: int, quant_type: str = "nf", **quant
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantState, torch.Tensor]:
    """One LoftQ iteration: quantize ``weight - lora`` (the part the adapter does not hold), then take the
    rank-r SVD of what quantization lost. ``weight``, ``lora``: ``(d_out, d_in)`` float32.

    Returns ``(A, B, packed, state, Q)`` with ``Q`` the dequantized base, so ``Q + scaling * B A ~ weight``.
    """
    packed, state = quantize_blockwise(weight - lora, quant_type, bits=bits, **quant)  # Q_t = q(W - s B A)
    Q = dequantize_blockwise(packed, state)  # (d_out, d_in) float32
    U, S, Vh = torch.linalg.svd(weight - Q, full_matrices=False)  # the quantization error's SVD
    A, B = principal_factors(U, S, Vh, r, scaling)  # s B A = its best rank-r approximation
    return A, B, packed, state, Q


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    bits: int = 4,
    iters: int = 1,
    quant_type: str = "nf",
    blocksize: int = 64,
    double_quant: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantState, list[float]]:
    """LoftQ (Algorithm 1) on one weight ``(d_out, d_in)``: ``(A, B, packed, state, errors)``.

    ``errors[t]`` is ``||W - Q - s B A||_F / ||W||_F`` after t iterations; ``errors[0]`` is plain QLoRA's
    (``B A = 0``). ``state`` decodes to the weight's dtype.
    """
    check_loftq_bits(quant_type, bits)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"LoftQ: iters={iters!r} is invalid; Algorithm 1 needs at least 1 alternating step")
    w = weight.detach().float()  # (d_out, d_in)
    lora = torch.zeros_like(w)  # s B_0 A_0 = 0: the first quantization is QLoRA's
    norm = torch.linalg.norm(w)
    errors = []
    for _ in range(iters):
        quant = {"blocksize": blocksize, "double_quant": double_quant}
        A, B, packed, state, Q = loftq_step(w, lora, r, scaling, bits, quant_type, **quant)
        if not errors:
            errors.append(float(torch.linalg.norm(w - Q) / norm))  # plain QLoRA: Q_1 and no adapter
        lora = scaling * B @ A  # (d_out, d_in)
        errors.append(float(torch.linalg.norm(w - Q - lora) / norm))
    return A, B, packed, dataclasses.replace(state, dtype=weight.dtype), errors


@torch.no_grad()
def loftq_init(
    model: nn.Module,
    bits: int = 4,
    iters: int = 1,
    quant_type: str = "nf",
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict[str, list[float]]:
    """Quantize every LoRA layer's base with LoftQ and set its A and B; returns each layer's errors.

    Call it after ``add_lora`` on a full-precision model. Each base layer becomes a ``Linear4bit``
    holding ``Q`` (any width the codebook has: NF2 to NF8); the layers without LoRA stay as they are
    (``lorakit.quantize_model`` quantizes them the plain way afterwards). Double quantization is on by
    default, QLoRA's recipe; the SVD then sees the doubly dequantized ``Q`` the model will use.
    """
    check_loftq_bits(quant_type, bits)
    layers = lora_layers(model)
    if not layers:
        raise ValueError("loftq_init: the model has no LoRA layers; call add_lora(model, targets) first")
    for name, layer in layers.items():
        if isinstance(layer.base_layer, Linear4bit):
            raise TypeError(
                f"loftq_init: {name!r} already has a 4-bit base; LoftQ needs the full-precision W to choose Q "
                "and B A together. Run add_lora and loftq_init on the float model: it quantizes the base itself"
            )
        if layer.merged or hasattr(layer, "magnitude"):
            raise ValueError(f"loftq_init: {name!r} is merged or a DoRA layer; LoftQ starts plain, unmerged LoRA")
    errors = {}
    for name, layer in layers.items():
        base = layer.base_layer
        weight = base.weight.T if layer.fan_in_fan_out else base.weight  # (d_out, d_in)
        A, B, packed, state, errors[name] = loftq_factors(
            weight, layer.r, layer.scaling, bits, iters, quant_type, blocksize, double_quant
        )
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        layer.base_layer = Linear4bit(packed, state, base.bias, from_conv1d=layer.fan_in_fan_out).to(weight.device)
        layer.fan_in_fan_out = False  # a Linear4bit stores (d_out, d_in), whatever the layer it came from
    return errors
