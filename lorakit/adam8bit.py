"""8-bit optimizer state: Adam's moments stored as blockwise dynamic-quantized bytes.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022), used by QLoRA's training
recipes: ``m`` and ``v`` are kept as one byte per element plus one fp32 ``absmax`` per block of
256 elements, so the state costs about 2 bytes per parameter instead of 8. Each step
dequantizes the block, does the ordinary fp32 AdamW update, and quantizes again.

The code book is the *dynamic* data type (Dettmers, "8-Bit Approximations for Parallelism in Deep
Learning", ICLR 2016, arXiv:1511.04561):
a sign bit, a run of zero bits whose length is the decimal exponent, an indicator bit, and the
remaining bits as a linear fraction. Values near zero get many codes, large ones few, which
suits moments spanning several orders of magnitude. ``create_dynamic_map`` (in codebooks.py) mirrors
``bitsandbytes.functional.create_dynamic_map`` (checked equal in ``tests/test_adam8bit.py``) and
the update mirrors bitsandbytes' CPU ``optimizer_update_8bit_blockwise`` (``backends/cpu/ops.py``),
which writes the update in ``torch.optim.AdamW``'s form (``_single_tensor_adam``: decoupled decay
``p *= 1 - lr * wd``, then ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``). One
difference from torch: the first moment is ``b1 m + (1 - b1) g`` where torch writes
``m.lerp_(g, 1 - b1)``, the same value up to one float32 rounding (tests/test_adam8bit.py).
"""

from __future__ import annotations

import math

import torch

from lorakit.blockwise import absmax_scale, nearest_code
from lorakit.codebooks import create_dynamic_map

BLOCKSIZE = 256  # bitsandbytes' blockwise optimizers: one absmax per 256 elements
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 state (bitsandbytes' ``min_8bit_size``)


def _quantize_state(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """A moment tensor -> (uint8 codes shaped like ``x``, float32 absmax per block of ``blocksize``).

    The same two steps as the 4-bit weights (blockwise.py): scale each block into [-1, 1] by its
    absmax, then take the index of the nearest code (``bucketize`` against the code midpoints), as
    bitsandbytes' pure-PyTorch ``quantize_blockwise`` kernel does; only the code book differs (the
    256-value dynamic type). double_quant.py holds the other 8-bit quantizer, a copy of the C
    kernel's lookup table, needed there only for byte identity with bitsandbytes' double quantization.
    """
    scaled, absmax = absmax_scale(x.reshape(-1).float(), blocksize)  # (n,), (n_blocks,)
    return nearest_code(scaled, code).view_as(x), absmax


def _dequantize_state(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE
) -> torch.Tensor:
    """Codes back to float32: ``code[q] * absmax`` of each element's block (shaped like ``q``)."""
    values = code[q.reshape(-1).long()]  # (n,)
    scale = absmax.repeat_interleave(blocksize)[: values.numel()]  # (n,)
    return (values * scale).view(q.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments live as 8-bit blockwise-quantized codes (the ``state1``/``state2`` of
    bitsandbytes' ``AdamW8bit``): m with the signed dynamic map, v (never negative) with the
    unsigned one. Tensors with fewer than ``min_8bit_size`` elements keep fp32 moments
    (``min_8bit_size=math.inf``: every moment in fp32, plain AdamW).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = MIN_8BIT_SIZE,
        blocksize: int = BLOCKSIZE,
    ):
        if not lr >= 0:
            raise ValueError(f"AdamW8bit: lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW8bit: betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size
        self.blocksize = blocksize
        self.code_m = create_dynamic_map(signed=True)
        self.code_v = create_dynamic_map(signed=False)

    def _init_state(self, p: torch.Tensor) -> dict:
        if p.numel() < self.min_8bit_size:
            return {
                "step": 0,
                "m": torch.zeros_like(p, dtype=torch.float32),
                "v": torch.zeros_like(p, dtype=torch.float32),
            }
        blocks = math.ceil(p.numel() / self.blocksize)
        return {
            "step": 0,
            "m": torch.zeros_like(p, dtype=torch.uint8),
            "absmax_m": torch.zeros(blocks, device=p.device),
            "v": torch.zeros_like(p, dtype=torch.uint8),
            "absmax_v": torch.zeros(blocks, device=p.device),
        }

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self._init_state(p))
                state["step"] += 1
                quantized = state["m"].dtype == torch.uint8
                if quantized:
                    code_m, code_v = self.code_m.to(p.device), self.code_v.to(p.device)
                    m = _dequantize_state(state["m"], state["absmax_m"], code_m, self.blocksize)
                    v = _dequantize_state(state["v"], state["absmax_v"], code_v, self.blocksize)
                else:
                    m, v = state["m"], state["v"]
                grad = p.grad.float()
                m.mul_(beta1).add_(grad, alpha=1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
                correction1 = 1 - beta1 ** state["step"]
                correction2 = math.sqrt(1 - beta2 ** state["step"])
                denom = (v.sqrt() / correction2).add_(eps)
                p32 = p.float()
                if wd > 0:
                    p32.mul_(1 - lr * wd)  # decoupled weight decay (Loshchilov & Hutter)
                p32.addcdiv_(m, denom, value=-lr / correction1)
                p.copy_(p32)
                if quantized:
                    state["m"], state["absmax_m"] = _quantize_state(m, code_m, self.blocksize)
                    state["v"], state["absmax_v"] = _quantize_state(v, code_v, self.blocksize)
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (codes, absmax, fp32 moments alike)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
