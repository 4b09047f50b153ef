"""Linear4bit, quantize_model / dequantize_model, and the logic behind the notebooks' controls."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lorakit import (
    Linear4bit,
    dequantize_4bit,
    dequantize_model,
    quantization_tradeoff,
    quantize_4bit,
    quantize_model,
    tradeoff_widget,
)
from lorakit.codebooks import widest_gap

warnings.filterwarnings("ignore", message=".*kernels.*")


class Tiny(nn.Module):
    """Two blocks of Linear layers and an ``lm_head``, like a miniature causal LM."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"up_proj": nn.Linear(32, 96), "down_proj": nn.Linear(96, 32, bias=False)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["down_proj"](torch.relu(layer["up_proj"](x)))
        return self.lm_head(x)


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_forward_is_linear_with_the_dequantized_weight(double_quant):
    linear = nn.Linear(64, 48)
    q = Linear4bit.from_linear(linear, "nf4", 64, double_quant)
    assert (q.in_features, q.out_features) == (64, 48)
    w = q.dequantize()
    assert w.shape == (48, 64) and w.dtype == torch.float32
    packed, state = quantize_4bit(linear.weight, "nf4", 64, double_quant)
    assert torch.equal(w, dequantize_4bit(packed, state))
    x = torch.randn(3, 5, 64)
    assert torch.equal(q(x), nn.functional.linear(x, w, linear.bias))
    # each weight is off by at most half the widest NF4 gap times its block's absmax (one row = one block)
    bound_w = widest_gap(q.code) / 2 * linear.weight.detach().abs().amax(dim=1, keepdim=True)  # (48, 1)
    if double_quant:  # the absmax itself is stored in 8 bits; allow its error too
        true_absmax = linear.weight.detach().abs().amax(dim=1, keepdim=True)
        bound_w = bound_w + (true_absmax - w.abs().amax(dim=1, keepdim=True)).abs()
    bound_y = x.abs() @ bound_w.expand(48, 64).T  # (3, 5, 48)
    assert torch.all((q(x) - linear(x)).abs() <= bound_y * 1.001)


def test_linear4bit_computes_in_the_input_dtype():
    q = Linear4bit.from_linear(nn.Linear(64, 16), "nf4")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, nn.functional.linear(x, q.dequantize(torch.bfloat16), q.bias.to(torch.bfloat16)))


def test_linear4bit_matches_bitsandbytes_dequantize():
    bnbF = pytest.importorskip("bitsandbytes.functional")
    linear = nn.Linear(128, 64)
    q = Linear4bit.from_linear(linear, "fp4", 64, double_quant=True)
    ref_packed, ref = bnbF.quantize_4bit(linear.weight.detach(), quant_type="fp4", compress_statistics=True)
    assert torch.equal(q.weight_packed, ref_packed)
    assert torch.equal(q.dequantize(), bnbF.dequantize_4bit(ref_packed, ref))


def test_state_lives_in_buffers():
    q = Linear4bit.from_linear(nn.Linear(64, 64), "nf4", 64, double_quant=True)
    keys = set(q.state_dict())
    assert {"weight_packed", "absmax", "code", "absmax_offset", "absmax2", "code2", "bias"} <= keys
    assert q.weight_packed.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    assert not any(p.requires_grad for p in q.parameters())


def test_quantize_model_replaces_linears_but_skips_lm_head():
    model = Tiny()
    x = torch.randn(4, 32)
    before = model(x)
    assert quantize_model(model) is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(("proj", "head"))}
    assert kinds == {
        "layers.0.up_proj": "Linear4bit",
        "layers.0.down_proj": "Linear4bit",
        "layers.1.up_proj": "Linear4bit",
        "layers.1.down_proj": "Linear4bit",
        "lm_head": "Linear",
    }
    after = model(x)
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()


def test_quantize_model_settings_and_skip_patterns():
    model = quantize_model(
        Tiny(), quant_type="int", bits=3, blocksize=32, double_quant=False, skip=("lm_head", "*up_proj")
    )
    down = model.layers[0]["down_proj"]
    assert isinstance(down, Linear4bit) and down.quant_type == "int3" and down.blocksize == 32 and not down.double_quant
    assert isinstance(model.layers[0]["up_proj"], nn.Linear)


@pytest.mark.parametrize(
    "quant_type, bits, expected",
    [("int8", None, "int8"), ("nf3", None, "nf3"), ("nf", None, "nf4"), ("int", 8, "int8")],
)
def test_quantize_model_takes_the_width_from_quant_type(quant_type, bits, expected):
    """The docstring's quant_type="int8" / "nf3" work: bits defaults to None (the width in the name, else 4)."""
    model = quantize_model(Tiny(), quant_type=quant_type, bits=bits)
    down = model.layers[0]["down_proj"]
    assert down.quant_type == expected and down.bits == int(expected[-1]) and down.code.numel() == 2**down.bits


