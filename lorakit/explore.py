"""The logic behind the notebooks' quantization controls: error and memory for one setting.

Widgets stay thin (STYLE.md): :func:`quantization_tradeoff` does the work and is tested;
:func:`tradeoff_widget` only wires three controls to it.
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


def tradeoff_widget(w: torch.Tensor):
    """A bit-width slider (2-8), a data-type menu and a blocksize menu that print :class:`Tradeoff`.

    Returns an ``ipywidgets.VBox`` whose ``children`` are ``[bits, kind, blocksize, output]`` and
    with ``update()`` to recompute; ``box.result`` holds the last :class:`Tradeoff` (or the error
    message when a combination is invalid, e.g. FP with bits other than 4).
    """
    import ipywidgets as widgets

    bits = widgets.IntSlider(value=4, min=2, max=8, description="bits")
    kind = widgets.Dropdown(options=["nf", "int", "fp"], value="nf", description="data type")
    blocksize = widgets.Dropdown(options=[16, 32, 64, 128, 256, 1024, 4096], value=64, description="blocksize")
    output = widgets.Output()
    box = widgets.VBox([bits, kind, blocksize, output])
    box.result = None

    def update(*_):
        try:
            box.result = quantization_tradeoff(w, kind.value, bits.value, blocksize.value)
        except ValueError as err:
            box.result = str(err)
        output.clear_output()
        with output:
            print(box.result)

    for control in (bits, kind, blocksize):
        control.observe(update, names="value")
    box.update = update
    update()
    return box


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


def check_absmax_int8(fn) -> str:
    """Checker for the notebook exercise: ``fn(x) -> (codes, scale)`` for one absmax int8 block.

    ``codes`` must be integers in [-127, 127] with ``codes * scale`` reproducing lorakit's Int8
    (one block as large as the tensor). Raises AssertionError with a hint when they differ.
    """
    g = torch.Generator().manual_seed(1)
    for n in (7, 64, 1000):
        x = torch.randn(n, generator=g) * 3
        codes, scale = fn(x)
        codes = torch.as_tensor(codes)
        assert codes.shape == x.shape, f"codes must have the input's shape {tuple(x.shape)}, got {tuple(codes.shape)}"
        assert codes.abs().max() <= 127, "codes must lie in [-127, 127]: scale by 127 / absmax"
        packed, state = quantize_blockwise(x, "int", blocksize=_next_power_of_two(n), bits=8)
        expected = dequantize_blockwise(packed, state)
        got = codes.float() * float(scale)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (
            "codes * scale differs from lorakit's int8; did you round to the nearest integer and use "
            "scale = absmax / 127?"
        )
    return "correct: your absmax int8 matches lorakit's Int8 codebook"


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def check_bits_per_parameter(answer: float, bits: int = 4, blocksize: int = 64, double_quant: bool = False) -> str:
    """Checker: is ``answer`` the bits per parameter of k-bit blockwise storage (measured on a real tensor)?"""
    n = blocksize * 256 * 4  # a size every block level divides
    measured = quantization_tradeoff(torch.randn(n), "int", bits, blocksize, double_quant).bits_per_parameter
    assert abs(answer - measured) < 1e-3, (
        f"not quite: {bits} bits per code + the absmax constants; measured {measured:.4f}, you said {answer}"
    )
    return f"correct: {measured:.4f} bits per parameter"
