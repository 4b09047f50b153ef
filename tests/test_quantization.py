"""Codebooks, blockwise quantization and double quantization against bitsandbytes 0.50.2 on the CPU.

Bit-identical means ``torch.equal`` on packed codes, absmax, offset, second-level absmax and the
dequantized tensors. bitsandbytes' ``quantize_4bit`` accepts blocksizes 32..4096 only, so the
comparisons use 64..4096; lorakit itself accepts any power of two (tested by properties below).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import (
    QuantState,
    blockwise,
    codebook,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise,
    dynamic_map,
    fp4,
    integer,
    nf_offset,
    normal_float,
    quantize_4bit,
    quantize_absmax,
    quantize_blockwise,
    storage,
)
from lorakit.blockwise import dequantize_blockwise_reference, pack_codes, unpack_codes
from lorakit.codebooks import widest_gap

warnings.filterwarnings("ignore", message=".*kernels.*")
bnbF = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' own pure-PyTorch 4-bit dequantization (backends/default/ops.py), uncompiled."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = state.absmax
    if state.nested:
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = _get_4bit_code(state.quant_type, packed.device)
    return compute(packed.reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def blocks_follow_rows(shape: torch.Size, blocksize: int) -> bool:
    """True unless a 2-D tensor's blocks straddle its rows (row length not a multiple of blocksize).

    bitsandbytes 0.50.2's native CPU kernel ``dequantizeBlockwise4bitCpu`` (used for an even row
    length and, on AVX-512 machines, blocksize < 2048) decodes some values of such tensors with the
    absmax of the wrong block: it disagrees with bitsandbytes' own quantizer and with its
    pure-PyTorch kernel. lorakit follows the quantizer and the pure-PyTorch kernel, so for those
    shapes the comparison is with the latter.
    """
    n = math.prod(shape)
    return len(shape) == 1 or shape[-1] % blocksize == 0 or n <= blocksize or shape[-1] % 2 == 1


def assert_same_as_bnb(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> None:
    ref_packed, ref = bnbF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed), f"{(packed != ref_packed).sum()} packed bytes differ"
    assert torch.equal(state.absmax, ref.absmax)
    if double_quant:
        assert torch.equal(state.offset, ref.offset)
        assert torch.equal(state.state2.absmax, ref.state2.absmax)
        assert torch.equal(state.state2.code, ref.state2.code)
        assert state.state2.blocksize == ref.state2.blocksize == 256
    out = dequantize_4bit(packed, state)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(out, bnb_reference_dequantize(ref_packed, ref).reshape(w.shape))
    if blocks_follow_rows(w.shape, blocksize):
        ref_out = bnbF.dequantize_4bit(ref_packed, ref)  # the public API (native kernel where it applies)
        assert ref_out.dtype == w.dtype
        assert torch.equal(out, ref_out.reshape(w.shape))  # bnb returns (1, n) for 1-D inputs


# ---------------------------------------------------------------- codebooks
def test_nf4_offset_is_derived():
    assert nf_offset(4) == 0.9677083


def test_nf4_table_equals_bitsandbytes():
    table = codebook("nf", 4)
    assert torch.equal(table, bnbF.get_4bit_type("nf4", device="cpu"))
    ref = bnbF.create_normal_map()  # 256 entries: the 16 values spread among 241 zeros
    assert torch.equal(torch.unique(ref), torch.unique(table))


def test_fp4_table_equals_bitsandbytes():
    assert torch.equal(fp4(), bnbF.get_4bit_type("fp4", device="cpu"))
    # bitsandbytes' get_4bit_type("int4") raises in 0.50.2 (it divides an integer tensor in place),
    # so Int-k is checked by its defining property in test_int_k_is_symmetric instead.


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_nf_k_is_asymmetric_with_exact_zero(bits):
    table = normal_float(bits)
    assert table.shape == (2**bits,) and table.dtype == torch.float32
    assert torch.all(table[1:] > table[:-1]), "sorted and distinct"
    assert table.min() == -1 and table.max() == 1 and (table == 0).sum() == 1
    assert (table > 0).sum() == 2 ** (bits - 1) and (table < 0).sum() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_k_is_symmetric(bits):
    table = integer(bits)
    m = 2 ** (bits - 1) - 1
    assert table.shape == (2**bits,)
    assert torch.equal(table, -table.flip(0))
    assert torch.equal(torch.unique(table * m), torch.arange(-m, m + 1, dtype=torch.float32))


def test_codebook_errors():
    with pytest.raises(ValueError, match="bits=9 is out of range"):
        codebook("nf", 9)
    with pytest.raises(ValueError, match="bits=1 is out of range"):
        codebook("int", 1)
    with pytest.raises(ValueError, match="FP4 .* only"):
        codebook("fp", 3)
    with pytest.raises(ValueError, match="kind='af' is not known"):
        codebook("af", 4)
    with pytest.raises(ValueError, match="says 4 bits but bits=3"):
        codebook("nf4", 3)
    assert torch.equal(codebook("nf3"), codebook("nf", 3))


# ---------------------------------------------------------------- bit identity with bitsandbytes
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_bit_identical_with_bitsandbytes(dtype, quant_type, double_quant, blocksize):
    torch.manual_seed(blocksize)
    w = (torch.randn(96, 101) * 0.02).to(dtype)  # 9696 values: no blocksize divides it; odd last dim
    w[5, 7] = 0.5  # an outlier
    assert_same_as_bnb(w, quant_type, blocksize, double_quant)
    w = (torch.randn(64, 1024) * 0.02).to(dtype)  # many blocks, several second-level blocks
    assert_same_as_bnb(w, quant_type, blocksize, double_quant)
    w = (torch.randn(48, 576) * 0.02).to(dtype)  # SmolLM2's width: blocks of 128+ straddle rows
    assert_same_as_bnb(w, quant_type, blocksize, double_quant)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from([64, 128, 256, 1024, 4096]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_bit_identical_property(rows, cols, dtype, blocksize, quant_type, double_quant, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    assert_same_as_bnb(w, quant_type, blocksize, double_quant)


def test_zero_blocks_match_bitsandbytes():
    w = torch.zeros(4, 100)  # a full zero block and a zero remainder block
    w[3, 50:] = torch.linspace(-1, 1, 50)
    for double_quant in (False, True):
        assert_same_as_bnb(w, "nf4", 64, double_quant)
    assert_same_as_bnb(torch.ones(64, 64), "nf4", 64, True)  # all absmax equal: centred constants are 0


@pytest.mark.model
def test_every_smollm2_linear_matches_bitsandbytes(smollm2):
    model, _ = smollm2  # read only
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach()
        ref_packed, ref = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
        assert torch.equal(packed, ref_packed), name
        assert torch.equal(state.absmax, ref.absmax), name
        assert torch.equal(state.offset, ref.offset) and torch.equal(state.state2.absmax, ref.state2.absmax), name
        assert torch.equal(dequantize_4bit(packed, state), bnbF.dequantize_4bit(ref_packed, ref)), name
        checked += 1
    assert checked == 30 * 7  # q, k, v, o, gate, up, down in 30 layers


# ---------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700),
    kind=st.sampled_from(["nf", "int", "fp"]),
    bits=st.integers(2, 8),
    blocksize=st.sampled_from([1, 2, 16, 64, 128, 1024]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_the_widest_gap(n, kind, bits, blocksize, seed):
    bits = 4 if kind == "fp" else bits
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    packed, state = quantize_blockwise(w, kind, blocksize, bits=bits)
    w_hat = dequantize_blockwise(packed, state)
    absmax = state.absmax.repeat_interleave(blocksize)[:n]  # (n,)
    bound = widest_gap(state.code) / 2 * absmax
    assert torch.all((w_hat - w).abs() <= bound * (1 + 1e-6) + 1e-30)
    assert packed.numel() == math.ceil(n * bits / 8)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 2000),
    kind=st.sampled_from(["nf", "int", "fp"]),
    bits=st.integers(2, 8),
    blocksize=st.sampled_from([1, 2, 16, 64, 256, 4096]),
    step=st.sampled_from([2, 4, 64, 256, 1024]),  # DEQUANT_STEP: a power of two, at least 2
    dtype=st.sampled_from(DTYPES),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dequantize_in_steps_equals_the_whole_tensor_formula(n, kind, bits, blocksize, step, dtype, double_quant, seed):
    """Stepping through the tensor (any step, odd counts, partial last blocks) changes no bit."""
    bits = 4 if kind == "fp" else bits
    w = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    packed, state = quantize_blockwise(w, kind, blocksize, double_quant, bits=bits)
    expected = dequantize_blockwise_reference(packed, state)  # code[q] * absmax over the whole tensor at once
    with mock.patch.object(blockwise, "DEQUANT_STEP", step):
        out = dequantize_blockwise(packed, state)
    assert out.dtype == dtype and out.shape == w.shape
    as_int = torch.int32 if dtype == torch.float32 else torch.int16  # bit patterns: -0.0 differs from 0.0
    assert torch.equal(out.view(as_int), expected.view(as_int))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 differs from 0.0, and NaNs compare)."""
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4", "nf3", "int8", "nf2", "nf5"])
@pytest.mark.parametrize("shape", [(1,), (63,), (64,), (65,), (7, 9), (64, 96), (96, 64), (3, 5, 129), (1000, 3)])
def test_dequantize_blockwise_equals_the_reference(shape, quant_type, double_quant, dtype):
    """The stepped, memory-saving dequantize gives the reference's bits: odd counts, partial last blocks, any width."""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(math.prod(shape))) * 2).to(dtype)
    packed, state = quantize_blockwise(w, quant_type, 64, double_quant)
    reference = dequantize_blockwise_reference(packed, state)
    assert reference.shape == w.shape and reference.dtype == dtype
    with mock.patch.object(blockwise, "DEQUANT_STEP", 128):  # several steps, even on these small tensors
        assert same_bits(dequantize_blockwise(packed, state), reference)
    assert same_bits(dequantize_blockwise(packed, state), reference)  # the default step: one step here


