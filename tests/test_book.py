"""The book: every notebook a chapter in teaching order, library source included (never pasted),
exercises with hidden solutions (sphinx-exercise, from the generated copy lorakit.bookgen writes), and a
build that fails on broken references. Two builds in all: the real book and a tiny broken one."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOURCE_PAGES = sorted((BOOK / "source").glob("*.md"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def toc_chapters() -> list[str]:
    return re.findall(r"^\s*- file: notebooks/(\S+)\s*$", (BOOK / "_toc.yml").read_text(), re.M)


def toc_files() -> list[str]:
    return re.findall(r"^\s*- file: (\S+)\s*$", (BOOK / "_toc.yml").read_text(), re.M)


def make_book_recipe() -> list[str]:
    """The two lines of `make book`: generate the source copy, then build it (read from the Makefile)."""
    recipe = re.search(r"^book:.*\n\t(.*)\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, "the Makefile's book rule should generate the source, then build it"
    return [recipe.group(1), recipe.group(2)]


def make_book_flags() -> list[str]:
    """The flags `make book` passes to jupyter-book build after the source and output folders."""
    generate, build_line = make_book_recipe()
    assert "-m lorakit.bookgen book book/_src" in generate, generate
    found = re.search(r"jupyter-book build book/_src --path-output book(.*)$", build_line)
    assert found, f"the book rule should build the generated copy book/_src into book/_build: {build_line}"
    return shlex.split(found.group(1))


def build(book: Path, out: Path) -> subprocess.CompletedProcess:
    """What `make book` does, into ``out``: generate the source copy (out/_src), then build it."""
    from lorakit.bookgen import generate

    source = generate(book, out / "_src")
    jb = Path(sys.executable).with_name("jupyter-book")
    return subprocess.run(
        [str(jb), "build", str(source), "--path-output", str(out), *make_book_flags()], capture_output=True, text=True
    )


def test_every_notebook_is_a_chapter_in_teaching_order():
    assert toc_chapters() == NOTEBOOKS


def test_every_library_source_page_is_in_the_book_after_the_notebooks():
    files = toc_files()
    pages = [f"source/{p.stem}" for p in SOURCE_PAGES]
    assert pages and sorted(f for f in files if f.startswith("source/")) == sorted(pages)
    assert max(files.index(f"notebooks/{n}") for n in NOTEBOOKS) < min(files.index(p) for p in pages)


def test_make_book_fails_on_warnings():
    assert "--warningiserror" in make_book_flags()


# ------------------------------------------------------------------ literalinclude, never a copy
def literalincludes(page: Path) -> list[tuple[Path, dict[str, str]]]:
    """(resolved file, options) of every ```{literalinclude}``` directive on a page."""
    found = []
    for target, body in re.findall(r"^```\{literalinclude\}\s+(\S+)\n(.*?)^```", page.read_text(), re.M | re.S):
        options = dict(re.findall(r"^:([\w-]+):\s*(.*?)\s*$", body, re.M))
        found.append(((page.parent / target).resolve(), options))
    return found


def python_objects(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and ``Class.method`` names."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names |= {
                    f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
    return names


@pytest.mark.parametrize("page", SOURCE_PAGES, ids=lambda p: p.stem)
def test_source_pages_include_existing_lorakit_code(page):
    includes = literalincludes(page)
    assert includes, f"{page.name} includes no library source"
    for path, options in includes:
        assert path.is_file() and (ROOT / "lorakit") in path.parents, f"{page.name}: {path} is not a lorakit module"
        text = path.read_text()
        if "pyobject" in options:
            assert options["pyobject"] in python_objects(path), f"{page.name}: no {options['pyobject']} in {path.name}"
        else:
            start, end = options.get("start-after"), options.get("end-before")
            assert start and end, f"{page.name}: include {path.name} by :pyobject: or by start-after/end-before markers"
            assert text.count(start) == 1 and text.count(end) == 1, f"{page.name}: markers not unique in {path.name}"
            assert text.index(start) < text.index(end), f"{page.name}: markers out of order in {path.name}"


def library_lines() -> set[str]:
    """Every substantial line of lorakit's source, stripped (what a pasted copy would repeat)."""
    lines = set()
    for module in (ROOT / "lorakit").rglob("*.py"):
        lines |= {
            s for line in module.read_text().splitlines() if len(s := line.strip()) >= 20 and not s.startswith("#")
        }
    return lines


