"""Shared fixtures. Tests that need the cached SmolLM2 fail with lorakit's own message naming the
fetch command when the cache is empty (``make test`` always fetches it first)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The offline SmolLM2-135M-Instruct, float32 on the CPU: ``(model, tokenizer)``."""
    from lorakit import load_base_model

    return load_base_model()
