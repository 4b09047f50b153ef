"""Codebooks: the value tables that a k-bit code indexes, derived rather than pasted.

A k-bit data type is a table of ``2**k`` numbers in ``[-1, 1]``; quantizing a block means
scaling it by its absolute maximum and storing, for each value, the index of the nearest table
entry. This module derives the tables used in QLoRA (Dettmers et al., 2023):

- ``nf`` (NormalFloat, QLoRA section 3): equal-probability quantiles of N(0, 1), asymmetric so
  that zero is exact. For k = 4 it equals bitsandbytes' NF4 table bit for bit.
- ``int``: symmetric integers ``-M..M`` over ``M = 2**(k-1) - 1`` (absmax "round to nearest").
- ``fp``: 4-bit float E2M1 in bitsandbytes' bit layout (only k = 4).
- ``dynamic_map()``: the 8-bit dynamic tree type that bitsandbytes uses for the second
  quantization in double quantization (Dettmers, "8-Bit Approximations for Parallelism in Deep
  Learning", ICLR 2016, arXiv:1511.04561).
"""

from __future__ import annotations

import torch

KINDS = ("nf", "int", "fp")  # a codebook's family; "nf4", "int8", "fp4" name a quant_type (kind + bits)
MIN_BITS, MAX_BITS = 2, 8
# The widths the workbook's controls and the fine-tune offer (any of MIN_BITS..MAX_BITS is a valid codebook).
BITS = (2, 3, 4, 8)