@pytest.mark.parametrize("case", ["subnormal", "tiny", "near_max"])
def test_double_quant_at_the_edges_of_float32(case):
    """Constants that are subnormal, or whose second-level scale is, or near float32's max (issue 20).

    bitsandbytes 0.50.2 on the same input, recorded: for "subnormal" and "tiny" its codes and
    weights are ours bit for bit; for "near_max" its float32 mean of the constants overflows, it
    stores offset = inf and dequantizes to NaN. We take that mean in float64 and decode finite values.
    """
    g = torch.Generator().manual_seed(0)
    w = {
        "subnormal": torch.full((128,), 1e-40),  # absmax below float32's normal range (1.2e-38)
        "tiny": torch.randn(128, generator=g) * 1e-39,  # the second-level absmax is subnormal: 1 / it is inf
        "near_max": torch.rand(1000, generator=g) * 3.3e38 + 1e37,  # the constants' float32 sum overflows
    }[case]
    packed, state = quantize_4bit(w, "nf4", 64, double_quant=True)
    out = dequantize_4bit(packed, state)
    assert torch.isfinite(out).all() and torch.isfinite(state.offset)
    ref_packed, ref = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ref_out = bnbF.dequantize_4bit(ref_packed, ref).view(-1)
    assert torch.equal(packed, ref_packed)  # the 4-bit codes never depend on the second level
    if case == "near_max":
        assert torch.isinf(ref.offset) and torch.isnan(ref_out).all()  # bitsandbytes' behaviour, recorded
        true_absmax = w[: 1000 // 64 * 64].view(-1, 64).abs().amax(dim=1)  # (15,) the full blocks' constants
        restored = dequantize_absmax(state.absmax, state.offset, state.state2)[: true_absmax.numel()]
        assert torch.allclose(restored, true_absmax, rtol=0.02)  # the 8-bit dynamic type's error at the top
        assert (out - w).abs().max() <= 0.16 * w.abs().max()  # NF4's half-gap (0.15) times the largest absmax
    else:
        assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.state2.absmax, ref.state2.absmax)
        assert torch.equal(state.offset, ref.offset) and torch.equal(out, ref_out)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16))
