"""Blockwise absmax quantization to a k-bit codebook, and the bitsandbytes-named 4-bit API.

QLoRA section 2 ("Block-wise k-bit Quantization"): cut the flattened weight into blocks of
``blocksize`` values, scale each block by its absolute maximum into [-1, 1], and store the index of
the nearest codebook value. An outlier then spoils only its own block, not the whole tensor.

Bit-identical with ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on the CPU
(bitsandbytes 0.50.2: the CPU backend has no 4-bit quantize kernel of its own, so the
``default`` torch kernel in ``backends/default/ops.py`` runs; dequantization computes
``table[code] * absmax`` in float32, then casts, as both its kernels do). One exception: for a
2-D tensor whose row length is not a multiple of the blocksize, bitsandbytes' native CPU
dequantize kernel decodes some values with the wrong block's absmax; there we equal its
quantizer's layout and its pure-PyTorch kernel instead (tests/test_quantization.py).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

from lorakit.codebooks import codebook, parse_kind
from lorakit.double_quant import SecondLevelState, dequantize_absmax, quantize_absmax

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class QuantState:
    """Everything besides the packed codes that dequantization needs (bitsandbytes ``QuantState``).

    absmax: (n_blocks,) float32, or uint8 when double-quantized (then ``offset`` and ``state2``
    undo the second level); shape/dtype: of the original tensor; code: (2**bits,) the codebook.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    quant_type: str  # "nf4", "fp4", "int3", ...
    bits: int = 4
    offset: torch.Tensor | None = None
    state2: SecondLevelState | None = None

    @property
    def nested(self) -> bool:
        """True when the absmax constants are double-quantized."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------- checks that teach
def check_blocksize(blocksize: int) -> None:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize < 1 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize={blocksize!r} is not a power of two; use e.g. 64 (QLoRA), 128 or 4096")


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {w.dtype}; blockwise quantization takes float32, bfloat16 or float16")
    if w.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(w.shape)}); there is nothing to quantize")


def _raise_not_finite(w: torch.Tensor, name: str) -> None:
    nan = int(torch.isnan(w).sum())
    inf = int(torch.isinf(w).sum())
    raise ValueError(
        f"{name} (shape {tuple(w.shape)}) has {nan} NaN and {inf} Inf values out of {w.numel()}; "
        "absmax quantization needs finite numbers (check the checkpoint or the step that produced it)"
    )


def packed_numel(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits each, packed back to back."""
    return -(n * bits // -8)


def check_state(packed: torch.Tensor, state: QuantState) -> None:
    """Raise if ``state`` cannot belong to ``packed`` (sizes that disagree, wrong dtypes)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a lorakit QuantState (from quantize_4bit), got {type(state).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    n = state.numel
    n_blocks = -(n // -state.blocksize)
    expected = packed_numel(n, state.bits)
    if packed.numel() != expected:
        raise ValueError(
            f"this state belongs to a tensor of shape {tuple(state.shape)} at {state.bits} bits "
            f"({expected} packed bytes), but the packed tensor has {packed.numel()} bytes"
        )
    if state.absmax.numel() != n_blocks:
        raise ValueError(
            f"state.absmax has {state.absmax.numel()} constants but shape {tuple(state.shape)} "
            f"with blocksize {state.blocksize} needs {n_blocks}"
        )
    if state.code.numel() != 2**state.bits:
        raise ValueError(f"state.code has {state.code.numel()} entries, expected 2**{state.bits}")
    if state.nested and state.absmax.dtype != torch.uint8:
        raise ValueError(f"a double-quantized state needs uint8 absmax codes, got {state.absmax.dtype}")


# ---------------------------------------------------------------- the algorithm
def absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block into [-1, 1]: (n,) float32 -> (scaled (n,), absmax (n_blocks,) float32).

    Written exactly as bitsandbytes' default ``quantize_4bit`` kernel, because values that land
    near a code midpoint depend on the arithmetic: full blocks are multiplied by ``1 / absmax``,
    the last, partial block is *divided* by its absmax; a zero absmax is clamped to 1e-38 before
    use (and the clamped value is stored only for the partial block). The clamp to [-1, 1] is
    skipped: it never changes which code a value gets.
    """
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_full_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).view(-1)  # (full,)
    if rem:
        last = flat[full:].abs().max().clamp(min=1e-38)  # 0-dim
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, flat[full:] / last])
    return scaled, absmax


