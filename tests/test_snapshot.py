"""Static pictures of the controls (lorakit.widgets.picture) and each control's picture (lorakit.widgets)."""

from __future__ import annotations

import base64

import matplotlib
import pytest
import torch

from lorakit import codebook, quantization_tradeoff
from lorakit.tradeoff import tradeoff_curve
from lorakit.widgets.picture import Pictured, figure_png, text_figure
from lorakit.widgets.tradeoff import TradeoffControl, tradeoff_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def w():
    return torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.02  # (d_out, d_in)


def test_figure_png_is_a_png_that_depends_only_on_the_figure():
    first, second = (
        figure_png(text_figure("a = 1\nb = 2", title="t")),
        figure_png(text_figure("a = 1\nb = 2", title="t")),
    )
    assert first.startswith(PNG_MAGIC) and first == second
    assert b"matplotlib version" not in first  # no version stamp: the bytes do not change with an upgrade's metadata
    assert figure_png(text_figure("a = 1\nb = 3", title="t")) != first


def test_pictures_ignore_the_notebooks_rcparams(w):
    """The kernel runs with the inline backend's rcParams; a test process does not. Same settings, same PNG."""
    plain = figure_png(tradeoff_figure(w, "nf", 4, 64))
    with matplotlib.rc_context({"font.size": 17, "figure.dpi": 150, "lines.linewidth": 4, "axes.facecolor": "k"}):
        assert figure_png(tradeoff_figure(w, "nf", 4, 64)) == plain


def test_tradeoff_figure_shows_the_levels_and_every_width(w):
    fig = tradeoff_figure(w, "nf", 3, 64)
    levels_ax, curve_ax = fig.axes
    (levels,) = levels_ax.collections  # the vertical lines of the codebook
    assert len(levels.get_segments()) == codebook("nf", 3).numel() == 8
    curve = curve_ax.lines[0]
    expected = tradeoff_curve(w, "nf", 64)
    assert (
        list(curve.get_xdata()) == [t.bits_per_parameter for t in expected.values()] == [b + 0.5 for b in range(2, 9)]
    )
    assert list(curve.get_ydata()) == [t.relative_error for t in expected.values()]
    chosen = curve_ax.lines[1]
    assert list(chosen.get_ydata()) == [quantization_tradeoff(w, "nf", 3, 64).relative_error]
    assert fig._suptitle.get_text() == str(quantization_tradeoff(w, "nf", 3, 64))
    assert figure_png(fig) != figure_png(tradeoff_figure(w, "nf", 5, 64))


def test_tradeoff_figure_of_an_invalid_setting_says_why(w):
    fig = tradeoff_figure(w, "fp", 3, 64)
    assert "bits must be 4" in fig._suptitle.get_text()
    assert list(tradeoff_curve(w, "fp", 64)) == [4]  # FP4 only


def test_tradeoff_control_shows_text_and_picture_of_its_settings(w):
    pytest.importorskip("ipywidgets")
    control = TradeoffControl(w)
    control.controls["bits"].value = 6
    control.controls["blocksize"].value = 128
    expected = quantization_tradeoff(w, "nf", 6, 128)
    assert control.result == expected
    assert str(expected) in control.text.value
    assert control.plot.value == figure_png(tradeoff_figure(w, "nf", 6, 128))
    control.controls["quant_type"].value = "fp"
    assert "bits must be 4" in control.result and "bits must be 4" in control.text.value
    assert control.plot.value == figure_png(tradeoff_figure(w, "fp", 6, 128))


def test_a_pictured_control_displays_the_widget_and_its_picture(w):
    widgets = pytest.importorskip("ipywidgets")
    control = TradeoffControl(w, bits=2)
    bundle = control._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # JupyterLab: the live widget
    assert base64.b64decode(bundle["image/png"]) == control.png() == control.plot.value  # the book: its picture

    slider = widgets.IntSlider(value=3)
    pictured = Pictured(slider, lambda: text_figure(f"value {slider.value}"))
    before = base64.b64decode(pictured._repr_mimebundle_()["image/png"])
    slider.value = 4
    after = base64.b64decode(pictured._repr_mimebundle_()["image/png"])
    assert before == figure_png(text_figure("value 3")) and after == figure_png(text_figure("value 4"))


def test_rank_control_shows_the_report_and_its_picture():
    pytest.importorskip("ipywidgets")
    from lorakit.lowrank import rank_report, singular_values
    from lorakit.widgets.rank import RankControl, rank_figure

    g = torch.Generator().manual_seed(0)
    dW = torch.randn(40, 8, generator=g) @ torch.randn(8, 60, generator=g)  # (d_out, d_in), rank 8
    s = singular_values(dW)
    control = RankControl(s, 60, 40, r=2)
    control.controls["rank"].value = 5
    assert control.result == rank_report(s, 60, 40, 5) and control.text.value == str(control.result)
    assert control.png() == figure_png(rank_figure(s, 60, 40, 5)) != figure_png(rank_figure(s, 60, 40, 2))
    fig = rank_figure(s, 60, 40, 8)
    curve, marker = fig.axes[0].lines
    assert (
        curve.get_ydata()[7] == pytest.approx(0, abs=1e-6)
        and marker.get_ydata()[0] == rank_report(s, 60, 40, 8).rel_error
    )
    assert list(curve.get_ydata()[:3]) == pytest.approx([rank_report(s, 60, 40, r).rel_error for r in (1, 2, 3)])


def test_memory_calculator_pictures_its_verdict():
    pytest.importorskip("ipywidgets")
    from lorakit import MemoryCalculator, check_fit
    from lorakit.widgets.memory import fit_figure

    calc = MemoryCalculator(model="7B", gpu_gb=24)
    bundle = calc._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == figure_png(fit_figure(calc.result))
    fig = fit_figure(calc.result)
    bars = [p.get_width() for p in fig.axes[0].patches]
    assert sum(bars) == pytest.approx(calc.result.estimate.total / 1e9)
    assert (
        fig.axes[0].get_title()
        == str(
            check_fit(
                24, model="7B", method="qlora", bits=4, rank=64, batch_size=1, seq_len=512, gradient_checkpointing=True
            )
        ).splitlines()[0]
    )
    calc.controls["method"].value = "full"
    calc.controls["bits"].value = 4  # impossible: the picture shows why
    assert calc.result is None and calc.png() == figure_png(text_figure(f"cannot estimate: {calc.error}"))
