"""06_qlora_finetune's controls in JupyterLab: move rank and bit width by mouse and keyboard, press Train.

The scratch copy keeps the notebook's own cells up to its controls (setup, parameters, the base
model, the controls) and drops the long fine-tunes, which nbval runs anyway; tiny training
settings are injected the way papermill does. Every report the control shows (text and picture,
byte for byte) is compared with ``lorakit.setting_report`` / ``memory_figure`` for the same
setting, computed here in the test process.
"""

from __future__ import annotations

import nbformat
import pytest
import torch
from lab import (
    ROOT,
    error_outputs,
    inject_parameters,
    notebook_parameters,
    open_notebook,
    restart_and_run_all,
    screenshot,
    shown_png,
    wait_for_text,
)

from lorakit import load_base_model, setting_report
from lorakit.codebooks import BITS
from lorakit.finetune.report import RANKS
from lorakit.runtime import pick_dtype
from lorakit.widgets.finetune import memory_figure
from lorakit.widgets.picture import figure_png

NOTEBOOK = "06_qlora_finetune.ipynb"
CONTROL = ".jp-NotebookPanel .lorakit-finetune-"  # + rank / bits / quant_type / report / plot / train / runs
NOTEBOOK_DTYPE = pick_dtype(torch.device("cpu"))  # what the notebook's lorakit.setup() picks here (bf16 on AVX512-BF16)
TINY = dict(BATCH_SIZE=2, SEQ_LEN=32, EVAL_BLOCKS=2, WIDGET_STEPS=1, WIDGET_EVAL_BLOCKS=1)


@pytest.fixture(scope="module")
def base():
    """The unquantized model the controls describe (the notebook's MODEL)."""
    model, _ = load_base_model(notebook_parameters(ROOT / "notebooks" / NOTEBOOK)["MODEL"], dtype=NOTEBOOK_DTYPE)
    return model


def keep_cells_up_to_the_controls(path) -> None:
    """Drop every code cell after the one that builds the controls (the long fine-tunes among them)."""
    nb = nbformat.read(path, as_version=4)
    last = max(i for i, c in enumerate(nb.cells) if "finetune_widget(" in c.source)
    kept = [
        c for i, c in enumerate(nb.cells) if i <= last and (c.cell_type == "markdown" or _needed_before_controls(c))
    ]
    nb.cells = kept
    nbformat.write(nb, path)


def _needed_before_controls(cell) -> bool:
    tags = cell.metadata.get("tags", [])
    return (
        "setup" in tags
        or "parameters" in tags
        or "load_base_model(" in cell.source
        or "finetune_widget(" in cell.source
    )


def expect_shown(page, base, rank: int, bits: int, quant_type: str, name: str) -> None:
    """Wait until the control shows this setting's report, then check text and picture against lorakit."""
    try:
        report = setting_report(
            base, rank, bits, quant_type, batch_size=TINY["BATCH_SIZE"], seq_len=TINY["SEQ_LEN"], dtype=NOTEBOOK_DTYPE
        )
        expected = str(report)
    except ValueError as err:  # an invalid setting shows the reason
        report = expected = str(err)
    wait_for_text(page, CONTROL + "report", expected)
    page.locator(CONTROL + "plot").scroll_into_view_if_needed()
    screenshot(page, f"06_control-{name}")
    assert page.locator(CONTROL + "rank .widget-readout").inner_text().strip() == str(rank)
    assert page.locator(CONTROL + "bits .widget-readout").inner_text().strip() == str(bits)
    assert shown_png(page, CONTROL + "plot") == figure_png(memory_figure(report)), f"plot of {name}"


def track_x(page, control: str, index: int, count: int) -> float:
    """The x pixel of a slider's track where its ``index``-th of ``count`` positions sits
    (one pixel inside the track at its ends, so a click lands on it)."""
    box = page.locator(CONTROL + control + " .noUi-target").bounding_box()
    return box["x"] + 1 + (box["width"] - 2) * index / (count - 1)


def test_finetune_controls_follow_mouse_and_keyboard_and_train_adds_a_run(page, lab, base):
    path = lab.root / NOTEBOOK
    keep_cells_up_to_the_controls(path)
    inject_parameters(path, **TINY)
    params = {**notebook_parameters(ROOT / "notebooks" / NOTEBOOK), **TINY}
    open_notebook(page, lab, NOTEBOOK)
    restart_and_run_all(page)  # clears the stored outputs first: the control below is from this run
    assert error_outputs(page) == []
    rank, bits, quant_type = params["RANK"], params["BITS"], params["QUANT_TYPE"]
    expect_shown(page, base, rank, bits, quant_type, "after-run-all")

    # mouse: drag the rank handle to 32
    handle = page.locator(CONTROL + "rank .noUi-handle")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track_x(page, "rank", 32 - RANKS[0], RANKS[1] - RANKS[0] + 1), y, steps=10)
    page.mouse.up()
    rank = int(page.locator(CONTROL + "rank .widget-readout").inner_text())
    assert 28 <= rank <= 36, f"the drag should land near 32, the readout says {rank}"  # pixel rounding
    expect_shown(page, base, rank, bits, quant_type, "drag-rank")

    # keyboard: rank one step up; bit width one position down (4 -> 3), then Home (2 bits)
    handle.focus()
    page.keyboard.press("ArrowRight")
    rank += 1
    expect_shown(page, base, rank, bits, quant_type, "keys-rank-up")
    bits_handle = page.locator(CONTROL + "bits .noUi-handle")
    bits_handle.focus()
    page.keyboard.press("ArrowLeft")
    bits = BITS[BITS.index(bits) - 1]
    expect_shown(page, base, rank, bits, quant_type, "keys-bits-down")
    page.keyboard.press("Home")
    bits = BITS[0]
    expect_shown(page, base, rank, bits, quant_type, "keys-bits-home")

    # mouse: click the bit-width track at its last position (8 bits); then FP, which has 4 bits only
    track = page.locator(CONTROL + "bits .noUi-target").bounding_box()
    page.mouse.click(track_x(page, "bits", len(BITS) - 1, len(BITS)), track["y"] + track["height"] / 2)
    bits = BITS[-1]
    expect_shown(page, base, rank, bits, quant_type, "click-bits-8")
    page.locator(CONTROL + "quant_type select").select_option("fp")
    expect_shown(page, base, rank, bits, "fp", "fp8-invalid")
    assert page.locator(CONTROL + "train").is_disabled()

    # a valid setting again (Int at 8 bits), and Train adds a run with this setting to the table
    page.locator(CONTROL + "quant_type select").select_option("int")
    expect_shown(page, base, rank, bits, "int", "int8")
    page.locator(CONTROL + "train").click()
    label = f"r={rank} int{bits}"
    wait_for_text(page, CONTROL + "runs", label, exact=False, timeout_ms=300_000)
    page.locator(CONTROL + "runs-plot").scroll_into_view_if_needed()
    screenshot(page, "06_control-after-train")
    rows = page.locator(CONTROL + "runs tr").all_inner_texts()
    assert len(rows) == 2 and rows[1].split("\t")[:3] == ["1", label, str(params["WIDGET_STEPS"])]
    assert len(shown_png(page, CONTROL + "loss")) > 0 and len(shown_png(page, CONTROL + "runs-plot")) > 0
    assert not page.locator(CONTROL + "train").is_disabled()
    assert error_outputs(page) == []