def check_codebook(kind: str, bits: int) -> None:
    """Refuse a (kind, bits) pair that names no codebook, saying what is valid (the one home of this check)."""
    if kind not in KINDS:
        raise ValueError(f"codebook kind={kind!r} is not known; valid kinds are {KINDS}")
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"codebook bits must be an int, got {bits!r} ({type(bits).__name__})")
    if kind == "fp" and bits != 4:
        raise ValueError(f"codebook kind='fp' is FP4 (E2M1) only, so bits must be 4, got bits={bits}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"codebook bits={bits} is out of range; valid: {MIN_BITS} to {MAX_BITS}")


def nf_offset(bits: int) -> float:
    """The outermost probability level of NF-k, ``0.9677083`` for k = 4.

    The quantile function is infinite at probability 1, so the outermost level must stop short
    of it. For k = 4 QLoRA and bitsandbytes' ``create_normal_map`` use ``0.9677083``: the average
    of the centres of the last slice when [0, 1] is cut into 15 or 16 equal slices,
    ``(0.966667 + 0.96875) / 2 = 0.96770833...``, rounded to 7 decimals (the unrounded value is one
    float32 step larger and would move some table entries by up to 3e-7). The paper defines NF4
    only; the k-bit rule ``((1 - 1/(2(2^k - 1))) + (1 - 1/(2 * 2^k))) / 2`` is lorakit's
    generalisation of that recipe, and gives back exactly ``0.9677083`` at k = 4.
    """
    levels = 2**bits
    exact = ((1 - 1 / (2 * (levels - 1))) + (1 - 1 / (2 * levels))) / 2
    return round(exact, 7)


def nf_probabilities(bits: int = 4, offset: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability levels whose normal quantiles become NF-k: ``(p_negative, p_positive)``.

    ``p_positive``: ``2**(k-1)`` levels evenly spaced from ``offset`` down to 0.5 (0.5 itself, the
    zero, left out); ``p_negative``: one level fewer. Both float32, as bitsandbytes computes them.
    """
    check_codebook("nf", bits)
    offset = nf_offset(bits) if offset is None else offset
    if not 0.5 < offset < 1.0:
        raise ValueError(f"normal_float offset={offset} must lie in (0.5, 1): it is a probability above the median")
    half = 2 ** (bits - 1)
    p_positive = torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1]  # (half,)
    p_negative = torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1]  # (half - 1,)
    return p_negative, p_positive


def normal_float(bits: int = 4, offset: float | None = None, symmetric: bool = False) -> torch.Tensor:
    """NF-k, QLoRA section 3: ``2**k`` sorted values with an exact zero, ``(2**k,)`` float32.

    The positive half holds the quantiles of N(0, 1) at :func:`nf_probabilities`' ``2**(k-1)``
    levels, the negative half one value fewer, so that with the zero they fill all ``2**k`` codes
    (for k = 4: 8 positive, 7 negative, 1 zero, "the 8/9 split"). Scaled so the largest value is 1.
    Follows bitsandbytes ``create_normal_map(offset, use_extra_value=True)``: probabilities in
    float32, quantiles in float64, normalisation in float32.

    ``symmetric=True`` is the alternative QLoRA rejects (``use_extra_value=False``): ``2**(k-1) - 1``
    values on each side and a zero, one code wasted (stored as a second zero).
    """
    p_negative, p_positive = nf_probabilities(bits, offset)
    if symmetric:
        p_positive = p_negative
    positive = torch.special.ndtri(p_positive.double())  # standard-normal quantiles
    negative = -torch.special.ndtri(p_negative.double())
    zeros = torch.zeros(2 if symmetric else 1, dtype=torch.float64)
    values = torch.cat([negative, zeros, positive]).float().sort().values  # (2**k,)
    return values / values.max()


def normal_float_eq4(bits: int = 4) -> torch.Tensor:
    """The paper's Eq. 4, read literally: ``q_i = (Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))) / 2``.

    QLoRA section 3 defines the NF-k values as averages of neighbouring quantiles of N(0, 1) at
    ``2^k + 1`` equal slices of probability. The two outermost averages involve ``Q(0) = -inf`` and
    ``Q(1) = +inf``, so only the ``2^k - 1`` inner ones (``i = 1 .. 2^k - 1``) are finite; they are
    symmetric with an exact zero in the middle. Scaled so the largest is 1: ``(2**k - 1,)`` float32.
    What bitsandbytes builds (:func:`normal_float`, ``create_normal_map``) differs: quantiles at
    evenly spaced probabilities from an offset down to 0.5, 8 positive and 7 negative.
    """
    check_codebook("nf", bits)
    slices = 2**bits + 1
    edges = torch.arange(1, slices, dtype=torch.float64) / slices  # (2^k,): i / (2^k + 1), i = 1 .. 2^k
    quantiles = torch.special.ndtri(edges)  # finite: 0 < p < 1
    values = (quantiles[:-1] + quantiles[1:]) / 2  # (2^k - 1,)
    return (values / values.max()).float()


def integer(bits: int = 4) -> torch.Tensor:
    """Symmetric Int-k: ``(-M..-1, -0, 0, 1..M) / M`` with ``M = 2**(k-1) - 1``, ``(2**k,)`` float32.

    Symmetric absmax integers use only ``2**k - 1`` distinct levels; the spare code is a second
    (negative) zero, as in bitsandbytes' ``get_4bit_type("int4")``.
    """
    check_codebook("int", bits)
    m = 2 ** (bits - 1) - 1
    negative = [float(-i) for i in range(m, 0, -1)]
    positive = [float(i) for i in range(1, m + 1)]
    values = torch.tensor(negative + [-0.0, 0.0] + positive, dtype=torch.float32)  # (2**k,)
    return values / m


def fp4() -> torch.Tensor:
    """FP4 (E2M1) in bitsandbytes' layout: entry ``c`` is the value of 4-bit code ``c``, ``(16,)``.

    Bit 3 is the sign, bits 2-1 the exponent field ``e``, bit 0 the mantissa ``m``. A zero
    exponent field is subnormal, ``m * 2**-4``; otherwise the value is ``(1 + m/2) * 2**(4 - e)``
    (bitsandbytes stores larger exponents under smaller fields: ``0b010`` is 8, ``0b110`` is 2).
    The table is divided by its largest magnitude (12) so it spans [-1, 1]; it is *not* sorted.
    """
    values = []
    for c in range(16):
        sign = -1.0 if c & 0b1000 else 1.0
        e, m = (c >> 1) & 0b11, c & 0b1
        magnitude = m * 2.0**-4 if e == 0 else (1 + m / 2) * 2.0 ** (4 - e)
        values.append(sign * magnitude)  # sign * 0.0 keeps -0.0 for code 8, as bitsandbytes
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.abs().max()


def codebook(kind: str = "nf", bits: int | None = None) -> torch.Tensor:
    """The value table of a k-bit data type, ``(2**bits,)`` float32; ``codebook("nf", 4)`` is NF4.

    ``kind`` is ``"nf"``, ``"int"`` or ``"fp"``; a width may be written into it (``"nf4"``), in
    which case ``bits`` may be left out or must agree. Without either, 4 bits.
    """
    kind, bits = parse_kind(kind, bits)
    if kind == "nf":
        return normal_float(bits)
    if kind == "int":
        return integer(bits)
    return fp4()


def parse_kind(kind: str, bits: int | None = None) -> tuple[str, int]:
    """Split ``"nf4"`` into ``("nf", 4)``; a bare family (``"nf"``) takes ``bits`` (default 4).

    A width written into ``kind`` that disagrees with ``bits`` is an error, never silently ignored.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string such as 'nf4', got {kind!r}")
    family = kind.rstrip("0123456789").lower()
    digits = kind[len(family) :]
    if digits:
        if bits is not None and int(digits) != bits:
            raise ValueError(f"kind={kind!r} says {digits} bits but bits={bits}; pass kind={family!r} with bits={bits}")
        bits = int(digits)
    bits = 4 if bits is None else bits
    check_codebook(family, bits)
    return family, bits


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic data type, sorted, in [-1, 1] (signed) or [0, 1]: always ``(256,)`` float32.

    For exponent ``e = 0 .. max_exponent_bits-1`` the code book holds a linear grid of fractions
    scaled by ``10 ** (e - (max_exponent_bits - 1))``: the smaller the exponent, the fewer
    fraction bits are left (``2**e`` grid points signed, ``2**(e+1)`` unsigned, for 8 bits and
    7 exponent bits). Each grid point is the midpoint of ``linspace(0.1, 1, n + 1)``. Then 0 and 1
    are added: ``2**total_bits`` values, and for ``total_bits < 8`` the rest of the 256 slots are
    padded with 0, as bitsandbytes' ``create_dynamic_map`` pads them (its kernels index a
    256-entry table whatever the width).
    """
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # codes when all exponent bits are zero
    for e in range(max_exponent_bits):
        n = (
            2 ** (e + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (e + non_sign_bits - max_exponent_bits + 1) + 1
        )
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0  # the midpoints of the grid
        scale = 10 ** (-(max_exponent_bits - 1) + e)
        values += (scale * fractions).tolist()
        if signed:
            values += (-scale * fractions).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        fractions = (edges[:-1] + edges[1:]) / 2.0
        # bitsandbytes writes 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1), which is 10 ** 0:
        # the codes with every exponent bit zero are a linear grid on [0.1, 1] itself.
        scale = 1.0
        values += (scale * fractions).tolist()
        if signed:
            values += (-scale * fractions).tolist()
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"dynamic map: {len(values)} values for {total_bits} bits "
            f"(max_exponent_bits={max_exponent_bits}, signed={signed})"
        )
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic tree type (bitsandbytes ``create_dynamic_map()``), ``(256,)`` float32.

    Each exponent ``10**(i-6)`` (i = 0..6) gets ``2**i`` linearly spaced fractions in [0.1, 1]
    (bin centres), with both signs; add 0 and 1. Fine near zero, coarse near one. Used to store
    the absmax constants in 8 bits in double quantization (QLoRA section 3), and Adam's first
    moment in 8-bit optimizers.
    """
    return create_dynamic_map(signed=True)


def widest_gap(table: torch.Tensor) -> float:
    """The widest gap between neighbouring values of a codebook (for the round-trip bound)."""
    ordered = table.float().sort().values
    return float((ordered[1:] - ordered[:-1]).max())
