"""Writing files so that nothing is ever half-written, and shared folders stay readable.

Every file lorakit writes (an adapter, a checkpoint, metrics, a cache manifest) goes through
``atomic_write``: the content is written to a temporary file beside the target and renamed over it.
``os.replace`` is atomic on one file system, so a reader sees the old file or the new one, never half
of one. ``tempfile.mkstemp`` creates its file as 0600 (private); the finished file gets the
permissions an ordinary ``open()`` would have given it (0666 less the umask), so that a classroom's
shared cache or a shared run folder is readable by the other users, as the user's umask intends.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask (reading it means setting it, so this is done under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: 0777 less the umask."""
    return 0o777 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    The parent folder is created if needed. On any error (including Ctrl-C) the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON (with a final newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
