"""Notebook 01's rank slider: :func:`lorakit.lowrank.rank_report` behind a slider, and its picture."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from lorakit.lowrank import RankReport, rank_report
from lorakit.widgets.picture import PicturedControl, default_style, new_figure


def rank_figure(s: torch.Tensor, d_in: int, d_out: int, r: int) -> Figure:
    """The rank slider's picture: rank-``r`` error of ``dW`` against ``r``, and trainable parameters.

    Left: the relative error of the best rank-``r`` approximation for every rank (from the
    singular values ``s``, Eckart-Young), ``r`` marked. Right: the parameters LoRA trains at
    ``r`` against the full ``(d_out, d_in)`` weight. The title is :func:`rank_report`.
    """
    report = rank_report(s, d_in, d_out, r)
    energy = s.double() ** 2  # (k,)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[i] = sum_{j >= i} s_j^2
    errors = torch.cat([(tail[1:] / energy.sum()).sqrt(), torch.zeros(1, dtype=energy.dtype)])  # error at r = 1..k
    with default_style():
        fig = new_figure(9.0, 3.0)
        error_ax, params_ax = fig.subplots(1, 2, width_ratios=[2, 1])
        ranks = torch.arange(1, len(s) + 1)
        error_ax.plot(ranks.numpy(), errors.numpy(), color="tab:blue")
        error_ax.plot([r], [report.rel_error], "o", ms=10, mfc="none", mec="tab:red", mew=2)
        error_ax.set(xscale="log", xlabel="rank r", ylabel="rank-r error of dW", ylim=(0, 1.02))
        params_ax.bar(["LoRA A, B", "full W"], [report.lora_params, report.full_params], color=["tab:red", "0.6"])
        params_ax.set(yscale="log", ylabel="trainable parameters")
        fig.suptitle(str(report), fontsize=10)
    return fig


class RankControl(PicturedControl):
    """The rank slider of notebook 01: moving it shows :func:`rank_report` and :func:`rank_figure`.

    ``controls["rank"]`` is the slider (1 to ``min(d_in, d_out)``); setting its ``value`` from
    code updates as the mouse does. ``result`` is the last :class:`RankReport`.
    """

    def __init__(self, s: torch.Tensor, d_in: int, d_out: int, r: int = 8):
        import ipywidgets as widgets

        self.s, self.d_in, self.d_out = s, d_in, d_out
        self.controls = {"rank": widgets.IntSlider(value=r, min=1, max=min(d_in, d_out), description="rank r")}
        self.text = widgets.HTML()
        self.widget = widgets.VBox([self.controls["rank"], self.text])
        self.result: RankReport | None = None
        self.controls["rank"].observe(lambda change: self.update(), names="value")
        self.update()

    def update(self) -> RankReport:
        self.result = rank_report(self.s, self.d_in, self.d_out, self.controls["rank"].value)
        self.text.value = str(self.result)
        return self.result

    def figure(self) -> Figure:
        return rank_figure(self.s, self.d_in, self.d_out, self.controls["rank"].value)
