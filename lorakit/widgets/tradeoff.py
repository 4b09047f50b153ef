"""The notebooks' quantization control and its picture.

:func:`lorakit.tradeoff.quantization_tradeoff` behind three controls.
"""

from __future__ import annotations

import html

import torch
from matplotlib.figure import Figure

from lorakit.blockwise import absmax_scale
from lorakit.codebooks import KINDS, codebook
from lorakit.tradeoff import BIT_WIDTHS, Tradeoff, invalid_reason, tradeoff_curve
from lorakit.widgets.picture import PicturedControl, default_style, new_figure


def tradeoff_figure(
    w: torch.Tensor,
    quant_type: str = "nf",
    bits: int = 4,
    blocksize: int = 64,
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
        curve_ax.set(
            xlabel="bits per parameter",
            ylabel="relative error",
            yscale="log",
            title=f"{quant_type}, blocksize {blocksize}: every width",
        )
        if curve:
            xs = [t.bits_per_parameter for t in curve.values()]
            curve_ax.plot(xs, [t.relative_error for t in curve.values()], "o-", color="tab:blue")
        if bits in curve:
            chosen = curve[bits]
            table = codebook(quant_type, bits)  # (2**bits,)
            levels_ax.vlines(table.numpy(), 0, 1, transform=levels_ax.get_xaxis_transform(), color="tab:red", lw=0.8)
            levels_ax.set_title(f"the {table.numel()} levels of {chosen.quant_type}", fontsize=10)
            curve_ax.plot(
                [chosen.bits_per_parameter], [chosen.relative_error], "o", ms=11, mfc="none", mec="tab:red", mew=2
            )
            fig.suptitle(str(chosen), fontsize=10)
        else:
            levels_ax.set_title(f"{quant_type}{bits} does not exist", fontsize=10)
            fig.suptitle(invalid_reason(w, quant_type, bits, blocksize), fontsize=10, color="tab:red")
    return fig


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
            "quant_type": widgets.Dropdown(options=list(KINDS), value=quant_type, description="data type"),
            "blocksize": widgets.Dropdown(
                options=[16, 32, 64, 128, 256, 1024, 4096], value=blocksize, description="blocksize"
            ),
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
        self.result = curve.get(s["bits"]) or invalid_reason(self.w, s["quant_type"], s["bits"], s["blocksize"])
        self.plot.value = self.png()  # the picture first: once the text shows a setting, so does the plot
        self.text.value = f"<pre>{html.escape(str(self.result))}</pre>"
        return self.result

    def figure(self) -> Figure:
        s = self.settings()
        return tradeoff_figure(self.w, s["quant_type"], s["bits"], s["blocksize"], curve=self.curve())
