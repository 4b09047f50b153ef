"""The papermill-style parameter injection the browser tests use on their scratch notebooks (no browser)."""

import shutil

import nbformat
import pytest
from lab import ROOT, inject_parameters, notebook_parameters

NOTEBOOK = "04_nf4_and_double_quant.ipynb"


def test_inject_parameters_adds_a_tagged_cell_after_the_parameters_cell(tmp_path):
    path = tmp_path / NOTEBOOK
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, path)
    before = notebook_parameters(path)
    assert before["BLOCKSIZE"] == 64 and "VAL_BLOCKS" in before
    inject_parameters(path, VAL_BLOCKS=2, LAYER="model.layers.0.mlp.up_proj")
    cells = nbformat.read(path, as_version=4).cells
    index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    injected = cells[index + 1]
    assert injected.metadata["tags"] == ["injected-parameters"] and injected.cell_type == "code"
    namespace = {}
    exec(injected.source, namespace)
    assert namespace["VAL_BLOCKS"] == 2 and namespace["LAYER"] == "model.layers.0.mlp.up_proj"
    assert len(cells) == len(nbformat.read(ROOT / "notebooks" / NOTEBOOK, as_version=4).cells) + 1


def test_inject_parameters_rejects_unknown_names_and_committed_notebooks(tmp_path):
    path = tmp_path / NOTEBOOK
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, path)
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['STEPS'\]"):
        inject_parameters(path, STEPS=1)
    with pytest.raises(ValueError, match="committed notebook"):
        inject_parameters(ROOT / "notebooks" / NOTEBOOK, VAL_BLOCKS=1)
