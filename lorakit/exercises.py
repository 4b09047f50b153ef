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
    from lorakit.linear4bit import Linear4bit

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
    from lorakit.memory import ModelShape

    return ModelShape(49152, 576, 1536, 30, 9, 3, tie_embeddings=True, name="SmolLM2-135M")


def check_step_memory(fn: Callable[..., tuple]) -> str:
    """Exercise (notebook 05): ``fn(shape, method, r, dtype_bytes) -> (weights, gradients, optimizer_state)`` in bytes.

    One AdamW step of ``method`` ``"full"`` or ``"lora"`` (rank ``r`` on all seven projections, adapters kept in
    float32 whatever the compute dtype, as lorakit and peft keep them) on a model of ``shape``
    (a :class:`lorakit.memory.ModelShape`) stored in ``dtype_bytes`` per weight. Compared with
    :func:`lorakit.memory.estimate_memory`.
    """
    from lorakit.memory import LLAMA, estimate_memory

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
    from lorakit.paged import PagedOptimizer

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
    from transformers import LlamaConfig, LlamaForCausalLM

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
    from lorakit.train import train_steps

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
    from lorakit.memory import quantized_bits_per_param

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
