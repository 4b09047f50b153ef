"""The computed half: the memory of one training step from shapes alone, for any size.

:func:`estimate_memory` computes the lines a :func:`lorakit.memory.memory_ledger` measures, for
any size (``"65B"``, a parameter count, a transformers config) and any method (``full``,
``lora``, ``qlora``), so the paper's 7B-65B figures can be reproduced from a laptop:
``python -m lorakit.memory 65B --method qlora``. :func:`check_fit` sets it against a GPU.

The activation formula counts, tensor by tensor, what the transformers Llama code with SDPA
attention and lorakit's loss save for backward (see :func:`activation_bytes`); ``tests/test_memory.py``
checks it against the ledger on SmolLM2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from lorakit.codebooks import BITS
from lorakit.lora import LLAMA_PROJECTIONS
from lorakit.memory.ledger import GB, MB, StepMemory

# ----------------------------------------------------------------------------------------------
# Quantized storage: the one place the estimator's 4-bit arithmetic lives
# ----------------------------------------------------------------------------------------------


def quantized_bits_per_param(
    bits: int = 4, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256
) -> float:
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


def quantized_bytes(
    numel: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256
) -> int:
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

ATTENTION_PROJECTIONS = LLAMA_PROJECTIONS[:4]  # q, k, v, o
MLP_PROJECTIONS = LLAMA_PROJECTIONS[4:]  # gate, up, down
METHODS = ("full", "lora", "qlora")  # what trains: every weight, adapters on a 16/32-bit base, adapters on a k-bit base
LOSSES = ("chunked", "transformers")  # which loss keeps what for backward: see activation_bytes
STATE_BYTES_PER_PARAM = {  # bytes of optimizer state per trainable parameter (the 8-bit one's absmax added apart)
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
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

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
    def from_config(cls, config, name: str = "") -> ModelShape:
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
            name=name
            or os.path.basename(str(getattr(config, "name_or_path", "")).rstrip("/"))
            or getattr(config, "model_type", ""),
        )

    @classmethod
    def from_params(cls, n_params: float, name: str = "") -> ModelShape:
        """A LLaMA-proportioned shape with about ``n_params`` parameters (for sizes without a preset).

        LLaMA's proportions: intermediate = 8/3 h rounded up to 256, one layer per 128 hidden units,
        heads of 128, vocabulary 32,000; a block then holds about 12 h^2 parameters, so
        n ~ 12 h^3 / 128 gives h (rounded to 128).
        """
        if not n_params > 0:
            raise ValueError(f"n_params must be positive, got {n_params}")
        h = max(128, round((n_params * 128 / 12) ** (1 / 3) / 128) * 128)
        inter = math.ceil(8 * h / 3 / 256) * 256
        return cls(
            32000, h, inter, max(1, h // 128), max(1, h // 128), max(1, h // 128), name=name or f"{n_params / 1e9:g}B"
        )


# QLoRA (Dettmers et al. 2023), Figure 6, "Breakdown of the memory footprint of different LLaMA
# models": the numbers on the bars, MB. The caption: batch size 1, sequence length 512; the paper
# trains LoRA r=64 on every linear layer, BF16 adapters (its qlora.py casts the LoRA modules to
# bf16, unlike peft's float32 default), gradient checkpointing and a *paged* optimizer. The paper
# does not spell out its accounting; QLORA_PAPER_SETTING is our reading (optimizer state paged out
# to CPU memory, so not on the GPU), and it reproduces all four totals within 5% (tests/test_memory.py).
# The 4-bit base weights alone are smaller (3.9 GB for 7B).
QLORA_PAPER_FIGURE6_MB = {"7B": 5046, "13B": 8476, "33B": 19302, "65B": 37074}
QLORA_PAPER_SETTING = dict(
    bits=4,
    rank=64,
    targets="all",
    batch_size=1,
    seq_len=512,
    gradient_checkpointing=True,
    optimizer="paged_adamw",
    dtype="bfloat16",
    adapter_dtype="bfloat16",
    loss="transformers",  # the paper trained with transformers' loss, which keeps a float32 log-softmax
)

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
            raise ValueError(
                f"model {model!r}: expected a size such as '7B' or '350M' "
                f"(presets: {', '.join(LLAMA)}), a parameter count or a config"
            )
        return ModelShape.from_params(float(m.group(1)) * (1e9 if m.group(2) == "B" else 1e6), name=model)
    if isinstance(model, (int, float)):
        return ModelShape.from_params(float(model))
    if hasattr(model, "hidden_size") or hasattr(getattr(model, "config", None), "hidden_size"):
        return ModelShape.from_config(model)
    raise TypeError(
        f"model: cannot read a shape from {type(model).__name__}; "
        "pass '7B', a parameter count, a transformers config or a ModelShape"
    )


def _resolve_targets(targets) -> tuple[str, ...]:
    if targets == "all":
        return LLAMA_PROJECTIONS
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in LLAMA_PROJECTIONS]
    if bad or not targets:
        raise ValueError(f"targets {bad or targets!r}: each must be one of {LLAMA_PROJECTIONS} (or 'all')")
    return targets


def lora_params(shape: ModelShape, rank: int, targets="all") -> int:
    """Adapter parameters: ``r * (d_in + d_out)`` per target per layer (A: (r, d_in), B: (d_out, r))."""
    lin = shape.linear_shapes()
    return shape.num_layers * sum(rank * (lin[t][0] + lin[t][1]) for t in _resolve_targets(targets))


def activation_bytes(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    method: str = "full",
    dtype_bytes: int = 2,
    rank: int = 64,
    targets="all",
    gradient_checkpointing: bool = False,
    adapter_bytes: int | None = None,
    loss: str = "chunked",
) -> int:
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
    * adapters in another dtype than the compute dtype (``adapter_bytes`` != ``dtype_bytes``: float32
      adapters on a bf16 model, lorakit's and peft's default): each targeted linear casts its input to
      the adapter's dtype and saves that copy, one per target (q, k and v each keep their own), and
      ``A x`` is saved in the adapter's dtype; the compute-dtype inputs are then saved by nobody.
    * both end with the final norm and the loss. ``loss="chunked"``: lorakit's (:mod:`lorakit.loss`,
      which ``load_base_model`` installs) keeps only the logits, in the compute dtype (vocab per token);
      ``loss="transformers"``: transformers' own keeps their float32 log-softmax (4 bytes per entry).

    With gradient checkpointing (one checkpoint per decoder block) only each block's input is kept,
    plus one block's activations while it is recomputed.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r}: expected one of {LOSSES}")
    b, h, kv, i, a = dtype_bytes, shape.hidden_size, shape.kv_size, shape.intermediate_size, shape.num_heads
    ab = b if adapter_bytes is None else adapter_bytes
    tokens = batch_size * seq_len
    x_fp32 = 4  # RMSNorm upcasts its input to fp32 and saves that copy, whatever the compute dtype
    attention = (2 * h + 2 * kv) * b + 4 * a  # q, k, v, output; fp32 log-sum-exp per head
    if method == "full":
        norms = 2 * (h * x_fp32 + 2 * h * b + 4)  # input, normalized, weight*normalized; rsqrt
        block = norms + attention + 4 * i * b
        first_block = block
        final = h * x_fp32 + 2 * h * b + 4
    else:
        t = _resolve_targets(targets)
        norms = 2 * (h * x_fp32 + 4)
        if ab == b:  # the LoRA path reads the layer's own input: one saved copy per block for q, k, v (and gate, up)
            lin_inputs = (any(n in t for n in ATTENTION_PROJECTIONS) + any(n in t for n in MLP_PROJECTIONS)) * h * b
            lin_inputs += ("down_proj" in t) * i * b
        else:  # x.to(adapter dtype) makes a new tensor in every targeted layer, and that copy is what is saved
            lin_inputs = sum(shape.linear_shapes()[n][1] for n in t) * ab
        mlp = 3 * i * b
        block = norms + lin_inputs + attention + mlp + len(t) * rank * ab
        first_block = block - h * x_fp32 - 4  # layer 0's input comes from the frozen embedding
        final = h * x_fp32 + 4
    final += shape.vocab_size * (b if loss == "chunked" else 4)  # the logits, or their fp32 log-softmax
    if gradient_checkpointing:
        per_token = shape.num_layers * h * b + block + final
    else:
        per_token = first_block + (shape.num_layers - 1) * block + final
    return tokens * per_token


@dataclass
class MemoryEstimate(StepMemory):
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
        head = f"{self.shape.name or 'model'} ({self.shape.n_params / 1e9:.2f}B params), {self.method}, " + ", ".join(
            f"{k}={v}" for k, v in self.settings.items()
        )
        rows = [head] + [f"  {k:<40}{v / MB:>14,.0f} MB" for k, v in self.lines().items()]
        rows.append(f"  {'total':<40}{self.total / MB:>14,.0f} MB")
        if self.paged_optimizer_state:
            rows.append(f"  {'(optimizer state paged to CPU)':<40}{self.paged_optimizer_state / MB:>14,.0f} MB")
        return "\n".join(rows)


def estimate_memory(
    model="7B",
    method: str = "qlora",
    bits: int | None = None,
    rank: int = 64,
    targets="all",
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    dtype: str = "bfloat16",
    blocksize: int = 64,
    double_quant: bool = True,
    adapter_dtype: str = "float32",
    loss: str = "chunked",
) -> MemoryEstimate:
    """Estimate the memory of one training step from shapes alone.

    * ``model``: ``"65B"``, ``"350M"``, a parameter count, a transformers config or model.
    * ``method``: ``"full"`` (every weight trained), ``"lora"`` (frozen base in ``dtype``, adapters),
      ``"qlora"`` (frozen base quantized to ``bits``, adapters in ``adapter_dtype``; QLoRA §3).
    * ``bits``: storage bits of the base weights: 2, 3, 4 or 8 for qlora (default 4; the k-bit codes are
      packed back to back, as ``lorakit.quantize_model`` stores them), 16 or 32 for full
      and lora (default: the bits of ``dtype``, which it then sets).
    * ``rank``, ``targets`` (``"all"`` linear layers of the blocks, or names such as
      ``("q_proj", "v_proj")``): the adapters.
    * ``adapter_dtype``: the dtype of the LoRA adapters, their gradients and the LoRA path's saved
      inputs (``lora`` and ``qlora``). Default ``"float32"``: lorakit's ``add_lora`` and peft
      (``autocast_adapter_dtype=True``) keep adapters in float32 on a bf16/fp16 base, because a
      16-bit adapter's small updates round away (bf16 keeps 8 significant bits). The QLoRA paper's
      script casts them to bf16 (``QLORA_PAPER_SETTING`` says so); with a float32 ``dtype`` both are float32.
    * ``loss``: ``"chunked"`` (lorakit's, :mod:`lorakit.loss`: keeps the logits) or ``"transformers"``
      (keeps a float32 log-softmax of them: the production stack's, and the QLoRA paper's).
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
    if optimizer not in STATE_BYTES_PER_PARAM:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {tuple(STATE_BYTES_PER_PARAM)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {tuple(DTYPE_BYTES)}")
    if adapter_dtype not in DTYPE_BYTES:
        raise ValueError(f"adapter_dtype {adapter_dtype!r}: expected one of {tuple(DTYPE_BYTES)}")
    for arg, value in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if method == "qlora":
        bits = 4 if bits is None else bits
        if bits not in BITS:
            raise ValueError(f"bits={bits} for qlora: the base is quantized to one of {BITS} bits")
    else:
        bits = 8 * DTYPE_BYTES[dtype] if bits is None else bits
        if bits not in (16, 32):
            raise ValueError(
                f"bits={bits} for {method}: weights are stored in 16 or 32 bit (use method='qlora' for 2 to 8 bits)"
            )
        dtype = "float32" if bits == 32 else ("bfloat16" if dtype == "float32" else dtype)
    b = DTYPE_BYTES[dtype]
    ab = b if method == "full" else DTYPE_BYTES[adapter_dtype]  # bytes of a trainable parameter

    if method == "qlora":
        per_layer = sum(
            quantized_bytes(o * i, bits, blocksize, double_quant) for o, i in shape.linear_shapes().values()
        )
        codes = math.ceil(shape.linear_params * bits / 8)
        weights = {
            f"{bits}-bit codes": codes,
            "quantization constants": shape.num_layers * per_layer - codes,
            f"{8 * b}-bit embeddings, lm_head, norms": shape.other_params * b,
        }
    else:
        weights = {f"{bits}-bit weights": shape.n_params * b}
    if method == "full":
        trainable = shape.n_params
    else:
        trainable = lora_params(shape, rank, targets)
        weights["LoRA adapters"] = trainable * ab
    state = trainable * STATE_BYTES_PER_PARAM[optimizer]
    if optimizer == "adamw8bit":
        state += 2 * 4 * math.ceil(trainable / ADAM8BIT_BLOCKSIZE)  # fp32 absmax of m and of v
    paged = 0
    if optimizer == "paged_adamw":  # the pages live in CPU memory; under pressure none stay resident
        state, paged = 0, state
    activations = activation_bytes(
        shape, batch_size, seq_len, method, b, rank, targets, gradient_checkpointing, ab, loss
    )
    settings = dict(
        bits=bits,
        dtype=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        optimizer=optimizer,
        gradient_checkpointing=gradient_checkpointing,
    )
    if method != "full":
        settings.update(
            rank=rank, targets=targets if isinstance(targets, str) else ",".join(targets), adapter_dtype=adapter_dtype
        )
    return MemoryEstimate(shape, method, weights, trainable * ab, state, activations, trainable, paged, settings)


# ----------------------------------------------------------------------------------------------
# Fits or not: the logic of the calculator (lorakit.widgets.memory) and the command line (__main__)
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
        return (
            f"{verdict} in {self.gpu_bytes / GB:g} GB: needs {self.estimate.total / GB:,.2f} GB, "
            f"{'headroom' if self.fits else 'short by'} {abs(self.headroom) / GB:,.2f} GB\n{self.estimate}"
        )


def check_fit(gpu_gb: float, **estimate_kwargs) -> FitCheck:
    """``estimate_memory(**estimate_kwargs)`` against a GPU of ``gpu_gb`` GB (10^9 bytes).

    Framework overheads (CUDA context, allocator fragmentation, temporary buffers) are not in the
    estimate: leave a margin of a GB or so.
    """
    if not gpu_gb > 0:
        raise ValueError(f"gpu_gb must be positive, got {gpu_gb}")
    return FitCheck(estimate_memory(**estimate_kwargs), int(gpu_gb * GB))
