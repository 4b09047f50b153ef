"""The student edition runs (issue 13): every notebook, its solutions cleared as `make student` clears them
(lorakit.student, nbgrader's ClearSolutions), executed top to bottom with no error, and every checker cell
reports "not solved yet" (or, for an exercise without a solution region, its success line).

Each notebook runs with the smallest settings that keep its asserted claims true: OVERRIDES below is injected
as a cell right after the `parameters` cell, as papermill does. A notebook without an entry runs as it is.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from lorakit.student import NOTEBOOK_GLOB, build, student_notebook

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob(NOTEBOOK_GLOB))
# Where `make student` writes the edition: the notebooks run with it as their working directory, one level
# below the repository root as notebooks/ is, so relative paths resolve as they do in the teacher edition.
STUDENT = ROOT / "student"

# The smallest settings per notebook (names and values of its parameters cell) that keep its asserts true.
# Measured (one thread, student edition): 01 12 s at its defaults, 9 s with these; 02 24 s, 18 s. Smaller still
# (01: 1 step of 1 x 16 tokens; 02: 2 steps of 1 x 32 tokens, 4 held-out blocks) also passed, with less margin
# on the asserted claims (dW closer to low rank than W0; the held-out perplexity goes down beyond the noise).
OVERRIDES: dict[str, dict[str, object]] = {
    "01_lora_from_scratch": {"FT_STEPS": 2, "BATCH_SIZE": 1, "SEQ_LEN": 32, "SLIDER_RANK": 4},
    "02_lora_on_a_transformer": {
        "STEPS": 4,
        "PEFT_STEPS": 1,
        "BATCH_SIZE": 2,
        "SEQ_LEN": 32,
        "VAL_BLOCKS": 8,
        "LATENCY_ROUNDS": 1,
        "LATENCY_REPEATS": 1,
    },  # fmt: skip
    # Reported by each notebook's author (one thread, student edition): 03 and 04 at their defaults (4-7 s and
    # 27-43 s; 04's perplexity asserts fail at fewer or shorter blocks); 05 20 s; 06 197 s (its other parameters
    # carry the asserted perplexity claims); 09 65 s (RANKS must hold RANK, 8).
    "05_memory_and_paged_optimizers": {"TIMING_STEPS": 1},
    "06_qlora_finetune": {"SHORT_STEPS": 1, "DTYPE_ROUNDS": 1},
    "07_instruction_tuning": {"N_TEST": 40, "STEPS": 10, "N_PROBE": 40},  # 106 s (200 s at its defaults)
    "08_merge_and_deploy": {"NEW_TOKENS": 2, "SPEED_REPEATS": 1, "ADAPTER2_STEPS": 2, "DEMO_TOKENS": 4},
    "09_beyond_lora": {"STEPS": 1, "EVAL_BLOCKS": 2, "BITS": (4, 2), "RANKS": (2, 8), "LRS": (1e-3,)},
    "10_lora_vs_qlora_lab": {  # 80 s, most of it process starts
        "STEPS": 2,
        "BATCH_SIZE": 2,
        "SEQ_LEN": 32,
        "TRAIN_BLOCKS": 4,
        "EVAL_BLOCKS": 4,
        "LATENCY_TOKENS": 16,
        "SPIKE_SEQ_LEN": 64,
        "SWEEP_RANKS": (2,),
    },
}

CHECK_CALL = re.compile(r"^check\(", re.M)


def with_parameters(nb: nbformat.NotebookNode, overrides: dict[str, object]) -> nbformat.NotebookNode:
    """Insert ``NAME = value`` lines as a cell tagged ``injected-parameters`` after the ``parameters`` cell."""
    if not overrides:
        return nb
    where = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Injected parameters (tests/test_student_edition.py)\n" + "".join(
        f"{name} = {value!r}\n" for name, value in overrides.items()
    )
    nb.cells.insert(where + 1, new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


def stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_make_student_writes_one_student_notebook_per_notebook(tmp_path):
    written = build(ROOT / "notebooks", tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path in written:
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and '"outputs": []' in text, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_notebook_runs_top_to_bottom(path, monkeypatch):
    from nbclient import NotebookClient

    teacher = nbformat.read(path, as_version=4)
    nb = with_parameters(student_notebook(teacher), OVERRIDES.get(path.stem, {}))
    STUDENT.mkdir(exist_ok=True)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the kernel imports this checkout's lorakit
    client = NotebookClient(nb, kernel_name="python3", timeout=1200, resources={"metadata": {"path": str(STUDENT)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    checkers = [c for c in nb.cells if c.cell_type == "code" and CHECK_CALL.search(c.source)]
    for cell in checkers:
        lines = [line for line in stdout(cell).splitlines() if line.strip()]
        verdicts = [line for line in lines if line.startswith(("not solved yet", "correct"))]
        assert len(verdicts) >= len(CHECK_CALL.findall(cell.source)), f"{path.stem}: checker cell printed {lines}"
    stubs = sum("raise NotImplementedError()" in c.source for c in nb.cells if c.cell_type == "code")
    not_solved = sum(stdout(c).count("not solved yet") for c in checkers)
    assert not_solved >= min(stubs, len(checkers)), f"{path.stem}: {stubs} stubs, {not_solved} 'not solved yet'"
