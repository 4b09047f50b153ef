"""The logic behind the notebooks' quantization controls: error and memory for one setting.

Widgets stay thin (STYLE.md): :func:`quantization_tradeoff` does the work and is tested;
:class:`TradeoffControl` only wires three controls to it and shows :func:`tradeoff_figure`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from matplotlib.figure import Figure

from lorakit.blockwise import (
    absmax_scale,
    check_blocksize,
    dequantize_blockwise,
    nearest_code,
    quantize_blockwise,
    storage,
)
from lorakit.codebooks import codebook
from lorakit.snapshot import PicturedControl, default_style, new_figure


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


def tradeoff_figure(
    w: torch.Tensor, quant_type: str = "nf", bits: int = 4, blocksize: int = 64,
    curve: dict[int, Tradeoff] | None = None,
) -> Figure:
    """The control's picture: where the ``2**bits`` levels sit on the weights, and error against memory.

    Left: histogram of the block-scaled weights ``w / absmax`` (what the codebook quantizes) with
    the codebook's levels. Right: relative error against bits per parameter for every width of
    ``quant_type`` at this ``blocksize`` (``curve``, computed when not given), the chosen one
    marked. The title is the setting's :class:`Tradeoff` (or why the setting is invalid).
    """
    curve = tradeoff_curve(w, quant_type, blocksize) if curve is None else curve
    with default_style():
        fig = new_figure(9.0, 3.2)
        levels_ax, curve_ax = fig.subplots(1, 2)
        scaled, _ = absmax_scale(w.detach().reshape(-1).float(), blocksize)  # (n,) in [-1, 1]
        levels_ax.hist(scaled.numpy(), bins=100, range=(-1, 1), density=True, color="0.7")
        levels_ax.set(xlabel="w / absmax of its block", yticks=[], xlim=(-1.05, 1.05))
        curve_ax.set(xlabel="bits per parameter", ylabel="relative error", yscale="log",
                     title=f"{quant_type}, blocksize {blocksize}: every width")
        if curve:
            xs = [t.bits_per_parameter for t in curve.values()]
            curve_ax.plot(xs, [t.relative_error for t in curve.values()], "o-", color="tab:blue")
        if bits in curve:
            chosen = curve[bits]
            table = codebook(quant_type, bits)  # (2**bits,)
            levels_ax.vlines(table.numpy(), 0, 1, transform=levels_ax.get_xaxis_transform(), color="tab:red", lw=0.8)
            levels_ax.set_title(f"the {table.numel()} levels of {chosen.quant_type}", fontsize=10)
            curve_ax.plot([chosen.bits_per_parameter], [chosen.relative_error], "o", ms=11, mfc="none",
                          mec="tab:red", mew=2)
            fig.suptitle(str(chosen), fontsize=10)
        else:
            levels_ax.set_title(f"{quant_type}{bits} does not exist", fontsize=10)
            fig.suptitle(_invalid(w, quant_type, bits, blocksize), fontsize=10, color="tab:red")
    return fig


def _invalid(w: torch.Tensor, quant_type: str, bits: int, blocksize: int) -> str:
    """Why a setting cannot be quantized: the ValueError's message."""
    try:
        quantization_tradeoff(w, quant_type, bits, blocksize)
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{quant_type}{bits}, blocksize {blocksize} is valid")


class TradeoffControl(PicturedControl):
    """A bit-width slider (2-8), a data-type menu and a blocksize menu, wired to :func:`quantization_tradeoff`.

    Shows the chosen setting's :class:`Tradeoff` as text and :func:`tradeoff_figure` as a picture
    (also the static picture the book shows). ``controls`` holds the three ipywidgets by name
    (``"bits"``, ``"quant_type"``, ``"blocksize"``); setting a control's ``value`` from code
    recomputes, as moving it with the mouse does. ``result`` is the last :class:`Tradeoff`, or the
    error message when the combination is invalid (FP exists only as FP4).
    """

    def __init__(self, w: torch.Tensor, quant_type: str = "nf", bits: int = 4, blocksize: int = 64):
        import ipywidgets as widgets

        self.w = w.detach()
        self.controls = {
            "bits": widgets.IntSlider(value=bits, min=BIT_WIDTHS[0], max=BIT_WIDTHS[-1], description="bits"),
            "quant_type": widgets.Dropdown(options=["nf", "int", "fp"], value=quant_type, description="data type"),
            "blocksize": widgets.Dropdown(options=[16, 32, 64, 128, 256, 1024, 4096], value=blocksize,
                                          description="blocksize"),
        }
        self.text = widgets.HTML()
        self.plot = widgets.Image(format="png")
        for name, part in (*self.controls.items(), ("result", self.text), ("plot", self.plot)):
            part.add_class(f"lorakit-tradeoff-{name}")  # for the browser tests' selectors
        self.widget = widgets.VBox([*self.controls.values(), self.text, self.plot])
        self._curves: dict[tuple[str, int], dict[int, Tradeoff]] = {}  # (quant_type, blocksize) -> curve
        self.result: Tradeoff | str | None = None
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def settings(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def curve(self) -> dict[int, Tradeoff]:
        key = (self.controls["quant_type"].value, self.controls["blocksize"].value)
        if key not in self._curves:
            self._curves[key] = tradeoff_curve(self.w, *key)
        return self._curves[key]

    def update(self) -> Tradeoff | str:
        """Recompute from the controls; show the text and the picture."""
        s = self.settings()
        curve = self.curve()
        self.result = curve.get(s["bits"]) or _invalid(self.w, s["quant_type"], s["bits"], s["blocksize"])
        self.plot.value = self.png()  # the picture first: once the text shows a setting, so does the plot
        self.text.value = f"<pre>{html.escape(str(self.result))}</pre>"
        return self.result

    def figure(self) -> Figure:
        s = self.settings()
        return tradeoff_figure(self.w, s["quant_type"], s["bits"], s["blocksize"], curve=self.curve())


def tradeoff_widget(w: torch.Tensor, **settings) -> TradeoffControl:
    """The notebooks' quantization control on weight ``w``: see :class:`TradeoffControl`."""
    return TradeoffControl(w, **settings)


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
