"""The quantization trade-off: what one setting (data type, bits, blocksize) costs in error and saves in memory.

Widgets stay thin (STYLE.md): :func:`quantization_tradeoff` does the work and is tested;
:class:`lorakit.widgets.tradeoff.TradeoffControl` only wires three controls to it and shows its picture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.blockwise import (
    absmax_scale,
    check_blocksize,
    dequantize_blockwise,
    nearest_code,
    quantize_blockwise,
    storage,
)


@dataclass
class Tradeoff:
    """Error and memory of one quantization setting on one weight tensor."""

    quant_type: str
    bits: int
    blocksize: int
    double_quant: bool
    rmse: float  # root mean squared error of dequantize(quantize(w)) - w
    max_abs_error: float
    relative_error: float  # ||w_hat - w|| / ||w||
    bits_per_parameter: float  # from the stored tensors' byte sizes
    megabytes: float  # all stored bytes, constants included

    def __str__(self) -> str:
        dq = " + DQ" if self.double_quant else ""
        return (
            f"{self.quant_type}{dq}, blocksize {self.blocksize}: RMSE {self.rmse:.3e}, "
            f"relative error {self.relative_error:.2%}, {self.bits_per_parameter:.3f} bits/param, "
            f"{self.megabytes:.3f} MB"
        )


def quantization_tradeoff(
    w: torch.Tensor, quant_type: str = "nf", bits: int = 4, blocksize: int = 64, double_quant: bool = False
) -> Tradeoff:
    """Quantize ``w`` with one setting and measure what it costs and saves."""
    packed, state = quantize_blockwise(w, quant_type, blocksize, double_quant, bits)
    w_hat = dequantize_blockwise(packed, state).float()
    diff = w_hat - w.float()
    report = storage(packed, state)
    return Tradeoff(
        quant_type=state.quant_type,
        bits=state.bits,
        blocksize=blocksize,
        double_quant=double_quant,
        rmse=float(diff.pow(2).mean().sqrt()),
        max_abs_error=float(diff.abs().max()),
        relative_error=float(diff.norm() / w.float().norm()),
        bits_per_parameter=report.bits_per_parameter,
        megabytes=report.total_bytes / 1e6,
    )


BIT_WIDTHS = range(2, 9)  # the bits slider's range


def tradeoff_curve(w: torch.Tensor, quant_type: str = "nf", blocksize: int = 64) -> dict[int, Tradeoff]:
    """:func:`quantization_tradeoff` at every width in :data:`BIT_WIDTHS` that ``quant_type`` has (FP: 4 only)."""
    curve = {}
    for bits in BIT_WIDTHS:
        try:
            curve[bits] = quantization_tradeoff(w, quant_type, bits, blocksize)
        except ValueError:  # a width this data type does not have
            continue
    return curve


def invalid_reason(w: torch.Tensor, quant_type: str, bits: int, blocksize: int) -> str:
    """Why a setting cannot be quantized: the message of the ValueError :func:`quantization_tradeoff` raises."""
    try:
        quantization_tradeoff(w, quant_type, bits, blocksize)
    except ValueError as err:
        return str(err)
    raise ValueError(f"{quant_type}{bits} at blocksize {blocksize} is a valid setting; there is no error to explain")


def codebook_error(w: torch.Tensor, table: torch.Tensor, blocksize: int = 64) -> float:
    """RMSE of blockwise absmax quantization of ``w`` to any sorted ``table`` in [-1, 1].

    For comparing candidate codebooks (say NF4 built with another offset) on real weights.
    """
    check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()  # (n,)
    scaled, absmax = absmax_scale(flat, blocksize)
    codes = nearest_code(scaled, table.float())  # (n,)
    n_blocks = absmax.numel()
    values = torch.nn.functional.pad(table.float()[codes.long()], (0, n_blocks * blocksize - flat.numel()))
    w_hat = (values.view(n_blocks, blocksize) * absmax.view(-1, 1)).view(-1)[: flat.numel()]
    return float((w_hat - flat).pow(2).mean().sqrt())


# ---------------------------------------------------------------- is NF4's premise true?
def block_normalized(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """What NF4 actually sees: each block of ``w`` divided by its absmax, ``(n,)`` float32 in [-1, 1]."""
    check_blocksize(blocksize)
    scaled, _ = absmax_scale(w.detach().reshape(-1).float(), blocksize)
    return scaled


def excess_kurtosis(x: torch.Tensor) -> float:
    """``E[(x - mean)^4] / var^2 - 3`` (population moments): 0 for a normal law, 3 for Laplace, -1.2 for uniform."""
    x = x.detach().double().reshape(-1)
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return float(centred.pow(4).mean() / var**2 - 3)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs.

    Same value as ``scipy.stats.ks_2samp(a, b).statistic`` (tests/test_quantization.py).
    """
    a = a.detach().double().reshape(-1).sort().values
    b = b.detach().double().reshape(-1).sort().values
    grid = torch.cat([a, b])  # the CDFs only jump at sample points
    cdf_a = torch.searchsorted(a, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b, grid, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())
