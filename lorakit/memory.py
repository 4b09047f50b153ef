"""Where the memory goes: a measured ledger of one training step, and an estimator for any model.

Two halves that check each other:

* :func:`memory_ledger` *measures* one real training step of the model in front of you: the bytes
  of weights (per dtype; parameters **and** buffers, so 4-bit storage and its quantization
  constants count), gradients, optimizer state, the activations autograd saves for backward
  (seen through ``torch.autograd.graph.saved_tensors_hooks``), the process's peak resident memory
  and, on a GPU, peak CUDA memory.
* :func:`estimate_memory` *computes* the same lines from shapes alone, for any size (``"65B"``, a
  parameter count, a transformers config) and any method (``full``, ``lora``, ``qlora``), so the
  paper's 7B-65B figures can be reproduced from a laptop:
  ``python -m lorakit.memory 65B --method qlora``.

The activation formula counts, tensor by tensor, what the transformers Llama code with SDPA
attention saves for backward (see :func:`activation_bytes`); ``tests/test_memory.py`` checks it
against the ledger on SmolLM2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorakit.snapshot import PicturedControl, default_style, new_figure, text_figure

MB = 10**6  # the QLoRA paper's figures are in MB (10^6 bytes)
GB = 10**9

# ----------------------------------------------------------------------------------------------
# The ledger: measured
# ----------------------------------------------------------------------------------------------


class FourLines:
    """What a ledger and an estimate share: weights (per dtype), gradients, optimizer state, activations."""

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
class MemoryLedger(FourLines):
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


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in an optimizer's state (fast and slow tier alike).

    An optimizer that keeps its state elsewhere (``PagedOptimizer``) reports it through a
    ``state_bytes()`` method; for a plain torch optimizer every tensor in ``optimizer.state``.
    """
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _unique_storage_bytes(tensors)


