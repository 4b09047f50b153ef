"""The student edition of the notebooks (issue 13): ``make student``, or ``python -m lorakit.student``.

The notebooks in ``notebooks/`` are the teacher edition: every "Build it" cell holds its solution between
nbgrader's markers (``### BEGIN SOLUTION`` / ``### END SOLUTION``). The student edition is the same notebooks
with, in each:

- every solution region replaced by ``raise NotImplementedError()``, by nbgrader's ``ClearSolutions``
  preprocessor (``enforce_metadata=False``: no nbgrader cell metadata needed, only the markers), so defining
  the function still works and its checker cell prints "not solved yet";
- every markdown cell tagged ``answer`` (the answer to a "Predict." or "Try it." question) replaced by a line
  that leaves the question to the student;
- every output, execution count and execution timestamp cleared (nbgrader's ``ClearOutput``).

Later cells use lorakit's implementation, never the learner's, so Run All still goes from top to bottom.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import nbformat
from nbformat import NotebookNode

ANSWER_STUB = "*Your answer here.* (The book and the teacher edition show one answer.)"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"


def student_notebook(nb: NotebookNode) -> NotebookNode:
    """A copy of ``nb`` with solutions, answers and outputs cleared (the input is left as it was)."""
    from nbgrader.preprocessors import ClearOutput, ClearSolutions

    nb = copy.deepcopy(nb)
    nb, _ = ClearSolutions(enforce_metadata=False).preprocess(nb, {})
    nb, _ = ClearOutput().preprocess(nb, {})
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "answer" in cell.metadata.get("tags", []):
            cell.source = ANSWER_STUB
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)  # the stored widget state belongs to the cleared outputs
    return nb


def build(src: Path | str = "notebooks", out: Path | str = "student") -> list[Path]:
    """Write the student edition of every ``src/NN_*.ipynb`` into ``out`` (created; its old notebooks replaced)."""
    src, out = Path(src), Path(out)
    paths = sorted(src.glob(NOTEBOOK_GLOB))
    if not paths:
        raise FileNotFoundError(f"no notebooks named {NOTEBOOK_GLOB} in {src}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(NOTEBOOK_GLOB):
        old.unlink()
    written = []
    for path in paths:
        nb = student_notebook(nbformat.read(path, as_version=4))
        target = out / path.name
        nbformat.write(nb, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorakit.student", description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="notebooks", help="the teacher edition's folder (default: notebooks)")
    parser.add_argument("--out", default="student", help="the student edition's folder (default: student)")
    args = parser.parse_args(argv)
    written = build(args.src, args.out)
    print(f"student edition: {len(written)} notebooks in {args.out}/ (solutions, answers and outputs cleared)")


if __name__ == "__main__":
    main()