def fenced_code(text: str) -> list[str]:
    """Bodies of fenced code blocks (``` or ~~~), directives like {literalinclude} left out."""
    return [
        body
        for fence, info, body in re.findall(r"^(```+|~~~+)[ \t]*(.*?)\n(.*?)^\1", text, re.M | re.S)
        if not info.startswith("{literalinclude}")
    ]


def book_markdown() -> dict[str, str]:
    """The text of every markdown page of the book and every notebook's markdown cells."""
    pages = {
        p.relative_to(BOOK).as_posix(): p.read_text()
        for p in BOOK.rglob("*.md")
        if not {"_build", "_src"} & set(p.parts) and p.parent.name != "notebooks"
    }
    for name in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
        pages[f"notebooks/{name}"] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return pages


def test_book_pages_hold_no_pasted_copy_of_lorakit_code():
    library = library_lines()
    pasted = {
        page: sorted({line.strip() for block in fenced_code(text) for line in block.splitlines()} & library)
        for page, text in book_markdown().items()
    }
    assert {page: lines for page, lines in pasted.items() if lines} == {}, "use literalinclude, not a copy"


def test_the_pasted_copy_check_catches_a_copy():
    source = (ROOT / "lorakit" / "lora.py").read_text()
    copied = source[source.index("class LoRALinear") :][:400]
    assert {
        line.strip() for block in fenced_code(f"```python\n{copied}\n```\n") for line in block.splitlines()
    } & library_lines()


# ------------------------------------------------------------------ the builds
def stored_outputs(name: str) -> list[dict]:
    """The mime bundles of a notebook's stored outputs."""
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    return [o.get("data", {}) for c in cells if c["cell_type"] == "code" for o in c["outputs"]]


def build_it_cells(name: str) -> tuple[int, int, int]:
    """(exercises, solution cells, answer cells) of a notebook: what the book shows as exercises and hides."""
    cells = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())["cells"]
    markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    exercises = sum(len(re.findall(r"^### Build it:", text, re.M)) for text in markdown)
    solutions = sum("solution" in c["metadata"].get("tags", []) for c in cells)
    answers = sum("answer" in c["metadata"].get("tags", []) for c in cells)
    return exercises, solutions, answers


def widget_outputs(name: str) -> tuple[int, int]:
    """(widget views without a picture, widget views with one) among a notebook's stored outputs."""
    views = [d for d in stored_outputs(name) if WIDGET_VIEW in d]
    return sum("image/png" not in d for d in views), sum("image/png" in d for d in views)


