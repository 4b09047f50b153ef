"""Notebooks 05-06's checkers: the right solution passes, plausible wrong ones are rejected with the failing case."""

from __future__ import annotations

import pytest
import torch

from lorakit.exercises import (
    check,
    check_accumulation,
    check_bits_per_weight,
    check_dequantize_matmul,
    check_paged_adamw_step,
    check_step_memory,
)
from lorakit.memory import lora_params

# -- the 4-bit Linear's autograd Function ---------------------------------------------------------


class RightMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype).T  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None


class KeepsTheWeight(torch.autograd.Function):  # autograd's default: the dequantized weight waits for backward
    @staticmethod
    def forward(ctx, x, layer):
        w = layer.dequantize(x.dtype)
        ctx.save_for_backward(w)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad_y):
        (w,) = ctx.saved_tensors
        return grad_y @ w, None


class KeepsTheWeightAsAttribute(KeepsTheWeight):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.w = layer.dequantize(x.dtype)
        return x @ ctx.w.T

    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.w, None


class GradientForTheWeight(torch.autograd.Function):  # returns the dequantized weight's gradient for the layer
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return x @ layer.dequantize(x.dtype).T

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        grad_w = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out, in)
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), grad_w


class TransposedForward(RightMatmul):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantize(x.dtype)


class TransposedBackward(RightMatmul):
    @staticmethod
    def backward(ctx, grad_y):
        return grad_y @ ctx.layer.dequantize(grad_y.dtype).T, None


class Float32Compute(RightMatmul):  # dequantizes to the storage dtype, not the input's
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.float() @ layer.dequantize().T


def test_dequantize_matmul_checker_accepts_the_right_function():
    assert check_dequantize_matmul(RightMatmul).startswith("correct")


@pytest.mark.parametrize(
    "wrong, match",
    [
        (KeepsTheWeight, r"x: \(4, 64\) float32.*keeps a full-size weight"),
        (KeepsTheWeightAsAttribute, r"x: \(4, 64\) float32.*keeps a full-size weight"),
        (GradientForTheWeight, r"x: \(4, 64\) float32.*None for the frozen layer"),
        (TransposedForward, r"x: \(4, 64\) float32.*you computed x @ W"),
        (TransposedBackward, r"x: \(4, 64\) float32.*you multiplied by W.T"),
        (Float32Compute, r"x: \(6, 192\) bfloat16.*layer.dequantize\(x.dtype\)"),
    ],
)
def test_dequantize_matmul_checker_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_dequantize_matmul(wrong)


# -- the memory of one step -------------------------------------------------------------------


def right_step_memory(shape, method, r, dtype_bytes):
    if method == "full":
        return shape.n_params * dtype_bytes, shape.n_params * dtype_bytes, 8 * shape.n_params
    t = lora_params(shape, r)
    return shape.n_params * dtype_bytes + 4 * t, 4 * t, 8 * t


def sixteen_bit_adapters(shape, method, r, dtype_bytes):  # adapters in the base's dtype: peft keeps them float32
    if method == "full":
        return right_step_memory(shape, method, r, dtype_bytes)
    t = lora_params(shape, r)
    return shape.n_params * dtype_bytes + dtype_bytes * t, dtype_bytes * t, 8 * t


def moments_in_the_weights_dtype(shape, method, r, dtype_bytes):
    w, g, _ = right_step_memory(shape, method, r, dtype_bytes)
    t = shape.n_params if method == "full" else lora_params(shape, r)
    return w, g, 2 * dtype_bytes * t


def gradients_for_everything(shape, method, r, dtype_bytes):
    w, _, s = right_step_memory(shape, method, r, dtype_bytes)
    return w, shape.n_params * dtype_bytes, s


def test_step_memory_checker_accepts_the_right_answer():
    assert check_step_memory(right_step_memory).startswith("correct")


@pytest.mark.parametrize(
    "wrong, match",
    [
        (sixteen_bit_adapters, r"SmolLM2-135M, lora, 2-byte weights, r=8: weights .*adapters"),
        (moments_in_the_weights_dtype, r"SmolLM2-135M, full, 2-byte weights: optimizer state .*float32"),
        (gradients_for_everything, r"SmolLM2-135M, lora, 4-byte weights, r=8: gradients .*frozen base"),
    ],
)
def test_step_memory_checker_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_step_memory(wrong)


# -- one paged AdamW step -------------------------------------------------------------------------


def adamw_(p, m, v, step, lr, betas, eps, weight_decay):
    b1, b2 = betas
    g = p.grad
    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


def right_paged_step(params, slow, fast, step, lr, betas, eps, weight_decay, page_in=True, page_out=True):
    with torch.no_grad():
        for p, state in zip(params, slow):
            n = p.numel()
            m, v = fast[0][:n].view_as(p), fast[1][:n].view_as(p)
            if page_in:
                m.copy_(state["exp_avg"])
                v.copy_(state["exp_avg_sq"])
            adamw_(p, m, v, step, lr, betas, eps, weight_decay)
            if page_out:
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)


