"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA", §4.1 and §4.3).

DoRA writes the adapted weight as a **magnitude** times a **direction**:

    W' = m * (W0 + s B A) / ||W0 + s B A||_c,        s = alpha / r (or alpha / sqrt(r), rsLoRA)

``||.||_c`` is the paper's column-wise norm. The paper writes ``W: (d, k)`` and takes the norm of
each column; torch stores a Linear's weight as ``(d_out, d_in)``, so each paper column is a *row*
here, one per output feature: ``||W||_c = W.norm(dim=1)``, shape ``(d_out,)``, as peft's
``DoraLinearLayer.get_weight_norm`` computes it. ``m`` starts at ``||W0||_c`` (B = 0), so the
layer starts equal to its base; LoRA's ``A`` and ``B`` learn the direction, ``m`` the magnitude.

§4.3 ("reduce training overhead"): the norm is treated as a constant in backward (detached), so
no gradient flows through it. As peft's ``DoraLinearVariant.forward``, the output reuses the base
layer's output ``h = W0 x + b`` instead of a second matmul with ``W0``:

    y = h + (m / n - 1) * (h - b) + (m / n) * s * B A x,        n = ||W0 + s B A||_c (detached)
      = (m / n) * (W0 + s B A) x + b

which is ``W' x + b`` rearranged. ``add_lora(model, targets, use_dora=True)`` builds these layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.linear4bit import Linear4bit
from lorakit.lora import LoRALinear


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """``W0`` as ``(d_out, d_in)``: dequantized from a 4-bit base, transposed from GPT-2's ``Conv1D``."""
    if isinstance(base_layer, Linear4bit):
        return base_layer.dequantize()
    return base_layer.weight.T if isinstance(base_layer, Conv1D) else base_layer.weight  # Conv1D: (d_in, d_out)


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """DoRA's ``||W||_c`` for a torch weight ``(d_out, d_in)``: the L2 norm of each output row, ``(d_out,)``."""
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class DoRALinear(LoRALinear):
    """``LoRALinear`` plus a trainable magnitude ``m: (d_out,)`` (DoRA §4.1); only forward and merging change."""

    def __init__(self, base_layer: nn.Module, *args, **kwargs):
        super().__init__(base_layer, *args, **kwargs)
        with torch.no_grad():  # B = 0, so m starts at ||W0||_c and the layer at its base
            norm = self.weight_norm(base_weight(base_layer).to(self.lora_A.dtype))
        self.magnitude = nn.Parameter(norm)  # (d_out,), peft's lora_magnitude_vector
        self._merged_norm: torch.Tensor | None = None  # n at merge time, to unmerge exactly

    def lora_weight(self) -> torch.Tensor:
        """``B A``: ``(d_out, d_in)``. Computed as peft's ``get_lora_weight``, by pushing the identity through
        A then B, so the rounding is the forward pass's own."""
        eye = torch.eye(self.lora_A.shape[1], dtype=self.lora_A.dtype, device=self.lora_A.device)  # (d_in, d_in)
        return F.linear(F.linear(eye, self.lora_A), self.lora_B).T  # (d_in, d_out), transposed

    def weight_norm(self, w0: torch.Tensor, lora_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``n = ||W0 + s B A||_c``: ``(d_out,)``, detached (DoRA §4.3)."""
        lora_weight = self.lora_weight() if lora_weight is None else lora_weight
        return column_norm(w0 + self.scaling * lora_weight.detach()).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        h = self.base_layer(x)  # W0 x + b: (..., d_out)
        if self.merged:  # W0 already holds m * (W0 + s B A) / n
            return h
        x = x.to(self.lora_A.dtype)
        w0 = base_weight(self.base_layer).to(x.dtype)  # (d_out, d_in)
        factor = self.magnitude / self.weight_norm(w0, self.lora_weight().to(x.dtype))  # m / n: (d_out,)
        bias = self.base_layer.bias
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base = h if bias is None else h - bias  # W0 x, reused from the base layer's output
        else:  # dropout applies to the input of both paths (peft's DoRA): W0 is applied to the dropped x again
            x = self.dropout(x)
            base = F.linear(x, w0)  # (..., d_out)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)  # B A x: (..., d_out)
        return (h + ((factor - 1) * base + factor * lora * self.scaling)).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The full-rank update ``W' - W0`` that merging adds (unlike LoRA's, it is not low rank)."""
        return self.merged_weight(+1).to(self.lora_A.dtype) - base_weight(self.base_layer).to(self.lora_A.dtype)

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> torch.Tensor:
        """``W' = (m / n) (W0 + s B A)`` (sign +1), or ``W0 = W' n / m - s B A`` back (sign -1), as peft's
        ``DoraLinearVariant.merge_unsafe`` / ``unmerge``; in the base weight's layout and dtype."""
        self._check_mergeable("merge" if sign > 0 else "unmerge")
        weight = self.base_layer.weight  # (d_out, d_in), or (d_in, d_out) for a Conv1D
        delta = LoRALinear.delta_weight(self)  # s B A, (d_out, d_in)
        if sign > 0:
            self._merged_norm = column_norm(base_weight(self.base_layer) + delta)  # from the unmerged W0
        factor = (self.magnitude / self._merged_norm).view(-1, 1)  # (d_out, 1)
        if self.fan_in_fan_out:
            delta, factor = delta.T, factor.T  # Conv1D: rows are inputs, so the factor scales columns
        if sign > 0:
            return (factor * (weight + delta)).to(weight.dtype)
        return (weight / factor - delta).to(weight.dtype)

    def _check_mergeable(self, what: str) -> None:
        if isinstance(self.base_layer, Linear4bit):
            raise NotImplementedError(
                f"cannot {what} DoRA into a 4-bit base layer ({self._where()}): DoRA's merged weight "
                "m * (W0 + s B A) / ||W0 + s B A||_c rescales every row of W0, so it is a new full-precision matrix "
                "with no 4-bit home, and lorakit.merge_qlora's strategies assume LoRA's low-rank update. "
                "Dequantize first (lorakit.dequantize_model(model)), then merge_lora or unload_lora"
            )
        super()._check_mergeable(what)

    def _where(self) -> str:
        return f"DoRA layer on {type(self.base_layer).__name__}({self.in_features} -> {self.out_features})"

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
