"""PiSSA: principal singular values and singular vectors adaptation (Meng et al. 2024, "PiSSA", §3).

LoRA starts with ``B = 0``: the adapter learns from nothing. PiSSA starts the adapter at the
weight's **principal** part and freezes the rest:

    W0 = U S V^T                                      (SVD, singular values in decreasing order)
    A = sqrt(S_r / s) V_r^T          (r, d_in)         the top r right singular vectors, scaled
    B = U_r sqrt(S_r / s)            (d_out, r)        the top r left singular vectors, scaled
    W_res = W0 - s B A = U_[r:] S_[r:] V_[r:]^T        the residual, the new frozen base

so ``W_res + s B A = W0``: the model is unchanged at step 0, but the trainable factors hold the
directions that matter most (§3, eq. 2-4), and the frozen residual is what gets quantized in
QPiSSA (§4). ``s`` is LoRA's scaling (alpha / r); dividing S by it, as peft's ``pissa_init`` does,
makes ``s B A`` equal the top-r part whatever alpha is.

**The sign convention.** An SVD is unique only up to flipping a pair ``(u_i, v_i) -> (-u_i, -v_i)``
(and LAPACK builds may choose differently). ``B A`` is the same either way, and so is training
(the flip is a symmetry of the loss), but the raw A and B tensors may differ in the sign of a
row of A together with the column of B. :func:`pissa_factors` fixes a convention (the entry of
largest magnitude in each ``u_i`` is positive, as scikit-learn's ``svd_flip``), so that the factors
do not depend on the LAPACK build; peft keeps what ``torch.linalg.svd`` returns, so the tests
compare the products and the residual exactly and the factors up to those paired signs.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.linear4bit import Linear4bit
from lorakit.lora import LoRALinear, lora_layers

# Singular values below this fraction of the largest count as zero (numerical rank, as numpy's matrix_rank).
RANK_TOLERANCE = 1e-6


def sign_convention(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair ``(u_i, v_i)`` so that the largest-magnitude entry of ``u_i`` is positive (``svd_flip``)."""
    biggest = U.abs().argmax(dim=0)  # (k,): row of each column's largest entry
    signs = torch.sign(U[biggest, torch.arange(U.shape[1])])  # (k,)
    signs[signs == 0] = 1
    return U * signs, Vh * signs[:, None]


@torch.no_grad()
def pissa_factors(
    weight: torch.Tensor, r: int, scaling: float, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, W_res)`` for a weight ``(d_out, d_in)``: ``W_res + scaling * B A == weight`` (PiSSA §3).

    Computed in float32 (as peft); ``W_res`` comes back in the weight's dtype.
    """
    d_out, d_in = weight.shape
    w = weight.float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
    rank = int((S > RANK_TOLERANCE * S[0]).sum()) if S.numel() else 0
    if r > rank:
        raise ValueError(
            f"PiSSA on {name}: rank r={r} exceeds the numerical rank {rank} of the weight ({d_out} x {d_in}, "
            f"singular values below {RANK_TOLERANCE:g} x the largest count as zero): components {rank + 1}..{r} "
            "would start with a zero row of A and a zero column of B, which get no gradient and never learn. "
            f"Use r <= {rank}"
        )
    A, B = principal_factors(U, S, Vh, r, scaling)
    residual = w - scaling * B @ A  # (d_out, d_in): the minor components
    return A, B, residual.to(weight.dtype)


def principal_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of the top-r part of ``U diag(S) Vh``: ``scaling * B A = U_r S_r Vh_r`` (also LoftQ's step)."""
    U, Vh = sign_convention(U, Vh)
    root = (S[:r] / scaling).sqrt()  # (r,): sqrt(S_r / s), shared by both factors
    A = root[:, None] * Vh[:r]  # (r, d_in)
    B = U[:, :r] * root  # (d_out, r)
    return A, B


@torch.no_grad()
def pissa_init(model: nn.Module) -> nn.Module:
    """Give every LoRA layer PiSSA's start: A, B from the top-r SVD, the residual as the frozen base weight.

    Call it after ``add_lora`` on a full-precision model (it rewrites ``W0`` in place; PiSSA §3). For QPiSSA
    (§4) call ``lorakit.quantize_model`` afterwards: the residual is what gets quantized. Returns the model.
    Save the residual base model with the adapter: the adapter alone does not fit the original weights.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("pissa_init: the model has no LoRA layers; call add_lora(model, targets) first")
    for name, layer in layers.items():
        check_pissa_layer(name, layer)
    for name, layer in layers.items():
        base = layer.base_layer
        weight = base.weight.T if layer.fan_in_fan_out else base.weight  # (d_out, d_in)
        A, B, residual = pissa_factors(weight, layer.r, layer.scaling, name=name)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        base.weight.copy_(residual.T if layer.fan_in_fan_out else residual)
    return model


def check_pissa_layer(name: str, layer: LoRALinear) -> None:
    """Refuse what PiSSA cannot start from: a 4-bit base, a merged layer, a DoRA layer."""
    if isinstance(layer.base_layer, Linear4bit):
        raise TypeError(
            f"pissa_init: {name!r} has a 4-bit base; PiSSA needs the full-precision W0 to take its SVD. "
            "Run pissa_init on the float model, then quantize the residual (lorakit.quantize_model): QPiSSA, §4"
        )
    if layer.merged:
        raise RuntimeError(f"pissa_init: {name!r} is merged; unmerge_lora(model) first")
    if hasattr(layer, "magnitude"):
        raise ValueError(
            f"pissa_init: {name!r} is a DoRA layer; its magnitude was measured on W0, which PiSSA would replace. "
            "lorakit combines PiSSA with plain LoRA only"
        )
