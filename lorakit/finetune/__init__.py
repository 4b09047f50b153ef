"""``finetune``: full fine-tuning, LoRA or QLoRA of the base model, from lorakit's readable parts.

QLoRA (Dettmers et al. 2023, section 3) is three steps on top of the training loop:

1. ``quantize_model``: every Linear of the base model but ``lm_head`` becomes a frozen ``Linear4bit``
   (NF4 with double quantization by default);
2. ``add_lora``: each targeted Linear gets trainable ``lora_A: (r, d_in)`` and ``lora_B: (d_out, r)``;
3. ``train``: only the LoRA matrices learn; the 4-bit weights are dequantized in every forward.

``backend="hf"`` runs the same data, schedule and loop with the production stack instead:
transformers' ``BitsAndBytesConfig`` (bitsandbytes' 4-bit Linear) and peft's ``LoraConfig``.

Command line (prints held-out perplexity before and after, writes the adapter and metrics.json)::

    python -m lorakit.finetune --method qlora --rank 8 --bits 4 --steps 60 --out runs/qlora
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit.adapter import save_adapter
from lorakit.data import CORPORA, split_documents, tokenize_blocks
from lorakit.linear4bit import quantize_model
from lorakit.lora import add_lora
from lorakit.models import DEFAULT_MODEL, count_parameters, keep_bnb_reference_path, load_base_model
from lorakit.train import TrainConfig, TrainResult, train

METHODS = ("full", "lora", "qlora")
BACKENDS = ("lorakit", "hf")
QUANT_TYPES = ("nf", "int", "fp")
BITS = (2, 3, 4, 8)
# QLoRA section 4: LoRA on every linear layer of the transformer blocks matches full fine-tuning.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RUN_FILE = "run.json"  # the settings of the run in an output folder, written before training
METRICS_FILE = "metrics.json"


@dataclass
class FinetuneConfig:
    method: str = "qlora"  # full | lora | qlora
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_LINEAR
    bits: int = 4  # qlora: width of the base weights' codes
    quant_type: str = "nf"  # qlora: nf | int | fp (fp: 4 bits only)
    blocksize: int = 64
    double_quant: bool = True
    steps: int = 60
    lr: float | None = None  # default: 2e-4 for LoRA and QLoRA (QLoRA appendix B), 2e-5 for full
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    warmup_steps: int = 6
    eval_blocks: int = 32
    train_blocks: int | None = None  # cap on training blocks (None: the whole training split)
    corpus: str = "shakespeare"
    gradient_checkpointing: bool = False
    sample_prompt: str | None = None  # generated (greedy, no chat template) before and after training
    seed: int = 0
    backend: str = "lorakit"  # lorakit | hf
    model: str = DEFAULT_MODEL

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 2e-4)


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    tokenizer: object
    train: TrainResult
    metrics: dict = field(default_factory=dict)


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def validate(config: FinetuneConfig) -> None:
    """Refuse bad settings before anything is loaded or trained, naming the setting and what is valid."""
    _choice("method", config.method, METHODS)
    _choice("backend", config.backend, BACKENDS)
    _choice("corpus", config.corpus, CORPORA)
    if config.method != "full":
        if isinstance(config.rank, bool) or not isinstance(config.rank, int) or not 1 <= config.rank <= 512:
            raise ValueError(f"rank={config.rank!r} is not valid; use an integer from 1 to 512 (1-64 is typical)")
        if config.alpha <= 0:
            raise ValueError(f"alpha={config.alpha!r} is not valid; use a positive number (often 2 * rank)")
    if config.method == "qlora":
        _choice("quant_type", config.quant_type, QUANT_TYPES)
        _choice("bits", config.bits, BITS)
        if config.quant_type == "fp" and config.bits != 4:
            raise ValueError(f"bits={config.bits} is not valid with quant_type='fp'; FP4 (E2M1) has 4 bits")
        if config.backend == "hf" and (config.quant_type, config.bits) not in (("nf", 4), ("fp", 4)):
            raise ValueError(
                f"backend='hf' (bitsandbytes) offers NF4 and FP4 only, not {config.quant_type}{config.bits}"
            )
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_blocks"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} is not valid; it must be at least 1")


def _settings(config: FinetuneConfig) -> dict:
    settings = asdict(config)
    settings["targets"] = list(config.targets)
    settings["lr"] = config.learning_rate
    return settings


def prepare_output(out: str | Path, config: FinetuneConfig, overwrite: bool = False) -> Path:
    """Make ``out`` ready for this run without losing an earlier run's files.

    An empty or missing folder is fine; a folder holding this same run (same ``run.json``) is
    resumed from its checkpoint; anything else is refused unless ``overwrite``.
    """
    folder = Path(out)
    settings = _settings(config)
    if folder.exists() and any(folder.iterdir()):
        previous = None
        if (folder / RUN_FILE).is_file():
            try:
                previous = json.loads((folder / RUN_FILE).read_text())
            except json.JSONDecodeError:
                previous = None
        if previous != settings:
            if not overwrite:
                what = "a different run" if previous is not None else "files that are not a lorakit run"
                raise FileExistsError(
                    f"output folder {str(folder)!r} holds {what}; choose another --out, or pass "
                    "--overwrite (overwrite=True) to replace it"
                )
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / RUN_FILE)
    return folder


def load_data(tokenizer, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, val_blocks)``, each ``(N, seq_len)``; too little text is a clear error."""
    train_docs, val_docs = split_documents(config.corpus, seed=0)
    train_blocks = tokenize_blocks(tokenizer, train_docs, config.seq_len, max_blocks=config.train_blocks)
    val_blocks = tokenize_blocks(tokenizer, val_docs, config.seq_len, max_blocks=config.eval_blocks)
    if len(train_blocks) < config.batch_size:
        raise ValueError(
            f"the training data holds {len(train_blocks)} blocks of {config.seq_len} tokens, fewer than one "
            f"batch of {config.batch_size}; raise train_blocks or lower batch_size"
        )
    return train_blocks, val_blocks


