"""Checkers for the notebooks' "Build it" exercises, all in one place (issue 13).

A checker runs the learner's function on several cases (shapes, dtypes, edge cases) and compares it with
lorakit's own implementation. On a wrong answer it raises ``AssertionError`` whose message names the case,
says what was expected and what came back, and gives a hint (an explicit ``raise``, not ``assert``, so the
checks still run under ``python -O``). On success it returns a sentence saying what was right.

The notebooks' checker cells call ``check(check_x, my_x)``: in the student edition (``make student``) an
unsolved stub raises ``NotImplementedError`` and ``check`` prints "not solved yet" instead of stopping Run All.

Notebook owners append their checkers at the end of this module, under a comment line
``# --- notebook NN: <title> ---``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.blockwise import dequantize_blockwise, quantize_4bit, quantize_blockwise, unpack_codes
from lorakit.chat import IGNORE_INDEX, common_prefix_length, pad_batch
from lorakit.codebooks import codebook, dynamic_map, nf_offset, normal_float
from lorakit.dora import DoRALinear
from lorakit.double_quant import ABSMAX_BLOCKSIZE, quantize_absmax
from lorakit.evaluation import perplexity_from_losses
from lorakit.linear4bit import Linear4bit
from lorakit.loftq import loftq_step
from lorakit.lora import LORA_BASE_TYPES, LoRALinear, _matches, add_lora, lora_layers
from lorakit.lowrank import lora_param_count
from lorakit.memory import LLAMA, ModelShape, estimate_memory, lora_params, model_shape, quantized_bits_per_param
from lorakit.paged import PagedOptimizer
from lorakit.tradeoff import quantization_tradeoff
from lorakit.train import train_steps

NOT_SOLVED = "not solved yet"


def check(checker: Callable[..., str], answer: object, *args: object, **kwargs: object) -> None:
    """Run ``checker`` on the learner's ``answer`` and print its verdict: the notebooks' checker cells call this.

    An unsolved stub (it raises ``NotImplementedError``, as in the student edition) prints "not solved yet" and
    returns, so Run All goes on: later cells use lorakit's implementation, never the learner's. A wrong answer
    raises the checker's ``AssertionError``, whose message names the failing case, expected vs got, and a hint.
    """
    name = getattr(answer, "__name__", type(answer).__name__)
    try:
        with torch.random.fork_rng(devices=[]):  # the checkers draw random cases; the notebook's stream is left alone
            verdict = checker(answer, *args, **kwargs)
    except NotImplementedError:
        print(f"{NOT_SOLVED}: {name} still raises NotImplementedError; write it, then run this cell again")
        return
    print(verdict)


def fail(case: str, problem: str, hint: str) -> NoReturn:
    """Raise the checkers' one kind of message: the case, what is wrong (expected vs got), a hint."""
    raise AssertionError(f"{case}: {problem}. Hint: {hint}")


def call(case: str, fn: Callable, *args, **kwargs):
    """Call the learner's ``fn``; an error inside it (other than the stub's ``NotImplementedError``) becomes
    an ``AssertionError`` that names the case, so the learner sees which input broke their code."""
    try:
        return fn(*args, **kwargs)
    except (NotImplementedError, AssertionError):
        raise
    except Exception as e:  # noqa: BLE001 -- any error in the learner's code is reported with its case
        fail(
            case, f"your code raised {type(e).__name__}: {e}", "check the shapes of each step (comments like # (N, r))"
        )


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def _max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float() - want.detach().float()).abs().max())


# --- notebook 01: LoRA from scratch ---

SHAPES = [(16, 16, 1), (64, 32, 4), (576, 192, 8), (4096, 4096, 16)]  # (d_in, d_out, r)


def check_lora_param_count(fn: Callable[[int, int, int], int]) -> str:
    """Exercise: ``fn(d_in, d_out, r)`` returns the trainable parameters LoRA adds to one weight."""
    for d_in, d_out, r in [SHAPES[1], *SHAPES[:1], *SHAPES[2:]]:  # a non-square case first: A and B differ
        case = f"case d_in={d_in}, d_out={d_out}, r={r}"
        got, want = call(case, fn, d_in, d_out, r), lora_param_count(d_in, d_out, r)
        if got == want:
            continue
        hints = {
            r * d_in * d_out: "A and B are two matrices whose sizes add up, not multiply",
            r * d_in: "you counted only one of A, (r, d_in), and B, (d_out, r); both train",
            r * d_out: "you counted only one of A, (r, d_in), and B, (d_out, r); both train",
            d_in * d_out: "you counted the full weight W0 (d_out * d_in), which stays frozen; count A and B instead",
        }
        fail(case, f"expected {want:,}, got {got!r}", hints.get(got, "A is (r, d_in) and B is (d_out, r)"))
    return "correct: A and B together hold r * (d_in + d_out) parameters"


def _layer_case(d_in: int, d_out: int, r: int, alpha: float, seed: int, bias: bool = False, dropout: float = 0.0):
    """A LoRALinear with random W0, A and a nonzero B (B = 0 would hide the LoRA path), and an input x: (3, d_in)."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(nn.Linear(d_in, d_out, bias=bias), r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
        if bias:
            layer.base_layer.bias.copy_(torch.randn(d_out, generator=g))
        layer.lora_A.copy_(torch.randn(r, d_in, generator=g))
        layer.lora_B.copy_(torch.randn(d_out, r, generator=g))
    x = torch.randn(3, d_in, generator=g)  # (N, d_in)
    return layer, x


def check_lora_forward(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(x, W0, A, B, alpha, r)`` returns ``h = W0 x + (alpha / r) B A x`` for ``x: (N, d_in)``."""
    for i, (d_in, d_out, r) in enumerate(SHAPES[:3]):
        alpha = 2.0 * r + 1  # alpha != r, so a missing or wrong scaling shows
        case = f"case x: (3, {d_in}), W0: ({d_out}, {d_in}), r={r}, alpha={alpha:g}"
        layer, x = _layer_case(d_in, d_out, r, alpha, seed=i)
        W0, A, B = layer.base_layer.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
        with torch.no_grad():
            want = layer(x)  # (N, d_out)
            got = call(case, fn, x, W0, A, B, alpha, r)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            fail(case, f"expected h: {tuple(want.shape)}, got {_shape(got)}", "x @ W0.T is (N, d_out)")
        if torch.allclose(got, x @ W0.T, atol=1e-4):
            fail(case, "your h equals the base output W0 x", "add the LoRA path (alpha / r) * B A x")
        if torch.allclose(got, x @ W0.T + x @ A.T @ B.T, atol=1e-4):
            fail(case, "the LoRA path is missing its scaling", "multiply B A x by alpha / r")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            fail(
                case,
                f"h differs from LoRALinear's by up to {_max_diff(got, want):.3g}",
                "x @ A.T is (N, r), then @ B.T gives (N, d_out)",
            )
    return "correct: h = W0 x + (alpha / r) B A x, as LoRALinear computes it"


# (d_in, d_out, r, alpha, bias, dropout, x's leading shape, mode): square first, so A and B swapped still runs
LAYER_CASES = [
    (16, 16, 2, 5.0, False, 0.0, (3,), "train"),
    (32, 24, 4, 16.0, True, 0.0, (2, 5), "train"),
    (32, 24, 4, 16.0, True, 0.3, (4,), "eval"),
    (48, 40, 8, 16.0, True, 0.5, (2, 6), "train"),
]


