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
    wait_kernel_connected(page)


def wait_kernel_connected(page, timeout_ms: int = 120_000) -> None:
    """Wait until the notebook's kernel connection is up and has had the kernel's info reply.

    A restart sent before that races the first websocket: the server logs "Replacing stale
    connection", drops the new one, and Run All then waits forever on a kernel that never hears.
    """
    page.wait_for_function(
        """() => {
            const kernel = window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel;
            return kernel && kernel.connectionStatus === 'connected';
        }""",
        timeout=timeout_ms,
        polling=200,
    )
    page.evaluate("async () => { await window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.info; }")


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


def wait_for_text(page, selector: str, text: str, exact: bool = True, timeout_ms: int = 120_000) -> None:
    """Wait until the element shows ``text`` (trimmed, exactly, or containing it), then until the kernel is idle."""
    check = "=== text" if exact else ".includes(text)"
    page.wait_for_function(
        f"([selector, text]) => document.querySelector(selector)?.innerText.trim(){check}",
        arg=[selector, text.strip()],
        timeout=timeout_ms,
        polling=200,
    )
    wait_kernel_idle(page)


def shown_png(page, selector: str) -> bytes:
    """The bytes of the image an ipywidgets Image shows (a blob: URL), fetched inside the page."""
    import base64

    encoded = page.evaluate(
        """async (selector) => {
            const img = document.querySelector(selector);
            const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
            let s = '';
            for (const b of bytes) s += String.fromCharCode(b);
            return btoa(s);
        }""",
        selector,
    )
    return base64.b64decode(encoded)


def error_outputs(page) -> list[str]:
    return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()


# ------------------------------------------------------------- notebook parameters, papermill-style
def notebook_parameters(path: Path) -> dict:
    """The literal assignments of a notebook's ``parameters`` cell (``NAME = <literal>``), by name.

    Lines that are not a plain literal assignment (``if rt.device.type == "cuda": ...``) are left out.
    """
    import ast

    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path.name}: expected one cell tagged 'parameters', found {len(cells)}")
    values = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def inject_parameters(path: Path, **params) -> None:
    """Override parameters in a (scratch) notebook the way papermill does: a code cell tagged
    ``injected-parameters`` right after the ``parameters`` cell, assigning each ``NAME = repr(value)``.

    Only for scratch copies (the ``lab`` fixture's ``lab.root``): never call it on notebooks/.
    Each name must be a parameter the notebook has, so a renamed knob fails loudly here.
    """
    import nbformat

    if Path(path).resolve().parent == ROOT / "notebooks":
        raise ValueError(
            f"inject_parameters edits notebooks in place; {path} is a committed notebook, use the lab's scratch copy"
        )
    known = notebook_parameters(path)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"{Path(path).name} has no parameter(s) {unknown}; its parameters are {sorted(known)}")
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Injected parameters (tests/browser/lab.py: inject_parameters)\n" + "\n".join(
        f"{name} = {value!r}" for name, value in params.items()
    )
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    nbformat.write(nb, path)
