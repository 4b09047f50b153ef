"""The fine-tune itself: check, then load, build, train, measure and save.

QLoRA (Dettmers et al. 2023, section 3) is three steps on top of the training loop:

1. ``quantize_model``: every Linear of the base model but ``lm_head`` becomes a frozen ``Linear4bit``
   (NF4 with double quantization by default);
2. ``add_lora``: each targeted Linear gets trainable ``lora_A: (r, d_in)`` and ``lora_B: (d_out, r)``;
3. ``train``: only the LoRA matrices learn; the 4-bit weights are dequantized in every forward.

``backend="hf"`` runs the same data, schedule and loop with the production stack instead:
transformers' ``BitsAndBytesConfig`` (bitsandbytes' 4-bit Linear) and peft's ``LoraConfig``.

Before anything is loaded or written, ``finetune`` validates the settings (``config.validate``) and
asks whether the run fits in the free memory (``fit.check_memory``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lorakit import _quiet
from lorakit._io import atomic_write_json
from lorakit.adapter import save_adapter
from lorakit.codebooks import KINDS
from lorakit.data import split_documents, tokenize_blocks
from lorakit.evaluation import HeldOut
from lorakit.finetune.config import FinetuneConfig, settings_of, validate
from lorakit.finetune.fit import check_memory, estimate
from lorakit.finetune.output import ADAPTER_DIR, CHECKPOINT_DIR, METRICS_FILE, prepare_output, remove_checkpoint
from lorakit.linear4bit import Linear4bit, embedding_module, quantize_model
from lorakit.lora import add_lora
from lorakit.memory import MB, peak_rss_bytes, release_free_pages, return_freed_memory
from lorakit.models import ParameterCount, keep_bnb_reference_path, load_base_model
from lorakit.runtime import check_device, pick_dtype
from lorakit.train import TrainConfig, TrainResult, train


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    tokenizer: object
    train: TrainResult
    metrics: dict = field(default_factory=dict)


def load_data(tokenizer, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, val_blocks)``, each ``(N, seq_len)``; too little text is a clear error."""
    train_docs, val_docs = split_documents(config.corpus, seed=0)
    train_blocks = tokenize_blocks(tokenizer, train_docs, config.seq_len, max_blocks=config.train_blocks)
    # the workbook's held-out set (lorakit.evaluation.HeldOut): eval_blocks blocks spread evenly over the split
    val_blocks = HeldOut(corpus=config.corpus, n_blocks=config.eval_blocks, seq_len=config.seq_len).blocks(tokenizer)
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
        quantize_model(
            model,
            quant_type=config.kind,
            blocksize=config.blocksize,
            double_quant=config.double_quant,
            bits=config.bits,
            skip=("lm_head",),
        )
        own_memory(model)
    if config.method in ("lora", "qlora"):
        add_lora(model, list(config.targets), r=config.rank, alpha=config.alpha)
    return model, tokenizer


def own_memory(model: torch.nn.Module) -> None:
    """Copy the model's remaining full-precision tensors out of the checkpoint file's memory map.

    transformers maps the safetensors checkpoint into memory, and the loaded tensors point into that
    map. After :func:`quantize_model` the projections are 4-bit copies, but the embeddings and norms
    still point into the map, which keeps the whole file mapped: the pages already read (every
    weight, to quantize it) stay in the process's resident memory, about 0.4 GB for SmolLM2 that no
    tensor uses any more. Copies of the remaining tensors (0.11 GB) let the map go.
    """
    for module in model.modules():
        for _, param in module.named_parameters(recurse=False):
            param.data = param.data.clone()  # the same Parameter object: a tied head stays tied
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                module._buffers[name] = buffer.clone()