def nearest_code(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table value: (n,) float32 -> (n,) uint8.

    ``bucketize`` against the midpoints of the sorted table (bitsandbytes ``_get_4bit_quantize_bounds``):
    a value exactly on a midpoint takes the lower code. FP4's table is not sorted, so the bucket
    index is mapped back through the sorting order.
    """
    order = torch.argsort(table)
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2  # (2**bits - 1,)
    bucket = torch.bucketize(scaled, midpoints, out_int32=True)
    if not torch.equal(order, torch.arange(table.numel(), device=order.device)):
        bucket = order[bucket]
    return bucket.to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack k-bit codes back to back, first code in the high bits: (n,) uint8 -> (bytes, 1) uint8.

    For 4 bits that is bitsandbytes' order, ``(q[0::2] << 4) | q[1::2]``; other widths fill the
    last byte with zero bits. (quantize_blockwise appends the code of 0.0 to an odd count of 4-bit
    codes first, as bitsandbytes does: NF4 code 7, FP4 code 0.)
    """
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        return ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)
    if bits == 8:
        return codes.view(-1, 1).clone()
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.uint8, device=codes.device)  # (bits,), most significant first
    stream = ((codes.view(-1, 1) >> shifts) & 1).view(-1)  # (n * bits,) one bit each
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = 1 << torch.arange(7, -1, -1, dtype=torch.int32, device=codes.device)  # (8,)
    return (stream.view(-1, 8).int() * weights).sum(dim=1).to(torch.uint8).view(-1, 1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (bytes, 1) uint8 -> (n,) uint8."""
    flat = packed.reshape(-1)
    if bits == 4:
        return torch.stack([flat >> 4, flat & 0xF], dim=1).view(-1)[:n]
    if bits == 8:
        return flat[:n]
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=flat.device)
    stream = ((flat.view(-1, 1) >> shifts) & 1).view(-1)[: n * bits]  # (n * bits,)
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int32, device=flat.device)  # (bits,)
    return (stream.view(n, bits).int() * weights).sum(dim=1).to(torch.uint8)


def quantize_blockwise(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    bits: int | None = None,
    name: str = "weight",
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` (any shape) to a k-bit codebook in blocks: -> (packed (bytes, 1) uint8, state).

    ``quant_type`` names the codebook (``"nf4"``, ``"fp4"``, ``"int8"``, or a family ``"nf"`` /
    ``"int"`` with ``bits``). ``double_quant`` also quantizes the absmax constants (QLoRA section 3).
    ``name`` is used in error messages.
    """
    check_weight(w, name)
    check_blocksize(blocksize)
    kind, bits = parse_kind(quant_type, bits)
    table = codebook(kind, bits).to(w.device)  # (2**bits,)
    flat = w.detach().reshape(-1).float()  # (n,), exact for bf16 and fp16
    scaled, absmax = absmax_scale(flat, blocksize)
    if not torch.isfinite(absmax).all():  # a NaN or Inf anywhere shows up in its block's absmax
        _raise_not_finite(w, name)
    if bits == 4 and scaled.numel() % 2:  # bitsandbytes pads the *scaled* values with a 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    packed = pack_codes(nearest_code(scaled, table), bits)
    state = QuantState(absmax, w.shape, w.dtype, blocksize, table, f"{kind}{bits}", bits)
    if double_quant:
        state.absmax, state.offset, state.state2 = quantize_absmax(absmax)
    return packed, state


# book: dequantize, the reference (book/source/blockwise.md shows the lines down to its end marker)
def dequantize_blockwise_reference(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """``code[q] * absmax`` of each value's block, in float32, rounded once to ``state.dtype``.

    The definition of dequantization in one pass over the whole tensor (so with a float32 copy of
    it). :func:`dequantize_blockwise` computes the same bits in steps of whole blocks (tests/test_quantization.py).
    """
    check_state(packed, state)
    absmax = state.absmax  # (n_blocks,)
    if state.nested:
        absmax = dequantize_absmax(state.absmax, state.offset, state.state2)
    codes = unpack_codes(packed, state.bits, state.numel).long()  # (n,)
    scale = absmax.repeat_interleave(state.blocksize)[: state.numel]  # (n,) each value's block absmax
    return (state.code[codes] * scale).to(state.dtype).view(state.shape)


# book: end of dequantize, the reference


# Values decoded per step of dequantize_blockwise: 2**20 float32 = 4 MiB of scratch, and 4 MiB of int64
# indices (one per packed byte). That holds every weight matrix of SmolLM2 in one step (fewer, larger
# operations: each torch call costs some microseconds, whatever its size). A power of two (at least
# 2), so each step holds whole blocks and an even count.
DEQUANT_STEP = 1 << 20
# torch spreads a gather over its threads by the index's other dimensions, so a 1-D one runs on one thread.
# Cut into up to this many rows, a (1536, 576) weight's gather took 93 us instead of 167 us on 2 threads.
GATHER_ROWS = 16


def byte_pairs(code: torch.Tensor) -> torch.Tensor:
    """The two values that each byte of packed 4-bit codes stands for: (16,) -> (256, 2) float32.

    ``pairs[b] = (code[b >> 4], code[b & 15])`` (first code in the high bits, as bitsandbytes packs
    them), so decoding packed bytes is a single gather of rows, with no unpacking step.
    """
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)  # (256, 2)


_pair_tables: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(code) -> (code, its version, table)


def _byte_pair_words(code: torch.Tensor) -> torch.Tensor:
    """``byte_pairs(code)`` as (256,) int64 words, built once and kept while ``code`` lives unchanged.

    A training step dequantizes hundreds of times with each layer's same ``code`` tensor: building the
    table anew each time would add a dozen small torch calls to each. The table is built again when the
    code changes in place (its version moves); it is dropped when the code tensor is freed (a weak
    reference). Never written to: callers only read it.
    """
    if code.is_inference():  # made under torch.inference_mode: no version counter tells a change, so no cache
        return byte_pairs(code).view(torch.int64).view(-1)
    key = id(code)
    entry = _pair_tables.get(key)
    if entry is None or entry[0]() is not code or entry[1] != code._version:
        table = byte_pairs(code).view(torch.int64).view(-1)  # (256,) one 8-byte word per byte
        gone = weakref.ref(code, lambda _, key=key: _pair_tables.pop(key, None))
        _pair_tables[key] = entry = (gone, code._version, table)
    return entry[2]


_kept = threading.local()  # each thread's scratch buffers: {(name, dtype, device): tensor}


def scratch_buffer(name: str, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``(size,)`` tensor of uninitialised scratch, the same memory at every call with the same name,
    dtype and device on this thread (grown when a call needs more). For work that is done within one call."""
    kept = _kept.__dict__.setdefault("buffers", {})
    key = (name, dtype, torch.device(device))
    # A buffer made under torch.inference_mode cannot be written outside it: such a one is replaced.
    stale = key in kept and kept[key].is_inference() and not torch.is_inference_mode_enabled()
    if key not in kept or kept[key].numel() < size or stale:
        kept[key] = torch.empty(size, dtype=dtype, device=device)
    return kept[key][:size]


def decoded_numel(state: QuantState) -> int:
    """How many values :func:`dequantize_blockwise` writes: ``state.numel``, rounded up to even at 4 bits
    (a byte holds two codes; the spare past an odd ``numel`` is scratch)."""
    return state.numel + state.numel % 2 if state.bits == 4 else state.numel


def dequantize_blockwise(packed: torch.Tensor, state: QuantState, out: torch.Tensor | None = None) -> torch.Tensor:
    """``code[q] * absmax`` per block in float32, cast to ``state.dtype``, in ``state.shape``: the
    numbers of :func:`dequantize_blockwise_reference`, bit for bit, without its float32 copy.

    The work goes in steps of :data:`DEQUANT_STEP` values (whole blocks): decode the codes into a
    float32 scratch of one step's size, multiply each block by its absmax there, and write
    the step into the output, rounding to its dtype once, as bitsandbytes' kernels do (the result is
    bit-identical). So a bfloat16 weight never exists as a full float32 copy. A float32 output needs
    no rounding, and is decoded into directly.

    Four details make it fast. The scratch and the step's indices (the codes as int64) live in
    buffers kept for the next call (:func:`scratch_buffer`): a fresh tensor for each would cost new
    memory pages each time, hundreds of times in a training step. A 4-bit byte's two float32 values
    are gathered as one 8-byte word (``byte_pairs`` viewed as int64): a gather of single elements is
    several times faster than one of 2-value rows. That table is built once per codebook
    (``_byte_pair_words``), not at every call, and is small enough (2 KiB) to stay in the fastest
    cache between calls. And the gather is cut into rows (:data:`GATHER_ROWS`), which torch spreads
    over its threads (``index_select`` of a 1-D table runs on one).

    ``out``: a contiguous ``(decoded_numel(state),)`` tensor of ``state.dtype`` to write into (a
    buffer ``Linear4bit.dequantize_for_matmul`` reuses); by default a new tensor.
    """
    check_state(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = dequantize_absmax(state.absmax, state.offset, state.state2)  # (n_blocks,) float32
    n, blocksize, decoded = state.numel, state.blocksize, decoded_numel(state)
    if state.bits == 4:  # one index per byte, one 8-byte word (two float32 values) per index
        table = _byte_pair_words(state.code)  # (256,) int64
        source, per_index = packed.view(-1), 2
    else:
        table, source, per_index = state.code, unpack_codes(packed, state.bits, n), 1  # (2**bits,), (n,) uint8
    step = max(DEQUANT_STEP // blocksize, 1) * blocksize  # whole blocks (and an even count)
    if out is None:
        out = torch.empty(decoded, dtype=state.dtype, device=packed.device)  # (n,) + a spare for an odd 4-bit count
    elif out.shape != (decoded,) or out.dtype != state.dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous ({decoded},) {state.dtype} tensor, got {tuple(out.shape)} {out.dtype}"
        )
    direct = state.dtype == torch.float32 and out.storage_offset() % per_index == 0  # decode into the output
    count = min(step, decoded)  # values decoded per step
    scratch = None if direct else scratch_buffer("values", count, torch.float32, packed.device)  # (count,)
    index = scratch_buffer("indices", count // per_index, torch.int64, packed.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        first_index, end_index = start // per_index, -(stop // -per_index)  # a 4-bit step holds whole bytes
        size = (end_index - first_index) * per_index  # values decoded: stop - start, + 1 for an odd 4-bit count
        buffer = out[start : start + size] if direct else scratch[:size]  # (size,) float32
        indices = index[: end_index - first_index]
        indices.copy_(source[first_index:end_index])  # uint8 -> int64 (gather takes int32 too, but ran 1.4x slower)
        rows = math.gcd(indices.numel(), GATHER_ROWS)  # 4 bits: (size / 2,) int64 words, in rows
        torch.gather(table.expand(rows, -1), 1, indices.view(rows, -1), out=buffer.view(table.dtype).view(rows, -1))
        values = buffer[: stop - start]  # (stop - start,)
        full = (stop - start) // blocksize * blocksize  # the last step may end in a partial block
        first = start // blocksize
        values[:full].view(-1, blocksize).mul_(absmax[first : first + full // blocksize].view(-1, 1))
        if full < stop - start:
            values[full:].mul_(absmax[-1])
        if not direct:
            out[start:stop] = values  # the one rounding to state.dtype
    return out[:n].view(state.shape)


# ---------------------------------------------------------------- bitsandbytes-named API
def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """4-bit blockwise quantization, ``bitsandbytes.functional.quantize_4bit`` by another name.

    ``quant_type``: ``"nf4"``, ``"fp4"`` or ``"int4"``; ``double_quant`` is bitsandbytes'
    ``compress_statistics``. Returns ``packed: ((n + 1) // 2, 1) uint8`` and the state.
    """
    kind, bits = parse_kind(quant_type, 4)
    return quantize_blockwise(w, f"{kind}{bits}", blocksize, double_quant)


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo :func:`quantize_4bit` (``bitsandbytes.functional.dequantize_4bit``)."""
    return dequantize_blockwise(packed, state)


# ---------------------------------------------------------------- honest storage accounting
@dataclass
class Storage:
    """Bytes of each stored tensor, and bits per parameter from those byte counts."""

    n_params: int
    code_bytes: int  # the packed k-bit codes
    absmax_bytes: int  # one constant per block (float32, or uint8 when double-quantized)
    absmax2_bytes: int  # one float32 per 256 constants (double quantization only)
    constant_bytes: int  # per-tensor constants: codebooks and the offset

    @property
    def bits_per_parameter(self) -> float:
        """Per-block storage only, as QLoRA counts it: 4 + 32/64 = 4.5, or 4 + 8/64 + 32/(64*256)."""
        return 8 * (self.code_bytes + self.absmax_bytes + self.absmax2_bytes) / self.n_params

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.absmax_bytes + self.absmax2_bytes + self.constant_bytes


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def storage(packed: torch.Tensor, state: QuantState) -> Storage:
    """Count the bytes of the real tensors that hold a quantized weight."""
    check_state(packed, state)
    second = state.state2
    return Storage(
        n_params=state.numel,
        code_bytes=_nbytes(packed),
        absmax_bytes=_nbytes(state.absmax),
        absmax2_bytes=_nbytes(second.absmax) if second else 0,
        constant_bytes=_nbytes(state.code) + _nbytes(state.offset) + (_nbytes(second.code) if second else 0),
    )


# ---------------------------------------------------------------- affine (zero-point) Int-k
@dataclass
class AffineQuant:
    """Affine Int-k per block: ``x ~ scale * q + minimum``, ``q`` in ``0 .. 2**k - 1``.

    The integer baseline that GPTQ, AWQ and llama.cpp use (llama.cpp's Q4_1 is k = 4, blocks of 32,
    ``scale`` and ``minimum`` in float16). Unlike symmetric absmax (:func:`lorakit.codebooks.integer`),
    all ``2**k`` levels are used and they span ``[min, max]`` of the block, not ``[-absmax, absmax]``.
    codes: (n,) uint8, unpacked; scale, minimum: (n_blocks,) in ``constants_dtype``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: torch.Size
    bits: int
    blocksize: int

    def dequantize(self) -> torch.Tensor:
        """``scale * q + minimum`` in float32, reshaped to the original tensor's shape."""
        q = self.codes.float().view(-1, self.blocksize)  # (n_blocks, blocksize)
        w = q * self.scale.float().view(-1, 1) + self.minimum.float().view(-1, 1)
        return w.view(-1)[: math.prod(self.shape)].view(self.shape)

    @property
    def bits_per_parameter(self) -> float:
        """k bits per code plus the two per-block constants, from the stored tensors' byte sizes."""
        n = math.prod(self.shape)
        constant_bytes = _nbytes(self.scale) + _nbytes(self.minimum)
        return self.bits + 8 * constant_bytes / n


def quantize_affine(
    w: torch.Tensor, bits: int = 4, blocksize: int = 64, constants_dtype: torch.dtype = torch.float16
) -> AffineQuant:
    """Affine (zero-point) Int-k quantization per block, written as llama.cpp's ``quantize_row_q4_1``.

    Per block: ``d = (max - min) / (2**k - 1)``, ``q = trunc((x - min) / d + 0.5)`` clipped to
    ``0 .. 2**k - 1``; ``d`` and ``min`` are then stored in ``constants_dtype`` (float16 in Q4_1).
    With k = 4, blocksize 32 and float16 it reproduces ``gguf.quants`` Q4_1 (tests/test_quantization.py).
    At blocksize 64 with float16 constants it costs 4.5 bits per parameter, the same as NF4 with a
    float32 absmax, so the two compare at equal memory.
    """
    check_blocksize(blocksize)
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"affine bits={bits!r} is out of range; valid: 2 to 8")
    check_weight(w)
    flat = w.detach().reshape(-1).float()  # (n,)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad), value=float(flat[-1])).view(-1, blocksize)  # (n_blocks, B)
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)  # (n_blocks, 1)
    levels = 2**bits - 1
    d = (hi - lo) / levels
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    codes = torch.trunc((blocks - lo) * inverse + 0.5).clamp(0, levels).to(torch.uint8)  # (n_blocks, B)
    return AffineQuant(
        codes.view(-1), d.view(-1).to(constants_dtype), lo.view(-1).to(constants_dtype), w.shape, bits, blocksize
    )
