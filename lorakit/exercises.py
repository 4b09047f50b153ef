"""Checkers for the notebooks' exercises (01 LoRA, 03-04 quantization, 06 fine-tuning), all in one place.

Each runs the learner's function on several cases, compares it with lorakit's answer, and raises
``AssertionError`` with a hint when it differs (an explicit ``raise``, not ``assert``, so the checks
still run under ``python -O``). On success it returns a sentence saying what was right.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.blockwise import dequantize_blockwise, quantize_blockwise
from lorakit.lora import LoRALinear
from lorakit.lowrank import lora_param_count
from lorakit.memory import lora_params, model_shape
from lorakit.tradeoff import quantization_tradeoff


def check(checker: Callable[..., str], answer: object, *args: object, **kwargs: object) -> None:
    """Run ``checker`` on the learner's ``answer`` and print its verdict: the notebooks' checker cells call this.

    An unsolved stub (it raises ``NotImplementedError``, as in the student edition) prints "not solved yet" and
    returns, so Run All goes on: later cells use lorakit's implementation, never the learner's. A wrong answer
    raises the checker's ``AssertionError``, whose message names the failing case, expected vs got, and a hint.
    """
    name = getattr(answer, "__name__", type(answer).__name__)
    try:
        verdict = checker(answer, *args, **kwargs)
    except NotImplementedError:
        print(f"not solved yet: {name} still raises NotImplementedError; write it, then run this cell again")
        return
    print(verdict)


SHAPES = [(16, 16, 1), (64, 32, 4), (576, 192, 8), (4096, 4096, 16)]  # (d_in, d_out, r)


def check_lora_param_count(fn: Callable[[int, int, int], int]) -> str:
    """Exercise: ``fn(d_in, d_out, r)`` returns the trainable parameters LoRA adds to one weight."""
    for d_in, d_out, r in SHAPES:
        got, want = fn(d_in, d_out, r), lora_param_count(d_in, d_out, r)
        if got == d_in * d_out:
            raise AssertionError(
                f"for d_in={d_in}, d_out={d_out}, r={r} you counted the full weight W0 (d_out * d_in); "
                "count A and B instead"
            )
        if got != want:
            raise AssertionError(
                f"for d_in={d_in}, d_out={d_out}, r={r} you returned {got!r}; hint: A is (r, d_in) and B is (d_out, r)"
            )
    return "correct: A and B together hold r * (d_in + d_out) parameters"


def _layer_case(d_in: int, d_out: int, r: int, alpha: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=alpha)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
        layer.lora_A.copy_(torch.randn(r, d_in, generator=g))
        layer.lora_B.copy_(torch.randn(d_out, r, generator=g))  # nonzero B, so the update shows
    x = torch.randn(3, d_in, generator=g)  # (N, d_in)
    return layer, x


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(x, W0, A, B, alpha, r)`` returns ``h = W0 x + (alpha / r) B A x`` for ``x: (N, d_in)``."""
    for i, (d_in, d_out, r) in enumerate(SHAPES[:3]):
        alpha = 2.0 * r + 1  # alpha != r, so a missing or wrong scaling shows
        layer, x = _layer_case(d_in, d_out, r, alpha, seed=i)
        W0, A, B = layer.base_layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
        with torch.no_grad():
            want = layer(x)  # (N, d_out)
            got = fn(x, W0, A, B, alpha, r)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(
                f"for x: {tuple(x.shape)} expected h: {tuple(want.shape)}, got {shape}; hint: x @ W0.T is (N, d_out)"
            )
        if torch.allclose(got, x @ W0.T, atol=1e-4):
            raise AssertionError("your h equals the base output W0 x; add the LoRA path (alpha / r) * B A x")
        if torch.allclose(got, x @ W0.T + x @ A.T @ B.T, atol=1e-4):
            raise AssertionError("the LoRA path is missing its scaling; multiply B A x by alpha / r")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise AssertionError(
                f"h differs from LoRALinear's by up to {(got - want).abs().max():.3g}; hint: x @ A.T is (N, r)"
            )
    return "correct: h = W0 x + (alpha / r) B A x, as LoRALinear computes it"


