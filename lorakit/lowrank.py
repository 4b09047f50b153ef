"""Is a fine-tuning update low rank? Singular values, rank-r approximations, parameter arithmetic.

LoRA's hypothesis (Hu et al. 2021, §4.1): the change ``dW`` a fine-tune makes to a weight has a
low "intrinsic rank", so ``dW ~ B A`` with a small ``r`` loses little. This module measures it on a
real update (``full_finetune_delta``) and does the trainable-parameter arithmetic of §4.2 / §5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.train import train_steps


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix, largest first, computed in float64."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().double())


def low_rank_approx(matrix: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation (Eckart-Young): the top ``r`` singular triplets, ``U_r S_r V_r^T``."""
    _check_rank(r, matrix.shape)
    U, S, Vh = torch.linalg.svd(matrix.detach().double(), full_matrices=False)  # (m, k), (k,), (k, n)
    return (U[:, :r] * S[:r]) @ Vh[:r]  # (m, r) @ (r, n) -> (m, n)


def rank_r_error(s: torch.Tensor, r: int) -> float:
    """Relative Frobenius error ``||M - M_r|| / ||M||`` of the best rank-``r`` approximation.

    By Eckart-Young it needs only the singular values: ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``.
    """
    _check_rank(r, (len(s), len(s)))
    energy = s.double() ** 2
    total = energy.sum()
    if total == 0:
        raise ValueError("the matrix is zero; its rank-r error is undefined")
    return float(torch.sqrt(energy[r:].sum() / total))


def _check_rank(r: int, shape) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(shape):
        raise ValueError(f"rank r={r!r} is invalid for a {tuple(shape)} matrix; use 1 <= r <= {min(shape)}")


def lora_param_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters LoRA adds to one ``(d_out, d_in)`` weight: ``A: (r, d_in)`` plus ``B: (d_out, r)``."""
    return r * d_in + d_out * r


@dataclass(frozen=True)
class RankReport:
    """What rank ``r`` buys for one ``(d_out, d_in)`` update: parameters and approximation error."""

    r: int
    lora_params: int  # r * (d_in + d_out)
    full_params: int  # d_in * d_out
    rel_error: float  # ||dW - dW_r||_F / ||dW||_F

    @property
    def fraction(self) -> float:
        return self.lora_params / self.full_params

    def __str__(self) -> str:
        return (
            f"r = {self.r}: {self.lora_params:,} trainable parameters ({100 * self.fraction:.2f}% of "
            f"{self.full_params:,}); rank-{self.r} error of dW: {100 * self.rel_error:.1f}%"
        )


def rank_report(s: torch.Tensor, d_in: int, d_out: int, r: int) -> RankReport:
    """The rank slider's numbers for rank ``r``, given the singular values ``s`` of a ``(d_out, d_in)`` update."""
    if len(s) != min(d_in, d_out):
        raise ValueError(
            f"{len(s)} singular values do not belong to a ({d_out}, {d_in}) matrix; expected {min(d_in, d_out)}"
        )
    return RankReport(r, lora_param_count(d_in, d_out, r), d_in * d_out, rank_r_error(s, r))


def full_finetune_delta(model: nn.Module, module_name: str, batches: list[dict], steps: int, lr: float = 1e-4):
    """Fully fine-tune one Linear's weight for ``steps`` AdamW steps; return ``(dW, losses)``.

    Only ``module_name``'s weight trains; afterwards the weight and every ``requires_grad`` flag
    are restored, so the model is left as it was. ``dW = W_after - W_before``: ``(d_out, d_in)``.
    """
    layer = model.get_submodule(module_name)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{module_name!r} is a {type(layer).__name__}, not an nn.Linear")
    flags = {p: p.requires_grad for p in model.parameters()}
    w0 = layer.weight.detach().clone()  # (d_out, d_in)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        layer.weight.requires_grad_(True)
        optimizer = torch.optim.AdamW([layer.weight], lr=lr, weight_decay=0.0)
        losses = train_steps(model, batches, optimizer, steps)
        delta = layer.weight.detach() - w0  # (d_out, d_in)
    finally:
        with torch.no_grad():
            layer.weight.copy_(w0)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return delta, losses


@dataclass(frozen=True)
class Gpt3LoRA:
    """The LoRA paper's GPT-3 175B setting (§4.2, §5.5): adapt ``W_q`` and ``W_v`` of every layer."""

    d_model: int = 12288  # GPT-3 175B (Brown et al. 2020, Table 2.1)
    n_layers: int = 96
    vocab: int = 50257
    n_ctx: int = 2048
    r: int = 4
    adapted_per_layer: int = 2  # W_q and W_v, each (d_model, d_model)

    @property
    def total_params(self) -> int:
        """Per layer: attention 4 d^2 + MLP 8 d^2 (d_ff = 4 d); plus token and position embeddings."""
        return self.n_layers * 12 * self.d_model**2 + (self.vocab + self.n_ctx) * self.d_model

    @property
    def lora_params(self) -> int:
        return self.n_layers * self.adapted_per_layer * lora_param_count(self.d_model, self.d_model, self.r)

    @property
    def reduction(self) -> float:
        """How many times fewer trainable parameters than a full fine-tune."""
        return self.total_params / self.lora_params

    def training_bytes(self, lora: bool, bytes_per_value: int = 2) -> int:
        """Weights + gradients + Adam's two moments, all 16-bit; activations left out.

        A full fine-tune keeps gradients and moments for every weight; LoRA only for ``A`` and ``B``.
        """
        trained = self.lora_params if lora else self.total_params
        weights = self.total_params + (self.lora_params if lora else 0)
        return bytes_per_value * (weights + 3 * trained)  # gradient + 2 Adam moments per trained value


def order_of_magnitude(x: float) -> int:
    """``round(log10(x))``: 9,000 and 11,000 are both "10,000x"."""
    return round(math.log10(x))


def first_step_update(d: int, r: int, alpha: float, rslora: bool = False, lr: float = 1e-3, seed: int = 0) -> float:
    """``||scaling * B A||_F`` after one AdamW step of a fresh ``(d, d)`` LoRA layer on a fixed random regression.

    Why ``alpha / r`` (LoRA §4.1) and what rsLoRA changes (Kalajdzievski 2023, arXiv:2312.03732):
    Adam moves each entry of ``B`` by about ``lr`` on its first step whatever the gradient's size, so
    ``||B A||`` grows like ``sqrt(r)``. Scaled by ``alpha / r`` the step then shrinks like ``1 / sqrt(r)``
    (large ranks learn slowly); scaled by ``alpha / sqrt(r)`` (rsLoRA) it stays the same for every ``r``.
    """
    from lorakit.lora import LoRALinear  # lora imports this module's neighbours; keep the import local

    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, d, generator=g) / math.sqrt(d))
    torch.manual_seed(seed)
    layer = LoRALinear(base, r=r, alpha=alpha, rslora=rslora)
    x, target = torch.randn(64, d, generator=g), torch.randn(64, d, generator=g)  # (N, d)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=lr, weight_decay=0.0)
    loss = (layer(x) - target).pow(2).mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return float((layer.lora_B @ layer.lora_A).norm() * layer.scaling)
