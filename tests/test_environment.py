"""environment.yml is generated from pyproject.toml (``make env``); these tests catch drift."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
P2C = Path(sys.executable).with_name("pyproject2conda")


def generate(pyproject: Path, workdir: Path) -> str:
    """Run the generator exactly as ``make env`` does, in a scratch folder, and return the yaml."""
    shutil.copy(pyproject, workdir / "pyproject.toml")
    subprocess.run([str(P2C), "project", "--overwrite", "force"], cwd=workdir, check=True, capture_output=True)
    return (workdir / "environment.yml").read_text()


def test_environment_yml_matches_pyproject(tmp_path):
    expected = generate(ROOT / "pyproject.toml", tmp_path)
    assert (ROOT / "environment.yml").read_text() == expected, (
        "environment.yml has drifted from pyproject.toml; regenerate it with `make env`"
    )


def test_drift_is_detected_when_a_dependency_is_added_to_pyproject_only(tmp_path):
    text = (ROOT / "pyproject.toml").read_text()
    assert '    "tqdm>=4.66",\n' in text
    drifted = tmp_path / "src"
    drifted.mkdir()
    (drifted / "pyproject.toml").write_text(text.replace('    "tqdm>=4.66",\n', '    "tqdm>=4.66",\n    "rich>=13",\n'))
    out = tmp_path / "out"
    out.mkdir()
    regenerated = generate(drifted / "pyproject.toml", out)
    assert "rich>=13" in regenerated
    assert regenerated != (ROOT / "environment.yml").read_text()


def test_environment_yml_uses_conda_forge_and_installs_lorakit():
    text = (ROOT / "environment.yml").read_text()
    assert "  - conda-forge" in text
    assert "- pytorch>=" in text  # conda-forge's name for torch
    assert "- -e ." in text