def check_lora_layer(cls: type[nn.Module]) -> str:
    """Exercise: ``cls(base_layer, r, alpha, dropout)`` is a LoRA layer whose ``forward`` computes
    ``h = W0 x + b + (alpha / r) B A dropout(x)``, as ``lorakit.LoRALinear`` does.

    Checked against LoRALinear with the same W0, A and B (B nonzero), with dropout off and on, in train and
    eval mode, for x of shape (N, d_in) and (batch, T, d_in); in train mode with dropout both layers draw the
    same dropout mask (the same seed). Also checks that gradients reach A and B.
    """
    for i, (d_in, d_out, r, alpha, bias, p, lead, mode) in enumerate(LAYER_CASES):
        case = (
            f"case d_in={d_in}, d_out={d_out}, r={r}, alpha={alpha:g}, bias={bias}, dropout={p}, "
            f"x: {(*lead, d_in)}, {mode} mode"
        )
        ref, _ = _layer_case(d_in, d_out, r, alpha, seed=20 + i, bias=bias, dropout=p)
        x = torch.randn(*lead, d_in, generator=torch.Generator().manual_seed(30 + i))
        base = copy.deepcopy(ref.base_layer)
        layer = call(case, cls, base, r=r, alpha=alpha, dropout=p)
        for name in ("lora_A", "lora_B"):
            if not isinstance(getattr(layer, name, None), torch.Tensor):
                fail(case, f"your layer has no tensor attribute {name}", "keep the __init__ given in the exercise")
        with torch.no_grad():
            layer.lora_A.copy_(ref.lora_A)
            layer.lora_B.copy_(ref.lora_B)
        ref.train(mode == "train")
        layer.train(mode == "train")
        torch.manual_seed(40 + i)
        want = ref(x)  # (..., d_out)
        torch.manual_seed(40 + i)
        got = call(case, layer, x)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            fail(case, f"expected h: {tuple(want.shape)}, got {_shape(got)}", "h has x's leading dimensions and d_out")
        if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            if layer.lora_A.requires_grad and layer.lora_B.requires_grad:
                got.square().sum().backward()
                if layer.lora_A.grad is None or layer.lora_B.grad is None or not layer.lora_B.grad.abs().sum() > 0:
                    fail(
                        case,
                        "h is right but no gradient reaches lora_A or lora_B",
                        "compute with the parameters themselves, not .data or .detach()",
                    )
            continue
        with torch.no_grad():
            base_out = ref.base_layer(x)
            A, B, s = ref.lora_A, ref.lora_B, alpha / r
            torch.manual_seed(40 + i)
            dropped = ref.dropout(x) if mode == "train" else x  # the same mask the reference drew
            suspects = {
                "the LoRA path is missing (h equals W0 x + b)": (base_out, "add (alpha / r) * B A x"),
                "the LoRA path is missing its scaling alpha / r": (
                    base_out + dropped @ A.T @ B.T,
                    "multiply B A x by self.scaling",
                ),
                "dropout is applied to the base path too": (
                    ref.base_layer(dropped) + s * dropped @ A.T @ B.T,
                    "W0 x must see the undropped x; only the LoRA path gets dropout(x)",
                ),
                "dropout is missing on the LoRA path": (
                    base_out + s * x @ A.T @ B.T,
                    "apply self.dropout to x before A: B A dropout(x)",
                ),
            }
        for problem, (value, hint) in suspects.items():
            if value.shape == got.shape and torch.allclose(got, value, atol=1e-4, rtol=1e-4):
                if mode == "eval" and problem.startswith("dropout"):
                    continue
                fail(case, f"{problem} (largest difference from LoRALinear {_max_diff(got, want):.3g})", hint)
        if mode == "eval" and p > 0:
            fail(
                case,
                f"in eval mode h differs from LoRALinear's by up to {_max_diff(got, want):.3g}; is dropout still on?",
                "use the nn.Dropout module self.dropout, which does nothing after .eval() "
                "(F.dropout(x, p) without training=self.training drops in eval mode too)",
            )
        fail(
            case,
            f"h differs from LoRALinear's by up to {_max_diff(got, want):.3g}",
            "h = base_layer(x) + scaling * (dropout(x) @ A.T) @ B.T, with A: (r, d_in) and B: (d_out, r)",
        )
    return "correct: W0 x + b + (alpha / r) B A dropout(x), dropout on the LoRA path only, off in eval mode"