def _read_vm_hwm() -> int | None:
    """Peak resident set size from /proc (Linux), bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Ask Linux to reset VmHWM (``echo 5 > /proc/self/clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    hwm = _read_vm_hwm()
    peak_rss = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MemoryLedger(
        weights=weight_bytes_by_dtype(model),
        gradients=_unique_storage_bytes(grads),
        optimizer_state=optimizer_state_bytes(optimizer) if optimizer is not None else 0,
        activations=activations,
        peak_rss=peak_rss,
        peak_rss_is_step_only=step_only and hwm is not None,
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


# ----------------------------------------------------------------------------------------------
# Quantized storage: the one place the estimator's 4-bit arithmetic lives
# ----------------------------------------------------------------------------------------------


def quantized_bits_per_param(bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                             dq_blocksize: int = 256) -> float:
    """Average storage bits per weight of blockwise quantization (QLoRA §3, "Double Quantization").

    Every block of ``blocksize`` weights stores ``bits``-bit codes plus one absmax constant:

    * without double quantization the absmax is fp32: ``bits + 32 / blocksize``
      (4 + 32/64 = 4.5 bits);
    * with double quantization the absmaxes are themselves quantized to 8 bits in blocks of
      ``dq_blocksize``, each such block keeping one fp32 constant:
      ``bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)`` (4 + 8/64 + 32/16384 = 4.127 bits).
    """
    if double_quant:
        return bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return bits + 32 / blocksize


def quantized_bytes(numel: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                    dq_blocksize: int = 256) -> int:
    """Exact bytes of one quantized tensor: codes, absmax constants, and (double quant) their constants.

    The whole-block version of :func:`quantized_bits_per_param` (partial blocks round up), so
    ``quantized_bytes(n) * 8 / n`` tends to ``quantized_bits_per_param()`` for large ``n``.
    """
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel * bits / 8)
    if not double_quant:
        return codes + 4 * blocks  # fp32 absmax per block
    # 8-bit absmax per block, one fp32 constant per dq block, and one fp32 mean offset per tensor
    # (bitsandbytes' ``quantize_4bit(compress_statistics=True)`` subtracts the absmax mean first).
    return codes + blocks + 4 * math.ceil(blocks / dq_blocksize) + 4


# ----------------------------------------------------------------------------------------------
# The estimator: computed from shapes
# ----------------------------------------------------------------------------------------------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_NAMES = LINEAR_NAMES[:4]
MLP_NAMES = LINEAR_NAMES[4:]
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = {  # bytes of state per trainable parameter (the 8-bit one's absmax added separately)
    "adamw": 8,  # m and v in fp32 (the usual mixed-precision convention; fp32 params: the same)
    "adamw8bit": 2,  # m and v as 8-bit codes, blockwise (lorakit.adam8bit, bitsandbytes' Adam8bit)
    "paged_adamw": 8,  # AdamW's fp32 moments, paged out to CPU memory (lorakit.paged; QLoRA §3)
    "sgd": 0,  # plain SGD without momentum keeps nothing
}
ADAM8BIT_BLOCKSIZE = 256  # bitsandbytes' blockwise optimizers use blocks of 256 (optim/optimizer.py)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The shapes of a Llama-style decoder (what the estimator needs, nothing more)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool = False
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (d_out, d_in)}`` of the linear layers in ONE decoder block."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @property
    def linear_params(self) -> int:
        """Parameters in the decoder blocks' linear layers (what QLoRA quantizes)."""
        return self.num_layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and RMSNorm weights: kept in 16 bit by QLoRA."""
        embed = self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embed * (1 if self.tie_embeddings else 2) + norms

    @property
    def n_params(self) -> int:
        return self.linear_params + self.other_params

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelShape":
        """From a transformers config (or anything with a ``.config``, such as a loaded model)."""
        config = getattr(config, "config", config)
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            # the folder's last part only: a full path would print machine paths into notebooks
            name=name or os.path.basename(str(getattr(config, "name_or_path", "")).rstrip("/"))
            or getattr(config, "model_type", ""),
        )

    @classmethod
    def from_params(cls, n_params: float, name: str = "") -> "ModelShape":
        """A LLaMA-proportioned shape with about ``n_params`` parameters (for sizes without a preset).

        LLaMA's proportions: intermediate = 8/3 h rounded up to 256, one layer per 128 hidden units,
        heads of 128, vocabulary 32,000; a block then holds about 12 h^2 parameters, so
        n ~ 12 h^3 / 128 gives h (rounded to 128).
        """
        if not n_params > 0:
            raise ValueError(f"n_params must be positive, got {n_params}")
        h = max(128, round((n_params * 128 / 12) ** (1 / 3) / 128) * 128)
        inter = math.ceil(8 * h / 3 / 256) * 256
        return cls(32000, h, inter, max(1, h // 128), max(1, h // 128), max(1, h // 128),
                   name=name or f"{n_params / 1e9:g}B")


# QLoRA (Dettmers et al. 2023), Figure 6, "Breakdown of the memory footprint of different LLaMA
# models": the numbers on the bars, MB. The caption: batch size 1, sequence length 512; the paper
# trains LoRA r=64 on every linear layer, BF16 adapters, gradient checkpointing and a *paged*
# optimizer. The paper does not spell out its accounting; QLORA_PAPER_SETTING is our reading
# (optimizer state paged out to CPU memory, so not on the GPU), and it reproduces all four
# within 5% (tests/test_memory.py). The 4-bit base weights alone are smaller (3.9 GB for 7B).
QLORA_PAPER_FIGURE6_MB = {"7B": 5046, "13B": 8476, "33B": 19302, "65B": 37074}
QLORA_PAPER_SETTING = dict(bits=4, rank=64, targets="all", batch_size=1, seq_len=512,
                           gradient_checkpointing=True, optimizer="paged_adamw", dtype="bfloat16")

# The real LLaMA-1 shapes (Touvron et al. 2023, Table 2; the released config.json files).
LLAMA = {
    "7B": ModelShape(32000, 4096, 11008, 32, 32, 32, name="LLaMA-7B"),
    "13B": ModelShape(32000, 5120, 13824, 40, 40, 40, name="LLaMA-13B"),
    "33B": ModelShape(32000, 6656, 17920, 60, 52, 52, name="LLaMA-33B"),
    "65B": ModelShape(32000, 8192, 22016, 80, 64, 64, name="LLaMA-65B"),
}


def model_shape(model) -> ModelShape:
    """``"65B"`` (a LLaMA preset), ``"1.5B"``/``"350M"``/``2e9`` (LLaMA-proportioned), a
    transformers config or model, or a :class:`ModelShape`."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = model.strip().upper()
        if key in LLAMA:
            return LLAMA[key]
        m = re.fullmatch(r"([0-9.]+)\s*([MB])", key)
        if not m:
            raise ValueError(f"model {model!r}: expected a size such as '7B' or '350M' "
                             f"(presets: {', '.join(LLAMA)}), a parameter count or a config")
        return ModelShape.from_params(float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6), name=model)
    if isinstance(model, (int, float)):
        return ModelShape.from_params(float(model))
    if hasattr(model, "hidden_size") or hasattr(getattr(model, "config", None), "hidden_size"):
        return ModelShape.from_config(model)
    raise TypeError(f"model: cannot read a shape from {type(model).__name__}; "
                    "pass '7B', a parameter count, a transformers config or a ModelShape")


