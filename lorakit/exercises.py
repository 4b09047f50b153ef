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


# --- notebook 09: beyond LoRA ---


def _dora_case(d_in: int, d_out: int, r: int, seed: int):
    """A DoRA layer with a nonzero B and a magnitude off its start, and an input ``x: (N, d_in)``."""
    from lorakit.dora import DoRALinear

    g = torch.Generator().manual_seed(seed)
    layer = DoRALinear(nn.Linear(d_in, d_out, bias=False), r=r, alpha=2 * r + 1)  # scaling != 1
    with torch.no_grad():
        layer.lora_B.copy_(0.5 * torch.randn(d_out, r, generator=g))
        layer.magnitude.mul_(1 + 0.3 * torch.randn(d_out, generator=g))
    return layer, torch.randn(3, d_in, generator=g)


def check_dora_forward(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(x, W0, A, B, m, scaling)`` returns DoRA's ``y = m * (W0 + s B A) / ||W0 + s B A||_c x``
    for ``x: (N, d_in)``, with the norm of each output row of the torch weight (DoRA §4.1)."""
    for i, (d_in, d_out, r) in enumerate([(16, 16, 2), (48, 24, 4), (24, 40, 8)]):
        layer, x = _dora_case(d_in, d_out, r, seed=i)
        W0, A, B, m = (t.detach() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.magnitude))
        s = layer.scaling
        with torch.no_grad():
            want = layer(x)  # (N, d_out)
            got = fn(x, W0, A, B, m, s)
        case = f"d_in={d_in}, d_out={d_out}, r={r}"
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(
                f"{case}: expected y of shape {tuple(want.shape)}, got {shape}; hint: m has one entry per output"
            )
        W = W0 + s * B @ A  # (d_out, d_in)
        if torch.allclose(got, x @ W.T, atol=1e-4):
            raise AssertionError(f"{case}: you returned LoRA's output (W0 + s B A) x; rescale each row by m / ||row||")
        if torch.allclose(got, x @ (m[:, None] * W / W.norm(dim=0, keepdim=True)).T, atol=1e-4):
            raise AssertionError(
                f"{case}: you normalized W's columns (dim=0); the paper's column is a torch *row* "
                "(one per output feature): W.norm(dim=1)"
            )
        if torch.allclose(got, x @ (m[:, None] * W).T, atol=1e-4):
            raise AssertionError(f"{case}: the direction is not normalized; divide W0 + s B A by its row norms")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise AssertionError(
                f"{case}: y differs from DoRALinear's by up to {(got - want).abs().max():.3g}; "
                "hint: W = W0 + s B A, then m[:, None] * W / W.norm(dim=1, keepdim=True), then x @ that.T"
            )
    return "correct: magnitude times unit direction, y = m * (W0 + s B A) / ||W0 + s B A||_c x, as DoRALinear"


def nf_roundtrip(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w -> dequantize(quantize(w))`` with lorakit's NF-k blockwise quantizer (blocks of 64)."""

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        return dequantize_blockwise(*quantize_blockwise(w, "nf", bits=bits))

    return roundtrip


def check_loftq_step(fn: Callable[..., tuple]) -> str:
    """Exercise: ``fn(W, lora, r, scaling, quantize)`` runs one LoftQ iteration and returns ``(A, B, Q)``:
    ``Q = quantize(W - lora)``, then ``scaling * B A`` = the rank-r SVD of ``W - Q`` (LoftQ Algorithm 1)."""
    from lorakit.loftq import loftq_step

    for i, (d_out, d_in, r, bits) in enumerate([(32, 64, 4, 4), (64, 128, 8, 2), (48, 64, 2, 3)]):
        g = torch.Generator().manual_seed(20 + i)
        W = torch.randn(d_out, d_in, generator=g)
        lora = 0.3 * torch.randn(d_out, r, generator=g) @ torch.randn(r, d_in, generator=g)  # a previous B A
        scaling = 2.0
        _, _, _, _, Q_want = loftq_step(W, lora, r, scaling, bits)
        got = fn(W.clone(), lora.clone(), r, scaling, nf_roundtrip(bits))
        case = f"W: ({d_out}, {d_in}), r={r}, {bits} bits"
        if not isinstance(got, tuple) or len(got) != 3:
            raise AssertionError(f"{case}: return the tuple (A, B, Q), got {type(got).__name__}")
        A, B, Q = got
        if tuple(A.shape) != (r, d_in) or tuple(B.shape) != (d_out, r):
            raise AssertionError(f"{case}: A must be (r, d_in) = {(r, d_in)}, B (d_out, r) = {(d_out, r)}")
        if torch.equal(Q, nf_roundtrip(bits)(W)):
            raise AssertionError(f"{case}: you quantized W; quantize W - lora, the part the adapter does not hold")
        if not torch.equal(Q, Q_want):
            raise AssertionError(f"{case}: Q differs; Q = quantize(W - lora)")
        U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
        best = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]  # the rank-r SVD of the error
        if torch.allclose(B @ A, best, atol=1e-4):
            raise AssertionError(f"{case}: B A is the error's top-r part, but scaling * B A must be; divide S by it")
        if not torch.allclose(scaling * B @ A, best, atol=1e-4):
            plain = torch.linalg.svd(W, full_matrices=False)
            if torch.allclose(scaling * B @ A, plain[0][:, :r] @ torch.diag(plain[1][:r]) @ plain[2][:r], atol=1e-4):
                raise AssertionError(f"{case}: you took the SVD of W; take it of the quantization error W - Q")
            raise AssertionError(
                f"{case}: scaling * B A differs from the rank-{r} SVD of W - Q by up to "
                f"{(scaling * B @ A - best).abs().max():.3g}; hint: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) Vh_r"
            )
    return "correct: quantize what the adapter does not hold, then let the adapter hold the error's top-r part"