def test_book_builds_with_outputs_pictures_and_library_source(tmp_path):
    result = build(BOOK, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    index = (html / "index.html").read_text()
    for name in NOTEBOOKS:
        assert f'href="notebooks/{name}.html"' in index, f"index.html does not link {name}"
        page = (html / "notebooks" / f"{name}.html").read_text()
        assert "cell_output" in page, f"{name}.html shows no stored outputs"
        without_picture, with_picture = widget_outputs(name)
        # a control that carries a picture is shown as that picture, not as an empty widget view
        assert page.count(f'<script type="{WIDGET_VIEW}">') == without_picture, name
        plots = sum("image/png" in d for d in stored_outputs(name))  # plots and controls' pictures
        assert page.count("<img") >= plots, f"{name}.html shows fewer images than its {plots} stored plots"
    assert sum(widget_outputs(name)[1] for name in NOTEBOOKS) >= 1  # at least the tradeoff control
    for name in NOTEBOOKS:  # every "Build it" cell an exercise, its solution hidden (a dropdown), one click away
        page = (html / "notebooks" / f"{name}.html").read_text()
        exercises, solutions, answers = build_it_cells(name)
        shown = len(re.findall(r'class="[^"]*\bexercise\b[^"]*\badmonition\b', page))
        assert shown >= exercises, f"{name}.html: {shown} exercises, expected {exercises}"
        hidden = len(re.findall(r'class="[^"]*\b(?:solution|admonition)\b[^"]*\bdropdown\b', page))
        assert hidden >= solutions + answers, f"{name}.html: {hidden} hidden, expected {solutions} + {answers}"
        assert "### BEGIN SOLUTION" not in page, f"{name}.html shows nbgrader's markers"
        assert page.count("NotImplementedError") >= solutions, f"{name}.html: an exercise without its stub"
    assert sum(build_it_cells(name)[0] for name in NOTEBOOKS) >= 2  # at least notebook 01's
    teachers = re.sub(r"<[^>]+>", "", (html / "teachers.html").read_text())
    assert "make student" in teachers and "lorakit.assets fetch" in teachers
    for page in SOURCE_PAGES:
        text = re.sub(r"<[^>]+>", "", (html / "source" / f"{page.stem}.html").read_text())
        for path, options in literalincludes(page):
            name = options.get("pyobject", "").split(".")[-1]
            wanted = f"def {name}" if name and f"def {name}" in path.read_text() else name or "\n"
            assert wanted in text, f"{page.stem}.html does not show {options}"


def test_a_broken_reference_fails_the_build(tmp_path):
    """The real _config.yml and `make book`'s flags on a two-page book with broken references."""
    book = tmp_path / "book"
    book.mkdir()
    (book / "_config.yml").write_text((BOOK / "_config.yml").read_text())
    (book / "_toc.yml").write_text("format: jb-book\nroot: index\nchapters:\n  - file: page\n")
    (book / "index.md").write_text("# Index\n\n(good-label)=\n## A label\n")
    train = os.path.relpath(ROOT / "lorakit" / "train.py", book)
    (book / "page.md").write_text(
        "# Page\n\nA good link: {ref}`good-label`, [the index](index.md).\n\n"
        "Broken: {ref}`no-such-label`, [a page](no_such_page.md), {py:func}`lorakit.no_such_function`.\n\n"
        f"```{{literalinclude}} {train}\n:pyobject: no_such_object\n```\n"
    )
    result = build(book, tmp_path / "out")
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    for broken in ("no-such-label", "no_such_page", "lorakit.no_such_function", "no_such_object"):
        assert broken in log, f"the build did not report {broken}:\n{log[-3000:]}"
    assert "good-label" not in log and "index.md" not in log.replace("_toc", "")


# ------------------------------------------------------------------ the generated source (lorakit.bookgen)
def tiny_exercise_notebook():
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    solution = 'def f(x):\n    """Twice x."""\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION'
    return new_notebook(
        cells=[
            new_markdown_cell("### Build it: twice\n\nWrite `f`, with a code block:\n\n```python\nf(2)\n```"),
            new_code_cell(solution, metadata={"tags": ["solution"]}),
            new_code_cell("check(check_f, f)"),
            new_markdown_cell("Some text first.\n\n### Build it: thrice\n\nNo solution cell follows."),
            new_markdown_cell("**Predict.** What is f(3)?"),
            new_markdown_cell("Six.", metadata={"tags": ["answer"]}),
            new_markdown_cell("An answer without its question.", metadata={"tags": ["answer"]}),
        ]
    )


def test_bookgen_turns_exercises_and_answers_into_sphinx_exercise_directives():
    from lorakit.bookgen import book_notebook

    teacher = tiny_exercise_notebook()
    cells = [c.source for c in book_notebook(teacher, "01_x").cells]
    exercise, start, code, end, check, text, second, question, answer, other = cells
    assert exercise.startswith("````{exercise} Build it: twice\n:label: 01_x-build-1\n\nWrite `f`")
    assert (
        '```python\ndef f(x):\n    """Twice x."""\n    # YOUR CODE HERE\n    raise NotImplementedError()\n```'
        in exercise
    )
    assert exercise.endswith("\n````")  # a longer fence than the code blocks inside
    assert start == "```{solution-start} 01_x-build-1\n:class: dropdown\n```" and end == "```{solution-end}\n```"
    assert code == 'def f(x):\n    """Twice x."""\n    return 2 * x'  # nbgrader's marker lines left out
    assert check == "check(check_f, f)"
    assert text == "Some text first." and second.startswith("```{exercise} Build it: thrice\n:label: 01_x-build-2\n")
    assert question == "```{exercise} Predict\n:label: 01_x-question-1\n:nonumber:\n\nWhat is f(3)?\n```"
    assert answer == "```{solution} 01_x-question-1\n:class: dropdown\n\nSix.\n```"
    assert other == "```{admonition} Answer\n:class: dropdown\n\nAn answer without its question.\n```"
    assert "### BEGIN SOLUTION" in teacher.cells[1].source  # the notebook itself is left as it was


def test_the_generated_copy_keeps_every_literalinclude_pointing_at_the_same_source(tmp_path):
    from lorakit.bookgen import generate

    out = generate(BOOK, tmp_path / "deeper" / "_src")
    for page in SOURCE_PAGES:
        copied = out / "source" / page.name
        assert [path for path, _ in literalincludes(copied)] == [path for path, _ in literalincludes(page)]
    assert sorted(p.name for p in (out / "notebooks").glob("*.ipynb")) == [f"{n}.ipynb" for n in NOTEBOOKS]
    assert (out / "_toc.yml").read_text() == (BOOK / "_toc.yml").read_text()