@contextmanager
def releasing_free_pages(model: torch.nn.Module, on_step=None):
    """Keep a training run's resident memory near what it holds; yields the ``on_step`` to pass on.

    glibc keeps the pages of freed heap memory (:func:`lorakit.memory.release_free_pages`). A training
    forward frees many temporaries (each 4-bit layer's dequantized weight, the LoRA path's casts) between
    the tensors it saves for backward, and the step peaks at its end, where the loss over the vocabulary
    (the logits, their float32 copy and log-softmax) comes on top. So the freed pages go back before the
    output layer and after each training forward (hooks), and after each step (before an evaluation).
    It changes no result; it costs about 35 ms a step on SmolLM2.
    """

    def after_forward(module, args, output=None):
        if module.training and torch.is_grad_enabled():
            release_free_pages()

    def step_done(result):
        release_free_pages()
        if on_step is not None:
            on_step(result)

    handles = [model.register_forward_hook(after_forward)]
    head = embedding_module(model, "output")
    if head is not None:
        handles.append(head.register_forward_pre_hook(after_forward))
    try:
        yield step_done
    finally:
        for handle in handles:
            handle.remove()


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
            bnb_4bit_quant_type=config.quant_type,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["device_map"] = {"": str(device or "cpu")}
    tokenizer = AutoTokenizer.from_pretrained(source)
    with _quiet.loading():  # no "Loading weights" progress bar on stderr
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if config.method != "qlora" and device is not None:
        model = model.to(device)
    if config.method in ("lora", "qlora"):
        lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)  # its FutureWarning is silenced once, in lorakit._quiet
    keep_bnb_reference_path(model)  # no bfloat16 repacking on AVX512-BF16 CPUs: it breaks training
    model.eval()
    return model, tokenizer