def _resolve_targets(targets) -> tuple[str, ...]:
    if targets == "all":
        return LINEAR_NAMES
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in LINEAR_NAMES]
    if bad or not targets:
        raise ValueError(f"targets {bad or targets!r}: each must be one of {LINEAR_NAMES} (or 'all')")
    return targets


def lora_params(shape: ModelShape, rank: int, targets="all") -> int:
    """Adapter parameters: ``r * (d_in + d_out)`` per target per layer (A: (r, d_in), B: (d_out, r))."""
    lin = shape.linear_shapes()
    return shape.num_layers * sum(rank * (lin[t][0] + lin[t][1]) for t in _resolve_targets(targets))


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, method: str = "full",
                     dtype_bytes: int = 2, rank: int = 64, targets="all",
                     gradient_checkpointing: bool = False) -> int:
    """Bytes autograd saves for backward in one step of a Llama decoder (transformers, SDPA attention).

    Counted per token, per layer, from what each op saves (``h`` hidden, ``kv`` key/value width,
    ``i`` intermediate, ``a`` heads, ``b`` bytes of the compute dtype):

    * full fine-tuning: each RMSNorm saves its fp32 input, its normalized output and ``weight *
      x`` (the next linear's input): 3 tensors of h, twice; SDPA saves q, k, v, its output and an
      fp32 log-sum-exp (h + 2 kv + h + a); the MLP saves gate, silu(gate), up and their product
      (4 i). RoPE saves only cos/sin (shared). Per layer: ``(8h + 2kv + 4i) b + 4(a + 2)``.
    * LoRA (frozen base): a frozen linear saves nothing; a norm with a frozen weight saves only its
      input; a targeted linear saves its input (once per block) and ``A x`` (r). Layer 0's input
      comes from a frozen embedding and is not saved.
    * both end with the final norm and the loss: log-softmax saves fp32 logits (vocab per token).

    With gradient checkpointing (one checkpoint per decoder block) only each block's input is kept,
    plus one block's activations while it is recomputed.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    b, h, kv, i, a = dtype_bytes, shape.hidden_size, shape.kv_size, shape.intermediate_size, shape.num_heads
    tokens = batch_size * seq_len
    x_fp32 = 4 if b != 4 else b  # RMSNorm upcasts its input to fp32 and saves that copy
    attention = (2 * h + 2 * kv) * b + 4 * a  # q, k, v, output; fp32 log-sum-exp per head
    if method == "full":
        norms = 2 * (h * x_fp32 + 2 * h * b + 4)  # input, normalized, weight*normalized; rsqrt
        block = norms + attention + 4 * i * b
        first_block = block
        final = h * x_fp32 + 2 * h * b + 4
    else:
        t = _resolve_targets(targets)
        norms = 2 * (h * x_fp32 + 4)
        lin_inputs = (any(n in t for n in ATTENTION_NAMES) + any(n in t for n in MLP_NAMES)) * h * b
        mlp = 3 * i * b + ("down_proj" in t) * i * b
        block = norms + lin_inputs + attention + mlp + len(t) * rank * b
        first_block = block - h * x_fp32 - 4  # layer 0's input comes from the frozen embedding
        final = h * x_fp32 + 4
    final += shape.vocab_size * 4  # log-softmax output, fp32
    if gradient_checkpointing:
        per_token = shape.num_layers * h * b + block + final
    else:
        per_token = first_block + (shape.num_layers - 1) * block + final
    return tokens * per_token


@dataclass
class MemoryEstimate(FourLines):
    """Estimated bytes per line; ``weights`` split into the storage kinds that make it up."""

    shape: ModelShape
    method: str
    weights: dict[str, int]
    gradients: int
    optimizer_state: int
    activations: int
    trainable_params: int
    paged_optimizer_state: int = 0  # state a paged optimizer keeps in CPU memory (not in ``total``)
    settings: dict = field(default_factory=dict)

    def lines(self) -> dict[str, int]:
        out = {f"weights: {k}": v for k, v in self.weights.items()}
        out.update(gradients=self.gradients, optimizer_state=self.optimizer_state, activations=self.activations)
        return out

    def __str__(self) -> str:
        head = (f"{self.shape.name or 'model'} ({self.shape.n_params / 1e9:.2f}B params), {self.method}, "
                + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        rows = [head] + [f"  {k:<40}{v / MB:>14,.0f} MB" for k, v in self.lines().items()]
        rows.append(f"  {'total':<40}{self.total / MB:>14,.0f} MB")
        if self.paged_optimizer_state:
            rows.append(f"  {'(optimizer state paged to CPU)':<40}{self.paged_optimizer_state / MB:>14,.0f} MB")
        return "\n".join(rows)


def estimate_memory(model="7B", method: str = "qlora", bits: int | None = None, rank: int = 64,
                    targets="all", batch_size: int = 1, seq_len: int = 512,
                    gradient_checkpointing: bool = False, optimizer: str = "adamw",
                    dtype: str = "bfloat16", blocksize: int = 64, double_quant: bool = True) -> MemoryEstimate:
    """Estimate the memory of one training step from shapes alone.

    * ``model``: ``"65B"``, ``"350M"``, a parameter count, a transformers config or model.
    * ``method``: ``"full"`` (every weight trained), ``"lora"`` (frozen base in ``dtype``, adapters),
      ``"qlora"`` (frozen base quantized to ``bits``, adapters in ``dtype``; QLoRA §3).
    * ``bits``: storage bits of the base weights: 2, 3, 4 or 8 for qlora (default 4; the k-bit codes are
      packed back to back, as ``lorakit.quantize_model`` stores them), 16 or 32 for full
      and lora (default: the bits of ``dtype``, which it then sets).
    * ``rank``, ``targets`` (``"all"`` linear layers of the blocks, or names such as
      ``("q_proj", "v_proj")``): the adapters.
    * ``optimizer``: ``"adamw"`` (fp32 moments), ``"adamw8bit"`` (8-bit blockwise moments),
      ``"paged_adamw"`` (fp32 moments paged out to CPU memory: reported apart, not in ``total``)
      or ``"sgd"``.

    QLoRA keeps embeddings, lm_head and norms in ``dtype``, 16 bit in the paper (bitsandbytes
    replaces only ``nn.Linear`` and transformers skips the output layer); only the blocks' linears
    are quantized. The line is named by its real width: "32-bit embeddings, ..." for float32.
    """
    shape = model_shape(model)
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {tuple(OPTIMIZERS)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {tuple(DTYPE_BYTES)}")
    for arg, value in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if method == "qlora":
        bits = 4 if bits is None else bits
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits={bits} for qlora: the base is quantized to 2, 3, 4 or 8 bits")
    else:
        bits = 8 * DTYPE_BYTES[dtype] if bits is None else bits
        if bits not in (16, 32):
            raise ValueError(f"bits={bits} for {method}: weights are stored in 16 or 32 bit "
                             "(use method='qlora' for 2 to 8 bits)")
        dtype = "float32" if bits == 32 else ("bfloat16" if dtype == "float32" else dtype)
    b = DTYPE_BYTES[dtype]

    if method == "qlora":
        per_layer = sum(quantized_bytes(o * i, bits, blocksize, double_quant)
                        for o, i in shape.linear_shapes().values())
        codes = math.ceil(shape.linear_params * bits / 8)
        weights = {f"{bits}-bit codes": codes,
                   "quantization constants": shape.num_layers * per_layer - codes,
                   f"{8 * b}-bit embeddings, lm_head, norms": shape.other_params * b}
    else:
        weights = {f"{bits}-bit weights": shape.n_params * b}
    if method == "full":
        trainable = shape.n_params
    else:
        trainable = lora_params(shape, rank, targets)
        weights["LoRA adapters"] = trainable * b
    state = trainable * OPTIMIZERS[optimizer]
    if optimizer == "adamw8bit":
        state += 2 * 4 * math.ceil(trainable / ADAM8BIT_BLOCKSIZE)  # fp32 absmax of m and of v
    paged = 0
    if optimizer == "paged_adamw":  # the pages live in CPU memory; under pressure none stay resident
        state, paged = 0, state
    activations = activation_bytes(shape, batch_size, seq_len, method, b, rank, targets, gradient_checkpointing)
    settings = dict(bits=bits, dtype=dtype, batch_size=batch_size, seq_len=seq_len, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing)
    if method != "full":
        settings.update(rank=rank, targets=targets if isinstance(targets, str) else ",".join(targets))
    return MemoryEstimate(shape, method, weights, trainable * b, state, activations, trainable, paged, settings)


# ----------------------------------------------------------------------------------------------
# Fits or not: the calculator's logic, and its command line
# ----------------------------------------------------------------------------------------------


@dataclass
class FitCheck:
    """Does one training step fit in ``gpu_bytes``? The estimate says why."""

    estimate: MemoryEstimate
    gpu_bytes: int

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.gpu_bytes

    @property
    def headroom(self) -> int:
        """Bytes left over (negative: bytes missing)."""
        return self.gpu_bytes - self.estimate.total

    def __str__(self) -> str:
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        return (f"{verdict} in {self.gpu_bytes / GB:g} GB: needs {self.estimate.total / GB:,.2f} GB, "
                f"{'headroom' if self.fits else 'short by'} {abs(self.headroom) / GB:,.2f} GB\n{self.estimate}")


def check_fit(gpu_gb: float, **estimate_kwargs) -> FitCheck:
    """``estimate_memory(**estimate_kwargs)`` against a GPU of ``gpu_gb`` GB (10^9 bytes).

    Framework overheads (CUDA context, allocator fragmentation, temporary buffers) are not in the
    estimate: leave a margin of a GB or so.
    """
    if not gpu_gb > 0:
        raise ValueError(f"gpu_gb must be positive, got {gpu_gb}")
    return FitCheck(estimate_memory(**estimate_kwargs), int(gpu_gb * GB))


def fit_figure(check: FitCheck):
    """The calculator's picture: the estimate's lines stacked into one bar, against the GPU's memory."""
    with default_style():
        fig = new_figure(9.0, 2.4)
        ax = fig.subplots()
        left = 0.0
        for (name, n), color in zip(check.estimate.lines().items(), _BAR_COLORS * 3):
            ax.barh(0, n / GB, left=left, color=color, label=f"{name}: {n / GB:,.2f} GB")
            left += n / GB
        ax.axvline(check.gpu_bytes / GB, color="k", ls="--", lw=1.5, label=f"GPU: {check.gpu_bytes / GB:g} GB")
        ax.set(yticks=[], xlabel="GB (10^9 bytes)", xlim=(0, 1.05 * max(left, check.gpu_bytes / GB)))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        ax.set_title(str(check).splitlines()[0], fontsize=10, color="tab:green" if check.fits else "tab:red")
    return fig


