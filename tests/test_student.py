"""The student edition's conversion (lorakit.student) on a tiny notebook built here: nbgrader's ClearSolutions
turns the solution into a stub that raises NotImplementedError, the checker cell then prints "not solved yet",
answers and outputs are cleared, and the teacher edition is left as it was."""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from lorakit.student import ANSWER_STUB, build, main, student_notebook

SOLUTION = '''def count_lora_params(d_in, d_out, r):
    """The trainable parameters LoRA adds to one weight."""
    ### BEGIN SOLUTION
    return r * (d_in + d_out)
    ### END SOLUTION'''


def tiny_notebook():
    solution = new_code_cell(SOLUTION, metadata={"tags": ["solution"]})
    solution.outputs = [new_output("stream", name="stdout", text="stored output\n")]
    solution.execution_count = 3
    return new_notebook(
        cells=[
            new_markdown_cell("### Build it: the count\n\nWrite it."),
            solution,
            new_code_cell(
                "from lorakit.exercises import check, check_lora_param_count\n\n"
                "check(check_lora_param_count, count_lora_params)"
            ),
            new_markdown_cell("**Predict.** How many?"),
            new_markdown_cell("r (d_in + d_out).", metadata={"tags": ["answer"]}),
            new_code_cell("print('later cells still run')"),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )


def test_student_notebook_clears_solutions_answers_and_outputs():
    teacher = tiny_notebook()
    student = student_notebook(teacher)
    stub = student.cells[1].source
    assert "raise NotImplementedError()" in stub and "BEGIN SOLUTION" not in stub and "r * (d_in + d_out)" not in stub
    assert stub.startswith("def count_lora_params(d_in, d_out, r):\n") and '"""The trainable' in stub  # signature kept
    assert student.cells[4].source == ANSWER_STUB and student.cells[3].source == "**Predict.** How many?"
    assert all(c.outputs == [] and c.execution_count is None for c in student.cells if c.cell_type == "code")
    assert "### BEGIN SOLUTION" in teacher.cells[1].source and teacher.cells[1].outputs  # input left as it was


def test_the_student_edition_runs_and_its_checker_says_not_solved(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    src, out = tmp_path / "notebooks", tmp_path / "student"
    src.mkdir()
    nbformat.write(tiny_notebook(), src / "01_tiny.ipynb")
    (src / "README.md").write_text("not a notebook")
    (out / "stale").mkdir(parents=True)
    nbformat.write(tiny_notebook(), out / "99_removed.ipynb")  # an old edition's notebook is replaced
    assert build(src, out) == [out / "01_tiny.ipynb"]
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["01_tiny.ipynb"]
    nb = nbformat.read(out / "01_tiny.ipynb", 4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(sys.path))  # the kernel imports this checkout's lorakit
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(out)}}).execute()
    texts = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"]
    assert texts[1].startswith("not solved yet: count_lora_params still raises NotImplementedError")
    assert texts[2] == "later cells still run\n"


def test_main_prints_what_it_wrote(tmp_path, capsys):
    src = tmp_path / "nb"
    src.mkdir()
    nbformat.write(tiny_notebook(), src / "02_tiny.ipynb")
    main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert "student edition: 1 notebooks in" in capsys.readouterr().out
    assert (tmp_path / "out" / "02_tiny.ipynb").is_file()
