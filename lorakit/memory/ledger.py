"""The measured half: one real training step, and the bytes each of its parts holds.

* :func:`memory_ledger` runs one step and measures the bytes of weights (per dtype; parameters
  **and** buffers, so 4-bit codes and their quantization constants count), gradients, optimizer
  state, the activations autograd saves for backward (seen through
  ``torch.autograd.graph.saved_tensors_hooks``), the process's peak resident memory and, on a GPU,
  peak CUDA memory.
* The byte counters behind it (:func:`weight_bytes_by_dtype`, :func:`model_bytes`,
  :func:`optimizer_state_bytes`, :func:`quantized_storage`) and the resident-memory readers
  (:func:`peak_rss_bytes`, :func:`rss_parts`) are the package's only ones: the lab and the
  fine-tune pipeline count with them too; :func:`return_freed_memory` and :func:`release_free_pages`
  keep the fine-tune's resident memory near what it holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from lorakit.blockwise import Storage, storage
from lorakit.linear4bit import Linear4bit

MB = 10**6  # the QLoRA paper's figures are in MB (10^6 bytes)
GB = 10**9


class StepMemory:
    """The four lines of one training step's memory, shared by a measured ledger and an estimate:
    weights (per dtype or storage kind), gradients, optimizer state, saved activations."""

    weights: dict[str, int]
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer state + saved activations (on the accelerator, for a GPU run)."""
        return self.weight_bytes + self.gradients + self.optimizer_state + self.activations


@dataclass
class MemoryLedger(StepMemory):
    """Measured bytes of one training step. ``weights`` maps a dtype name to bytes."""

    weights: dict[str, int]
    gradients: int
    optimizer_state: int
    activations: int
    peak_rss: int  # process peak resident set size during the step, bytes
    peak_rss_is_step_only: bool  # False when the kernel would not reset the peak (then: lifetime peak)
    peak_cuda: int | None  # torch.cuda.max_memory_allocated during the step; None without a GPU
    loss: float

    def lines(self) -> dict[str, int]:
        """The ledger as ``{line: bytes}``, weights split per dtype (for stacked bars)."""
        out = {f"weights ({dtype})": n for dtype, n in sorted(self.weights.items())}
        out.update(gradients=self.gradients, optimizer_state=self.optimizer_state, activations=self.activations)
        return out

    def __str__(self) -> str:
        rows = [f"{k:<28}{v / MB:>12,.1f} MB" for k, v in self.lines().items()]
        rows.append(f"{'total':<28}{self.total / MB:>12,.1f} MB")
        rows.append(f"{'peak RSS':<28}{self.peak_rss / MB:>12,.1f} MB")
        if self.peak_cuda is not None:
            rows.append(f"{'peak CUDA':<28}{self.peak_cuda / MB:>12,.1f} MB")
        return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Byte counters: each storage once
