"""lorakit._io: atomic writes leave the old file on error and give new files the umask's mode."""

from __future__ import annotations

import os
import stat

import pytest

from lorakit._io import atomic_write, atomic_write_json, atomic_write_text, default_file_mode


def test_atomic_write_replaces_and_uses_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    finally:
        os.umask(old)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by others, as open() would make it
    atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{\n  "x": 1\n}\n'


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_private_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        assert default_file_mode() == 0o600
        path = atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
