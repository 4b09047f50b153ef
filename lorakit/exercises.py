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
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch
from torch import nn

from lorakit.blockwise import dequantize_blockwise, quantize_blockwise
from lorakit.lora import LORA_BASE_TYPES, LoRALinear, _matches, add_lora, lora_layers
from lorakit.lowrank import lora_param_count
from lorakit.memory import lora_params, model_shape
from lorakit.tradeoff import quantization_tradeoff

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
    import transformers

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
