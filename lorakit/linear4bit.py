"""A readable ``Linear4bit`` and the explicit ``quantize_model`` / ``dequantize_model`` pair.

QLoRA section 3: the frozen base weight is stored in a k-bit type (NF4) and dequantized to the
compute dtype (bf16 on GPUs) for every matrix multiply: ``Y = X doubleDequant(c1, c2, W)``.
Unlike bitsandbytes, quantization is never a side effect of ``.to()``: call ``quantize_model``.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from lorakit.blockwise import QuantState, dequantize_blockwise, quantize_blockwise, storage
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
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "Linear4bit") -> torch.Tensor:
        ctx.layer = layer
        return nn.functional.linear(x, layer.dequantize(x.dtype), bias)  # (..., out_features)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer.dequantize(grad_y.dtype)  # (out_features, in_features), recomputed
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
    """

    def __init__(self, weight_packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None):
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

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
        bits: int | None = None, name: str = "weight",
    ) -> "Linear4bit":
        """Quantize an ``nn.Linear``'s weight; the bias is kept as it is."""
        packed, state = quantize_blockwise(linear.weight, quant_type, blocksize, double_quant, bits, name)
        return cls(packed, state, linear.bias)

    @property
    def state(self) -> QuantState:
        """The quantization state, rebuilt from the buffers (so it follows ``.to(device)``)."""
        state2 = SecondLevelState(self.absmax2, self.code2) if self.double_quant else None
        offset = self.absmax_offset if self.double_quant else None
        return QuantState(
            self.absmax, torch.Size((self.out_features, self.in_features)), self.weight_dtype,
            self.blocksize, self.code, self.quant_type, self.bits, offset, state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight, (out_features, in_features), in ``dtype`` (default: its original dtype)."""
        w = dequantize_blockwise(self.weight_packed, self.state)
        return w if dtype is None else w.to(dtype)

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

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight and its constants (the bias not included)."""
        return storage(self.weight_packed, self.state).total_bytes

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"{self.quant_type}, blocksize={self.blocksize}{dq}"
        )


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    """A module is skipped when a pattern matches its full name or its last component."""
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(name.rsplit(".", 1)[-1], p) for p in skip)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(
    model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
    bits: int = 4, skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` (except those matching ``skip``) with a :class:`Linear4bit`, in place.

    ``quant_type`` is a codebook family (``"nf"``, ``"int"``, ``"fp"``) or with its width (``"nf4"``);
    ``bits`` sets the width (2 to 8; FP only 4). ``skip`` holds names or glob patterns
    (QLoRA keeps ``lm_head`` in 16 bits). Returns ``model`` so calls can be chained.
    """
    kind, bits = parse_kind(quant_type, bits)
    if isinstance(skip, str):
        raise TypeError(f"skip must be a tuple of names, got the string {skip!r}; write ({skip!r},)")
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not _skipped(name, tuple(skip))
    ]
    if not targets:
        raise ValueError(f"quantize_model found no nn.Linear to quantize in {type(model).__name__} (skip={skip})")
    for name, linear in targets:
        q = Linear4bit.from_linear(linear, f"{kind}{bits}", blocksize, double_quant, name=f"{name}.weight")
        _set_module(model, name, q.to(linear.weight.device))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`Linear4bit` with an ``nn.Linear`` holding its dequantized weight, in place."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    for name, q in targets:
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None,
                           device=q.weight_packed.device, dtype=q.weight_dtype)
        linear.weight.copy_(q.dequantize())
        if q.bias is not None:
            linear.bias.copy_(q.bias)
        _set_module(model, name, linear)
    return model
