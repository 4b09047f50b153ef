"""What ``import lorakit`` loads, and that every name the notebooks import resolves.

The teaching core must not pull in the notebook UI (matplotlib, ipywidgets) or the lab; their
names load on first use (``lorakit.__getattr__``). Checked in fresh processes, since this test
process may have imported anything already.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "ipywidgets", "lorakit.widgets", "lorakit.lab", "lorakit.finetune.report")
# the core and plumbing modules a script may import without drawing anything
CORE = ("lorakit", "lorakit.lowrank", "lorakit.memory", "lorakit.memory.__main__", "lorakit.tradeoff",
        "lorakit.exercises", "lorakit.timing", "lorakit.train", "lorakit.models", "lorakit.finetune")


def fresh_python(code: str) -> dict:
    """Run ``code`` in a new interpreter from the repository root; it prints one JSON value, returned here."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_core_modules_load_no_ui_and_no_lab():
    """One process imports the core modules in turn; after each, none of HEAVY may be loaded."""
    loaded = fresh_python(
        "import importlib, json, sys\n"
        f"out = {{}}\n"
        f"for module in {CORE!r}:\n"
        "    importlib.import_module(module)\n"
        f"    out[module] = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps(out))"
    )
    assert loaded == {module: [] for module in CORE}


def test_lazy_names_load_their_module_on_first_use():
    out = fresh_python(
        "import json, sys, lorakit\n"
        "before = 'lorakit.widgets.tradeoff' in sys.modules\n"
        "control = lorakit.TradeoffControl\n"
        "from lorakit.widgets.tradeoff import TradeoffControl\n"
        "print(json.dumps(dict(before=before, after='matplotlib' in sys.modules, same=control is TradeoffControl,\n"
        "                      lab='lorakit.lab' in sys.modules)))"
    )
    assert out == dict(before=False, after=True, same=True, lab=False)


def test_finetune_stays_the_function_whatever_is_imported_first():
    out = fresh_python("import json, lorakit.finetune.report, lorakit; from lorakit import run_lab; "
                       "f = lorakit.finetune; print(json.dumps(callable(f) and f'{f.__module__}.{f.__qualname__}'))")
    assert out == "lorakit.finetune.pipeline.finetune"  # the function, not the subpackage of the same name


def test_every_public_name_resolves_and_is_listed():
    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name
    assert set(lorakit.__all__) <= set(dir(lorakit))
    with pytest.raises(AttributeError, match="module 'lorakit' has no attribute 'no_such_name'"):
        lorakit.no_such_name  # noqa: B018


def notebook_imports() -> list[tuple[str, str, str]]:
    """``(notebook, module, name)`` for every ``from lorakit... import name`` and ``lorakit.name`` in code cells."""
    found = []
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            lines = "".join(cell["source"]).splitlines()
            code = "\n".join(line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!"))
                             else line for line in lines)  # IPython magics, kept as statements in their block
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorakit":
                    found += [(path.stem, node.module, alias.name) for alias in node.names]
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lorakit":
                    found.append((path.stem, "lorakit", node.attr))
    return found


def test_every_name_the_notebooks_import_resolves():
    imports = notebook_imports()
    assert len(imports) > 50  # the parser found the notebooks' imports
    missing = []
    for notebook, module, name in imports:
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{notebook}: from {module} import {name} ({err})")
    assert not missing, "\n".join(missing)