def test_a_head_tied_to_the_embeddings_is_never_quantized():
    """Whatever skip says: quantizing a tied head would quantize (and untie) the input embeddings too."""
    from tiny_models import tiny_llama

    from lorakit.linear4bit import kept_in_full_precision

    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert kept_in_full_precision(model) == {"lm_head"}
    quantize_model(model, skip=())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    untied = quantize_model(tiny_llama(tie_word_embeddings=False), skip=())  # an untied head is still the output head
    assert type(untied.lm_head) is nn.Linear


def test_dequantize_model_restores_plain_linears():
    model = quantize_model(Tiny())
    weights = {name: m.dequantize() for name, m in model.named_modules() if isinstance(m, Linear4bit)}
    x = torch.randn(2, 32)
    quantized_out = model(x)
    dequantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    for name, w in weights.items():
        assert torch.equal(model.get_submodule(name).weight, w)
    assert torch.allclose(model(x), quantized_out, atol=1e-6)


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="says 4 bits but bits=3"):
        quantize_model(Tiny(), quant_type="nf4", bits=3)
    with pytest.raises(TypeError, match="tuple of names"):
        quantize_model(Tiny(), skip="lm_head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(Tiny(), skip=("*",))
    model = Tiny()
    model.layers[1]["up_proj"].weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"layers.1.up_proj.weight .* 1 NaN and 0 Inf"):
        quantize_model(model)


# ---------------------------------------------------------------- explore: the widget's logic
def test_tradeoff_reports_error_and_memory():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    nf4 = quantization_tradeoff(w, "nf", 4, 64)
    assert nf4.bits_per_parameter == 4.5 and nf4.quant_type == "nf4"
    assert nf4.megabytes == pytest.approx((256 * 256 / 2 + 1024 * 4 + 16 * 4) / 1e6)
    assert 0 < nf4.relative_error < 0.15
    int8 = quantization_tradeoff(w, "int", 8, 64)
    assert int8.rmse < nf4.rmse and int8.bits_per_parameter == 8.5
    coarse = quantization_tradeoff(w, "nf", 4, 4096)
    assert coarse.bits_per_parameter < nf4.bits_per_parameter
    dq = quantization_tradeoff(w, "nf", 4, 64, double_quant=True)
    assert dq.bits_per_parameter < nf4.bits_per_parameter
    assert "nf4" in str(nf4) and "bits/param" in str(nf4)


def test_tradeoff_widget_drives_from_code():
    pytest.importorskip("ipywidgets")
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    box = tradeoff_widget(w)
    bits, kind, blocksize = (box.controls[k] for k in ("bits", "quant_type", "blocksize"))
    assert box.result.bits == 4
    bits.value = 8  # the observer recomputes
    assert box.result.bits == 8 and box.result == quantization_tradeoff(w, "nf", 8, 64)
    blocksize.value = 256
    assert box.result.blocksize == 256
    kind.value = "fp"  # FP only exists at 4 bits: the widget shows the error instead of failing
    assert isinstance(box.result, str) and "bits must be 4" in box.result
    bits.value = 4
    assert box.result.quant_type == "fp4"


def test_codebook_error_matches_quantize_blockwise():
    from lorakit import codebook, normal_float
    from lorakit.tradeoff import codebook_error

    w = torch.randn(48, 100, generator=torch.Generator().manual_seed(0))  # 4800 values: a partial last block
    expected = quantization_tradeoff(w, "nf", 4, 64).rmse
    assert codebook_error(w, codebook("nf", 4), 64) == pytest.approx(expected, rel=1e-6)
    assert codebook_error(w, normal_float(4), 64) < codebook_error(w, normal_float(4, symmetric=True), 64)
    with pytest.raises(ValueError, match="power of two"):
        codebook_error(w, codebook("nf", 4), 60)


def test_exercise_checkers_accept_right_and_reject_wrong_answers():
    from lorakit.exercises import check_absmax_int8, check_bits_per_parameter

    def right(x):
        scale = x.abs().max() / 127
        return torch.round(x / scale), scale

    def too_many_codes(x):
        scale = x.abs().max() / 128
        return torch.round(x / scale), scale

    def truncates(x):
        scale = x.abs().max() / 127
        return torch.trunc(x / scale), scale

    assert check_absmax_int8(right).startswith("correct")
    with pytest.raises(AssertionError, match=r"lie in \[-127, 127\]"):
        check_absmax_int8(too_many_codes)
    with pytest.raises(AssertionError, match="round to the nearest integer"):
        check_absmax_int8(truncates)
    assert check_bits_per_parameter(4 + 8 / 64 + 32 / (64 * 256), 4, 64, True).startswith("correct")
    with pytest.raises(AssertionError, match="measured 4.1270"):
        check_bits_per_parameter(4.5, 4, 64, True)