def test_double_quantized_absmax_error_is_bounded(n, seed):
    absmax = torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 0.1
    q, offset, state2 = quantize_absmax(absmax)
    restored = dequantize_absmax(q, offset, state2)
    scale = state2.absmax.repeat_interleave(256)[:n]
    # the 8-bit dynamic type's widest gap is near 1: 1 - 0.9930 on the 0.1..1 decade
    assert torch.all((restored - absmax).abs() <= widest_gap(dynamic_map()) * scale + 1e-7)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_four_bit_packing_order_is_high_nibble_first():
    packed = pack_codes(torch.tensor([1, 2, 3], dtype=torch.uint8), 4)
    assert packed.view(-1).tolist() == [0x12, 0x30]


PEAK_SCRIPT = """
import re, sys, torch
from lorakit import codebook
from lorakit.blockwise import QuantState, dequantize_blockwise

def peak_bytes():  # VmHWM: this process's peak resident memory (ru_maxrss would carry the parent's over exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

dtype, n = getattr(torch, sys.argv[1]), 4096 * 4096
packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8)
state = QuantState(torch.rand(n // 64), torch.Size((4096, 4096)), dtype, 64, codebook("nf", 4), "nf4")
before = peak_bytes()
out = dequantize_blockwise(packed, state)
print((peak_bytes() - before) / (out.numel() * out.element_size()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak from Linux's /proc")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantize_holds_no_full_size_intermediate(dtype):
    """The peak memory of dequantizing is the output and a small scratch: no float32 copy, no index."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, dtype], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    growth = float(run.stdout.strip().splitlines()[-1])  # peak growth over the output's size
    # Measured: 1.10 (float32), 1.33 (bfloat16): 64 or 32 MiB of output, plus 4 MiB of float32 scratch (bfloat16
    # only), 4 MiB of int64 indices and a few MiB of the allocator's own. Decoding the whole tensor to float32 at
    # once (the first version) grew it 1.5x and 3x; a whole int64 index would add 1x and 2x.
    assert 0.9 < growth < 1.4, f"dequantizing a 4096 x 4096 {dtype} weight grew the peak by {growth:.2f}x its output"


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = []
    for bits in range(2, 9):
        packed, state = quantize_blockwise(w, "nf", 64, bits=bits)
        errors.append(float((dequantize_blockwise(packed, state) - w).pow(2).mean()))
    assert errors == sorted(errors, reverse=True)


