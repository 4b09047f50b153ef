"""Will it fit? lorakit's own memory estimate of the run, against the memory free on its device, asked before training.

The estimate is ``lorakit.memory.estimate_memory`` (shapes only, from the model's config.json), the
larger of one training step and one evaluation batch (``perplexity`` scores 8 blocks at a time, and
its fp32 logits and their log-softmax are ``8 * seq_len * vocab`` floats each). It leaves out the
framework (torch, the tokenizer, the allocator's slack), so ``MARGIN`` is kept free on top, as
``lorakit.memory.check_fit`` advises.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from lorakit.finetune.config import FinetuneConfig
from lorakit.memory import GB, MemoryEstimate, estimate_memory

MARGIN = 1 * GB  # torch, tokenizer, data and allocator slack, not in the estimate
EVAL_BATCH = 8  # lorakit.data.perplexity's batch size


class WontFit(ValueError):
    """The run's estimate exceeds the free memory; the message holds the breakdown and a setting that fits."""

    keep_lines = True  # the breakdown is a table (lorakit.runtime.run_main prints it as it is)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes free for this run, where the figure comes from)``; ``None`` when it cannot be known.

    On the CPU: the available RAM, or less where this process is capped: a container's memory limit
    (cgroup v2 ``memory.max``) or an address-space limit (``ulimit -v``, ``prlimit --as``).
    ``$LORAKIT_FREE_MEMORY`` (bytes) stands in for the figure: the check as a smaller machine would do it.
    """
    if os.environ.get("LORAKIT_FREE_MEMORY"):
        return int(os.environ["LORAKIT_FREE_MEMORY"]), "$LORAKIT_FREE_MEMORY"
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    figures = [f for f in (_ram_available(), _cgroup_headroom(), _address_space_headroom()) if f[0] is not None]
    return min(figures, key=lambda f: f[0]) if figures else (None, "unknown on this system")


def _ram_available() -> tuple[int | None, str]:
    try:
        import psutil

        return psutil.virtual_memory().available, "available RAM (psutil)"
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return None, ""


def _cgroup_headroom() -> tuple[int | None, str]:
    """A container's memory limit less what it uses now (cgroup v2); None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None, ""
    return (None, "") if limit == "max" else (int(limit) - used, "the container's memory limit (cgroup memory.max)")


def _address_space_headroom() -> tuple[int | None, str]:
    """An address-space limit (``ulimit -v``) less this process's virtual size now; None without a limit."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (ImportError, OSError, ValueError):
        return None, ""
    if soft == resource.RLIM_INFINITY:
        return None, ""
    return soft - pages * os.sysconf("SC_PAGE_SIZE"), "the address-space limit (ulimit -v) less this process's size"


def estimate(config: FinetuneConfig, model_cfg, dtype: torch.dtype) -> tuple[MemoryEstimate, int]:
    """``(training-step estimate, bytes needed)``: the larger of a training step and an evaluation batch."""
    dtype_name = str(dtype).removeprefix("torch.")
    if config.method == "qlora":
        bits = config.bits
    else:
        bits = 8 * torch.empty(0, dtype=dtype).element_size()
    # the memory estimator knows one paged optimizer; a paged 8-bit one keeps at most the 8-bit state resident
    optimizer = "adamw8bit" if config.optimizer == "paged_adamw8bit" else config.optimizer
    step = estimate_memory(model_cfg, method=config.method, bits=bits, rank=config.rank, targets=tuple(config.targets),
                           batch_size=config.batch_size, seq_len=config.seq_len,
                           gradient_checkpointing=config.gradient_checkpointing, optimizer=optimizer,
                           dtype=dtype_name, blocksize=config.blocksize, double_quant=config.double_quant)
    weights = sum(step.weights.values())
    batch = min(EVAL_BATCH, config.eval_blocks)
    evaluation = weights + 2 * batch * config.seq_len * model_cfg.vocab_size * 4  # (B, T, V) fp32, twice
    return step, max(step.total, evaluation)


def _fits(config: FinetuneConfig, model_cfg, dtype, free: int) -> int | None:
    need = estimate(config, model_cfg, dtype)[1] + MARGIN
    return need if need <= free else None


def suggest(config: FinetuneConfig, model_cfg, dtype: torch.dtype, free: int) -> tuple[dict, int] | None:
    """Changed settings that fit in ``free`` bytes, and their need; tried in the order that costs least:
    gradient checkpointing (slower, same result), a smaller batch with more accumulation (the same
    effective batch), fewer base-weight bits, shorter sequences. None if nothing tried fits."""
    changes: dict = {}
    current = config

    def attempt(**change) -> int | None:
        nonlocal current
        trial = dataclasses.replace(current, **change)
        current = trial
        changes.update(change)
        return _fits(trial, model_cfg, dtype, free)

    if not config.gradient_checkpointing and (need := attempt(gradient_checkpointing=True)):
        return changes, need
    while current.batch_size > 1:
        half = current.batch_size // 2
        need = attempt(batch_size=half, grad_accum=current.grad_accum * current.batch_size // half)
        if need:
            return changes, need
    while current.method == "qlora" and current.bits > 2 and current.kind != "fp":
        if need := attempt(bits={8: 4, 4: 3, 3: 2}[current.bits]):
            return changes, need
    while current.seq_len > 64:
        if need := attempt(seq_len=current.seq_len // 2):
            return changes, need
    return None


def flags(changes: dict) -> str:
    """Settings as the command line's flags: ``--batch-size 2 --grad-accum 2``."""
    parts = []
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        parts.append(flag if value is True else f"{flag} {value}")
    return " ".join(parts)


def check_memory(config: FinetuneConfig, model_cfg, device: torch.device, dtype: torch.dtype) -> str:
    """Refuse (:class:`WontFit`) a run whose estimate exceeds the free memory; else a one-line summary."""
    free, source = available_memory(device)
    step, need = estimate(config, model_cfg, dtype)
    if free is None:
        return f"memory estimate {need / GB:.2f} GB (free memory {source}, not checked)"
    if need + MARGIN <= free:
        return f"memory estimate {need / GB:.2f} GB + {MARGIN / GB:g} GB margin, {free / GB:.2f} GB free ({source})"
    fix = suggest(config, model_cfg, dtype, free)
    advice = (f"a setting that fits: {flags(fix[0])} (about {fix[1] / GB:.2f} GB with the margin)" if fix
              else "no smaller setting tried fits (a shorter --seq-len, --batch-size 1, method qlora)")
    raise WontFit(
        f"this run needs about {need / GB:.2f} GB plus a {MARGIN / GB:g} GB margin, but only {free / GB:.2f} GB "
        f"are free ({source}); {advice}; or pass --force (force=True) to try anyway.\n"
        f"lorakit.memory's estimate of one training step:\n{step}"
    )

