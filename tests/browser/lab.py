"""Helpers that drive JupyterLab in the browser, waiting on real states (never fixed sleeps)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
    page.screenshot(path=str(path), full_page=False)
    return path


def open_notebook(page, lab, name: str) -> None:
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=120_000)
    wait_kernel_idle(page)


def wait_kernel_idle(page, timeout_ms: int = 120_000) -> None:
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status=idle]", state="attached", timeout=timeout_ms)


def menu(page, top: str, item: str) -> None:
    page.click(f"div.lm-MenuBar-itemLabel:text-is('{top}')")
    page.click(f"li.lm-Menu-item:has-text('{item}')")


def restart_and_run_all(page, timeout_ms: int = 600_000) -> None:
    """Clear every stored output, Restart Kernel and Run All Cells, and wait until every cell has run.

    Clearing first means any output on the page afterwards comes from this run. Done = the last
    code cell has an output again, no cell is waiting ([*]), and the kernel is idle.
    """
    page.click(".jp-NotebookPanel .jp-Cell .jp-InputPrompt >> nth=0")  # make the notebook the current widget
    menu(page, "Edit", "Clear Outputs of All Cells")
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output').length === 0",
        timeout=60_000,
    )
    menu(page, "Kernel", "Restart Kernel and Run All Cells")
    page.click(".jp-Dialog button.jp-mod-accept")
    page.wait_for_function(
        """() => {
            const cells = [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')];
            const last = cells[cells.length - 1];
            const ind = document.querySelector('.jp-Notebook-ExecutionIndicator');
            return cells.length > 0
                && last.querySelectorAll('.jp-OutputArea-output').length > 0
                && cells.every(c => !c.querySelector('.jp-InputPrompt').textContent.includes('*'))
                && ind && ind.dataset.status === 'idle';
        }""",
        timeout=timeout_ms,
        polling=500,
    )


def error_outputs(page) -> list[str]:
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()
