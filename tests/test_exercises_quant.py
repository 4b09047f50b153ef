"""The "Build it" checkers of notebooks 03 and 04 accept the right solution and reject plausible wrong ones.

Each wrong solution is a mistake a learner makes; the checker must reject it with a message that names the failing
case (``case k of n (...)``) and says what is wrong. The right solutions are the notebooks' own.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit import codebook, dynamic_map
from lorakit.exercises import (
    check,
    check_absmax_dequantize,
    check_absmax_quantize,
    check_bits_per_parameter_formula,
    check_blockwise_dequantize,
    check_blockwise_quantize,
    check_double_quantize,
    check_nf_table,
    check_quantize_nf4,
)


# ------------------------------------------------------------------ 03: one block
def absmax_quantize(x):
    x = x.float()
    scale = x.abs().max() / 127
    return torch.round(x / scale).to(torch.int8), scale


def absmax_dequantize(codes, scale):
    return codes.float() * scale


def test_absmax_quantize_accepts_the_solution():
    assert check_absmax_quantize(absmax_quantize).startswith("correct")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda x: (torch.round(x / x.abs().max()).to(torch.int8), x.abs().max()), r"case 1 of 4 .*scale = absmax"),
        (lambda x: ((x / (x.abs().max() / 127)).to(torch.int8), x.abs().max() / 127), r"case 1 of 4 .*truncated"),
        (
            lambda x: (torch.round(x / (x.max() / 127)).to(torch.int8), x.max() / 127),
            r"case 1 of 4 .*x\.abs\(\)\.max\(\) \(here it is negative\)",
        ),
        (lambda x: (torch.round(x / (x.abs().max() / 127)), x.abs().max() / 127), r"case 1 of 4 .*torch\.int8"),
        (
            lambda x: (torch.round(x / (x.abs().max() / 127)).to(torch.int8), x.abs().max() / 127),
            r"case 4 of 4 \(300 weights in bfloat16\).*x\.float\(\)",
        ),
    ],
    ids=["scale-is-absmax", "no-rounding", "max-not-absmax", "float-codes", "bfloat16-arithmetic"],
)
def test_absmax_quantize_rejects(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_absmax_quantize(wrong)


def test_absmax_dequantize():
    assert check_absmax_dequantize(absmax_dequantize).startswith("correct")
    with pytest.raises(AssertionError, match=r"case 1 of 4 .*x_hat = codes \* scale"):
        check_absmax_dequantize(lambda codes, scale: codes.float() / scale)
    with pytest.raises(AssertionError, match=r"case 1 of 4 .*already holds the 1/127"):
        check_absmax_dequantize(lambda codes, scale: codes.float() * scale * 127)
    with pytest.raises(AssertionError, match=r"case 1 of 4 .*dtype torch.int8"):
        check_absmax_dequantize(lambda codes, scale: codes)


# ------------------------------------------------------------------ 03: blockwise
def blockwise_quantize(w, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)  # zero padding never raises an absmax
    absmax = blocks.abs().amax(dim=1)
    codes = torch.round(blocks / absmax.view(-1, 1) * m).to(torch.int8)
    return codes.view(-1)[:n], absmax


def blockwise_dequantize(codes, absmax, shape, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    scale = absmax.repeat_interleave(blocksize)[: codes.numel()]
    return (codes.float() / m * scale).view(shape)


def drops_partial_block(w, blocksize=64, bits=8):
    flat = w.reshape(-1)
    return blockwise_quantize(flat[: flat.numel() // blocksize * blocksize], blocksize, bits)


def keeps_padding(w, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    flat = w.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    return torch.round(blocks / absmax.view(-1, 1) * m).to(torch.int8).view(-1), absmax


def one_scale(w, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    flat = w.reshape(-1).float()
    absmax = flat.abs().max()
    n_blocks = -(flat.numel() // -blocksize)
    return torch.round(flat / absmax * m).to(torch.int8), absmax.repeat(n_blocks)


def truncates(w, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    codes, absmax = blockwise_quantize(w, blocksize, bits)
    scale = absmax.repeat_interleave(blocksize)[: w.numel()] / m
    return (w.reshape(-1).float() / scale).to(torch.int8), absmax


def signed_max(w, blocksize=64, bits=8):
    m = 2 ** (bits - 1) - 1
    flat = w.reshape(-1).float()
    blocks = F.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    absmax = blocks.amax(dim=1)  # the largest value, not the largest magnitude
    return torch.round(blocks / absmax.view(-1, 1) * m).clamp(-m, m).to(torch.int8).view(-1)[: flat.numel()], absmax


def test_blockwise_quantize_accepts_the_solution():
    assert check_blockwise_quantize(blockwise_quantize).startswith("correct")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (drops_partial_block, r"case 2 of 4 .*the partial last block of 44 was dropped"),
        (keeps_padding, r"case 2 of 4 .*cropped off"),
        (one_scale, r"case 1 of 4 .*the whole tensor's"),
        (truncates, r"case 1 of 4 .*truncated toward zero"),
        (signed_max, r"case 1 of 4 .*its largest value; absmax is the largest magnitude"),
    ],
    ids=["partial-block-dropped", "padding-kept", "one-scale", "no-rounding", "max-not-absmax"],
)
def test_blockwise_quantize_rejects(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_blockwise_quantize(wrong)


def test_blockwise_dequantize():
    assert check_blockwise_dequantize(blockwise_dequantize).startswith("correct")

    def no_division(codes, absmax, shape, blocksize=64, bits=8):
        return (codes.float() * absmax.repeat_interleave(blocksize)[: codes.numel()]).view(shape)

    def first_absmax_for_the_tail(codes, absmax, shape, blocksize=64, bits=8):
        n, full = codes.numel(), codes.numel() // blocksize
        scale = torch.cat([absmax[:full].repeat_interleave(blocksize), absmax[:1].expand(n - full * blocksize)])
        return (codes.float() / (2 ** (bits - 1) - 1) * scale).view(shape)

    with pytest.raises(AssertionError, match=r"case 1 of 3 .*divide the codes by M = 127"):
        check_blockwise_dequantize(no_division)
    with pytest.raises(AssertionError, match=r"case 2 of 3 .*only the partial last block is wrong"):
        check_blockwise_dequantize(first_absmax_for_the_tail)


# ------------------------------------------------------------------ 04: the NF table
def nf_table(bits=4, offset=0.9677083):
    half = 2 ** (bits - 1)
    p_positive = torch.linspace(offset, 0.5, half + 1)[:-1]  # (half,) float32
    p_negative = torch.linspace(offset, 0.5, half)[:-1]  # (half - 1,)
    positive = torch.special.ndtri(p_positive.double())
    negative = -torch.special.ndtri(p_negative.double())
    table = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (table / table.max()).float()


def not_normalized(bits=4, offset=0.9677083):
    return nf_table(bits, offset) * torch.special.ndtri(torch.tensor(offset, dtype=torch.float64)).float()


def symmetric_with_zero(bits=4, offset=0.9677083):
    p = torch.linspace(offset, 0.5, 2 ** (bits - 1) + 1)[:-1].double()
    table = torch.cat([-torch.special.ndtri(p), torch.zeros(1, dtype=torch.float64), torch.special.ndtri(p)])
    return (table.sort().values / table.max()).float()


def symmetric_without_zero(bits=4, offset=0.9677083):
    table = symmetric_with_zero(bits, offset)
    return table[table != 0]


def evenly_spaced_probabilities(bits=4, offset=0.9677083):
    table = torch.special.ndtri((torch.arange(2**bits, dtype=torch.float64) + 0.5) / 2**bits)
    return (table / table.max()).float()


def mirrored_negative_half(bits=4, offset=0.9677083):
    p = torch.linspace(offset, 0.5, 2 ** (bits - 1) + 1)[:-1].double()
    positive = torch.special.ndtri(p)
    table = torch.cat([-positive[:-1], torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (table / table.max()).float()


def ignores_offset(bits=4, offset=0.9677083):
    return nf_table(bits, 0.9677083)


def test_nf_table_accepts_the_solution():
    assert check_nf_table(nf_table).startswith("correct")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (not_normalized, r"case 1 of 3 .*expected \[-1, 1\]"),
        (symmetric_with_zero, r"case 1 of 3 .*got 17; 8 positive, 8 negative"),
        (symmetric_without_zero, r"case 1 of 3 .*8 positive values, 0 zeros and 8 negative"),
        (evenly_spaced_probabilities, r"case 1 of 3 .*8 positive values, 0 zeros and 8 negative"),
        (mirrored_negative_half, r"case 1 of 3 .*negative half"),
        (ignores_offset, r"case 2 of 3 \(bits=4, offset=0.95.*use the offset argument"),
    ],
    ids=["not-normalized", "symmetric-8-8-and-zero", "symmetric-8-8", "evenly-spaced", "mirrored", "offset-ignored"],
)
def test_nf_table_rejects(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_nf_table(wrong)


# ------------------------------------------------------------------ 04: blockwise NF4, two codes per byte
def quantize_nf4(w, blocksize=64, low_first=False, pad_code=None, drop_odd=False):
    nf4 = codebook("nf", 4)  # (16,)
    flat = w.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.view(-1, 1)).view(-1)[:n]
    if n % 2:
        scaled = scaled[:-1] if drop_odd else F.pad(scaled, (0, 1))  # bitsandbytes pads with 0.0
    codes = (scaled.view(-1, 1) - nf4).abs().argmin(dim=1).to(torch.uint8)
    if pad_code is not None and n % 2:
        codes[-1] = pad_code
    first, second = (codes[1::2], codes[0::2]) if low_first else (codes[0::2], codes[1::2])
    return (first << 4) | second, absmax


def partial_block_absmax_dropped(w, blocksize=64):
    packed, absmax = quantize_nf4(w, blocksize)
    return packed, absmax[: w.numel() // blocksize]


def no_float32(w, blocksize=64):
    nf4 = codebook("nf", 4).to(w.dtype)
    flat = w.reshape(-1)
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = F.pad((blocks / absmax.view(-1, 1)).view(-1)[:n], (0, n % 2))
    codes = (scaled.view(-1, 1) - nf4).abs().argmin(dim=1).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def test_quantize_nf4_accepts_the_solution():
    assert check_quantize_nf4(quantize_nf4).startswith("correct")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda w, b: quantize_nf4(w, b, low_first=True), r"case 1 of 4 .*low nibble"),
        (lambda w, b: quantize_nf4(w, b, drop_odd=True), r"case 3 of 4 .*odd count of 63 codes: the last code is lost"),
        (lambda w, b: quantize_nf4(w, b, pad_code=0), r"case 3 of 4 .*padding.*you stored 0"),
        (no_float32, r"case 4 of 4 .*bfloat16.*absmax has dtype torch.bfloat16"),
        (partial_block_absmax_dropped, r"case 2 of 4 .*partial last block of 22 values needs its own absmax"),
        (lambda w, b: (quantize_nf4(w, b)[0].repeat_interleave(2), quantize_nf4(w, b)[1]), r"case 1 of 4 .*two 4-bit"),
        (
            lambda w, b: quantize_nf4(w.reshape(-1), w.numel()),
            r"case 1 of 4 .*1 absmax constants, expected ceil\(512 / 64\) = 8",
        ),
    ],
    ids=[
        "low-nibble-first",
        "odd-code-dropped",
        "pad-nibble-0",
        "bfloat16-arithmetic",
        "partial-block-absmax",
        "one-per-byte",
        "one-block",
    ],
)
def test_quantize_nf4_rejects(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_quantize_nf4(wrong)


# ------------------------------------------------------------------ 04: double quantization
def double_quantize(absmax, blocksize=256, subtract=True, offset_of=torch.mean):
    code = dynamic_map()  # (256,)
    offset = offset_of(absmax)
    centred = absmax - offset if subtract else absmax
    n = centred.numel()
    blocks = F.pad(centred, (0, -n % blocksize)).view(-1, blocksize)
    absmax2 = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax2.view(-1, 1)).view(-1)[:n]
    codes = (scaled.view(-1, 1) - code).abs().argmin(dim=1).to(torch.uint8)
    return codes, offset, absmax2


def tail_scale_dropped(absmax):
    codes, offset, absmax2 = double_quantize(absmax)
    return codes, offset, absmax2[: max(absmax.numel() // 256, 1)]


def test_double_quantize_accepts_the_solution():
    assert check_double_quantize(double_quantize).startswith("correct")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda a: double_quantize(a, subtract=False), r"case 1 of 4 .*subtract the offset first"),
        (
            lambda a: double_quantize(a, offset_of=torch.min),
            r"case 1 of 4 .*the minimum; bitsandbytes subtracts the mean",
        ),
        (lambda a: double_quantize(a, blocksize=64), r"case 1 of 4 .*blocks of 256 constants, not 64"),
        (lambda a: double_quantize(a[: a.numel() // 256 * 256] if a.numel() > 256 else a), r"case 2 of 4 .*300 uint8"),
        (tail_scale_dropped, r"case 2 of 4 .*partial last block of 44 constants needs its own scale"),
    ],
    ids=["offset-not-subtracted", "offset-is-min", "blocks-of-64", "tail-dropped", "tail-scale-dropped"],
)
def test_double_quantize_rejects(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_double_quantize(wrong)


# ------------------------------------------------------------------ 04: bits per parameter
def bits_per_parameter(bits, blocksize, double_quant):
    if double_quant:
        return bits + 8 / blocksize + 32 / (blocksize * 256)
    return bits + 32 / blocksize


def test_bits_per_parameter_formula():
    assert check_bits_per_parameter_formula(bits_per_parameter).startswith("correct")
    with pytest.raises(AssertionError, match=r"case 2 of 5 .*add the second-level float32 scales"):
        check_bits_per_parameter_formula(lambda b, B, dq: b + (8 if dq else 32) / B)
    with pytest.raises(AssertionError, match=r"case 2 of 5 .*without double quantization"):
        check_bits_per_parameter_formula(lambda b, B, dq: b + 32 / B)
    with pytest.raises(AssertionError, match=r"case 1 of 5 .*add the absmax constants"):
        check_bits_per_parameter_formula(lambda b, B, dq: float(b))


# ------------------------------------------------------------------ the student edition's stubs
def test_a_stub_is_not_solved_yet(capsys):
    def stub(*args):
        raise NotImplementedError()

    for checker in (check_absmax_quantize, check_blockwise_quantize, check_nf_table, check_quantize_nf4):
        check(checker, stub)
        assert "not solved yet" in capsys.readouterr().out