def check_merged_weight(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(W0, A, B, alpha, r)`` returns the merged weight ``W0 + (alpha / r) B A``: ``(d_out, d_in)``."""
    for i, (d_in, d_out, r) in enumerate(SHAPES[:3]):
        alpha = 2.0 * r + 1
        layer, x = _layer_case(d_in, d_out, r, alpha, seed=10 + i)
        W0, A, B = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
        got = fn(W0.clone(), A, B, alpha, r)
        layer.merge()
        want = layer.base_layer.weight.detach()  # (d_out, d_in)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(
                f"the merged weight must be (d_out, d_in) = {tuple(want.shape)}, got {shape}; hint: B @ A"
            )
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise AssertionError(
                f"your merged weight differs from W0 + (alpha / r) B A by up to {(got - want).abs().max():.3g}"
            )
    return "correct: one (d_out, d_in) matrix, so the merged layer costs exactly what the base layer costs"


def check_trainable_params(fn: Callable[[object, int], int], config) -> str:
    """Exercise (notebook 06): ``fn(config, r)`` returns the parameters LoRA adds to all seven
    projections of every decoder block of the model with this transformers ``config``.

    Compared with ``lorakit.memory.lora_params``, which counts ``r * (d_in + d_out)`` per
    projection from the config's shapes (k_proj and v_proj are narrower under grouped-query attention).
    """
    shape = model_shape(config)
    for r in (1, 8, 64):
        got, want = fn(config, r), lora_params(shape, r)
        if got == want:
            continue
        square = lora_params(
            type(shape)(
                shape.vocab_size,
                shape.hidden_size,
                shape.intermediate_size,
                shape.num_layers,
                shape.num_heads,
                shape.num_heads,
            ),
            r,
        )
        if got == square:
            raise AssertionError(
                f"for r={r} you returned {got:,}: k_proj and v_proj are narrower than q_proj here, their output "
                f"is num_key_value_heads * head_dim = {shape.kv_size}, not {shape.hidden_size}"
            )
        raise AssertionError(
            f"for r={r} you returned {got!r}, expected {want:,}; hint: per block, sum r * (d_in + d_out) over "
            "q, k, v, o, gate, up and down, then multiply by num_hidden_layers"
        )
    return f"correct: rank 8 adds {lora_params(shape, 8):,} parameters to SmolLM2's projections"


def check_absmax_int8(fn: Callable[[torch.Tensor], tuple]) -> str:
    """Exercise (notebook 03): ``fn(x) -> (codes, scale)`` for one absmax int8 block.

    ``codes`` must be integers in [-127, 127] with ``codes * scale`` reproducing lorakit's Int8
    (one block as large as the tensor).
    """
    g = torch.Generator().manual_seed(1)
    for n in (7, 64, 1000):
        x = torch.randn(n, generator=g) * 3  # (n,)
        codes, scale = fn(x)
        codes = torch.as_tensor(codes)
        if codes.shape != x.shape:
            raise AssertionError(f"codes must have the input's shape {tuple(x.shape)}, got {tuple(codes.shape)}")
        if codes.abs().max() > 127:
            raise AssertionError(
                f"codes must lie in [-127, 127], got one of {int(codes.abs().max())}: scale by 127 / absmax"
            )
        packed, state = quantize_blockwise(x, "int", blocksize=_next_power_of_two(n), bits=8)
        expected = dequantize_blockwise(packed, state)  # (n,)
        got = codes.float() * float(scale)
        if not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            raise AssertionError(
                f"for {n} values codes * scale differs from lorakit's int8 by up to "
                f"{(got - expected).abs().max():.3g}; did you round to the nearest integer and use "
                "scale = absmax / 127?"
            )
    return "correct: your absmax int8 matches lorakit's Int8 codebook"


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def check_bits_per_parameter(answer: float, bits: int = 4, blocksize: int = 64, double_quant: bool = False) -> str:
    """Exercise (notebooks 03-04): is ``answer`` the bits per parameter of k-bit blockwise storage?

    Compared with the figure measured on a real quantized tensor's byte sizes.
    """
    n = blocksize * 256 * 4  # a size every block level divides
    measured = quantization_tradeoff(torch.randn(n), "int", bits, blocksize, double_quant).bits_per_parameter
    if not abs(answer - measured) < 1e-3:
        raise AssertionError(
            f"not quite: {bits} bits per code + the absmax constants; measured {measured:.4f}, you said {answer}"
        )
    return f"correct: {measured:.4f} bits per parameter"


# --- notebook 08: merge and deploy ---


def _nf4_case(d_out: int, d_in: int, r: int, seed: int, blocksize: int = 64):
    """A random W0 quantized to NF4 (no double quantization), with LoRA factors: the learner's inputs and lorakit's
    merged weight ``dequant(W0) + (alpha / r) B A`` (float32)."""
    from lorakit.blockwise import unpack_codes

    g = torch.Generator().manual_seed(seed)
    w0 = 0.05 * torch.randn(d_out, d_in, generator=g)
    packed, state = quantize_blockwise(w0, "nf4", blocksize)
    codes = unpack_codes(packed, 4, d_out * d_in).long()  # (d_out * d_in,)
    A, B = torch.randn(r, d_in, generator=g), 0.01 * torch.randn(d_out, r, generator=g)
    alpha = 2.0 * r + 1
    want = dequantize_blockwise(packed, state).float() + (alpha / r) * (B @ A)  # (d_out, d_in)
    return (codes, state.absmax.clone(), state.code.clone(), A, B, alpha, r, blocksize), want


def check_fold_into_dequantized(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(codes, absmax, codebook, A, B, alpha, r, blocksize)`` returns merge (a)'s weight
    ``W = dequant(W0_nf4) + (alpha / r) B A``, ``(d_out, d_in)`` float32, where ``dequant`` gives the value at
    flat position ``i`` as ``codebook[codes[i]] * absmax[i // blocksize]``."""
    cases = {
        "(8, 64), r=4: one block per row": (8, 64, 4),
        "(6, 40), r=2: blocks that straddle rows": (6, 40, 2),
        "(5, 20), r=1: 100 weights, a partial last block of 36": (5, 20, 1),
    }
    for i, (case, (d_out, d_in, r)) in enumerate(cases.items()):
        args, want = _nf4_case(d_out, d_in, r, seed=80 + i)
        got = fn(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != (d_out, d_in):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(
                f"case {case}: expected a (d_out, d_in) = {(d_out, d_in)} tensor, got {shape}; "
                "hint: reshape the dequantized flat weights to (d_out, d_in), then add (alpha / r) * (B @ A)"
            )
        error = (got.float() - want).abs().max().item()
        if error > 1e-5:
            codes, absmax, codebook, A, B, alpha, r, _ = args
            unscaled = dequantize_flat(codes, absmax, codebook, args[-1]).view(d_out, d_in) + B @ A
            no_scale = (got.float() - unscaled).abs().max()
            hint = (
                "the update is missing its scaling alpha / r"
                if no_scale < 1e-5
                else "each value's constant is absmax[i // blocksize] for its flat index i (the blocks run along the "
                "flattened weight, and the last one may be partial)"
            )
            raise AssertionError(f"case {case}: your W differs from lorakit's by up to {error:.3g}; hint: {hint}")
    return (
        "correct: merge (a) decodes every NF4 code with its block's absmax and adds the scaled update in float32, "
        "the weights the adapter was trained against"
    )


def dequantize_flat(codes: torch.Tensor, absmax: torch.Tensor, codebook: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``codebook[codes[i]] * absmax[i // blocksize]`` for every flat index ``i``: ``(n,)`` float32."""
    return codebook[codes] * absmax.repeat_interleave(blocksize)[: len(codes)]


def check_quantize_q8_0(fn: Callable[[torch.Tensor], tuple]) -> str:
    """Exercise: ``fn(w)`` returns GGUF's Q8_0 of ``w`` (rows, cols): ``(codes int8 (rows, cols), scales float16
    (rows, cols // 32))``, as :func:`lorakit.deploy.gguf.quantize_q8_0`."""
    from lorakit.deploy.gguf import quantize_q8_0

    g = torch.Generator().manual_seed(8)
    halves = torch.full((1, 32), 0.5)
    halves[0, 0], halves[0, 1:4] = 127.0, torch.tensor([2.5, -2.5, 60.5])  # d = 1: codes 3, -3, 61 (half away)
    cases = {
        "(4, 64) random weights": torch.randn(4, 64, generator=g),
        "(2, 32) with an all-zero row": torch.cat([torch.zeros(1, 32), torch.randn(1, 32, generator=g)]),
        "(1, 32) with values halfway between two codes": halves,
    }
    for case, w in cases.items():
        want_codes, want_scales = quantize_q8_0(w)
        got = fn(w.clone())
        if not (isinstance(got, tuple) and len(got) == 2):
            raise AssertionError(f"case {case}: return a pair (codes, scales), got {type(got).__name__}")
        codes, scales = got
        if tuple(codes.shape) != tuple(want_codes.shape) or tuple(scales.shape) != tuple(want_scales.shape):
            raise AssertionError(
                f"case {case}: expected codes {tuple(want_codes.shape)} and scales {tuple(want_scales.shape)}, got "
                f"{tuple(codes.shape)} and {tuple(scales.shape)}; hint: one scale per block of 32 along each row"
            )
        if scales.dtype != torch.float16:
            raise AssertionError(
                f"case {case}: the scales are {scales.dtype}; GGUF stores each block's d as float16 (2 bytes)"
            )
        if not torch.equal(scales, want_scales):
            raise AssertionError(
                f"case {case}: scales differ from absmax / 127 by up to "
                f"{(scales.float() - want_scales.float()).abs().max():.3g}; hint: d = max |w| over the block / 127"
            )
        if codes.dtype != torch.int8 or not torch.equal(codes, want_codes):
            wrong = int((codes.to(torch.int16) != want_codes.to(torch.int16)).sum())
            raise AssertionError(
                f"case {case}: {wrong} codes differ (dtype {codes.dtype}); hint: q = round(w / d) with the float32 d, "
                "rounded half away from zero as C's roundf (torch.round rounds half to even), as int8; a zero block "
                "has d = 0 and codes 0"
            )
    return "correct: 32 int8 codes and one float16 scale per block, 34 bytes for 32 weights: 8.5 bits per weight"