def parameter_count(model: torch.nn.Module) -> ParameterCount:
    """Trainable and total parameters, a quantized weight counted as the parameters it stands for.

    ``lorakit.count_parameters`` counts ``nn.Parameter``s, so a ``Linear4bit``'s packed codes (buffers)
    drop out, and bitsandbytes' ``Params4bit`` holds two 4-bit codes per byte; here each counts as its
    ``out_features * in_features`` weights, as peft's ``get_nb_trainable_parameters`` does for 4-bit.
    """
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes' Params4bit
        if quant_state is not None:
            n = int(torch.Size(quant_state.shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.out_features * module.in_features
    return ParameterCount(trainable, total, 100.0 * trainable / total if total else 0.0)


def _interval_at(result: TrainResult, step: int) -> list[float] | None:
    """The held-out perplexity's interval measured at ``step``, ``[low, high]``; None if none was."""
    found = [[round(low, 2), round(high, 2)] for at, low, high in result.eval_intervals if at == step]
    return found[-1] if found else None


def _settings_with_aliases(settings: dict) -> dict:
    """``quant_type="nf"`` (the old name of ``kind``) still works; "nf4" style values are split."""
    if "quant_type" not in settings:
        return settings
    settings = dict(settings)
    value = settings.pop("quant_type")
    if "kind" in settings:
        raise ValueError("pass kind=... only; quant_type is its old name")
    if isinstance(value, str) and value[:-1] in KINDS and value[-1:].isdigit():  # "nf4": kind and bits
        settings.setdefault("bits", int(value[-1]))
        value = value[:-1]
    settings["kind"] = value
    return settings


def finetune(
    config: FinetuneConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    on_step=None,
    force: bool = False,
    **settings,
) -> FinetuneResult:
    """Fine-tune the base model by ``method`` and measure it; ``settings`` override ``config``'s fields.

    Every setting, the device, the output folder and the model's limits are checked first, and the
    run's memory estimate against the free memory (``force=True`` skips that one check).

    With ``out``, the folder receives ``run.json`` (the settings) before training, checkpoints while
    training (an interrupted run resumes when called again with the same settings), and at the end
    the adapter (LoRA and QLoRA, in peft's format) and ``metrics.json``. A folder holding that same
    run, finished, raises :class:`lorakit.finetune.output.RunComplete` (its metrics attached) rather
    than training again; see :func:`prepare_output` for the other cases. A diverged run keeps its
    last checkpoint, saves no adapter, and its ``metrics.json`` says where and why it diverged.
    """
    config = FinetuneConfig(**{**asdict(config or FinetuneConfig()), **_settings_with_aliases(settings)})
    config.targets = tuple(config.targets)
    model_cfg = validate(config, device=device, out=out)
    device = check_device(device) if device is not None else torch.device("cpu")
    dtype = dtype or pick_dtype(device)
    return_freed_memory()  # freed tensors leave resident memory at once (glibc): peak RSS near the estimate
    memory = None if force else check_memory(config, model_cfg, device, dtype)
    estimated = estimate(config, model_cfg, dtype)[1]  # bytes: the larger of a training step and an eval batch
    folder = prepare_output(out, settings_of(config), overwrite) if out is not None else None
    torch.manual_seed(config.seed)
    model, tokenizer = build_model(config, device, dtype)
    if config.data is not None:
        return _finetune_on_data(config, model, tokenizer, folder, dtype, estimated, memory, progress, on_step)
    train_blocks, val_blocks = load_data(tokenizer, config)
    params = parameter_count(model)
    train_config = TrainConfig(
        steps=config.steps,
        lr=config.learning_rate,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        warmup_steps=min(config.warmup_steps, config.steps),
        gradient_checkpointing=config.gradient_checkpointing,
        eval_blocks=config.eval_blocks,
        checkpoint_every=max(1, config.steps // 4) if folder else 0,
        sample_prompt=config.sample_prompt,
        seed=config.seed,
        progress=progress,
        optimizer=config.optimizer,
    )
    release_free_pages()  # what loading and quantizing freed
    with releasing_free_pages(model, on_step) as step_done:
        result = train(
            model,
            train_blocks,
            val_blocks,
            train_config,
            tokenizer=tokenizer,
            checkpoint_dir=folder / CHECKPOINT_DIR if folder else None,
            on_step=step_done,
        )
    finished = not result.interrupted and not result.diverged
    measured_now = result.evals and result.evals[-1][0] == result.step
    metrics = {
        "ppl_before": result.evals[0][1] if result.evals and result.evals[0][0] == 0 else None,
        "ppl_after": result.evals[-1][1] if finished and measured_now else None,  # None: not measured
        "ppl_before_ci": _interval_at(result, 0),  # 95% bootstrap interval over the held-out blocks
        "ppl_after_ci": _interval_at(result, result.step) if finished and measured_now else None,
        "steps": result.step,
        "steps_this_process": result.steps_run,
        "seconds": round(result.seconds, 2),  # this process's training time
        "seconds_per_step": round(result.seconds_per_step, 4) if result.seconds_per_step else None,
        **_run_metrics(config, params, result, dtype, estimated, memory),
    }
    if folder is not None and finished:
        if config.method != "full":
            if config.backend == "hf":
                model.save_pretrained(folder / ADAPTER_DIR)
            else:
                save_adapter(model, folder / ADAPTER_DIR)
        atomic_write_json(folder / METRICS_FILE, metrics)
        remove_checkpoint(folder)  # the run is complete
    elif folder is not None and result.diverged:
        atomic_write_json(folder / METRICS_FILE, metrics)  # the checkpoint stays: the last good state
    return FinetuneResult(model=model, tokenizer=tokenizer, train=result, metrics=metrics)


def _run_metrics(config, params, result, dtype, estimated: int, memory) -> dict:
    """What every run's ``metrics.json`` holds, on Shakespeare or on the learner's data: memory, sizes, outcome."""
    return {
        "peak_rss_mb": round(peak_rss_bytes() / MB, 1),  # the whole process: Python, libraries, data
        "estimated_mb": round(estimated / MB, 1),  # lorakit.memory's estimate of the run's tensors
        "peak_rss_over_estimate": round(peak_rss_bytes() / estimated, 2),
        "dtype": str(dtype).removeprefix("torch."),
        "trainable_params": params.trainable,
        "total_params": params.total,  # 4-bit weights counted as the parameters they stand for
        "base_params": params.total - params.trainable if config.method != "full" else params.total,
        "final_loss": result.losses[-1] if result.losses else None,
        "interrupted": result.interrupted,
        "diverged": result.diverged,
        "memory_check": memory or "skipped (force=True)",
        "settings": settings_of(config),
    }


def _finetune_on_data(config, model, tokenizer, folder, dtype, estimated, memory, progress, on_step) -> FinetuneResult:
    """The ``data=...`` run (instruction tuning, :mod:`lorakit.finetune.instruct`): train, measure, save."""
    from lorakit.finetune.instruct import run_on_data

    params = parameter_count(model)
    release_free_pages()  # what loading and quantizing freed
    with releasing_free_pages(model, on_step) as step_done:
        result, data_metrics = run_on_data(config, model, tokenizer, progress=progress, on_step=step_done)
    finished = not result.interrupted and not result.diverged
    metrics = {
        **data_metrics,
        "steps": result.step,
        "steps_this_process": result.step,
        "seconds": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds / result.step, 4) if result.step else None,
        **_run_metrics(config, params, result, dtype, estimated, memory),
    }
    if folder is not None and (finished or result.diverged):
        if finished and config.method != "full":
            save_adapter(model, folder / ADAPTER_DIR)
        atomic_write_json(folder / METRICS_FILE, metrics)
    return FinetuneResult(model=model, tokenizer=tokenizer, train=result, metrics=metrics)
