"""The conventions of notebooks/README.md that a machine can check, for every notebook."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"])


def tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def colab_url(path: Path) -> str:
    """The badge URL, built from the repository URL in pyproject.toml."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    repo = re.search(r'^Repository = "([^"]+)"', pyproject, re.M).group(1)  # [project.urls]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)/?", repo).group(1)
    return f"https://colab.research.google.com/github/{owner_repo}/blob/main/notebooks/{path.name}"


def test_there_are_notebooks():
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_welcome.ipynb"


def test_notebooks_are_numbered_once():
    numbers = [p.name[:2] for p in NOTEBOOKS]
    assert len(numbers) == len(set(numbers)), numbers


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_kernel_badge_setup_and_parameters(path):
    nb = load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown"
    badge = f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({colab_url(path)})"
    assert badge in source(first), f"{path.name}: the first cell needs the badge {badge}"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    setup, parameters = code[0], code[1]
    assert "setup" in tags(setup), f"{path.name}: the first code cell must be tagged 'setup'"
    assert '"google.colab" in sys.modules' in source(setup)
    assert "lorakit.setup(" in source(setup)
    assert "parameters" in tags(parameters), f"{path.name}: the second code cell must be tagged 'parameters'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_stored_from_a_clean_run(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code" and source(c).strip()]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, f"{path.name}: run all cells and save"
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: outputs are not from one Restart and Run All"
    for cell in code:
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                assert "raises-exception" in tags(cell), f"{path.name}: stored error {out['ename']}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_machine_paths_or_tokens_in_outputs(path):
    leaks = {str(Path.home()) + "/", tempfile.gettempdir() + "/", str(ROOT.parent) + "/"}
    if os.environ.get("LORAKIT_CACHE"):
        leaks.add(os.environ["LORAKIT_CACHE"])
    for cell in load(path)["cells"]:
        for out in cell.get("outputs", []):
            text = json.dumps(out)
            for leak in leaks:
                assert leak not in text, f"{path.name}: an output shows the machine path {leak}"
            assert "token=" not in text, f"{path.name}: an output shows a server token"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_small(path):
    assert path.stat().st_size < 3_000_000, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB"