def build_model(config: FinetuneConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """The model ready to train, ``(model, tokenizer)``: frozen base + trainable parts per ``method``."""
    if config.backend == "hf":
        return _build_hf(config, device, dtype)
    model, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    if config.method == "qlora":
        quantize_model(model, quant_type=config.quant_type, blocksize=config.blocksize,
                       double_quant=config.double_quant, bits=config.bits, skip=("lm_head",))
    if config.method in ("lora", "qlora"):
        add_lora(model, list(config.targets), r=config.rank, alpha=config.alpha)
    return model, tokenizer


def _build_hf(config: FinetuneConfig, device, dtype):
    """The production stack: transformers + bitsandbytes' 4-bit Linear + peft's LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit.assets import ASSETS, require

    source = str(require(config.model)) if config.model in ASSETS else config.model
    dtype = dtype or torch.float32
    kwargs = {"dtype": dtype}
    if config.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=f"{config.quant_type}4",
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": str(device or "cpu")}
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if config.method != "qlora" and device is not None:
        model = model.to(device)
    if config.method in ("lora", "qlora"):
        lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft 0.21 asks transformers 5 for the renamed is_gradient_checkpointing: a FutureWarning
            # about peft's code, not the learner's, and its text shows a machine path.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora_config)
    keep_bnb_reference_path(model)  # no bfloat16 repacking on AVX512-BF16 CPUs: it breaks training
    model.eval()
    return model, tokenizer


def finetune(
    config: FinetuneConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    on_step=None,
    **settings,
) -> FinetuneResult:
    """Fine-tune the base model by ``method`` and measure it; ``settings`` override ``config``'s fields.

    With ``out``, the folder receives ``run.json`` (the settings) before training, checkpoints while
    training (an interrupted run resumes when called again with the same settings), and at the end
    the adapter (LoRA and QLoRA, in peft's format) and ``metrics.json``.
    """
    config = FinetuneConfig(**{**asdict(config or FinetuneConfig()), **settings})
    config.targets = tuple(config.targets)
    validate(config)
    folder = prepare_output(out, config, overwrite) if out is not None else None
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, device, dtype)
    train_blocks, val_blocks = load_data(tokenizer, config)
    params = count_parameters(model)
    train_config = TrainConfig(
        steps=config.steps, lr=config.learning_rate, batch_size=config.batch_size, grad_accum=config.grad_accum,
        warmup_steps=min(config.warmup_steps, config.steps), gradient_checkpointing=config.gradient_checkpointing,
        eval_blocks=config.eval_blocks, checkpoint_every=max(1, config.steps // 4) if folder else 0,
        sample_prompt=config.sample_prompt, seed=config.seed, progress=progress,
    )
    result = train(model, train_blocks, val_blocks, train_config, tokenizer=tokenizer,
                   checkpoint_dir=folder / "checkpoint" if folder else None, on_step=on_step)
    metrics = {
        "ppl_before": result.evals[0][1],
        "ppl_after": result.evals[-1][1],
        "steps": result.step,
        "seconds": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds / max(1, len(result.losses)), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "trainable_params": params.trainable,
        "total_params": params.total,
        "final_loss": result.losses[-1] if result.losses else None,
        "interrupted": result.interrupted,
        "settings": _settings(config),
    }
    if folder is not None and not result.interrupted:
        if config.method != "full":
            if config.backend == "hf":
                model.save_pretrained(folder / "adapter")
            else:
                save_adapter(model, folder / "adapter")
        tmp = folder / f".{METRICS_FILE}.tmp"
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        os.replace(tmp, folder / METRICS_FILE)
        shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # the run is complete
    return FinetuneResult(model=model, tokenizer=tokenizer, train=result, metrics=metrics)