# ---------------------------------------------------------------- storage accounting
def test_bits_per_parameter_from_byte_sizes():
    w = torch.randn(1024, 1024)  # 2**20 values: 16384 blocks of 64, 64 blocks of 256 constants
    plain = storage(*quantize_4bit(w, "nf4", 64, double_quant=False))
    dq = storage(*quantize_4bit(w, "nf4", 64, double_quant=True))
    assert plain.code_bytes == 2**19 and plain.absmax_bytes == 16384 * 4 and plain.absmax2_bytes == 0
    assert plain.bits_per_parameter == 4 + 32 / 64 == 4.5
    assert dq.absmax_bytes == 16384 and dq.absmax2_bytes == 64 * 4
    assert dq.bits_per_parameter == 4 + 8 / 64 + 32 / (64 * 256)
    assert round(dq.bits_per_parameter, 3) == 4.127
    assert plain.bits_per_parameter - dq.bits_per_parameter == pytest.approx(0.373, abs=5e-4)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_storage_counts_every_bit_width_honestly(bits):
    w = torch.randn(1000)
    report = storage(*quantize_blockwise(w, "int", 64, bits=bits))
    assert report.code_bytes == math.ceil(1000 * bits / 8)
    assert report.absmax_bytes == 16 * 4  # 16 blocks (the last one partial) of float32
    assert report.constant_bytes == 2**bits * 4