_BAR_COLORS = ["tab:blue", "tab:cyan", "tab:purple", "tab:orange", "tab:red", "tab:olive", "tab:gray"]


class MemoryCalculator(PicturedControl):
    """A thin ipywidgets front end to :func:`check_fit`: controls in, verdict and breakdown out.

    Drive it from code as a learner would with the mouse::

        calc = MemoryCalculator()
        calc.controls["model"].value = "65B"; calc.update()
        calc.result.fits
    """

    def __init__(self, model: str = "7B", method: str = "qlora", bits: int = 4, rank: int = 64,
                 batch_size: int = 1, seq_len: int = 512, gradient_checkpointing: bool = True,
                 gpu_gb: float = 24.0):
        import ipywidgets as w

        self.controls = {
            "model": w.Dropdown(options=["135M", "1B", *LLAMA], value=model, description="model"),
            "method": w.Dropdown(options=list(METHODS), value=method, description="method"),
            "bits": w.Dropdown(options=[4, 8, 16, 32], value=bits, description="bits"),
            "rank": w.IntSlider(value=rank, min=1, max=256, description="rank"),
            "batch_size": w.IntSlider(value=batch_size, min=1, max=64, description="batch"),
            "seq_len": w.IntSlider(value=seq_len, min=64, max=8192, step=64, description="seq len"),
            "gradient_checkpointing": w.Checkbox(value=gradient_checkpointing, description="checkpointing"),
            "gpu_gb": w.FloatSlider(value=gpu_gb, min=4, max=192, step=4, description="GPU GB"),
        }
        self.output = w.Output()
        self.widget = w.VBox([*self.controls.values(), self.output])
        self.result: FitCheck | None = None
        self.error: str | None = None
        for control in self.controls.values():
            control.observe(lambda change: self.update(), names="value")
        self.update()

    def update(self) -> FitCheck | None:
        """Recompute from the controls; an impossible combination (bits=4 with full) shows its error."""
        kwargs = {k: c.value for k, c in self.controls.items()}
        gpu_gb = kwargs.pop("gpu_gb")
        self.output.clear_output()
        try:
            self.result, self.error = check_fit(gpu_gb, **kwargs), None
        except ValueError as e:
            self.result, self.error = None, str(e)
        with self.output:
            print(self.result if self.result is not None else f"cannot estimate: {self.error}")
        return self.result

    def figure(self):
        """The picture of the current state (the book shows it): :func:`fit_figure`, or the error."""
        if self.result is None:
            return text_figure(f"cannot estimate: {self.error}")
        return fit_figure(self.result)


def main(argv: list[str] | None = None) -> int:
    """``python -m lorakit.memory 65B --method qlora``: print the breakdown and the total."""
    parser = argparse.ArgumentParser(prog="python -m lorakit.memory", description=main.__doc__)
    parser.add_argument("model", help="'7B', '13B', '33B', '65B' (LLaMA), or a size such as '1.5B', '350M'")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--bits", type=int, default=None)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--targets", default="all", help="'all' or a comma list such as q_proj,v_proj")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--gpu-gb", type=float, default=None, help="also say whether it fits")
    args = parser.parse_args(argv)
    targets = args.targets if args.targets == "all" else tuple(args.targets.split(","))
    kwargs = dict(model=args.model, method=args.method, bits=args.bits, rank=args.rank, targets=targets,
                  batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer,
                  gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype)
    try:
        print(check_fit(args.gpu_gb, **kwargs) if args.gpu_gb else estimate_memory(**kwargs))
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
