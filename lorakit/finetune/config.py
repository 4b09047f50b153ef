"""The fine-tune's settings, and every check on them that can run before anything is loaded or written.

``validate`` refuses a bad setting with a message that names it, its value and what is valid. Besides the
settings themselves it checks what the run will meet: the device (it must exist here), the output
folder (it must be creatable and writable), and the model, read from its ``config.json`` without
loading a weight: ``seq_len`` within its maximum positions, ``rank`` within every targeted layer's
width. So a typo costs a second, not a model load, and never leaves a half-made run folder behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.blockwise import check_blocksize
from lorakit.codebooks import BITS, KINDS, check_codebook
from lorakit.data import CORPORA
from lorakit.lora import LLAMA_PROJECTIONS
from lorakit.memory import METHODS
from lorakit.models import DEFAULT_MODEL
from lorakit.runtime import check_device
from lorakit.train import OPTIMIZERS, check_optimizer

BACKENDS = ("lorakit", "hf")
# QLoRA section 4: LoRA on every linear layer of the transformer blocks matches full fine-tuning.
ALL_LINEAR = LLAMA_PROJECTIONS
MAX_RANK = 512


@dataclass
class FinetuneConfig:
    method: str = "qlora"  # full | lora | qlora
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_LINEAR
    bits: int = 4  # qlora: width of the base weights' codes
    kind: str = "nf"  # qlora: the codebook's family, nf | int | fp (fp: 4 bits only); kind + bits = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    steps: int = 60
    lr: float | None = None  # default: 2e-4 for LoRA and QLoRA (QLoRA appendix B), 2e-5 for full
    optimizer: str = "adamw"  # adamw | paged_adamw | adamw8bit | paged_adamw8bit (bitsandbytes' names)
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    warmup_steps: int = 6
    eval_blocks: int = 32
    train_blocks: int | None = None  # cap on training blocks (None: the whole training split)
    corpus: str = "shakespeare"
    data: str | None = None  # a JSONL or CSV file of conversations (lorakit.chat): instruction tuning instead of corpus
    test_fraction: float = 0.1  # with data: the share of examples held out for evaluation
    gradient_checkpointing: bool = False
    sample_prompt: str | None = None  # generated (greedy, no chat template) before and after training
    seed: int = 0
    backend: str = "lorakit"  # lorakit | hf
    model: str = DEFAULT_MODEL

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 2e-4)

    @property
    def quant_type(self) -> str:
        """bitsandbytes' name of the base weights' data type: ``kind`` + ``bits``, e.g. ``"nf4"``."""
        return f"{self.kind}{self.bits}"


def settings_of(config: FinetuneConfig) -> dict:
    """The settings as ``run.json`` stores them (the learning rate resolved)."""
    settings = asdict(config)
    settings["targets"] = list(config.targets)
    settings["lr"] = config.learning_rate
    return settings


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def _int_at_least(name: str, value, low: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not valid; it must be an integer of at least {low}{extra}")


def check_settings(config: FinetuneConfig) -> None:
    """The settings alone, no file read: choices, ranges, a finite positive learning rate."""
    _choice("method", config.method, METHODS)
    _choice("backend", config.backend, BACKENDS)
    _choice("corpus", config.corpus, CORPORA)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    check_optimizer(config.optimizer)
    if config.method != "full":
        if isinstance(config.rank, bool) or not isinstance(config.rank, int) or not 1 <= config.rank <= MAX_RANK:
            raise ValueError(
                f"rank={config.rank!r} is not valid; use an integer from 1 to {MAX_RANK} (1-64 is typical)"
            )
        if not (isinstance(config.alpha, (int, float)) and math.isfinite(config.alpha) and config.alpha > 0):
            raise ValueError(f"alpha={config.alpha!r} is not valid; use a positive number (often 2 * rank)")
        targets = list(config.targets)
        unknown = [t for t in targets if t not in ALL_LINEAR]
        if unknown or not targets:
            raise ValueError(f"targets={unknown or targets!r} is not valid; choose among {', '.join(ALL_LINEAR)}")
    if config.method == "qlora":
        _choice("kind", config.kind, KINDS)
        _choice("bits", config.bits, BITS)
        if config.kind == "fp" and config.bits != 4:
            raise ValueError(f"bits={config.bits} is not valid with kind='fp'; FP4 (E2M1) has 4 bits")
        check_codebook(config.kind, config.bits)
        check_blocksize(config.blocksize)
        if config.backend == "hf" and config.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"backend='hf' (bitsandbytes) offers NF4 and FP4 only, not {config.quant_type}")
    if config.backend == "hf" and config.optimizer != "adamw":
        raise ValueError(
            f"optimizer={config.optimizer!r} is lorakit's; backend='hf' trains with 'adamw' "
            "(use backend='lorakit' for the others)"
        )
    for name in ("steps", "batch_size", "grad_accum", "eval_blocks"):
        _int_at_least(name, getattr(config, name), 1)
    _int_at_least("seq_len", config.seq_len, 2, " (one input and one target token)")
    _int_at_least("warmup_steps", config.warmup_steps, 0)
    if config.data is not None:
        if not isinstance(config.data, (str, os.PathLike)):
            raise ValueError(f"data={config.data!r} is not valid; pass the path of a .jsonl or .csv file")
        tf = config.test_fraction
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0.0 < tf < 1.0:
            raise ValueError(f"test_fraction={tf!r} is not valid; use a number between 0 and 1 (0.1 holds out 10%)")
        if config.gradient_checkpointing or config.grad_accum != 1 or config.backend != "lorakit":
            raise ValueError(
                "with data=..., gradient_checkpointing, grad_accum and backend='hf' are not offered (yet); "
                "leave them at their defaults"
            )
    if config.train_blocks is not None:
        _int_at_least("train_blocks", config.train_blocks, 1, ", or None for the whole training split")
    lr = config.learning_rate
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(
            f"lr={lr!r} is not valid; use a finite positive learning rate "
            "(2e-4 is QLoRA's for LoRA, 2e-5 a usual one for full fine-tuning)"
        )


def model_config(name: str):
    """The transformers config of model ``name`` (an offline asset, a folder or a hub id), no weights read.

    For an asset the cache entry is verified first, so a missing or broken one is an AssetError now.
    """
    from transformers import AutoConfig

    from lorakit.assets import ASSETS, require

    source = str(require(name)) if name in ASSETS else name
    return AutoConfig.from_pretrained(source)


def check_model(config: FinetuneConfig, model_cfg) -> None:
    """Settings against the model's shapes: positions for ``seq_len``, layer widths for ``rank``."""
    from lorakit.memory import ModelShape

    positions = getattr(model_cfg, "max_position_embeddings", None)
    if positions is not None and config.seq_len > positions:
        raise ValueError(
            f"seq_len={config.seq_len} is not valid for {config.model}: it has "
            f"{positions} positions (max_position_embeddings); use a seq_len of at most {positions}"
        )
    if config.method != "full":
        shapes = ModelShape.from_config(model_cfg).linear_shapes()  # {name: (d_out, d_in)}
        widths = {t: min(shapes[t]) for t in config.targets}
        narrowest = min(widths, key=widths.get)
        if config.rank > widths[narrowest]:
            d_out, d_in = shapes[narrowest]
            raise ValueError(
                f"rank={config.rank} is not valid for {config.model}: LoRA on {narrowest} needs "
                f"r <= min(d_in, d_out) = min({d_in}, {d_out}) = {widths[narrowest]}; "
                f"use a rank from 1 to {widths[narrowest]}"
            )


