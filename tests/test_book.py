"""The book lists every notebook in teaching order and builds offline into HTML."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def toc_chapters() -> list[str]:
    return re.findall(r"^\s*- file: notebooks/(\S+)\s*$", (ROOT / "book" / "_toc.yml").read_text(), re.M)


def test_every_notebook_is_a_chapter_in_teaching_order():
    assert toc_chapters() == NOTEBOOKS


def test_book_builds_and_its_index_lists_every_notebook(tmp_path):
    jb = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run(
        [str(jb), "build", str(ROOT / "book"), "--path-output", str(tmp_path), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    index = (tmp_path / "_build" / "html" / "index.html").read_text()
    for name in NOTEBOOKS:
        assert f'href="notebooks/{name}.html"' in index, f"index.html does not link {name}"
        page = (tmp_path / "_build" / "html" / "notebooks" / f"{name}.html").read_text()
        assert "cell_output" in page, f"{name}.html shows no stored outputs"
