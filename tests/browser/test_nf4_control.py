"""04_nf4_and_double_quant in JupyterLab: run it all, then move the tradeoff control by mouse and keyboard.

Every value the control shows (its text and its plot, byte for byte) is compared with what
``lorakit.quantization_tradeoff`` / ``tradeoff_figure`` give for the same settings on the same
weight, computed here in the test process.
"""

from __future__ import annotations

import pytest
from lab import (
    ROOT,
    error_outputs,
    notebook_parameters,
    open_notebook,
    restart_and_run_all,
    screenshot,
    shown_png,
    wait_for_text,
)

from lorakit import load_base_model, quantization_tradeoff
from lorakit.widgets.picture import figure_png
from lorakit.widgets.tradeoff import tradeoff_figure

NOTEBOOK = "04_nf4_and_double_quant.ipynb"
CONTROL = ".jp-NotebookPanel .lorakit-tradeoff-"  # + bits / quant_type / blocksize / result / plot


@pytest.fixture(scope="module")
def weight():
    """The weight the notebook's control shows: its parameters' MODEL and LAYER."""
    params = notebook_parameters(ROOT / "notebooks" / NOTEBOOK)
    model, _ = load_base_model(params["MODEL"])
    return model.get_submodule(params["LAYER"]).weight.detach()  # (d_out, d_in)


def shown_text(page) -> str:
    return page.locator(CONTROL + "result").inner_text().strip()


def expect_shown(page, w, quant_type: str, bits: int, blocksize: int, name: str) -> None:
    """Wait until the control shows this setting's text, then check text and plot against lorakit."""
    try:
        expected = str(quantization_tradeoff(w, quant_type, bits, blocksize))
    except ValueError as err:  # an invalid combination shows the reason
        expected = str(err)
    wait_for_text(page, CONTROL + "result", expected)
    page.locator(CONTROL + "plot").scroll_into_view_if_needed()
    screenshot(page, f"04_control-{name}")
    assert page.locator(CONTROL + "bits .widget-readout").inner_text().strip() == str(bits)
    assert shown_text(page) == expected
    # the plot was updated before the text, so it already shows this setting
    assert shown_png(page, CONTROL + "plot") == figure_png(tradeoff_figure(w, quant_type, bits, blocksize)), (
        f"plot of {name}"
    )


def handle_x(page, bits: int) -> float:
    """The x pixel of the slider track where the value ``bits`` sits (range 2-8)."""
    box = page.locator(CONTROL + "bits .noUi-target").bounding_box()
    return box["x"] + box["width"] * (bits - 2) / (8 - 2)


def test_nf4_tradeoff_control_follows_mouse_and_keyboard(page, lab, weight):
    open_notebook(page, lab, NOTEBOOK)
    restart_and_run_all(page)  # clears the stored outputs first: the control below is from this run
    screenshot(page, "04-after-run-all")
    assert error_outputs(page) == []
    # the notebook's own cell drove the control from code and left it at FP4, blocksize 4096
    expect_shown(page, weight, "fp", 4, 4096, "after-run-all")

    # data type and blocksize menus (select elements)
    page.locator(CONTROL + "quant_type select").select_option("nf")
    expect_shown(page, weight, "nf", 4, 4096, "menu-nf")
    page.locator(CONTROL + "blocksize select").select_option("64")
    expect_shown(page, weight, "nf", 4, 64, "menu-blocksize-64")

    # mouse: drag the handle from 4 to 7
    handle = page.locator(CONTROL + "bits .noUi-handle")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(handle_x(page, 7), y, steps=8)
    page.mouse.up()
    expect_shown(page, weight, "nf", 7, 64, "drag-to-7")

    # mouse: click on the track at 3
    track = page.locator(CONTROL + "bits .noUi-target").bounding_box()
    page.mouse.click(handle_x(page, 3), track["y"] + track["height"] / 2)
    expect_shown(page, weight, "nf", 3, 64, "click-track-3")

    # keyboard: focus the handle, two steps right, one left
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect_shown(page, weight, "nf", 5, 64, "keys-right-5")
    page.keyboard.press("ArrowLeft")
    expect_shown(page, weight, "nf", 4, 64, "keys-left-4")

    # the int data type, End (the slider's maximum) from the keyboard, then FP at a width it lacks
    page.locator(CONTROL + "quant_type select").select_option("int")
    expect_shown(page, weight, "int", 4, 64, "menu-int")
    handle.focus()
    page.keyboard.press("End")  # noUiSlider: End jumps to the maximum
    expect_shown(page, weight, "int", 8, 64, "keys-end-8")
    page.locator(CONTROL + "quant_type select").select_option("fp")
    expect_shown(page, weight, "fp", 8, 64, "fp8-invalid")
    assert error_outputs(page) == []