# ---------------------------------------------------------------- errors that teach
def test_nan_and_inf_are_named_and_counted():
    w = torch.randn(10, 10)
    w[0, 0], w[3, 3], w[5, 5] = float("nan"), float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"layers.0.q_proj.weight .* 2 NaN and 1 Inf values out of 100"):
        quantize_blockwise(w, name="layers.0.q_proj.weight")
    with pytest.raises(ValueError, match=r"weight .* 2 NaN"):
        quantize_4bit(w)


@pytest.mark.parametrize("blocksize", [0, 48, -64, 100, 64.0])
def test_blocksize_must_be_a_power_of_two(blocksize):
    with pytest.raises(ValueError, match="not a power of two"):
        quantize_4bit(torch.randn(128), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match=f"{dtype}.*float32, bfloat16 or float16"):
        quantize_4bit(torch.ones(64, dtype=dtype))


def test_bits_out_of_range_and_unknown_quant_type():
    with pytest.raises(ValueError, match="out of range"):
        quantize_blockwise(torch.randn(64), "nf", bits=1)
    with pytest.raises(ValueError, match="'nf3' says 3 bits but bits=4"):
        quantize_4bit(torch.randn(64), "nf3")
    with pytest.raises(ValueError, match="not known"):
        quantize_4bit(torch.randn(64), "af4")


def test_state_must_belong_to_the_packed_tensor():
    packed_a, state_a = quantize_4bit(torch.randn(64, 64))
    packed_b, state_b = quantize_4bit(torch.randn(32, 64))
    message = r"shape \(32, 64\) at 4 bits \(1024 packed bytes\), but the packed tensor has 2048"
    with pytest.raises(ValueError, match=message):
        dequantize_4bit(packed_a, state_b)
    _, state_c = quantize_4bit(torch.randn(64, 64), blocksize=128)
    with pytest.raises(ValueError, match="absmax has 32 constants .* needs 64"):
        dequantize_4bit(packed_a, QuantState(state_c.absmax, state_a.shape, torch.float32, 64, state_a.code, "nf4"))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_4bit(packed_a.int(), state_a)
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_4bit(packed_a, {"absmax": state_a.absmax})


# ---------------------------------------------------------------- affine Int4, Eq. 4, normality statistics
@pytest.mark.parametrize("seed", [0, 1])
def test_affine_int4_blocks_of_32_equal_gguf_q4_1(seed):
    """quantize_affine(bits=4, blocksize=32, float16) is llama.cpp's Q4_1, as gguf-py writes it."""
    np = pytest.importorskip("numpy")
    gguf_quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    from lorakit.blockwise import quantize_affine

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(seed)) * 0.02
    ours = quantize_affine(w, bits=4, blocksize=32, constants_dtype=torch.float16).dequantize()
    packed = gguf_quants.quantize(w.numpy().astype(np.float32), GGMLQuantizationType.Q4_1)
    ref = torch.from_numpy(gguf_quants.dequantize(packed, GGMLQuantizationType.Q4_1).copy()).view(w.shape)
    assert torch.equal(ours, ref)


def test_affine_uses_every_level_and_costs_constants():
    from lorakit.blockwise import quantize_affine

    w = torch.linspace(-1, 3, 64)
    q = quantize_affine(w, bits=4, blocksize=64)
    assert q.codes.unique().numel() == 16  # all 2**4 levels, unlike symmetric absmax (15)
    assert q.bits_per_parameter == 4 + 2 * 16 / 64  # float16 scale and minimum per block of 64
    assert (q.dequantize() - w).abs().max() <= float(q.scale[0]) / 2 + 1e-3
    with pytest.raises(ValueError, match="bits=9"):
        quantize_affine(w, bits=9)


