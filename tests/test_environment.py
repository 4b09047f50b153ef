"""The build's files agree: environment.yml with pyproject.toml (``make env``), the extras the Makefile
installs with the conda environment's, constraints.txt with the dependencies, CI with the Makefile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
P2C = Path(sys.executable).with_name("pyproject2conda")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def generate(pyproject: Path, workdir: Path) -> str:
    """Run the generator exactly as ``make env`` does, in a scratch folder, and return the yaml."""
    shutil.copy(pyproject, workdir / "pyproject.toml")
    subprocess.run([str(P2C), "project", "--overwrite", "force"], cwd=workdir, check=True, capture_output=True)
    return (workdir / "environment.yml").read_text()


def name(requirement: str) -> str:
    """The normalised project name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def makefile_extras() -> set[str]:
    found = re.findall(r'-e "\.\[([^]]*)\]"', (ROOT / "Makefile").read_text())
    assert len(found) == 1, 'the Makefile should install lorakit once, with its extras: -e ".[...]"'
    return set(found[0].split(","))


@pytest.mark.slow
def test_environment_yml_matches_pyproject(tmp_path):
    expected = generate(ROOT / "pyproject.toml", tmp_path)
    assert (ROOT / "environment.yml").read_text() == expected, (
        "environment.yml has drifted from pyproject.toml; regenerate it with `make env`"
    )


def test_make_and_conda_install_every_extra():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    conda = set(PYPROJECT["tool"]["pyproject2conda"]["envs"]["environment"]["extras"])
    assert makefile_extras() == extras, "the Makefile should install every extra, so that `make` installs everything"
    assert conda == extras, "environment.yml should hold every extra, as `make` installs them"


def test_constraints_pin_every_dependency_but_torch():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][^\s]*", line), f"constraints.txt: {line!r} is not an exact pin"
            pins[name(line)] = line
    project = PYPROJECT["project"]
    wanted = {name(r) for r in project["dependencies"]}
    wanted |= {name(r) for extra in project["optional-dependencies"].values() for r in extra}
    assert "torch" not in pins, "torch is chosen by the Makefile's TORCH, not by constraints.txt"
    assert sorted(wanted - {"torch"} - set(pins)) == []
    # beyond the direct dependencies: what the picture and property tests' results depend on
    assert {"numpy", "pillow", "tokenizers"} <= set(pins)


def test_ci_runs_the_torch_the_makefile_defaults_to():
    default = re.search(r"^TORCH\s*\?=\s*(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    ci = re.search(r"make test TORCH=(\S+)", (ROOT / ".ci" / "run").read_text())
    assert default and ci, "the Makefile should set TORCH ?= ..., and .ci/run run make test TORCH=..."
    assert default.group(1).startswith("torch=="), "the default torch should be the exact release the tests ran"
    assert ci.group(1) == default.group(1)
    assert f"TORCH={ci.group(1)}" in (ROOT / "README.md").read_text()


def test_environment_yml_uses_conda_forge_and_installs_lorakit():
    text = (ROOT / "environment.yml").read_text()
    assert "  - conda-forge" in text
    assert "- pytorch>=" in text  # conda-forge's name for torch
    assert "- -e ." in text