def check_merged_weight(fn: Callable[..., torch.Tensor]) -> str:
    """Exercise: ``fn(W0, A, B, alpha, r)`` returns the merged weight ``W0 + (alpha / r) B A``: ``(d_out, d_in)``."""
    for i, (d_in, d_out, r) in enumerate(SHAPES[:3]):
        alpha = 2.0 * r + 1
        case = f"case W0: ({d_out}, {d_in}), r={r}, alpha={alpha:g}"
        layer, x = _layer_case(d_in, d_out, r, alpha, seed=10 + i)
        W0, A, B = (t.detach().clone() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
        got = call(case, fn, W0.clone(), A, B, alpha, r)
        layer.merge()
        want = layer.base_layer.weight.detach()  # (d_out, d_in)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            fail(case, f"the merged weight must be (d_out, d_in) = {tuple(want.shape)}, got {_shape(got)}", "B @ A")
        if torch.allclose(got, W0 + B @ A, atol=1e-4, rtol=1e-4):
            fail(case, "your merged weight is W0 + B A, without the scaling", "W0 + (alpha / r) * (B @ A)")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            fail(
                case,
                f"your merged weight differs from W0 + (alpha / r) B A by up to {_max_diff(got, want):.3g}",
                "B @ A is (d_out, r) @ (r, d_in) = (d_out, d_in)",
            )
    return "correct: one (d_out, d_in) matrix, so the merged layer costs exactly what the base layer costs"


# --- notebook 02: LoRA on a transformer ---


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A random transformers model with a few thousand parameters, built from its config (nothing downloaded):
    ``"llama"`` (SmolLM2's architecture), ``"gpt_neox"`` (Pythia's) or ``"t5"`` (an encoder-decoder)."""

    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    if kind == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.GPTNeoXForCausalLM(config)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2
        )
        return transformers.T5ForConditionalGeneration(config)
    raise ValueError(f"kind={kind!r}: use 'llama', 'gpt_neox' or 't5'")


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (model kind, targets, what the case is about)
TARGET_CASES = [
    ("llama", ["q_proj", "v_proj"], "the LoRA paper's choice"),
    ("llama", SEVEN, "all seven projections"),
    ("gpt_neox", ["query_key_value", "dense"], "'dense' must not match mlp.dense_h_to_4h"),
    ("t5", ["q", "v", "o"], "'o' must not match DenseReluDense.wo"),
    ("llama", ["q_proj", "mlp"], "'mlp' names a LlamaMLP block, not a Linear"),
]


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """lorakit's answer to the 02 exercise: the dotted names of the Linear modules ``add_lora`` wraps, in
    ``named_modules`` order (peft's ``target_modules`` rule: the name is a target or ends with ``"." + target``)."""
    return [n for n, m in model.named_modules() if n and _matches(n, targets) and isinstance(m, LORA_BASE_TYPES)]


def check_find_targets(fn: Callable[[nn.Module, list[str]], list[str]]) -> str:
    """Exercise: ``fn(model, targets)`` returns the dotted names of the Linears LoRA wraps, in model order."""
    for kind, targets, about in TARGET_CASES:
        case = f"case {kind} model, targets={targets} ({about})"
        model = tiny_model(kind)
        want = target_names(model, targets)
        got = call(case, fn, model, list(targets))
        if not isinstance(got, (list, tuple)) or not all(isinstance(n, str) for n in got):
            fail(case, f"expected a list of names, got {type(got).__name__}", "collect name for name, module in ...")
        got = list(got)
        if got == want:
            continue
        extra, missing = [n for n in got if n not in want], [n for n in want if n not in got]
        if extra:
            module = model.get_submodule(extra[0]) if extra[0] in dict(model.named_modules()) else None
            if module is not None and not isinstance(module, LORA_BASE_TYPES):
                hint = f"{extra[0]} is a {type(module).__name__}, not a Linear: keep only isinstance(module, nn.Linear)"
            else:
                hint = (
                    "a target matches the whole last part of the name: name == t or name.endswith('.' + t); "
                    "'t in name' or name.endswith(t) also catch longer names"
                )
            fail(case, f"{len(extra)} names too many, e.g. {extra[0]!r} (expected {len(want)} names)", hint)
        if missing:
            fail(case, f"{len(missing)} names missing, e.g. {missing[0]!r}", "walk every module: model.named_modules()")
        fail(case, f"the right names in another order: expected {want[:3]}..., got {got[:3]}...", "keep model order")
    return "correct: every Linear whose last name part is a target, and nothing else (peft's target_modules rule)"


# (model kind, targets, r, alpha)
WRAP_CASES = [
    ("llama", ["q_proj", "v_proj"], 4, 8.0),
    ("llama", SEVEN, 2, 5.0),
    ("gpt_neox", ["query_key_value", "dense"], 4, 16.0),
]


def check_wrap_and_freeze(fn: Callable[..., nn.Module]) -> str:
    """Exercise: ``fn(model, names, r, alpha)`` puts a ``LoRALinear(module, r=r, alpha=alpha)`` in place of each
    named Linear of ``model`` (in place, returning ``model``) and freezes everything except the LoRA
    factors, as ``lorakit.add_lora`` does (compared with it on tiny models)."""
    for kind, targets, r, alpha in WRAP_CASES:
        case = f"case {kind} model, {len(targets)} targets {targets[:2]}..., r={r}, alpha={alpha:g}"
        model = tiny_model(kind)
        names = target_names(model, targets)
        originals = {n: model.get_submodule(n) for n in names}
        reference = add_lora(copy.deepcopy(model), targets, r=r, alpha=alpha)
        got = call(case, fn, model, list(names), r, alpha)
        if got is not model:
            fail(case, f"expected the model itself back, got {type(got).__name__}", "change model in place, return it")
        stray = [k for k in vars(model)["_modules"] if "." in k]
        if stray:
            fail(
                case,
                f"the model got a new attribute named {stray[0]!r}; the module at that path is unchanged",
                "setattr(model, 'a.b.c', layer) does not walk the dots: set the last part on the parent, "
                "setattr(model.get_submodule('a.b'), 'c', layer)",
            )
        layers = lora_layers(model)
        if not layers:
            fail(
                case,
                f"no LoRALinear in the model (expected {len(names)})",
                "replace each module by LoRALinear(module, r=r, alpha=alpha) with setattr on its parent",
            )
        if sorted(layers) != sorted(lora_layers(reference)):
            wrong = sorted(set(layers) ^ set(lora_layers(reference)))
            fail(
                case,
                f"LoRA layers at the wrong places, e.g. {wrong[0]!r}: expected {len(names)}, got {len(layers)}",
                "wrap exactly the modules named in names, each at its own dotted name",
            )
        for name, layer in layers.items():
            if layer.base_layer is not originals[name]:
                fail(case, f"{name}.base_layer is not the model's original Linear", "wrap the module itself, no copy")
            if (layer.r, layer.scaling) != (r, alpha / r):
                fail(
                    case,
                    f"{name}: expected r={r}, scaling={alpha / r:g}, got r={layer.r}, scaling={layer.scaling:g}",
                    "pass r and alpha to LoRALinear(module, r=r, alpha=alpha)",
                )
        want = {n for n, p in reference.named_parameters() if p.requires_grad}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable != want:
            frozen_lora = sorted(want - trainable)
            open_base = sorted(trainable - want)
            if frozen_lora:
                fail(
                    case,
                    f"{len(frozen_lora)} LoRA factors are frozen, e.g. {frozen_lora[0]!r}",
                    "freeze every parameter first, then wrap: new LoRALinear factors start trainable",
                )
            fail(
                case,
                f"{len(open_base)} base parameters still train, e.g. {open_base[0]!r} (expected only lora_A/lora_B)",
                "p.requires_grad_(False) for every parameter of the model before wrapping",
            )
    return "correct: the named Linears wrapped in place, only lora_A and lora_B left trainable, as add_lora does"


# --- shared by notebooks 03-06 ---


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


# --- notebooks 05-06: the 4-bit Linear, memory, training ---


def _run_case(case: str, hint: str, fn: Callable[..., object], *args: object) -> object:
    """``fn(*args)``, with an error other than ``NotImplementedError`` turned into an AssertionError naming ``case``."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise
    except AssertionError:
        raise
    except Exception as e:  # the learner's code failed on this case: say where, and what to look at
        raise AssertionError(f"{case}: your code raised {type(e).__name__}: {e}; hint: {hint}") from e


def _tensors_kept_by(grad_fn) -> list[torch.Tensor]:
    """What an autograd Function's ``ctx`` keeps until backward: saved tensors and tensors stored as attributes."""
    kept = list(grad_fn.saved_tensors)
    for value in vars(grad_fn).values():
        values = value if isinstance(value, (list, tuple)) else (value,)
        kept += [v for v in values if isinstance(v, torch.Tensor)]
    return kept


DEQUANTIZE_MATMUL_CASES = [  # (x's shape, out_features, dtype): 2-D and 3-D inputs, square and not, both dtypes
    ((4, 64), 64, torch.float32),
    ((3, 128), 64, torch.float32),
    ((2, 5, 64), 96, torch.float32),
    ((6, 192), 128, torch.bfloat16),
    ((2, 3, 64), 64, torch.bfloat16),
]


def check_dequantize_matmul(fn: type) -> str:
    """Exercise (notebook 05): ``fn`` is a ``torch.autograd.Function`` with ``fn.apply(x, layer) = x W^T``.

    ``forward(ctx, x, layer)`` dequantizes ``layer`` (a :class:`lorakit.linear4bit.Linear4bit`) to ``x``'s dtype and
    multiplies; ``backward(ctx, grad_y)`` returns ``(grad_y W, None)``, dequantizing ``W`` again. Compared with
    lorakit's ``Linear4bit`` (its ``DequantizeMatmul``) on 2-D and 3-D inputs in float32 and bfloat16; rejected: a
    full-size weight kept in ``ctx`` for backward, a gradient for the frozen layer, a transposed product.
    """

    g = torch.Generator().manual_seed(5)
    for shape, d_out, dtype in DEQUANTIZE_MATMUL_CASES:
        d_in = shape[-1]
        case = f"x: {tuple(shape)} {str(dtype).removeprefix('torch.')}, W: ({d_out}, {d_in})"
        layer = Linear4bit.from_linear(nn.Linear(d_in, d_out, bias=False))
        x = torch.randn(*shape, generator=g).to(dtype)
        grad_y = torch.randn(*shape[:-1], d_out, generator=g).to(dtype)
        x_ref = x.clone().requires_grad_(True)
        want = layer(x_ref)  # (..., d_out)
        want.backward(grad_y)
        x_got = x.clone().requires_grad_(True)
        got = _run_case(case, "W is (out_features, in_features): y = x @ W.T", fn.apply, x_got, layer)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape_got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"{case}: expected y: {tuple(want.shape)}, got {shape_got}; hint: y = x @ W.T")
        if got.dtype != dtype:
            raise AssertionError(
                f"{case}: y came out in {got.dtype}; compute in the input's dtype: layer.dequantize(x.dtype)"
            )
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        if not torch.allclose(got.float(), want.float(), **tol):
            transposed = d_in == d_out and torch.allclose(
                got.float(), (x.float() @ layer.dequantize(torch.float32)).to(dtype).float(), **tol
            )
            raise AssertionError(
                f"{case}: y differs from Linear4bit's by up to {(got.float() - want.float()).abs().max():.3g}"
                + ("; you computed x @ W: W is (out_features, in_features), so y = x @ W.T" if transposed else "")
            )
        if got.grad_fn is None:
            raise AssertionError(f"{case}: y has no grad_fn; return the product from forward, do not detach it")
        big = [t for t in _tensors_kept_by(got.grad_fn) if t.is_floating_point() and t.numel() >= d_out * d_in]
        big = [t for t in big if t.shape != x.shape]  # x itself is not the weight (and lorakit does not keep it)
        if big:
            raise AssertionError(
                f"{case}: ctx keeps a full-size weight until backward ({tuple(big[0].shape)}, {big[0].dtype}): that is "
                "the memory the 4-bit layer exists to save; keep only the layer (ctx.layer = layer) and dequantize "
                "again in backward"
            )
        _run_case(
            case,
            "backward returns one gradient per forward input: grad_y @ W for x, None for the frozen layer",
            got.backward,
            grad_y,
        )
        if x_got.grad is None or x_got.grad.shape != x.shape:
            raise AssertionError(f"{case}: no gradient of x's shape {tuple(x.shape)} came back; return grad_y @ W")
        if not torch.allclose(x_got.grad.float(), x_ref.grad.float(), **tol):
            hint = "grad_x = grad_y @ W: (..., out_features) @ (out_features, in_features)"
            if d_in == d_out:
                wt = (grad_y.float() @ layer.dequantize(torch.float32).T).to(dtype).float()
                if torch.allclose(x_got.grad.float(), wt, **tol):
                    hint = "you multiplied by W.T; backward needs grad_y @ W"
            raise AssertionError(
                f"{case}: the gradient of x differs from Linear4bit's by up to "
                f"{(x_got.grad.float() - x_ref.grad.float()).abs().max():.3g}; {hint}"
            )
    return (
        "correct: forward dequantizes to the compute dtype and multiplies; backward dequantizes again, so no "
        "full-precision weight waits in memory for backward, and the frozen codes get no gradient"
    )


def _smollm2_shape():

    return ModelShape(49152, 576, 1536, 30, 9, 3, tie_embeddings=True, name="SmolLM2-135M")


def check_step_memory(fn: Callable[..., tuple]) -> str:
    """Exercise (notebook 05): ``fn(shape, method, r, dtype_bytes) -> (weights, gradients, optimizer_state)`` in bytes.

    One AdamW step of ``method`` ``"full"`` or ``"lora"`` (rank ``r`` on all seven projections, adapters kept in
    float32 whatever the compute dtype, as lorakit and peft keep them) on a model of ``shape``
    (a :class:`lorakit.memory.ModelShape`) stored in ``dtype_bytes`` per weight. Compared with
    :func:`lorakit.memory.estimate_memory`.
    """

    for shape in (_smollm2_shape(), LLAMA["7B"]):
        for method in ("full", "lora"):
            for dtype_bytes, dtype in ((4, "float32"), (2, "bfloat16")):
                case = f"{shape.name}, {method}, {dtype_bytes}-byte weights" + (", r=8" if method == "lora" else "")
                est = estimate_memory(shape, method, rank=8, dtype=dtype, targets="all")
                got = _run_case(case, "return three ints", fn, shape, method, 8, dtype_bytes)
                if not isinstance(got, (tuple, list)) or len(got) != 3:
                    raise AssertionError(f"{case}: return (weights, gradients, optimizer_state), got {got!r}")
                want = (est.weight_bytes, est.gradients, est.optimizer_state)
                for name, g_, w_ in zip(("weights", "gradients", "optimizer state"), got, want):
                    if g_ == w_:
                        continue
                    n, t = shape.n_params, est.trainable_params
                    hint = {
                        "weights": "every parameter in dtype_bytes, plus (LoRA) the adapters in 4 bytes each",
                        "gradients": "one gradient per trainable parameter, in the trainable parameter's dtype",
                        "optimizer state": "AdamW keeps m and v per trainable parameter, in float32: 8 bytes",
                    }[name]
                    if name == "gradients" and method == "lora" and g_ == n * dtype_bytes:
                        hint = "the frozen base gets no gradient: count the adapters' parameters only"
                    elif name == "gradients" and method == "lora" and g_ == t * dtype_bytes != w_:
                        hint = "the adapters are float32 (4 bytes) on a 16-bit base, and so are their gradients"
                    elif name == "optimizer state" and g_ == 2 * dtype_bytes * (n if method == "full" else t) != w_:
                        hint = "AdamW's m and v are float32 (4 bytes each) whatever the weights' dtype"
                    elif name == "optimizer state" and method == "lora" and g_ == 8 * n:
                        hint = "only trainable parameters have optimizer state: the adapters"
                    elif name == "weights" and method == "lora" and g_ == n * dtype_bytes:
                        hint = "the adapters are weights too: add 4 bytes per LoRA parameter"
                    raise AssertionError(f"{case}: {name} {g_!r} bytes, expected {w_:,} (trainable {t:,}); {hint}")
    return "correct: weights, gradients and AdamW state, byte for byte as lorakit.estimate_memory counts them"


def _paged_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (4, 4), (2, 3, 2)]  # different sizes: a stale fast-tier frame shows
    params = [torch.randn(*s, generator=g) for s in shapes]
    grads = [[torch.randn(*s, generator=g) for s in shapes] for _ in range(3)]  # three steps
    return params, grads


