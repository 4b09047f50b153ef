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


# --- notebook 10: the lab ---


def _bootstrap_cases():
    g = torch.Generator().manual_seed(10)
    return [  # (name, losses, resamples, seed, confidence)
        ("8 blocks", 4.8 + 0.4 * torch.randn(8, generator=g, dtype=torch.float64), 1000, 0, 0.95),
        ("33 blocks, seed 3", 3.0 + torch.rand(33, generator=g, dtype=torch.float64), 500, 3, 0.95),
        ("8 blocks at 90%", 4.8 + 0.4 * torch.randn(8, generator=g, dtype=torch.float64), 1000, 1, 0.90),
        ("one block", torch.tensor([4.2], dtype=torch.float64), 200, 0, 0.95),
    ]


def check_bootstrap_perplexity(fn: Callable[..., tuple]) -> str:
    """Exercise: ``fn(losses, resamples, seed, confidence)`` returns ``(ppl, low, high)``: ``exp`` of the mean
    per-block loss and its percentile bootstrap interval, as :func:`lorakit.evaluation.perplexity_from_losses`."""
    import math

    from lorakit.evaluation import perplexity_from_losses

    for name, losses, resamples, seed, confidence in _bootstrap_cases():
        blocks = torch.zeros(len(losses), 4, dtype=torch.long)  # only their count matters here
        want = perplexity_from_losses(losses, blocks, confidence=confidence, resamples=resamples, seed=seed)
        got = fn(losses.clone(), resamples=resamples, seed=seed, confidence=confidence)
        if not (isinstance(got, tuple) and len(got) == 3):
            raise AssertionError(f"case {name}: expected a tuple (ppl, low, high), got {got!r}")
        ppl, low, high = (float(x) for x in got)
        mean_of_exp = float(losses.exp().mean())
        if abs(ppl - want.ppl) > 1e-6 * want.ppl:
            hint = (
                "you averaged exp(loss); perplexity is exp of the mean loss"
                if abs(ppl - mean_of_exp) < 1e-6 * mean_of_exp
                else "ppl = exp(losses.mean())"
            )
            raise AssertionError(f"case {name}: perplexity expected {want.ppl:.4f}, got {ppl:.4f}; hint: {hint}")
        if abs(low - want.low) > 1e-6 * want.ppl or abs(high - want.high) > 1e-6 * want.ppl:
            if len(losses) > 1 and abs(high - low) < 1e-9:
                hint = (
                    "the interval has no width: resample the blocks *with* replacement (torch.randint), "
                    "not as a permutation"
                )
            elif abs(low - math.log(want.low)) <= 1e-6 * abs(math.log(want.low)):
                hint = "the interval must be in perplexity: exp() of the quantiles of the resampled mean losses"
            elif high - low < 0.92 * (want.high - want.low):  # not a different draw: a few percent at most
                hint = (
                    f"your interval is narrower than the {confidence:.0%} one: the quantiles are "
                    f"(1 - c) / 2 and (1 + c) / 2, here {(1 - confidence) / 2:g} and {(1 + confidence) / 2:g}"
                )
            else:
                hint = (
                    "draw the indices exactly as the task says, torch.randint(N, (resamples, N), "
                    "generator=torch.Generator().manual_seed(seed)), and take torch.quantile of the resampled means"
                )
            raise AssertionError(
                f"case {name}: interval expected {want.low:.4f} to {want.high:.4f}, got {low:.4f} to {high:.4f}; "
                f"hint: {hint}"
            )
    return "correct: your bootstrap interval equals lorakit's (perplexity_from_losses) on every case"


def check_interval_order(fn: Callable[[tuple, tuple], str]) -> str:
    """Exercise: ``fn(a, b)`` for two intervals ``(low, high)`` returns ``"lower"``, ``"higher"`` or ``"overlap"``,
    as :func:`lorakit.lab.claims.interval_order`."""
    from lorakit.lab.claims import interval_order

    cases = [
        ("a wholly below b", (120.0, 130.0), (131.0, 140.0)),
        ("a wholly above b", (150.0, 170.0), (120.0, 140.0)),
        ("overlapping, a's centre lower", (100.0, 135.0), (130.0, 160.0)),
        ("b inside a", (80.0, 220.0), (125.0, 135.0)),
        ("touching ends", (120.0, 130.0), (130.0, 140.0)),
        ("a single point inside b", (131.0, 131.0), (130.0, 140.0)),
    ]
    for name, a, b in cases:
        want, got = interval_order(a, b), fn(a, b)
        if got != want:
            hint = {
                "overlap": "two intervals that share any point (touching ends too) cannot order the two models",
                "lower": "a lies wholly below b when a's high end is below b's low end",
                "higher": "a lies wholly above b when a's low end is above b's high end",
            }[want]
            raise AssertionError(f"case {name}: a={a}, b={b}: expected {want!r}, got {got!r}; hint: {hint}")
    return "correct: only intervals that do not touch order two models"
