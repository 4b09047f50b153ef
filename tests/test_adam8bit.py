"""8-bit optimizer state: the dynamic map and blockwise quantization equal bitsandbytes'; the
optimizer stores ~2 bytes per parameter and trains like 32-bit AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.adam8bit import AdamW8bit, _dequantize_state, _quantize_state, create_dynamic_map, state_bytes


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    import bitsandbytes.functional as F

    assert torch.equal(create_dynamic_map(signed=signed), F.create_dynamic_map(signed=signed))


@pytest.mark.parametrize(
    "signed, max_exponent_bits, total_bits",
    [(True, 6, 8), (True, 5, 8), (True, 1, 8), (True, 3, 4), (True, 2, 4), (True, 4, 6), (False, 3, 4)],
)
def test_other_dynamic_maps_equal_bitsandbytes(signed, max_exponent_bits, total_bits):
    """Fewer exponent bits use the all-exponent-bits-zero codes (scale 1.0); fewer total bits pad to 256 zeros."""
    import bitsandbytes.functional as F

    ours = create_dynamic_map(signed, max_exponent_bits, total_bits)
    assert ours.shape == (256,) and torch.equal(ours, F.create_dynamic_map(signed, max_exponent_bits, total_bits))
    assert torch.unique(ours).numel() == 2**total_bits  # the padding repeats the existing 0


def bnb_reference_quantize(x, code, blocksize):
    """bitsandbytes' pure-PyTorch ``quantize_blockwise`` kernel (backends/default/ops.py).

    The CPU build dispatches to a C kernel whose search does not always return the nearest code
    (about 2 values in 1,000 land on the neighbour); the PyTorch kernel is the readable reference.
    """
    import bitsandbytes  # noqa: F401  (registers the op)

    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)


@pytest.mark.parametrize("n", [256 * 8, 1000, 4096 * 3 + 17])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_blockwise_equals_bitsandbytes(n, signed):
    import bitsandbytes.functional as F

    torch.manual_seed(n)
    x = torch.randn(n) * torch.logspace(-6, 0, n)  # values over six decades, like Adam's moments
    if not signed:
        x = x.abs()
    code = create_dynamic_map(signed=signed)
    q, absmax = _quantize_state(x, code, 256)
    q_ref, absmax_ref = bnb_reference_quantize(x, code, 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    # and dequantization equals bitsandbytes' (its C kernel is exact here: a table look-up)
    state = F.QuantState(absmax=absmax, code=code, blocksize=256, dtype=torch.float32)
    assert torch.equal(_dequantize_state(q, absmax, code, 256), F.dequantize_blockwise(q, state))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2000), st.floats(1e-6, 1e3))
def test_roundtrip_error_within_half_the_widest_code_gap(n, scale):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    code = create_dynamic_map()
    q, absmax = _quantize_state(x, code, 256)
    err = (_dequantize_state(q, absmax, code, 256) - x).abs()
    widest_gap = (code[1:] - code[:-1]).max()
    block_max = absmax.repeat_interleave(256)[:n]
    assert torch.all(err <= widest_gap / 2 * block_max * (1 + 1e-5) + 1e-12)


def test_state_is_about_two_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(512, 1024))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = state_bytes(opt) / p.numel()
    assert per_param == 2 + 2 * 4 / 256  # two uint8 codes + two fp32 absmax per 256 elements
    ref = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())])
    ref.param_groups[0]["params"][0].grad = p.grad.clone()
    ref.step()
    assert state_bytes(ref) / p.numel() >= 8  # 32-bit AdamW: 8 bytes per parameter


def test_close_to_bitsandbytes_adamw8bit():
    """Same algorithm as bitsandbytes' CPU AdamW8bit; its C quantizer sometimes picks the neighbouring
    code, so the parameters agree to a small fraction of the distance they moved, not bit for bit."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = torch.randn(64, 128)
    p1, p2 = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    o1, o2 = AdamW8bit([p1], lr=1e-2), bnb.optim.AdamW8bit([p2], lr=1e-2)
    for _ in range(10):
        g = torch.randn(64, 128)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    moved = (p2 - w).abs().mean()
    assert (p1 - p2).abs().mean() < 0.02 * moved


def test_fp32_state_is_torch_adamw():
    """With every moment in fp32 (min_8bit_size=inf) the update is torch.optim.AdamW's, with one known
    difference: m = b1 m + (1 - b1) g (bitsandbytes' CPU update) against torch's m.lerp_(g, 1 - b1),
    equal up to one float32 rounding of m per step. Over 20 steps the parameters stay within a few
    float32 roundings of the distance they moved; v, the bias corrections and the step are torch's."""
    torch.manual_seed(0)
    w = torch.randn(300, 70)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    o1 = AdamW8bit([ours], lr=1e-2, weight_decay=0.1, min_8bit_size=math.inf)
    o2 = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(20):
        g = torch.randn(300, 70)
        ours.grad, theirs.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o1.state[ours]["m"].dtype == torch.float32
    moved = (theirs - w).abs().max()
    assert (ours - theirs).abs().max() <= 1e-5 * moved  # measured: 1.2e-6
    assert torch.equal(o1.state[ours]["v"], o2.state[theirs]["exp_avg_sq"])  # the same formula, bit for bit
    m, exp_avg = o1.state[ours]["m"], o2.state[theirs]["exp_avg"]
    assert (m - exp_avg).abs().max() <= 4 * torch.finfo(torch.float32).eps * exp_avg.abs().max()  # measured: 2.3 eps
    assert not torch.equal(m, exp_avg)  # lerp really is a different rounding (so the bound above is needed)


def test_small_tensors_keep_fp32_state_like_bitsandbytes():
    p = torch.nn.Parameter(torch.randn(100))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["m"].dtype == torch.float32


def test_short_finetune_converges_like_32bit_adamw():
    """A small regression network, 150 steps: final loss within 2% of torch's AdamW."""

    def run(make_opt):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(32, 256),
            torch.nn.GELU(),
            torch.nn.Linear(256, 256),
            torch.nn.GELU(),
            torch.nn.Linear(256, 1),
        )
        teacher = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        opt = make_opt(net.parameters())
        g = torch.Generator().manual_seed(1)
        for _ in range(150):
            x = torch.randn(64, 32, generator=g)
            with torch.no_grad():
                y = teacher(x)
            loss = torch.nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x = torch.randn(1024, 32, generator=g)
        with torch.no_grad():
            return torch.nn.functional.mse_loss(net(x), teacher(x)).item()

    loss32 = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    loss8 = run(lambda ps: AdamW8bit(ps, lr=1e-3))
    first = run(lambda ps: torch.optim.SGD(ps, lr=0.0))  # untrained, to show training did something
    assert loss32 < 0.5 * first
    assert abs(loss8 - loss32) <= 0.02 * loss32, (loss8, loss32)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(1))], lr=-1)
