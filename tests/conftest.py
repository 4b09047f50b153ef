"""Shared fixtures and markers. Tests that need the cached SmolLM2 fail with lorakit's own message
naming the fetch command when the cache is empty (``make test`` always fetches it first).

Markers (declared in pyproject.toml): ``model`` for a test that loads SmolLM2, ``slow`` for a test that
takes long. ``make unit`` runs ``-m "not slow"``, ``make slow`` runs ``-m slow``; ``make test`` runs both.
Besides the marks written on the tests, this file adds:

* ``model`` to every test that uses the ``smollm2`` fixture;
* ``slow`` to every ``model`` test (loading and running SmolLM2 takes seconds to minutes on a CPU);
* ``slow`` to the tests in ``tests/test_book.py`` that run a whole ``jupyter-book build`` (those that call
  its ``build(...)`` helper), marked here so that the book's test file need not know about the make targets.
"""

from __future__ import annotations

import inspect
import re

import pytest

BOOK_BUILD = re.compile(r"\bbuild\(")


def _builds_the_book(item: pytest.Item) -> bool:
    if item.path.name != "test_book.py" or not isinstance(item, pytest.Function):
        return False
    try:
        return bool(BOOK_BUILD.search(inspect.getsource(item.function)))
    except (OSError, TypeError):
        return False


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.model)
        if item.get_closest_marker("model") is not None or _builds_the_book(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2():
    """The offline SmolLM2-135M-Instruct, float32 on the CPU: ``(model, tokenizer)``."""
    from lorakit import load_base_model

    return load_base_model()