# ----------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def _unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view and its base count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def weight_bytes_by_dtype(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per dtype name, each storage once (tied weights once).

    Buffers count because quantized layers keep their packed 4-bit codes and their absmax
    constants as buffers (``uint8``, ``float32``...), not as parameters.
    """
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(t)
        if key in seen:
            continue
        seen.add(key)
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.untyped_storage().nbytes()
    return out


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage once: :func:`weight_bytes_by_dtype` summed."""
    return sum(weight_bytes_by_dtype(model).values())


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in an optimizer's state (fast and slow tier alike).

    An optimizer that keeps its state elsewhere (``PagedOptimizer``) reports it through a
    ``state_bytes()`` method; for a plain torch optimizer every tensor in ``optimizer.state``.
    """
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _unique_storage_bytes(tensors)


def quantized_storage(model: torch.nn.Module) -> Storage:
    """The :class:`lorakit.blockwise.Storage` of every ``Linear4bit`` of ``model``, added up.

    Counted from the real tensors (``blockwise.storage`` per layer), so ``bits_per_parameter`` is
    the model's measured figure (4.127 for NF4 with double quantization at blocksize 64).
    """
    parts = [storage(m.weight_packed, m.state) for m in model.modules() if isinstance(m, Linear4bit)]
    if not parts:
        raise ValueError(f"{type(model).__name__} has no Linear4bit layers; call lorakit.quantize_model first")
    return Storage(**{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(Storage)})


# ----------------------------------------------------------------------------------------------
# Resident memory of this process
# ----------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far, in bytes on every platform.

    ``getrusage``'s ``ru_maxrss`` is in KiB on Linux but in bytes on macOS (see ``man getrusage``
    on each). On Linux, :func:`memory_ledger` resets the peak before its step, so the figure then
    covers the step alone.
    """
    import resource  # POSIX only: imported here so that importing lorakit works everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_parts() -> dict[str, int] | None:
    """The process's resident memory now, split as Linux reports it: ``anon`` (pages the process
    allocated) and ``file`` (file-backed ones, such as a memory-mapped checkpoint), bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields_kb = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return None
    return {key.removeprefix("Rss").lower(): int(value.split()[0]) * 1024 for key, value in fields_kb.items()}


# glibc's mallopt parameter number for the mmap threshold (malloc.h: #define M_MMAP_THRESHOLD -3).
_M_MMAP_THRESHOLD = -3
RETURN_THRESHOLD = 1 << 20  # bytes: allocations at least this large get their own mapping


def return_freed_memory(threshold: int = RETURN_THRESHOLD) -> bool:
    """Make freed tensors leave the process's resident memory at once (Linux with glibc); True if set.

    PyTorch allocates CPU tensors with ``malloc``. glibc serves a request of at least the *mmap
    threshold* with its own memory mapping, returned to the system by ``free``; smaller ones come from
    its heap, which keeps freed space for reuse. The threshold starts at 128 KiB but glibc raises it
    (up to 32 MiB) each time such a mapping is freed (``man mallopt``, M_MMAP_THRESHOLD). A training
    step frees large tensors all the time (each 4-bit layer's dequantized weight, twice a step; the
    logits), so the threshold climbs, those tensors move into the heap, and resident memory grows far
    past what the step holds at any moment: on SmolLM2's QLoRA step, 2.7 GB of peak RSS against 1.8 GB
    with the threshold fixed. Setting the threshold fixes it (and turns off the raising), so every
    tensor of ``threshold`` bytes or more is mapped on its own and handed back when freed.
    Elsewhere (macOS, Windows, musl) this does nothing and returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc
        return False


def release_free_pages() -> bool:
    """Hand the pages of freed memory inside glibc's heap back to the system now (``malloc_trim(0)``); True if done.

    :func:`return_freed_memory` sends large tensors to mappings of their own, but smaller ones (a
    bfloat16 activation of SmolLM2's step is 0.6 MB) come from the heap, and the holes they leave between
    tensors that live on stay resident. ``malloc_trim`` returns the holes' whole pages (about 17 ms
    after a training forward of SmolLM2). Elsewhere (macOS, Windows, musl) this does nothing and returns False.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc
        return False


def _reset_peak_rss() -> bool:
    """Ask Linux to reset the peak (``echo 5 > /proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# One measured step
# ----------------------------------------------------------------------------------------------


def _causal_lm_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def memory_ledger(
    model: torch.nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = _causal_lm_loss,
) -> MemoryLedger:
    """Run ONE real training step (forward, backward, ``optimizer.step()``) and measure its memory.

    The model's weights change (it is a real step); pass a copy to keep the original.
    ``batch`` is a dict of tensors (``input_ids``, ``attention_mask``, ``labels``) on the model's
    device; ``loss_fn(model, batch)`` defaults to the causal-LM loss the model computes itself.
    Without ``optimizer`` the optimizer state line is 0. Activations are the distinct storages
    autograd saves for backward that are not parameters or buffers.
    """
    device = next(model.parameters()).device
    frozen = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[tuple[str, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in frozen:
            saved.setdefault(key, t.untyped_storage().nbytes())
        return t

    model.train()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    step_only = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, batch)
    activations = sum(saved.values())
    loss.backward()
    if optimizer is not None:
        optimizer.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return MemoryLedger(
        weights=weight_bytes_by_dtype(model),
        gradients=_unique_storage_bytes(grads),
        optimizer_state=optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        activations=activations,
        peak_rss=peak_rss_bytes(),
        peak_rss_is_step_only=step_only,
        peak_cuda=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        loss=float(loss.detach()),
    )


def resident_peak(ledger: MemoryLedger, optimizer=None) -> int:
    """Fast-tier bytes at the step's peak: weights + gradients + saved activations + the optimizer
    state that is resident then: all of it for a plain optimizer, the peak resident pages for a
    ``PagedOptimizer`` (its ``peak_resident_bytes``; the rest waits on the slow tier)."""
    if optimizer is None:
        state = 0
    elif hasattr(optimizer, "peak_resident_bytes"):
        state = optimizer.peak_resident_bytes
    else:
        state = ledger.optimizer_state
    return ledger.weight_bytes + ledger.gradients + ledger.activations + state
