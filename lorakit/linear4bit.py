"""A readable ``Linear4bit`` and the explicit ``quantize_model`` / ``dequantize_model`` pair.

QLoRA section 3: the frozen base weight is stored in a k-bit type (NF4) and dequantized to the
compute dtype (bf16 on GPUs) for every matrix multiply: ``Y = X doubleDequant(c1, c2, W)``.
Unlike bitsandbytes, quantization is never a side effect of ``.to()``: call ``quantize_model``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.blockwise import QuantState, decoded_numel, dequantize_blockwise, quantize_blockwise, scratch_buffer
from lorakit.codebooks import parse_kind
from lorakit.double_quant import SecondLevelState


class DequantizeMatmul(torch.autograd.Function):
    """``y = x W^T`` with ``W`` dequantized on the fly, in forward *and again in backward*.

    A plain ``F.linear(x, layer.dequantize())`` would make autograd keep the dequantized
    ``(out_features, in_features)`` weight alive until backward (it needs ``W`` for
    ``grad_x = grad_y W``): the full-precision weights would all be back in memory during training.
    Like bitsandbytes' ``MatMul4Bit``, we save only the layer (its 4-bit buffers) and dequantize
    once more in backward. The frozen weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantize_for_matmul(x.dtype), bias)  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            # (out_features, in_features), recomputed; a tensor of its own if autograd keeps it (create_graph)
            w = (
                ctx.layer.dequantize(grad_y.dtype)
                if torch.is_grad_enabled()
                else ctx.layer.dequantize_for_matmul(grad_y.dtype)
            )
            grad_x = grad_y @ w  # (..., out_features) @ (out_features, in_features) -> (..., in_features)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out_features,)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """``y = x W^T + b`` with ``W: (out_features, in_features)`` stored as packed k-bit codes.

    Buffers (they move with ``.to()`` and live in ``state_dict``): ``weight_packed`` (bytes, 1)
    uint8, ``absmax`` (n_blocks,), ``code`` (2**bits,) and, with double quantization,
    ``absmax_offset`` (), ``absmax2`` (n_blocks / 256,), ``code2`` (256,). ``bias`` stays a float
    parameter. ``forward`` dequantizes the weight to the input's dtype (the compute dtype).
    ``from_conv1d`` records that the weight came from GPT-2's ``Conv1D`` (stored ``(d_in, d_out)``),
    so ``dequantize_model`` gives a ``Conv1D`` back; the 4-bit layer itself is an ordinary Linear.
    """

    def __init__(
        self,
        weight_packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        from_conv1d: bool = False,
    ):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(
                f"Linear4bit needs a 2-D weight (out_features, in_features), got shape {tuple(state.shape)}"
            )
        self.out_features, self.in_features = state.shape
        self.blocksize, self.quant_type, self.bits = state.blocksize, state.quant_type, state.bits
        self.weight_dtype = state.dtype  # the dtype the weight had before quantization
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        self.double_quant = state.nested
        if state.nested:
            self.register_buffer("absmax_offset", state.offset)
            self.register_buffer("absmax2", state.state2.absmax)
            self.register_buffer("code2", state.state2.code)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.from_conv1d = from_conv1d

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear | Conv1D,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        bits: int | None = None,
        name: str = "weight",
    ) -> Linear4bit:
        """Quantize an ``nn.Linear``'s weight (or a ``Conv1D``'s, transposed to (out, in)); the bias is kept."""
        conv1d = isinstance(linear, Conv1D)
        weight = linear.weight.T if conv1d else linear.weight  # (out_features, in_features)
        packed, state = quantize_blockwise(weight, quant_type, blocksize, double_quant, bits, name)
        return cls(packed, state, linear.bias, from_conv1d=conv1d)

    @property
    def state(self) -> QuantState:
        """The quantization state, rebuilt from the buffers (so it follows ``.to(device)``)."""
        state2 = SecondLevelState(self.absmax2, self.code2) if self.double_quant else None
        offset = self.absmax_offset if self.double_quant else None
        return QuantState(
            self.absmax,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.blocksize,
            self.code,
            self.quant_type,
            self.bits,
            offset,
            state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, (out_features, in_features), in ``dtype`` (default: its original dtype)."""
        w = dequantize_blockwise(self.weight_packed, self.state)
        return w if dtype is None else w.to(dtype)

    def dequantize_for_matmul(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, written into a buffer this thread reuses at its next call: never keep it.

        For a matrix multiply that uses it at once (``DequantizeMatmul``, twice a step for every layer). A new
        tensor each time would be a new allocation each time; the fine-tune command has glibc give large
        freed blocks back to the system (``lorakit.memory.return_freed_memory``), so each would also be a
        new memory mapping whose pages the kernel must zero, about 1 ms per 4 MB.
        """
        if dtype != self.weight_dtype:  # a cast makes a tensor of its own anyway
            return self.dequantize(dtype)
        state = self.state
        out = scratch_buffer("weight", decoded_numel(state), dtype, self.weight_packed.device)  # (n,) + spares
        return dequantize_blockwise(self.weight_packed, state, out=out)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (out_features, in_features), built anew at every read.

        Only for model code that inspects a layer's ``.weight`` (T5's ``T5DenseActDense`` casts its
        input to ``self.wo.weight.dtype``); ``forward`` never reads it, and nothing keeps it.
        """
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return DequantizeMatmul.apply(x, bias, self)  # x W^T + b: (..., out_features)

    def _apply(self, fn, recurse=True):
        """``.to(dtype)`` / ``.half()`` must not round the codes' constants: buffers move, never cast.

        (nn.Module would cast every floating buffer, turning the float32 absmax into bf16.)
        """
        target = fn(torch.empty(0))  # where this call sends a float tensor: its device
        kept = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in kept.items():
            self._buffers[name] = buf.to(target.device)
        return self

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.quant_type}, blocksize={self.blocksize}{dq}"
        )


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped when a pattern matches its full name or its last component."""
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in skip)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (``"model.layers.0.mlp.down_proj"``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def embedding_module(model: nn.Module, which: str) -> nn.Module | None:
    """A transformers model's ``get_input_embeddings()`` / ``get_output_embeddings()`` (``which``:
    ``"input"`` or ``"output"``), or None for a model without one (or a plain ``nn.Module``)."""
    getter = getattr(model, f"get_{which}_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):  # transformers' default when a model has none
        return None


def kept_in_full_precision(model: nn.Module) -> set[str]:
    """Names of the modules ``quantize_model`` never quantizes, whatever ``skip`` says.

    As transformers' bitsandbytes path (``get_keys_to_not_convert``, ``_keep_in_fp32_modules``):
    every module whose weight is the input embedding's (a tied output head, whatever it is called:
    ``lm_head``, Whisper's ``proj_out``), the output head ``get_output_embeddings()`` returns, and
    the modules the model class asks to keep in float32 (T5's ``wo``).
    """
    kept = set()
    embedding, head = embedding_module(model, "input"), embedding_module(model, "output")
    embedding_weight = getattr(embedding, "weight", None)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        tied = module is not embedding and embedding_weight is not None and weight is embedding_weight
        # transformers' should_convert_module: a pattern names a module, a module above it, or a name suffix
        in_fp32 = any(name == k or name.startswith(k + ".") or name.endswith("." + k) for k in keep_fp32)
        if name and (tied or module is head or in_fp32):
            kept.add(name)
    return kept


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    bits: int | None = None,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``Conv1D`` (except those skipped) with a :class:`Linear4bit`, in place.

    ``quant_type`` is a codebook family (``"nf"``, ``"int"``, ``"fp"``) or with its width (``"nf4"``,
    ``"int8"``, ``"nf3"``); ``bits`` sets the width of a bare family (2 to 8; FP only 4; default 4).
    ``double_quant`` defaults to True here, QLoRA's recipe (``quantize_4bit`` / ``quantize_blockwise``
    default to False, as bitsandbytes' ``compress_statistics``).
    ``skip`` holds names or glob patterns (QLoRA keeps ``lm_head`` in 16 bits); besides those,
    :func:`kept_in_full_precision` modules (a head tied to the embeddings, T5's ``wo``) are never
    quantized. Returns ``model`` so calls can be chained.
    """
    kind, bits = parse_kind(quant_type, bits)
    if isinstance(skip, str):
        raise TypeError(f"skip must be a tuple of names, got the string {skip!r}; write ({skip!r},)")
    kept = kept_in_full_precision(model)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name not in kept and not _skipped(name, tuple(skip))
    ]
    if not targets:
        raise ValueError(
            f"quantize_model found no nn.Linear to quantize in {type(model).__name__} "
            f"(skip={skip}; always kept: {sorted(kept)})"
        )
    for name, linear in targets:
        q = Linear4bit.from_linear(linear, f"{kind}{bits}", blocksize, double_quant, name=f"{name}.weight")
        set_module(model, name, q.to(linear.weight.device))
    return model


def to_float_layer(weight: torch.Tensor, like: Linear4bit) -> nn.Module:
    """A float layer holding ``weight`` (out_features, in_features) in ``like``'s weight dtype,
    with its bias: an ``nn.Linear``, or a ``Conv1D`` (weight stored transposed) if ``like`` came from one."""
    device, dtype = like.weight_packed.device, like.weight_dtype
    if like.from_conv1d:
        layer = Conv1D(like.out_features, like.in_features).to(device=device, dtype=dtype)
        layer.weight.copy_(weight.T)  # Conv1D stores (in_features, out_features)
    else:
        layer = nn.Linear(like.in_features, like.out_features, bias=like.bias is not None, device=device, dtype=dtype)
        layer.weight.copy_(weight)
    if like.bias is not None:
        layer.bias.copy_(like.bias)
    elif like.from_conv1d:
        layer.bias.zero_()  # Conv1D always has a bias; GPT-2's are never None
    return layer


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`Linear4bit` with an ``nn.Linear`` (or the ``Conv1D`` it came from) holding
    its dequantized weight, in place."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, q in targets:
        set_module(model, name, to_float_layer(q.dequantize(), q))
    return model