def test_normal_float_eq4_against_statistics_normal_dist():
    """QLoRA Eq. 4 with an independent inverse CDF (the standard library's NormalDist)."""
    from statistics import NormalDist

    from lorakit.codebooks import normal_float_eq4

    k = 4
    q = NormalDist().inv_cdf
    n = 2**k + 1
    ref = [(q(i / n) + q((i + 1) / n)) / 2 for i in range(1, 2**k)]
    ref = torch.tensor(ref, dtype=torch.float64)
    table = normal_float_eq4(k)
    assert table.shape == (2**k - 1,)
    torch.testing.assert_close(table, (ref / ref.max()).float(), rtol=0, atol=1e-6)
    assert (table == 0).sum() == 1 and torch.equal(table, -table.flip(0))
    assert not torch.equal(table, normal_float(k)[1:])  # not bitsandbytes' create_normal_map


def test_ks_distance_and_kurtosis_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    from lorakit.tradeoff import excess_kurtosis, ks_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, generator=g), torch.rand(300, generator=g) * 4 - 2
    assert ks_distance(a, b) == pytest.approx(stats.ks_2samp(a.numpy(), b.numpy()).statistic, abs=1e-12)
    assert excess_kurtosis(a) == pytest.approx(
        float(stats.kurtosis(a.double().numpy(), fisher=True, bias=True)), abs=1e-9
    )
    assert excess_kurtosis(b) < -1.0  # uniform: -1.2


def test_block_normalized_is_what_the_quantizer_scales():
    from lorakit.tradeoff import block_normalized

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    scaled = block_normalized(w, 64).view(4, 64)
    torch.testing.assert_close(scaled, w / w.abs().amax(dim=1, keepdim=True))


def test_the_byte_pair_table_follows_its_codebook():
    """The table dequantize keeps per codebook is rebuilt when the code changes and dropped when it is freed."""
    import gc

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, "nf4", 64)
    first = dequantize_4bit(packed, state)
    assert torch.equal(dequantize_4bit(packed, state), first)  # from the kept table
    with torch.no_grad():
        state.code.mul_(2)  # a changed codebook: every value doubles, not the stale table's
    assert torch.equal(dequantize_4bit(packed, state), 2 * first)
    key = id(state.code)
    assert key in blockwise._pair_tables
    del state
    gc.collect()
    assert key not in blockwise._pair_tables


def test_a_codebook_made_in_inference_mode_dequantizes():
    """Inference tensors have no version counter: their table is built at each call, with the same bits."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        packed, state = quantize_4bit(w, "nf4", 64)
        inside = dequantize_4bit(packed, state)
    assert state.code.is_inference()
    assert torch.equal(dequantize_4bit(packed, state), inside)
    assert torch.equal(inside, dequantize_4bit(*quantize_4bit(w, "nf4", 64)))


def test_dequantize_into_a_buffer_checks_it():
    """``out=`` takes a contiguous buffer of the weight's size and dtype, and says what it needs otherwise."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(w, "nf4", 64)
    out = torch.empty(256)
    assert torch.equal(blockwise.dequantize_blockwise(packed, state, out=out), dequantize_4bit(packed, state))
    shifted = torch.empty(257)[1:]  # contiguous, but not on an 8-byte boundary: decoded through the scratch
    assert torch.equal(blockwise.dequantize_blockwise(packed, state, out=shifted), dequantize_4bit(packed, state))
    odd, odd_state = quantize_4bit(w.view(-1)[:65], "nf4", 64)  # 65 values in 33 bytes: 66 decoded
    assert blockwise.decoded_numel(odd_state) == 66
    odd_out = torch.full((66,), float("nan"))
    assert torch.equal(blockwise.dequantize_blockwise(odd, odd_state, out=odd_out), dequantize_4bit(odd, odd_state))
    for wrong in (torch.empty(255), torch.empty(256, dtype=torch.bfloat16), torch.empty(512)[::2]):
        with pytest.raises(ValueError, match=r"out must be a contiguous \(256,\) torch.float32 tensor"):
            blockwise.dequantize_blockwise(packed, state, out=wrong)