def check_output(out: str | os.PathLike) -> Path:
    """``out`` can be a run folder: it is one already, or it can be created; and it can be written.

    Nothing is left behind: writability is tried with a temporary folder that is removed at once.
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"output folder {str(out)!r} is not a folder (it is a file or a device); "
            "choose a new or empty folder for --out"
        )
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output folder {str(out)!r} cannot be created: {str(existing)!r} is a file, not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".lorakit-probe-", dir=existing)).rmdir()
    except OSError as e:
        raise ValueError(
            f"output folder {str(out)!r} cannot be created or written: {str(existing)!r} "
            f"refuses it ({e.strerror}); choose a folder you can write to"
        ) from None
    return folder


def validate(config: FinetuneConfig, device: torch.device | str | None = None, out: str | os.PathLike | None = None):
    """Refuse bad settings before anything is loaded or written; returns the model's transformers config.

    In order: the settings alone, the device, the output folder, then the model and corpus from the
    cache (verified, so a missing asset is an error now) and the settings against the model's shapes.
    """
    from lorakit.assets import require

    check_settings(config)
    if device is not None:
        check_device(device)
    if out is not None:
        check_output(out)
    if config.data is not None:
        from lorakit.finetune.instruct import check_data

        check_data(config.data)  # every line, read as a stream, before any model is loaded
    model_cfg = model_config(config.model)
    check_model(config, model_cfg)
    if config.data is None:
        require(config.corpus)
    return model_cfg
