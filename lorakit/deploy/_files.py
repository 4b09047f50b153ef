"""Writing a whole folder so that nothing is ever half-written: :func:`atomic_folder`.

The folder-sized sibling of :func:`lorakit._io.atomic_write`: everything is written into a temporary
folder beside the target, which is renamed into place only when all of it is there. An interrupted
export (an error, Ctrl-C) removes the temporary folder and leaves the target as it was. The finished
folder gets the mode an ordinary ``os.mkdir`` would have given it (``mkdtemp`` makes it 0700).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lorakit._io import default_dir_mode


def folder_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of every file under ``path`` (a file: its own size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_output_folder(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path that holds something (a file, or a folder that is not empty) unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is an existing file; pass a folder path (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {str(out)!r} already holds files; pass an empty or new folder, or --overwrite to replace it"
        )
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    ``out`` may be absent or an empty folder; a folder that holds files is replaced only with
    ``overwrite=True`` (the old folder is moved aside first and deleted after the rename). On any
    error, including ``KeyboardInterrupt``, the temporary folder is deleted and ``out`` is untouched.
    """
    out = check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        os.chmod(tmp, default_dir_mode())
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / "previous").exists():
            os.replace(old / "previous", out)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