def check_paged_adamw_step(fn: Callable[..., None]) -> str:
    """Exercise (notebook 05): ``fn(params, slow, fast, step, lr, betas, eps, weight_decay)``: one AdamW step with the
    moments paged.

    ``slow[i]`` holds parameter ``i``'s ``"exp_avg"`` and ``"exp_avg_sq"`` (the slow tier); ``fast`` is a pair of 1-D
    frames as long as the largest parameter (the fast-tier budget: one parameter's moments). For each parameter:
    page in (copy its moments into the frames), update the parameter and the frames in place (AdamW), page out
    (copy the frames back). Compared over three steps with :class:`lorakit.PagedOptimizer` around
    ``torch.optim.AdamW``.
    """

    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    params, grads = _paged_case(0)
    ref = [p.clone() for p in params]
    paged = PagedOptimizer(
        torch.optim.AdamW(ref, lr=lr, betas=betas, eps=eps, weight_decay=wd), budget_bytes=128, page_bytes=128
    )
    mine = [p.clone() for p in params]
    slow = [{"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in mine]
    longest = max(p.numel() for p in mine)
    fast = (torch.full((longest,), float("nan")), torch.full((longest,), float("nan")))  # stale until paged in
    try:
        for step in range(1, 4):
            for p, r, gr in zip(mine, ref, grads[step - 1]):
                p.grad, r.grad = gr.clone(), gr.clone()
            paged.step()
            case = f"step {step}"
            _run_case(
                case,
                "slow[i]['exp_avg'] and fast[0][:n].view_as(p) are tensors: copy_ between them",
                fn,
                *(mine, slow, fast, step, lr, betas, eps, wd),
            )
            for i, p in enumerate(mine):
                if torch.isnan(p).any():
                    raise AssertionError(
                        f"{case}, parameter {i} {tuple(p.shape)}: NaN in the parameter: the frames hold stale "
                        "values until you page this parameter's moments in"
                    )
            last = mine[-1]
            if torch.isnan(fast[0][: last.numel()]).any() or torch.isnan(fast[1][: last.numel()]).any():
                raise AssertionError(
                    f"{case}: the fast-tier frames were never written: page each parameter's moments in "
                    "(fast[0][:n].copy_(slow[i]['exp_avg'].view(-1))) and update them there, not on the slow tier"
                )
            for i, (p, r) in enumerate(zip(mine, ref)):
                state = paged.state_of(r)
                if not torch.allclose(slow[i]["exp_avg"], state["exp_avg"], atol=1e-7) or not torch.allclose(
                    slow[i]["exp_avg_sq"], state["exp_avg_sq"], atol=1e-9
                ):
                    out = step == 1 and not slow[i]["exp_avg"].any()  # still the zeros it started as
                    raise AssertionError(
                        f"{case}, parameter {i} {tuple(p.shape)}: the moments on the slow tier differ from "
                        "PagedOptimizer's"
                        + (
                            "; they are still zero: after the update, page them out (copy the frames back)"
                            if out
                            else ""
                        )
                        + "; hint: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2"
                    )
                if not torch.allclose(p, r, rtol=1e-5, atol=1e-7):
                    raise AssertionError(
                        f"{case}, parameter {i} {tuple(p.shape)}: the parameter differs from PagedOptimizer's by "
                        f"{(p - r).abs().max():.3g}; hint: p -= lr * wd * p (decoupled decay, first), then "
                        "p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)"
                    )
    finally:
        paged.close()
    return (
        "correct: page in, update on the fast tier, page out; the updates are AdamW's, as PagedOptimizer's are, "
        "while only one parameter's moments are ever on the fast tier"
    )


def _tiny_lm(seed: int):

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class _CountingSGD(torch.optim.SGD):
    """SGD that counts its ``step`` and ``zero_grad`` calls (plain SGD: a wrong gradient scale shows in the update)."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.steps = self.zero_grads = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.zero_grads += 1
        super().zero_grad(set_to_none)


def check_accumulation(fn: Callable[..., list]) -> str:
    """Exercise (notebook 06): ``fn(model, micro_batches, optimizer, accum) -> losses``: gradient accumulation.

    Every ``accum`` micro-batches make one optimizer step: each micro-batch's loss is divided by ``accum`` before
    ``backward`` (the gradients add up in ``.grad``), then ``optimizer.step()`` and ``optimizer.zero_grad()`` once.
    Returns one loss per optimizer step (the mean over its micro-batches). Compared on a tiny Llama with
    :func:`lorakit.train.train_steps` on the merged batches (``accum`` micro-batches of B blocks = one batch of
    ``accum * B``), with plain SGD so that a wrong gradient scale changes the update.
    """

    g = torch.Generator().manual_seed(3)
    for accum, n_steps, micro_size in ((2, 2, 2), (4, 1, 1), (1, 2, 2), (3, 2, 1)):
        case = f"accum={accum}, {n_steps} optimizer steps, micro-batches of {micro_size}"
        micro = []
        for _ in range(accum * n_steps):
            ids = torch.randint(0, 64, (micro_size, 16), generator=g)  # (B, T)
            micro.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
        merged = []
        for s in range(n_steps):
            chunk = micro[s * accum : (s + 1) * accum]
            merged.append({k: torch.cat([b[k] for b in chunk]) for k in chunk[0]})  # (accum * B, T)
        ref_model, model = _tiny_lm(0), _tiny_lm(0)
        want = train_steps(ref_model, merged, torch.optim.SGD(ref_model.parameters(), lr=0.5), steps=n_steps)
        opt = _CountingSGD(model.parameters(), lr=0.5)
        model.train()
        got = _run_case(case, "loop over the micro-batches; model(**batch).loss", fn, model, micro, opt, accum)
        if opt.steps != n_steps:
            raise AssertionError(
                f"{case}: optimizer.step() ran {opt.steps} times for {len(micro)} micro-batches, expected {n_steps}"
                + ("; step once every accum micro-batches, not after each one" if opt.steps == len(micro) else "")
            )
        if accum > 1 and opt.zero_grads >= len(micro):
            raise AssertionError(
                f"{case}: optimizer.zero_grad() ran {opt.zero_grads} times for {len(micro)} micro-batches: clearing "
                "the gradients after every micro-batch throws the earlier ones away; clear once per optimizer step"
            )
        ref_delta = [(r - p0).detach() for r, p0 in zip(ref_model.parameters(), _tiny_lm(0).parameters())]
        got_delta = [(p - p0).detach() for p, p0 in zip(model.parameters(), _tiny_lm(0).parameters())]
        if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got_delta, ref_delta)):
            num = sum((a * b).sum() for a, b in zip(got_delta, ref_delta))
            ratio = float(num / sum((b * b).sum() for b in ref_delta))
            if n_steps == 1 and accum > 1 and abs(ratio - accum) < 0.05 * accum:
                hint = f"the update is {ratio:.2f}x too large: divide each micro-batch's loss by accum before backward"
            elif accum > 1 and abs(ratio - accum) < 0.3 * accum:
                hint = f"the updates are about {accum}x too large: divide each micro-batch's loss by accum"
            else:
                hint = "sum the gradients of all accum micro-batches (loss / accum each), then step once"
            raise AssertionError(
                f"{case}: the weights after training differ from train_steps' on merged batches; {hint}"
            )
        if not isinstance(got, (list, tuple)) or len(got) != n_steps:
            raise AssertionError(f"{case}: return one loss per optimizer step ({n_steps}), got {got!r}")
        for s, (a, b) in enumerate(zip(got, want)):
            if not abs(float(a) - b) <= 1e-4 * abs(b):
                hint = (
                    "you returned the loss divided by accum: report the mean over the micro-batches"
                    if abs(float(a) * accum - b) <= 1e-4 * abs(b) and accum > 1
                    else "report the mean of the step's micro-batch losses"
                )
                raise AssertionError(f"{case}: step {s} loss {float(a):.5f}, expected {b:.5f}; {hint}")
    return (
        "correct: accum micro-batches, each loss / accum, one step and one zero_grad per accum: the same update "
        "as one batch accum times larger, in the memory of one micro-batch"
    )


def check_bits_per_weight(fn: Callable[[int, int, int], float]) -> str:
    """Exercise (notebook 05): ``fn(bits, blocksize, dq_blocksize)``, bits per weight with double quantization.

    ``bits``-bit codes, an 8-bit absmax per block of ``blocksize`` weights and one fp32 constant per
    ``dq_blocksize`` absmaxes. Compared with :func:`lorakit.memory.quantized_bits_per_param`.
    """

    for bits, blocksize, dq in ((4, 64, 256), (4, 128, 256), (3, 64, 256), (8, 256, 128)):
        case = f"bits={bits}, blocksize={blocksize}, dq_blocksize={dq}"
        got = _run_case(case, "return a float", fn, bits, blocksize, dq)
        want = quantized_bits_per_param(bits, blocksize, True, dq)
        if not (isinstance(got, (int, float)) and abs(got - want) < 1e-9):
            no_dq = bits + 32 / blocksize
            hint = (
                "that is without double quantization: the absmax is 8-bit, plus one fp32 constant per dq block"
                if isinstance(got, (int, float)) and abs(got - no_dq) < 1e-9
                else "bits + 8 / blocksize + 32 / (blocksize * dq_blocksize)"
            )
            raise AssertionError(f"{case}: expected {want:.4f} bits per weight, got {got!r}; {hint}")
    return f"correct: {quantized_bits_per_param(4, 128):.4f} bits per weight with blocks of 128"


# --- notebook 09: beyond LoRA ---


def _dora_case(d_in: int, d_out: int, r: int, seed: int):
    """A DoRA layer with a nonzero B and a magnitude off its start, and an input ``x: (N, d_in)``."""

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


# --- notebooks 03-04: quantization ---
# The "Build it" checkers of notebook 03 (absmax int8 of one block, then blockwise absmax) and notebook 04 (the NF4
# table, blockwise 4-bit codes packed two per byte, double quantization of the absmax constants, bits per parameter).
# Each runs the learner's function on several cases against lorakit's own implementation (lorakit.blockwise,
# lorakit.codebooks, lorakit.double_quant) and names the failing case, expected vs got, and a hint.
# Codes are compared by the value they stand for: the learner's code must be as near to the scaled input as
# lorakit's (within 1e-6 of the [-1, 1] range), so a tie broken the other way by float rounding still passes.


_TIE = 1e-6  # how much farther than lorakit's code a learner's code may be from the scaled value (ties, float rounding)


def _tensor(value: object, what: str, case: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{case}: {what} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _unpack(result: object, names: tuple[str, ...], case: str) -> tuple:
    if not isinstance(result, tuple | list) or len(result) != len(names):
        raise AssertionError(f"{case}: return a tuple ({', '.join(names)}), got {type(result).__name__}")
    return tuple(result)


def _scalar(value: object, what: str, case: str) -> float:
    t = torch.as_tensor(value)
    if t.numel() != 1:
        raise AssertionError(f"{case}: {what} must be one number, got a tensor of shape {tuple(t.shape)}")
    return float(t)


def _int_codes(w: torch.Tensor, bits: int, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lorakit's symmetric Int-k blockwise quantization as integers: (codes (n,) int64 in -M..M, absmax (n_blocks,))."""
    packed, state = quantize_blockwise(w, "int", blocksize, bits=bits)
    index = unpack_codes(packed, bits, w.numel()).long()  # (n,) positions in the Int-k table
    m = 2 ** (bits - 1) - 1
    return torch.round(state.code[index] * m).long(), state.absmax


def _farther(got: torch.Tensor, want: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Positions where the value ``got`` is farther from ``target`` than lorakit's ``want`` (all float64)."""
    return (got - target).abs() > (want - target).abs() + _TIE


def _toward_zero(got: torch.Tensor, want: torch.Tensor) -> bool:
    """True when ``got`` is ``want`` moved toward zero by at most one (truncation instead of rounding)."""
    return bool((got.abs() <= want.abs()).all() and ((got - want).abs() <= 1).all() and (got * want >= 0).all())


def _blocks_text(n: int, blocksize: int) -> str:
    full, rest = divmod(n, blocksize)
    text = f"{n} values = {full} full block{'s' if full != 1 else ''} of {blocksize}"
    return text + (f" + a partial last block of {rest}" if rest else "")


def _check_absmax(
    got: torch.Tensor, want: torch.Tensor, n: int, blocksize: int, case: str, values: torch.Tensor | None = None
) -> None:
    """The per-block absmax constants: count (the partial last block) and values (of the flat float32 ``values``)."""
    n_blocks = -(n // -blocksize)
    if got.numel() == n // blocksize and n % blocksize:
        raise AssertionError(
            f"{case}: {got.numel()} absmax constants, expected {n_blocks}: the partial last block of "
            f"{n % blocksize} values needs its own absmax too (ceil(n / blocksize) blocks)"
        )
    if got.numel() != n_blocks:
        raise AssertionError(
            f"{case}: {got.numel()} absmax constants, expected ceil({n} / {blocksize}) = {n_blocks}, one per block"
        )
    if got.dtype != torch.float32:
        raise AssertionError(
            f"{case}: absmax has dtype {got.dtype}; store the constants in float32, as lorakit and bitsandbytes do "
            "(convert the weights with .float() first)"
        )
    got = got.reshape(-1).double()
    if torch.allclose(got, want.double(), rtol=1e-6, atol=0.0):
        return
    if torch.allclose(got, torch.full_like(got, float(want.max())), rtol=1e-6):
        raise AssertionError(
            f"{case}: every block got the same absmax {float(want.max()):.4g}, the whole tensor's; "
            f"each block of {blocksize} values has its own absmax, its largest magnitude"
        )
    i = int(((got - want.double()).abs() > 1e-6 * want.double().abs()).nonzero()[0])  # the first wrong block
    if values is not None:
        signed = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize).amax(dim=1)
        if torch.allclose(got, signed.double(), rtol=1e-6):
            raise AssertionError(
                f"{case}: the absmax of block {i} is {float(want[i]):.6g}, you returned {float(got[i]):.6g}, its "
                "largest value; absmax is the largest magnitude, x.abs().max(), so a negative value can set it"
            )
    raise AssertionError(
        f"{case}: the absmax of block {i} is {float(want[i]):.6g}, you returned {float(got[i]):.6g}; "
        "hint: the largest magnitude of the block, x.abs().max() over its values, computed in float32"
    )


# ------------------------------------------------------------------ 03: absmax int8 of one block
def _one_block_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    negative = torch.randn(7, generator=g)
    negative[3] = -2.5 * negative.abs().max()  # the largest magnitude is negative
    return [
        ("8 values from N(0, 1), float32", torch.randn(8, generator=g)),
        ("7 values whose largest magnitude is negative", negative),
        ("1000 weights from N(0, 0.02^2), float32", torch.randn(1000, generator=g) * 0.02),
        ("300 weights in bfloat16", (torch.randn(300, generator=g) * 0.02).bfloat16()),
    ]


def check_absmax_quantize(fn: Callable[[torch.Tensor], tuple]) -> str:
    """Build it (notebook 03): ``fn(x) -> (codes, scale)``, absmax int8 of one block ``x: (n,)``.

    ``scale = absmax / 127`` (float32), ``codes = round(x / scale)`` as ``torch.int8`` in [-127, 127]. Compared with
    lorakit's Int8 codebook (``quantize_blockwise(x, "int", bits=8)`` with one block as large as ``x``).
    """
    cases = _one_block_cases()
    for k, (text, x) in enumerate(cases, 1):
        case = f"case {k} of {len(cases)} ({text})"
        want_codes, absmax = _int_codes(x, 8, _next_power_of_two(x.numel()))
        codes, scale = _unpack(fn(x.clone()), ("codes", "scale"), case)
        codes = _tensor(codes, "codes", case)
        if codes.shape != x.shape:
            raise AssertionError(
                f"{case}: codes must have the input's shape {tuple(x.shape)}, got {tuple(codes.shape)}"
            )
        if codes.dtype != torch.int8:
            raise AssertionError(
                f"{case}: codes have dtype {codes.dtype}, expected torch.int8 (one byte per weight is the point); "
                "hint: round first, then .to(torch.int8)"
            )
        scale = _scalar(scale, "scale", case)
        want_scale = float(absmax[0]) / 127
        if not abs(scale - want_scale) <= 1e-6 * want_scale:
            if abs(scale - 127 * want_scale) <= 1e-6 * 127 * want_scale:
                hint = "scale = absmax maps the largest value to code 1; divide by 127 so that it maps to 127"
            elif abs(scale - float(x.float().max()) / 127) <= 1e-6 * want_scale:
                hint = "you took x.max(); absmax is the largest magnitude, x.abs().max() (here it is negative)"
            elif any(abs(scale - 127 * want_scale / d) <= 1e-6 * want_scale for d in (128, 255, 256)):
                hint = "absmax int8 is symmetric, codes -127..127 (-128 stays unused): divide by 127"
            elif x.dtype != torch.float32:
                hint = f"x is {x.dtype}: convert it with x.float() first, a {x.dtype} scale is rounded"
            else:
                hint = "scale = x.abs().max() / 127"
            raise AssertionError(f"{case}: expected scale {want_scale:.7g}, got {scale:.7g}; {hint}")
        got = codes.long()
        if got.abs().max() > 127:
            raise AssertionError(f"{case}: codes must lie in [-127, 127], got {int(got.abs().max())}")
        target = x.double() / (float(absmax[0]) / 127)  # (n,) the exact x / scale
        wrong = _farther(got.double(), want_codes.double(), target)
        if wrong.any():
            i = int(wrong.nonzero()[0])
            if _toward_zero(got, want_codes):
                hint = "you truncated toward zero (.to(torch.int8) alone does that); round to the nearest integer first"
            elif x.dtype != torch.float32:
                hint = f"x is {x.dtype}: convert it with x.float() before dividing, {x.dtype} rounds x / scale"
            else:
                hint = "codes = torch.round(x / scale)"
            raise AssertionError(
                f"{case}: x[{i}] = {float(x[i]):.6g}, x / scale = {float(target[i]):.4f}, so its code is "
                f"{int(want_codes[i])}; you returned {int(got[i])}; {hint}"
            )
    return "correct: scale = absmax / 127 and codes = round(x / scale) as int8, as lorakit's Int8 codebook stores them"


def check_absmax_dequantize(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    """Build it (notebook 03): ``fn(codes, scale) -> x_hat``, ``codes * scale`` in float32, ``codes``' shape.

    ``codes``: (n,) int8 and ``scale``: 0-dim float32, as lorakit's Int8 stores one block; compared with
    ``dequantize_blockwise``.
    """
    cases = [(text, x.float()) for text, x in _one_block_cases()]
    for k, (text, x) in enumerate(cases, 1):
        case = f"case {k} of {len(cases)} ({text})"
        packed, state = quantize_blockwise(x, "int", _next_power_of_two(x.numel()), bits=8)
        want = dequantize_blockwise(packed, state)  # (n,) float32
        codes = torch.round(state.code[unpack_codes(packed, 8, x.numel()).long()] * 127).to(torch.int8)  # (n,)
        scale = state.absmax[0] / 127  # 0-dim float32
        got = _tensor(fn(codes.clone(), scale.clone()), "x_hat", case)
        if got.shape != want.shape:
            raise AssertionError(
                f"{case}: x_hat must have the codes' shape {tuple(want.shape)}, got {tuple(got.shape)}"
            )
        if not got.is_floating_point():
            raise AssertionError(f"{case}: x_hat has dtype {got.dtype}; return floats: codes.float() * scale")
        if torch.allclose(got.double(), want.double(), rtol=1e-6, atol=0.0):
            continue
        c = codes.double()
        if torch.allclose(got.double(), c * float(scale) * 127, rtol=1e-5):
            hint = "you multiplied by absmax = 127 * scale; the scale already holds the 1/127"
        elif torch.allclose(got.double(), c * float(scale) / 127, rtol=1e-5):
            hint = "you divided by 127 again; scale = absmax / 127 already"
        else:
            hint = "x_hat = codes * scale"
        i = int((got.double() - want.double()).abs().argmax())
        raise AssertionError(
            f"{case}: code {int(codes[i])} with scale {float(scale):.6g} gives {float(want[i]):.6g}, "
            f"you returned {float(got[i]):.6g}; {hint}"
        )
    return "correct: x_hat = codes * scale, as lorakit's dequantize_blockwise computes it"


# ------------------------------------------------------------------ 03: blockwise absmax
def _blockwise_cases() -> list[tuple[str, torch.Tensor, int, int]]:
    g = torch.Generator().manual_seed(4)
    spiky = torch.randn(1000, generator=g) * 0.02
    spiky[300] = 1.0  # one outlier, in block 2
    return [
        ("w (4, 64) float32, blocksize 64, 8 bits", torch.randn(4, 64, generator=g), 64, 8),
        ("w (3, 100) float32, blocksize 64, 8 bits", torch.randn(3, 100, generator=g), 64, 8),
        ("w (1000,) with one outlier, blocksize 128, 4 bits", spiky, 128, 4),
        ("w (5, 40) bfloat16, blocksize 32, 4 bits", (torch.randn(5, 40, generator=g) * 0.02).bfloat16(), 32, 4),
    ]


def check_blockwise_quantize(fn: Callable[..., tuple]) -> str:
    """Build it (notebook 03): ``fn(w, blocksize, bits) -> (codes, absmax)``, symmetric absmax Int-k in blocks.

    ``codes``: (n,) ``torch.int8`` in ``-M..M`` with ``M = 2**(bits-1) - 1``, of ``w`` flattened; ``absmax``:
    ``(ceil(n / blocksize),)`` float32, the last block possibly partial. Compared with
    ``lorakit.quantize_blockwise(w, "int", blocksize, bits=bits)``.
    """
    cases = _blockwise_cases()
    for k, (text, w, blocksize, bits) in enumerate(cases, 1):
        n = w.numel()
        case = f"case {k} of {len(cases)} ({text}: {_blocks_text(n, blocksize)})"
        m = 2 ** (bits - 1) - 1
        want_codes, want_absmax = _int_codes(w, bits, blocksize)
        codes, absmax = _unpack(fn(w.clone(), blocksize, bits), ("codes", "absmax"), case)
        codes, absmax = _tensor(codes, "codes", case), _tensor(absmax, "absmax", case)
        if codes.numel() == n - n % blocksize and n % blocksize:
            raise AssertionError(
                f"{case}: {codes.numel()} codes for {n} values: the partial last block of {n % blocksize} was "
                "dropped; quantize it with its own absmax (pad it, or treat it apart)"
            )
        if codes.numel() != n:
            raise AssertionError(
                f"{case}: {codes.numel()} codes for {n} values; return one code per value of w.flatten() "
                "(padding, if you added some, cropped off)"
            )
        if codes.dtype != torch.int8:
            raise AssertionError(f"{case}: codes have dtype {codes.dtype}, expected torch.int8; hint: .to(torch.int8)")
        _check_absmax(_tensor(absmax, "absmax", case), want_absmax, n, blocksize, case, w.reshape(-1).float())
        got = codes.reshape(-1).long()
        if got.abs().max() > m:
            raise AssertionError(
                f"{case}: codes at {bits} bits lie in [-{m}, {m}] (M = 2**(bits-1) - 1), got {int(got.abs().max())}"
            )
        scale = want_absmax.double().repeat_interleave(blocksize)[:n] / m  # (n,) each value's absmax / M
        target = w.reshape(-1).double() / scale
        wrong = _farther(got.double(), want_codes.double(), target)
        if wrong.any():
            i = int(wrong.nonzero()[0])
            if _toward_zero(got, want_codes):
                hint = "you truncated toward zero; round to the nearest integer first"
            elif w.dtype != torch.float32:
                hint = f"w is {w.dtype}: convert it with .float() first, {w.dtype} rounds x / scale"
            elif i >= n - n % blocksize:
                hint = "the wrong code is in the partial last block: scale it by its own absmax"
            else:
                hint = f"codes = round(x / (absmax of x's block / {m}))"
            raise AssertionError(
                f"{case}: value {i} (block {i // blocksize}) is {float(w.reshape(-1)[i]):.6g}, its code "
                f"{int(want_codes[i])}; you returned {int(got[i])}; {hint}"
            )
    return "correct: each block scaled by its own absmax, the partial last block too, as lorakit.quantize_blockwise"


def check_blockwise_dequantize(fn: Callable[..., torch.Tensor]) -> str:
    """Build it (notebook 03): ``fn(codes, absmax, shape, blocksize, bits) -> w_hat``, float32 of ``shape``.

    ``w_hat = codes / M * absmax`` of each value's block, ``M = 2**(bits-1) - 1``; compared with
    ``lorakit.dequantize_blockwise``.
    """
    cases = [(text, w.float(), blocksize, bits) for text, w, blocksize, bits in _blockwise_cases()[:3]]
    for k, (text, w, blocksize, bits) in enumerate(cases, 1):
        n = w.numel()
        case = f"case {k} of {len(cases)} ({text}: {_blocks_text(n, blocksize)})"
        m = 2 ** (bits - 1) - 1
        packed, state = quantize_blockwise(w, "int", blocksize, bits=bits)
        want = dequantize_blockwise(packed, state)  # (w.shape) float32
        codes = torch.round(state.code[unpack_codes(packed, bits, n).long()] * m).to(torch.int8)  # (n,)
        got = _tensor(fn(codes.clone(), state.absmax.clone(), w.shape, blocksize, bits), "w_hat", case)
        if got.shape != w.shape:
            raise AssertionError(f"{case}: w_hat must have the shape {tuple(w.shape)}, got {tuple(got.shape)}")
        if torch.allclose(got.double(), want.double(), rtol=1e-6, atol=0.0):
            continue
        diff = (got.double() - want.double()).reshape(-1).abs()
        i = int(diff.argmax())
        c = codes.double()
        per_value = state.absmax.double().repeat_interleave(blocksize)[:n]
        if torch.allclose(got.reshape(-1).double(), c * per_value, rtol=1e-5):
            hint = f"divide the codes by M = {m} first: a code of {m} stands for the block's absmax"
        elif (diff[: n - n % blocksize] <= 1e-6 * want.abs().max()).all():
            hint = "only the partial last block is wrong: its values use the last absmax, absmax[-1]"
        else:
            hint = f"w_hat = codes / {m} * absmax of each value's block (repeat_interleave, then crop to n)"
        raise AssertionError(
            f"{case}: value {i} (block {i // blocksize}) should be {float(want.reshape(-1)[i]):.6g}, "
            f"you returned {float(got.reshape(-1)[i]):.6g}; {hint}"
        )
    return "correct: w_hat = codes / M * each block's absmax, as lorakit.dequantize_blockwise computes it"


# ------------------------------------------------------------------ 04: the NF4 table
def check_nf_table(fn: Callable[[int, float], torch.Tensor]) -> str:
    """Build it (notebook 04): ``fn(bits, offset) -> table``, NF-k as bitsandbytes' ``create_normal_map`` builds it.

    ``2**(k-1)`` positive quantiles of N(0, 1) at ``linspace(offset, 0.5, 2**(k-1) + 1)[:-1]``, one fewer negative
    ones at ``linspace(offset, 0.5, 2**(k-1))[:-1]``, an exact zero, sorted, divided by the largest: ``(2**k,)``.
    Compared with ``lorakit.normal_float(bits, offset)`` (bit-identical to bitsandbytes) within 1e-6.
    """
    cases = [(4, nf_offset(4), "NF4"), (4, 0.95, "NF4 with another offset"), (3, nf_offset(3), "NF3")]
    for k, (bits, offset, text) in enumerate(cases, 1):
        case = f"case {k} of {len(cases)} (bits={bits}, offset={offset}: {text})"
        want = normal_float(bits, offset)  # (2**bits,) float32
        got = _tensor(fn(bits, offset), "the table", case).reshape(-1).double()
        half = 2 ** (bits - 1)
        if got.numel() != 2**bits:
            hint = (
                f"{half} positive, {half} negative and a zero make {2**bits + 1}: take one negative quantile fewer, "
                f"linspace(offset, 0.5, {half})[:-1]"
                if got.numel() == 2**bits + 1
                else f"{half} positive quantiles, {half - 1} negative ones and an exact zero"
            )
            raise AssertionError(f"{case}: expected {2**bits} values, got {got.numel()}; {hint}")
        if not torch.isfinite(got).all():
            raise AssertionError(
                f"{case}: your table has an infinite value: Phi^-1(1) is +inf (and Phi^-1(0.5) is the zero); the "
                "probabilities run from the offset down to 0.5, with 0.5 left out ([:-1])"
            )
        counts = (int((got > 0).sum()), int((got == 0).sum()), int((got < 0).sum()))
        if counts != (half, 1, half - 1):
            raise AssertionError(
                f"{case}: your table has {counts[0]} positive values, {counts[1]} zeros and {counts[2]} negative; "
                f"NF{bits} has {half}, 1 and {half - 1}: the asymmetric split keeps zero exact and every code distinct"
            )
        if not (got[1:] >= got[:-1]).all():
            raise AssertionError(f"{case}: sort the table ascending (codes index a sorted table)")
        if not (abs(float(got.max()) - 1) < 1e-6 and abs(float(got.min()) + 1) < 1e-6):
            raise AssertionError(
                f"{case}: the table spans [{float(got.min()):.4f}, {float(got.max()):.4f}], expected [-1, 1]; "
                "divide by its largest value (absmax-scaled blocks lie in [-1, 1])"
            )
        if not torch.allclose(got, want.double(), rtol=0.0, atol=1e-6):
            if offset != nf_offset(bits) and torch.allclose(got, normal_float(bits).double(), atol=1e-6):
                raise AssertionError(
                    f"{case}: this is the table for offset {nf_offset(bits)}; use the offset argument, the outermost "
                    "probability"
                )
            i = int((got - want.double()).abs().argmax())
            side = "positive" if want[i] > 0 else "negative"
            raise AssertionError(
                f"{case}: entry {i} ({side} half) should be {float(want[i]):.7f}, you have {float(got[i]):.7f}; "
                f"hint: positive half Phi^-1 at linspace(offset, 0.5, {half + 1})[:-1], negative half -Phi^-1 at "
                f"linspace(offset, 0.5, {half})[:-1] (a different spacing on each side), then divide by the largest"
            )
    return "correct: your NF table equals bitsandbytes' create_normal_map (lorakit.normal_float), within 1e-6"


# ------------------------------------------------------------------ 04: blockwise NF4, two codes per byte
def _nf4_cases() -> list[tuple[str, torch.Tensor, int]]:
    g = torch.Generator().manual_seed(5)
    return [
        ("w (8, 64) float32, blocksize 64", torch.randn(8, 64, generator=g) * 0.02, 64),
        ("w (3, 50) float32, blocksize 64", torch.randn(3, 50, generator=g), 64),
        ("w (7, 9) float32, blocksize 16, an odd count of codes", torch.randn(7, 9, generator=g), 16),
        (
            "w (5, 33) bfloat16, blocksize 64, an odd count of codes",
            (torch.randn(5, 33, generator=g) * 0.02).bfloat16(),
            64,
        ),
    ]


def check_quantize_nf4(fn: Callable[[torch.Tensor, int], tuple]) -> str:
    """Build it (notebook 04): ``fn(w, blocksize) -> (packed, absmax)``, NF4 in blocks, two codes per byte.

    ``packed``: ``(ceil(n / 2),)`` uint8 with the first code of each pair in the high nibble and, for an odd
    count, the code of 0.0 (NF4: 7) as the last low nibble; ``absmax``: ``(ceil(n / blocksize),)`` float32.
    Compared with ``lorakit.quantize_4bit(w, "nf4", blocksize)``, which is byte-identical to bitsandbytes.
    """
    table = codebook("nf", 4).double()  # (16,)
    zero_code = int(table.abs().argmin())  # 7
    cases = _nf4_cases()
    for k, (text, w, blocksize) in enumerate(cases, 1):
        n = w.numel()
        case = f"case {k} of {len(cases)} ({text}: {_blocks_text(n, blocksize)})"
        want_packed, state = quantize_4bit(w, "nf4", blocksize)
        want_codes = unpack_codes(want_packed, 4, n).long()  # (n,)
        packed, absmax = _unpack(fn(w.clone(), blocksize), ("packed", "absmax"), case)
        packed = _tensor(packed, "packed", case).reshape(-1)
        n_bytes = (n + 1) // 2
        if packed.numel() == n:
            raise AssertionError(f"{case}: {n} bytes for {n} codes: pack two 4-bit codes into each byte")
        if packed.numel() == n // 2 and n % 2:
            raise AssertionError(
                f"{case}: {packed.numel()} bytes for an odd count of {n} codes: the last code is lost; it needs a "
                f"byte of its own, ceil(n / 2) = {n_bytes} bytes (pad with 0.0 before packing)"
            )
        if packed.numel() != n_bytes:
            raise AssertionError(f"{case}: expected ceil({n} / 2) = {n_bytes} bytes, got {packed.numel()}")
        if packed.dtype != torch.uint8:
            raise AssertionError(f"{case}: packed has dtype {packed.dtype}, expected torch.uint8 (0..255)")
        _check_absmax(_tensor(absmax, "absmax", case), state.absmax, n, blocksize, case, w.reshape(-1).float())
        high_first = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()  # (2 * n_bytes,)
        got = high_first[:n]
        target = w.reshape(-1).double() / state.absmax.double().repeat_interleave(blocksize)[:n]  # (n,) in [-1, 1]
        wrong = _farther(table[got], table[want_codes], target)
        if wrong.any():
            low_first = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1).long()[:n]
            i = int(wrong.nonzero()[0])
            if not _farther(table[low_first], table[want_codes], target).any():
                hint = (
                    "you put the first code in the low nibble; bitsandbytes (and lorakit) put it in the high one: "
                    "(q[0::2] << 4) | q[1::2]"
                )
            elif w.dtype != torch.float32:
                hint = f"w is {w.dtype}: convert it with .float() first, {w.dtype} rounds the scaled values"
            else:
                hint = (
                    f"scale each block by its absmax, then take the index of the nearest NF4 value "
                    f"(value {i} / absmax = {float(target[i]):.4f})"
                )
            raise AssertionError(
                f"{case}: code {i} (byte {i // 2}, {'high' if i % 2 == 0 else 'low'} nibble) should be "
                f"{int(want_codes[i])} (NF4 value {float(table[want_codes[i]]):.4f}), you stored {int(got[i])}; {hint}"
            )
        if n % 2 and int(high_first[-1]) != zero_code:
            raise AssertionError(
                f"{case}: the last byte's low nibble is padding; bitsandbytes pads the scaled values with 0.0 before "
                f"looking up codes, so it holds the code of 0.0 ({zero_code} in NF4); you stored {int(high_first[-1])}"
            )
    return "correct: your packed NF4 bytes and absmax equal lorakit's quantize_4bit, and so bitsandbytes'"


# ------------------------------------------------------------------ 04: double quantization
def _double_quant_cases() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(4000 * 64, generator=g) * 0.02
    return [
        ("512 constants, 2 full blocks of 256", torch.rand(512, generator=g) * 0.5 + 0.3),
        ("300 constants: a full block of 256 and a partial block of 44", torch.rand(300, generator=g) + 0.1),
        ("100 constants, fewer than one block", torch.rand(100, generator=g) * 0.1 + 0.05),
        ("the 4000 absmax constants of a weight in blocks of 64", weight.view(-1, 64).abs().amax(dim=1)),
    ]


def check_double_quantize(fn: Callable[[torch.Tensor], tuple]) -> str:
    """Build it (notebook 04): ``fn(absmax) -> (codes, offset, absmax2)``, double quantization (QLoRA section 3).

    ``offset``: the mean of the constants; ``absmax - offset`` quantized in blocks of 256 to the 8-bit dynamic type
    (``lorakit.dynamic_map()``): ``codes`` (n,) uint8, ``absmax2`` ``(ceil(n / 256),)`` float32. Compared with
    ``lorakit.double_quant.quantize_absmax``; a code is accepted when it is as near to the scaled constant as
    lorakit's (lorakit copies bitsandbytes' lookup table, which sometimes picks a neighbour of the nearest code).
    """
    table = dynamic_map().double()  # (256,)
    cases = _double_quant_cases()
    for k, (text, absmax) in enumerate(cases, 1):
        n = absmax.numel()
        case = f"case {k} of {len(cases)} ({text})"
        want_codes, want_offset, state2 = quantize_absmax(absmax)
        codes, offset, absmax2 = _unpack(fn(absmax.clone()), ("codes", "offset", "absmax2"), case)
        codes, absmax2 = _tensor(codes, "codes", case).reshape(-1), _tensor(absmax2, "absmax2", case).reshape(-1)
        if codes.numel() != n or codes.dtype != torch.uint8:
            raise AssertionError(
                f"{case}: codes must be {n} uint8 values, one per constant; got {codes.numel()} of {codes.dtype}"
            )
        offset = _scalar(offset, "offset", case)
        mean = float(want_offset)
        if not abs(offset - mean) <= 1e-6 * mean:
            hint = "the minimum; bitsandbytes subtracts the mean" if abs(offset - float(absmax.min())) < 1e-9 else ""
            hint = hint or "offset = absmax.mean(), subtracted before the second quantization"
            raise AssertionError(f"{case}: expected offset {mean:.6g} (the mean constant), got {offset:.6g}; {hint}")
        n_blocks = -(n // -ABSMAX_BLOCKSIZE)
        if absmax2.numel() != n_blocks:
            if absmax2.numel() == -(n // -64):
                hint = "the second level uses blocks of 256 constants, not 64"
            elif absmax2.numel() == n // ABSMAX_BLOCKSIZE:
                hint = f"the partial last block of {n % ABSMAX_BLOCKSIZE} constants needs its own scale too"
            else:
                hint = "one float32 scale per block of 256 constants"
            raise AssertionError(
                f"{case}: expected ceil({n} / 256) = {n_blocks} second-level scales, got {absmax2.numel()}; {hint}"
            )
        want2 = state2.absmax.double()
        if not torch.allclose(absmax2.double(), want2, rtol=1e-6, atol=0.0):
            raw = torch.nn.functional.pad(absmax, (0, n_blocks * ABSMAX_BLOCKSIZE - n)).view(n_blocks, -1).amax(dim=1)
            if torch.allclose(absmax2.double(), raw.double(), rtol=1e-6):
                hint = "these are the raw constants' block absmax: subtract the offset first, then take the absmax"
            else:
                hint = "absmax2 = the largest magnitude of (absmax - offset) in each block of 256"
            i = int((absmax2.double() - want2).abs().argmax())
            raise AssertionError(
                f"{case}: second-level scale {i} should be {float(want2[i]):.6g}, got {float(absmax2[i]):.6g}; {hint}"
            )
        target = (absmax.double() - mean) / want2.repeat_interleave(ABSMAX_BLOCKSIZE)[:n]  # (n,) in [-1, 1]
        got = codes.long()
        wrong = _farther(table[got], table[want_codes.long()], target)
        if wrong.any():
            i = int(wrong.nonzero()[0])
            nearest = int((table - float(target[i])).abs().argmin())
            raise AssertionError(
                f"{case}: constant {i}: (absmax - offset) / absmax2 = {float(target[i]):.6f}, whose nearest "
                f"dynamic_map() value is {float(table[nearest]):.6f} (code {nearest}); you stored code {int(got[i])} "
                f"({float(table[got[i]]):.6f}); hint: scale by the block's absmax2, then the nearest code"
            )
    return "correct: offset = mean, blocks of 256 on the 8-bit dynamic type, as lorakit and bitsandbytes store them"


# ------------------------------------------------------------------ 04: bits per parameter
def check_bits_per_parameter_formula(fn: Callable[[int, int, bool], float]) -> str:
    """Build it (notebook 04): ``fn(bits, blocksize, double_quant) -> bits per parameter`` of k-bit blockwise storage.

    Compared, on several settings, with the figure measured from the byte sizes of a real quantized tensor
    (``lorakit.quantization_tradeoff``); second-level blocks are 256 constants (QLoRA section 3).
    """
    settings = [(4, 64, False), (4, 64, True), (4, 256, True), (8, 64, False), (3, 128, True)]
    for k, (bits, blocksize, double_quant) in enumerate(settings, 1):
        case = f"case {k} of {len(settings)} (bits={bits}, blocksize={blocksize}, double_quant={double_quant})"
        n = blocksize * ABSMAX_BLOCKSIZE * 4  # every level's blocks divide it
        g = torch.Generator().manual_seed(k)
        want = quantization_tradeoff(torch.randn(n, generator=g), "int", bits, blocksize, double_quant)
        want = want.bits_per_parameter
        got = _scalar(fn(bits, blocksize, double_quant), "the answer", case)
        if abs(got - want) < 1e-6:
            continue
        if double_quant and abs(got - (bits + 32 / blocksize)) < 1e-6:
            hint = "that is without double quantization; each block's constant is then an 8-bit code"
        elif double_quant and abs(got - (bits + 8 / blocksize)) < 1e-6:
            hint = "add the second-level float32 scales: 32 bits per 256 constants, 32 / (blocksize * 256)"
        elif abs(got - bits) < 1e-6:
            hint = "add the absmax constants: 32 bits per block, shared by blocksize weights"
        else:
            hint = "bits per code + bits of a block's constant / blocksize (+ 32 / (blocksize * 256) with double quant)"
        raise AssertionError(f"{case}: measured {want:.6f} bits per parameter, you said {got:.6f}; {hint}")
    return "correct: your formula matches the bytes of real quantized tensors on every setting"


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
    from lorakit.lab.claims import interval_order  # the lab package loads its runner: imported only when checked

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


# --- notebook 07: instruction tuning ---

_LABEL_CASES = [  # (name, context_ids, full_ids): the context ends with the generation prompt
    ("one answer", [1, 9, 5, 2, 1, 7], [1, 9, 5, 2, 1, 7, 40, 41, 2, 3]),
    ("a one-token answer", [1, 5, 6], [1, 5, 6, 8, 2, 3]),
    ("a context whose last token merges with the answer's first", [1, 9, 5, 12], [1, 9, 5, 13, 40, 2]),
]


def check_answer_labels(fn: Callable[[list[int], list[int]], list[int]]) -> str:
    """Exercise (notebook 07): ``fn(context_ids, full_ids)`` returns the labels of ``full_ids``: -100 on the
    context, the token ids from where the context and the full conversation part (TRL's completion mask)."""

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


# --- notebook 08: merge and deploy ---


def _nf4_case(d_out: int, d_in: int, r: int, seed: int, blocksize: int = 64):
    """A random W0 quantized to NF4 (no double quantization), with LoRA factors: the learner's inputs and lorakit's
    merged weight ``dequant(W0) + (alpha / r) B A`` (float32)."""

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
    from lorakit.deploy.gguf import quantize_q8_0  # the deploy package loads all its routes: imported only when checked

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