def test_to_dtype_keeps_the_quantization_state_exact():
    q = Linear4bit.from_linear(nn.Linear(64, 32), "nf4", 64, double_quant=True)
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.absmax2.dtype == torch.float32 and q.code.dtype == torch.float32 and q.absmax_offset.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16  # the bias is an ordinary parameter and follows .to()
    assert torch.equal(q.dequantize(), before)
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type, bits", [("nf", 4), ("fp", 4), ("nf", 3), ("int", 8)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_stays_on_the_device_of_the_layer(quant_type, bits, double_quant, dtype):
    """Moved to another device, a layer dequantizes there: every tensor dequantize makes follows it.

    The meta device stands in for a GPU (none in CI): an operation that mixed in a CPU tensor fails on
    it as it would on CUDA, and the output's shape and dtype are still computed.
    """
    q = Linear4bit.from_linear(nn.Linear(96, 64).to(dtype), quant_type, 64, double_quant, bits).to("meta")
    w = q.dequantize()
    assert w.device.type == "meta" and w.shape == (64, 96) and w.dtype == dtype
    assert q(torch.empty(2, 96, dtype=dtype, device="meta")).shape == (2, 64)


@pytest.mark.parametrize("bias_trains", [False, True])
def test_backward_recomputes_the_weight_instead_of_keeping_it(bias_trains):
    """Between forward and backward only 4-bit codes stay alive, as in QLoRA; gradients are exact."""
    linear = nn.Linear(128, 96)
    q = Linear4bit.from_linear(linear, "nf4", 64, True)
    q.bias.requires_grad_(bias_trains)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.numel() >= 96 * 128 for t in saved)  # no dequantized (96, 128) weight kept
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w = q.dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = q.bias.detach().clone().requires_grad_(bias_trains)
    nn.functional.linear(x2, w, b2).backward(grad_y)
    assert torch.equal(y, nn.functional.linear(x2, w, b2))
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    if bias_trains:
        torch.testing.assert_close(q.bias.grad, b2.grad, rtol=1e-6, atol=1e-6)


def test_the_matmul_reuses_one_buffer_and_gives_the_same_numbers():
    """forward and backward dequantize into this thread's reused buffer: the same bits as a fresh weight."""
    layers = [Linear4bit.from_linear(nn.Linear(d_in, d_out), "nf4", 64, True) for d_in, d_out in ((64, 96), (96, 32))]
    first, second = (q.dequantize_for_matmul(torch.float32) for q in layers)
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # one buffer, rewritten
    assert torch.equal(second, layers[1].dequantize())
    x = torch.randn(3, 64, requires_grad=True)
    y = layers[1](layers[0](x).relu())
    y.backward(torch.ones_like(y))
    w0, w1 = layers[0].dequantize(), layers[1].dequantize()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(torch.nn.functional.linear(x_ref, w0, layers[0].bias).relu(), w1, layers[1].bias)
    y_ref.backward(torch.ones_like(y_ref))
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)


def test_a_gradient_of_a_gradient_gets_a_weight_of_its_own():
    """With create_graph=True autograd keeps backward's weight: it must not be the reused buffer."""
    layers = [Linear4bit.from_linear(nn.Linear(64, 64), "nf4", 64, True) for _ in range(2)]
    x = torch.randn(3, 64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layers[1](layers[0](x).tanh()).square().sum(), x, create_graph=True)
    grad_x.sum().backward()  # through both layers' backward matmuls again
    w0, w1 = layers[0].dequantize(), layers[1].dequantize()
    x_ref = x.detach().clone().requires_grad_()

    def f(t):
        return torch.nn.functional.linear(torch.nn.functional.linear(t, w0, layers[0].bias).tanh(), w1, layers[1].bias)

    (g_ref,) = torch.autograd.grad(f(x_ref).square().sum(), x_ref, create_graph=True)
    g_ref.sum().backward()
    torch.testing.assert_close(grad_x, g_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_used_under_inference_mode_still_trains_afterwards(dtype):
    """The reused buffers made under torch.inference_mode (the lab's inference) are not written outside it."""
    q = Linear4bit.from_linear(nn.Linear(64, 32).to(dtype), "nf4", 64, True)
    x = torch.randn(2, 64, dtype=dtype)
    with torch.inference_mode():
        inside = q(x)
    x.requires_grad_()
    y = q(x)
    y.sum().backward()
    assert torch.equal(y.detach(), inside) and x.grad is not None
