"""The lab's training measurements: each fine-tune, then what it cost.

Each training run (``full``, ``lora``, ``qlora_nf4``, ``qlora_fp4``) goes through
:func:`lorakit.finetune` and is then measured: held-out perplexity, median step time, one more
training step under :func:`lorakit.memory_ledger` (with ``lr=0``, so no weight moves), the peak
resident memory of its process, and the adapter's size on disk. ``qlora_nf4`` also takes a
long-sequence batch with and without a :class:`lorakit.PagedOptimizer` (QLoRA §3, "Paged
Optimizers").
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from lorakit.adapter import save_adapter
from lorakit.data import split_documents, tokenize_blocks
from lorakit.finetune import finetune, load_data
from lorakit.lab.config import device_and_dtype, finetune_config, lab_config
from lorakit.memory import (
    memory_ledger,
    model_bytes,
    peak_rss_bytes,
    quantized_storage,
    resident_peak,
    rss_parts,
    weight_bytes_by_dtype,
)
from lorakit.paged import PagedOptimizer
from lorakit.timing import StageClock


def _lm_batch(ids: torch.Tensor, device: torch.device) -> dict:
    ids = ids.to(device)  # (B, T)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def _ledger_line(ledger, optimizer=None) -> dict:
    return dict(
        weights=ledger.weight_bytes,
        gradients=ledger.gradients,
        optimizer_state=ledger.optimizer_state,
        activations=ledger.activations,
        total=ledger.total,
        peak_rss=ledger.peak_rss,
        peak_rss_is_step_only=ledger.peak_rss_is_step_only,
        peak_cuda=ledger.peak_cuda,
        resident_peak=resident_peak(ledger, optimizer),
    )


def storage_line(model: torch.nn.Module) -> dict:
    """Bytes and bits per weight of the model's 4-bit layers, as plain numbers.

    Counted by :func:`lorakit.memory.quantized_storage`.
    """
    s = quantized_storage(model)
    return dict(params=s.n_params, bytes=s.total_bytes, bits_per_param=s.bits_per_parameter)


def _zero_lr_ledger(model, batch, optimizer) -> dict:
    """The ledger of one more step with an ``lr=0`` optimizer (its state is allocated, no weight moves); the
    gradients are dropped afterwards."""
    line = _ledger_line(memory_ledger(model, batch, optimizer), optimizer)
    model.zero_grad(set_to_none=True)
    return line


def paging_spike(model, ordinary: dict, long: dict, page_bytes: int, budget_pages: int) -> dict:
    """Resident peaks of an ordinary batch and a long one, the long one with plain and paged AdamW.

    ``lr=0``: the steps allocate and update the optimizer state, but no weight moves.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    ordinary_plain = _zero_lr_ledger(model, ordinary, torch.optim.AdamW(trainable, lr=0.0))
    long_plain = _zero_lr_ledger(model, long, torch.optim.AdamW(trainable, lr=0.0))
    paged = PagedOptimizer(
        torch.optim.AdamW(trainable, lr=0.0), budget_bytes=budget_pages * page_bytes, page_bytes=page_bytes
    )
    try:
        long_paged = _zero_lr_ledger(model, long, paged)
    finally:
        paged.close()
    return dict(
        ordinary_tokens=ordinary["input_ids"].numel(),
        long_tokens=long["input_ids"].numel(),
        ordinary_plain=ordinary_plain,
        long_plain=long_plain,
        long_paged=long_paged,
        budget_bytes=budget_pages * page_bytes,
    )


def train_run(name: str, settings: dict, adapter_dir: str | None) -> dict:
    """Fine-tune by run ``name`` and measure it; returns plain numbers (it may run in another process)."""
    config = lab_config(settings)
    device, dtype = device_and_dtype(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fconfig = finetune_config(name, config)
    clock = StageClock()
    stamps: list[float] = []
    result = finetune(
        fconfig, device=device, dtype=dtype, progress=False, on_step=lambda _: stamps.append(time.perf_counter())
    )
    model, tokenizer = result.model, result.tokenizer
    peak_rss_run = peak_rss_bytes()  # loading + training + the two evaluations
    clock("load, evaluate, train, evaluate")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N: the first one allocates the optimizer
    out = dict(
        method=fconfig.method,
        quant_type=fconfig.kind if fconfig.method == "qlora" else None,
        lr=fconfig.learning_rate,
        ppl_before=result.metrics["ppl_before"],
        ppl_after=result.metrics["ppl_after"],
        ppl_before_ci=result.metrics["ppl_before_ci"],
        ppl_after_ci=result.metrics["ppl_after_ci"],  # 95% intervals
        final_loss=result.metrics["final_loss"],
        step_seconds=statistics.median(gaps) if gaps else result.metrics["seconds_per_step"],
        trainable_params=result.metrics["trainable_params"],
        total_params=result.metrics["total_params"],
        peak_rss_run=peak_rss_run,
        peak_cuda_run=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
    train_blocks, _ = load_data(tokenizer, fconfig)
    ordinary = _lm_batch(train_blocks[: config.batch_size], device)  # (B, T), the training batch shape
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["ledger"] = _zero_lr_ledger(model, ordinary, torch.optim.AdamW(trainable, lr=0.0))
    out["rss_after_step"] = rss_parts()
    clock("ledger")
    out["weights_by_dtype"] = weight_bytes_by_dtype(model)
    if fconfig.method == "qlora":
        out["quantized"] = storage_line(model)
    if name == "qlora_nf4" and config.spike_seq_len:
        train_docs, _ = split_documents(config.corpus, seed=0)
        long_ids = tokenize_blocks(tokenizer, train_docs, config.spike_seq_len, max_blocks=1)  # (1, T_long)
        out["spike"] = paging_spike(
            model, ordinary, _lm_batch(long_ids, device), config.page_kib * 1024, config.page_budget_pages
        )
        clock("paging spike")
    if fconfig.method == "full":
        out["checkpoint_bytes"] = model_bytes(model)  # every weight: what a full fine-tune must save
    elif adapter_dir is not None:
        folder = save_adapter(model, Path(adapter_dir) / name)
        out["adapter_dir"] = str(folder)
        out["adapter_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    out["stage_seconds"] = clock.seconds
    return out