def no_page_out(*args):
    right_paged_step(*args, page_out=False)


def no_page_in(*args):
    right_paged_step(*args, page_in=False)


def on_the_slow_tier(params, slow, fast, step, lr, betas, eps, weight_decay):  # never uses the fast tier
    with torch.no_grad():
        for p, state in zip(params, slow):
            adamw_(p, state["exp_avg"], state["exp_avg_sq"], step, lr, betas, eps, weight_decay)


def coupled_weight_decay(params, slow, fast, step, lr, betas, eps, weight_decay):  # Adam's L2, not AdamW's
    for p in params:
        p.grad = p.grad + weight_decay * p
    right_paged_step(params, slow, fast, step, lr, betas, eps, 0.0)


def test_paged_step_checker_accepts_the_right_answer():
    assert check_paged_adamw_step(right_paged_step).startswith("correct")


@pytest.mark.parametrize(
    "wrong, match",
    [
        (no_page_out, r"step 1, parameter 0 \(3, 5\).*still zero.*page them out"),
        (no_page_in, r"step 1, parameter 0 \(3, 5\): NaN.*page this parameter's moments in"),
        (on_the_slow_tier, r"step 1: the fast-tier frames were never written"),
        (coupled_weight_decay, r"step 1, parameter 0 \(3, 5\).*(decoupled decay|moments on the slow tier)"),
    ],
)
def test_paged_step_checker_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_paged_adamw_step(wrong)


# -- gradient accumulation --------------------------------------------------------------------------


def right_accumulation(model, micro_batches, optimizer, accum, scale=True, zero_each=False, step_each=False):
    losses, total = [], 0.0
    optimizer.zero_grad()
    for i, batch in enumerate(micro_batches):
        loss = model(**batch).loss
        (loss / accum if scale else loss).backward()
        total += loss.item() / accum
        if step_each:
            optimizer.step()
        if zero_each:
            optimizer.zero_grad()
        if (i + 1) % accum == 0:
            if not step_each:
                optimizer.step()
            optimizer.zero_grad()
            losses.append(total)
            total = 0.0
    return losses


def loss_not_divided(*args):
    return right_accumulation(*args, scale=False)


def zero_grad_every_micro_batch(*args):
    return right_accumulation(*args, zero_each=True)


def step_every_micro_batch(*args):
    return right_accumulation(*args, step_each=True)


def returns_the_scaled_loss(model, micro_batches, optimizer, accum):
    return [loss / accum for loss in right_accumulation(model, micro_batches, optimizer, accum)]


def test_accumulation_checker_accepts_the_right_answer():
    assert check_accumulation(right_accumulation).startswith("correct")


@pytest.mark.parametrize(
    "wrong, match",
    [
        (loss_not_divided, r"accum=2, 2 optimizer steps.*too large: divide each micro-batch's loss by accum"),
        (zero_grad_every_micro_batch, r"accum=2, 2 optimizer steps.*zero_grad\(\) ran .*throws the earlier ones away"),
        (
            step_every_micro_batch,
            r"accum=2, 2 optimizer steps, micro-batches of 2: optimizer.step\(\) ran 4 times.*not after each",
        ),
        (returns_the_scaled_loss, r"accum=2, 2 optimizer steps, micro-batches of 2: step 0 loss.*divided by accum"),
    ],
)
def test_accumulation_checker_rejects(wrong, match):
    with pytest.raises(AssertionError, match=match):
        check_accumulation(wrong)


# -- bits per weight ------------------------------------------------------------------------------


def test_bits_per_weight_checker():
    assert check_bits_per_weight(lambda bits, bs, dq: bits + 8 / bs + 32 / (bs * dq)).startswith("correct")
    with pytest.raises(AssertionError, match=r"bits=4, blocksize=64, dq_blocksize=256.*without double quantization"):
        check_bits_per_weight(lambda bits, bs, dq: bits + 32 / bs)
    with pytest.raises(AssertionError, match=r"bits=4, blocksize=128, dq_blocksize=256: expected 4.0635"):
        check_bits_per_weight(lambda bits, bs, dq: bits + 8 / 64 + 32 / (64 * dq))  # the block size fixed at 64


def test_a_stub_is_not_solved_yet(capsys):
    class Stub(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, layer):
            raise NotImplementedError()

    def stub(*args):
        raise NotImplementedError()

    for checker, answer in (
        (check_dequantize_matmul, Stub),
        (check_step_memory, stub),
        (check_paged_adamw_step, stub),
        (check_accumulation, stub),
        (check_bits_per_weight, stub),
    ):
        check(checker, answer)
        assert "not solved yet" in capsys.readouterr().out
