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


# --- notebook 07: instruction tuning ---

_LABEL_CASES = [  # (name, context_ids, full_ids): the context ends with the generation prompt
    ("one answer", [1, 9, 5, 2, 1, 7], [1, 9, 5, 2, 1, 7, 40, 41, 2, 3]),
    ("a one-token answer", [1, 5, 6], [1, 5, 6, 8, 2, 3]),
    ("a context whose last token merges with the answer's first", [1, 9, 5, 12], [1, 9, 5, 13, 40, 2]),
]


def check_answer_labels(fn: Callable[[list[int], list[int]], list[int]]) -> str:
    """Exercise (notebook 07): ``fn(context_ids, full_ids)`` returns the labels of ``full_ids``: -100 on the
    context, the token ids from where the context and the full conversation part (TRL's completion mask)."""
    from lorakit.chat import IGNORE_INDEX, common_prefix_length

    for name, context, full in _LABEL_CASES:
        start = common_prefix_length(context, full)
        want = [IGNORE_INDEX] * start + full[start:]
        got = list(fn(list(context), list(full)))
        if len(got) != len(full):
            raise AssertionError(f"{name}: expected {len(full)} labels (one per token of full_ids), got {len(got)}")
        if got == want:
            continue
        if got == full:
            raise AssertionError(f"{name}: every token counts in your labels; set the context's labels to -100")
        if got[:-1] == want[:-1]:
            raise AssertionError(
                f"{name}: the last token's label is {got[-1]}, expected {want[-1]}; the end of the turn must count, "
                "or the model never learns to stop"
            )
        raise AssertionError(
            f"{name}: expected {want}, got {got}; hint: the answer starts where context_ids and full_ids first "
            "differ, which is not always len(context_ids)"
        )
    return "correct: -100 on the context, the answer and its end-of-turn token in the loss"


def check_pad_batch(fn: Callable[[list[list[int]], list[list[int]], int], dict]) -> str:
    """Exercise (notebook 07): ``fn(input_ids, labels, pad_id)`` pads on the right to ``(B, T)`` tensors
    ``input_ids``, ``attention_mask`` and ``labels``, padding ignored by position (checked with pad = EOS)."""
    from lorakit.chat import pad_batch

    eos = 2
    cases = [
        ("two examples, pad_id = EOS", [[1, 5, 6, 2], [1, 7, 2]], [[-100, -100, 6, 2], [-100, 7, 2]], eos),
        (
            "three examples, another pad_id",
            [[1, 5], [1, 7, 8, 9, 2], [1, 2]],
            [[-100, 5], [-100, 7, 8, 9, 2], [-100, 2]],
            0,
        ),
    ]
    for name, ids, labels, pad in cases:
        want = pad_batch(ids, labels, pad)
        got = fn([list(x) for x in ids], [list(x) for x in labels], pad)
        for key in ("input_ids", "attention_mask", "labels"):
            value = got.get(key) if isinstance(got, dict) else None
            if not isinstance(value, torch.Tensor) or value.shape != want[key].shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise AssertionError(f"{name}: {key} must be a tensor of shape {tuple(want[key].shape)}, got {shape}")
            if torch.equal(value.long(), want[key]):
                continue
            if key == "labels" and int((value == -100).sum()) > int((want[key] == -100).sum()):
                raise AssertionError(
                    f"{name}: your labels ignore an EOS token: padding was found by token id, and pad_id is the "
                    "EOS here; mark padding by position (beyond each example's length)"
                )
            raise AssertionError(f"{name}: {key} expected {want[key].tolist()}, got {value.tolist()}")
    return "correct: right-padded, attention 0 and label -100 on padding by position, every EOS kept"
