"""The book's source, generated from ``book/`` and the notebooks: ``python -m lorakit.bookgen book book/_src``.

``make book`` builds this generated copy, never ``book/`` itself, so that the notebooks stay plain notebooks
for learners in JupyterLab (no MyST directives in them) while the book renders exercises with sphinx-exercise:

- a markdown cell whose first line is ``### Build it: <title>`` becomes an ``{exercise}`` (numbered, labelled
  ``<notebook>-build-<k>``) that also shows the student's stub (the signature, as the student edition has it);
- the first code cell after it, when tagged ``solution``, goes between a gated ``{solution-start}`` (class
  ``dropdown``: hidden, one click shows it) and ``{solution-end}``, with nbgrader's marker lines left out;
- a markdown cell tagged ``answer`` right after a ``**Predict.**`` or ``**Try it.**`` cell becomes a hidden
  ``{solution}`` of that question, which becomes an unnumbered ``{exercise}``; an ``answer`` cell elsewhere
  becomes a dropdown admonition "Answer".

Every other file of ``book/`` is copied, with the paths of ``{literalinclude}`` directives rewritten so that
they still point at the same library source from the copy's location.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
from pathlib import Path

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_markdown_cell

BUILD_IT = "### Build it:"
QUESTIONS = ("**Predict.**", "**Try it.**")
MARKER = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$")
LITERALINCLUDE = re.compile(r"^(\s*(?:```+|:::+)\{literalinclude\}\s+)(\S+)", re.M)
SKIP = {"_build", "_src", "notebooks"}  # the generated tree writes its own notebooks/


def _fence(body: str, char: str = "`") -> str:
    """A fence longer than any run of ``char`` in ``body``, so the directive can hold code blocks."""
    longest = max((len(m) for m in re.findall(f"{re.escape(char)}+", body)), default=0)
    return char * max(3, longest + 1)


def _directive(name: str, argument: str, options: dict[str, str], body: str) -> str:
    fence = _fence(body)
    lines = [f"{fence}{{{name}}} {argument}".rstrip()]
    lines += [f":{key}: {value}".rstrip() for key, value in options.items()]
    return "\n".join(lines) + ("\n\n" + body.strip("\n") if body.strip() else "") + f"\n{fence}"


def _tags(cell: NotebookNode) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _split_build_it(cell: NotebookNode) -> list[NotebookNode]:
    """A markdown cell with a ``### Build it:`` line after other text, split in two there."""
    head, sep, tail = cell.source.partition("\n" + BUILD_IT)
    if cell.cell_type != "markdown" or not sep:
        return [cell]
    first = copy.deepcopy(cell)
    first.source = head.rstrip("\n")
    return [first, *_split_build_it(new_markdown_cell(BUILD_IT + tail))]


def _stub(source: str) -> str:
    """The student's view of a solution cell (nbgrader's ClearSolutions), for the exercise to show."""
    from nbgrader.preprocessors import ClearSolutions

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb, _ = ClearSolutions(enforce_metadata=False).preprocess(nb, {})
    return nb.cells[0].source


def book_notebook(nb: NotebookNode, name: str) -> NotebookNode:
    """A copy of notebook ``nb`` (file stem ``name``) with its exercises and answers as sphinx-exercise directives."""
    nb = copy.deepcopy(nb)
    cells: list[NotebookNode] = []
    source = [part for cell in nb.cells for part in _split_build_it(cell)]
    n_build = n_question = 0
    i = 0
    while i < len(source):
        cell = source[i]
        text = cell.source
        if cell.cell_type == "markdown" and text.startswith(BUILD_IT):
            n_build += 1
            label = f"{name}-build-{n_build}"
            title, _, body = text[len("### ") :].partition("\n")
            following = next((j for j in range(i + 1, len(source)) if source[j].cell_type == "code"), None)
            solution = following if following is not None and "solution" in _tags(source[following]) else None
            if solution is not None:
                body = body.rstrip() + f"\n\n```python\n{_stub(source[solution].source)}\n```\n"
            cells.append(new_markdown_cell(_directive("exercise", title.strip(), {"label": label}, body)))
            cells.extend(source[i + 1 : solution if solution is not None else i + 1])
            if solution is not None:
                code = copy.deepcopy(source[solution])
                code.source = "\n".join(line for line in code.source.splitlines() if not MARKER.match(line))
                cells.append(new_markdown_cell(_directive("solution-start", label, {"class": "dropdown"}, "")))
                cells.append(code)
                cells.append(new_markdown_cell(_directive("solution-end", "", {}, "")))
                i = solution + 1
            else:
                i += 1
            continue
        nxt = source[i + 1] if i + 1 < len(source) else None
        if (
            cell.cell_type == "markdown"
            and text.startswith(QUESTIONS)
            and nxt is not None
            and nxt.cell_type == "markdown"
            and "answer" in _tags(nxt)
        ):
            n_question += 1
            label = f"{name}-question-{n_question}"
            kind = "Predict" if text.startswith(QUESTIONS[0]) else "Try it"
            question = text.split("**", 2)[2].lstrip()
            options = {"label": label, "nonumber": ""}
            cells.append(new_markdown_cell(_directive("exercise", kind, options, question)))
            cells.append(new_markdown_cell(_directive("solution", label, {"class": "dropdown"}, nxt.source)))
            i += 2
            continue
        if cell.cell_type == "markdown" and "answer" in _tags(cell):
            cell = copy.deepcopy(cell)
            cell.source = _directive("admonition", "Answer", {"class": "dropdown"}, text)
        cells.append(cell)
        i += 1
    nb.cells = cells
    return nb


def _rewrite_includes(text: str, page: Path, new_page: Path) -> str:
    """Point every relative ``{literalinclude}`` path of ``page`` at the same file from ``new_page``."""

    def repoint(m: re.Match) -> str:
        target = m.group(2)
        if os.path.isabs(target) or target.startswith("/"):
            return m.group(0)
        resolved = (page.parent / target).resolve()
        return m.group(1) + os.path.relpath(resolved, new_page.parent.resolve())

    return LITERALINCLUDE.sub(repoint, text)


def generate(book: Path | str = "book", out: Path | str = "book/_src") -> Path:
    """Write the generated book source into ``out`` (replaced) and return it."""
    book, out = Path(book), Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(book.rglob("*")):
        rel = path.relative_to(book)
        if rel.parts[0] in SKIP or path.is_dir():
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".md":
            target.write_text(_rewrite_includes(path.read_text(), path, target))
        else:
            shutil.copy2(path, target)
    notebooks = book / "notebooks"
    if notebooks.is_dir():
        (out / "notebooks").mkdir()
        for path in sorted(notebooks.resolve().glob("[0-9][0-9]_*.ipynb")):
            nb = book_notebook(nbformat.read(path, as_version=4), path.stem)
            nbformat.write(nb, out / "notebooks" / path.name)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorakit.bookgen", description=__doc__.splitlines()[0])
    parser.add_argument("book", nargs="?", default="book", help="the book's folder (default: book)")
    parser.add_argument("out", nargs="?", default="book/_src", help="the generated copy (default: book/_src)")
    args = parser.parse_args(argv)
    print(f"book source generated in {generate(args.book, args.out)}")


if __name__ == "__main__":
    main()
