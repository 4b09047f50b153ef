"""Double quantization (QLoRA section 3): quantize the quantization constants themselves.

Blockwise quantization stores one float32 absmax per block of 64 weights, 32/64 = 0.5 extra bits
per parameter. Double quantization subtracts the mean of those constants (they are all positive,
so centring them lets the symmetric 8-bit type use its full range) and stores them with the 8-bit
dynamic type in blocks of 256, keeping one float32 "second-level" absmax per 256 constants:
``8/64 + 32/(64*256) = 0.127`` extra bits instead of 0.5, saving 0.373 bits per parameter.

Mirrors ``bitsandbytes.functional.quantize_4bit(compress_statistics=True)`` on the CPU
(bitsandbytes 0.50.2): ``offset = absmax.mean()``, then ``quantize_blockwise(absmax - offset,
blocksize=256)``, which runs the C kernel ``quantize_cpu_impl`` (csrc/cpu_ops.cpp).

Why a second 8-bit quantizer: lorakit's other 8-bit path (adam8bit.py's moments) takes the nearest
code with ``bucketize``, as bitsandbytes' pure-PyTorch kernel does. The CPU C kernel instead reads
a 65,536-entry lookup table, which picks a neighbouring code for a few values in a thousand; to
store the same bytes as ``quantize_4bit(compress_statistics=True)`` we copy that table here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.codebooks import dynamic_map

ABSMAX_BLOCKSIZE = 256  # QLoRA section 3: "a blocksize of 256 for the second quantization"


@dataclass
class SecondLevelState:
    """What undoes the second quantization (bitsandbytes calls it ``state2``).

    ``absmax``: (ceil(n_blocks / 256),) float32, one scale per block of 256 constants;
    ``code``: (256,) float32, the dynamic 8-bit table; ``blocksize``: 256.
    """

    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int = ABSMAX_BLOCKSIZE


LUT_SIZE = 65536  # grid points on [-1, 1] in bitsandbytes' CPU 8-bit quantizer


def lookup_table(code: torch.Tensor) -> torch.Tensor:
    """For each of 65,536 evenly spaced points of [-1, 1], the code nearest to it: (65536,) uint8.

    bitsandbytes' ``build_quantize_lut`` (csrc/cpu_ops.cpp): point ``i`` is ``-1 + 2i / 65535``
    in float32, and its code is the number of code midpoints strictly below it.
    """
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device)) / (LUT_SIZE - 1)  # (65536,)
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


def quantize_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization exactly as bitsandbytes' CPU kernel ``quantize_cpu_impl`` does it.

    x: (n,) float32 -> (codes (n,) uint8, absmax (ceil(n / blocksize),) float32).

    That kernel does not search for the nearest code. It multiplies by ``1 / absmax``, rounds the
    result onto the 65,536-point grid of :func:`lookup_table` (``uint16((v + 1) * 0.5 * 65535 + 0.5)``)
    and reads the code there. The grid step, 3e-5, is coarser than the gaps of the dynamic type near
    zero, so a value can get a code that is not the nearest one; to be byte-identical we do the same.
    A block whose absmax is 0 gets code 0 everywhere (the kernel's special case).
    An absmax below 1 / 3.4e38 = 2.9e-39 (subnormal) has a reciprocal beyond float32's range,
    ``inf``: every nonzero value then scales to +-inf and is clamped to +-1, which gives the kernel's
    codes bit for bit (tests/test_quantization.py); a zero stays 0 (``0 * inf`` would be NaN, and so
    would the zero padding of the last block).
    """
    n = x.numel()
    n_blocks = -(n // -blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,), the zero padding never raises it
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # inf for a subnormal absmax
    scaled = torch.where(blocks == 0, 0.0, blocks * inverse.view(-1, 1)).clamp(-1.0, 1.0)  # (n_blocks, blocksize)
    grid_index = (((scaled + 1.0) * 0.5) * (LUT_SIZE - 1) + 0.5).long()  # truncation, as the C cast
    codes = lookup_table(code)[grid_index]  # (n_blocks, blocksize)
    codes[absmax == 0] = 0
    return codes.view(-1)[:n], absmax


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SecondLevelState]:
    """Double-quantize the per-block constants: (n_blocks,) float32 -> (codes uint8, offset, state2).

    ``offset`` is the 0-dim float32 mean that was subtracted (bitsandbytes: ``_absmax.mean()``).
    Constants near float32's maximum (3.4e38) make that float32 mean overflow to ``inf``;
    bitsandbytes 0.50.2 then stores ``inf`` and decodes NaN weights. We take the mean in float64
    there instead (a mean of finite float32 values always fits in float32).
    """
    offset = absmax.mean()  # 0-dim; same reduction as bitsandbytes, so the same float32 result
    if not torch.isfinite(offset):  # the float32 sum overflowed
        offset = absmax.double().mean().float()
    code = dynamic_map().to(absmax.device)  # (256,)
    qabsmax, absmax2 = quantize_8bit(absmax - offset, code, ABSMAX_BLOCKSIZE)
    return qabsmax, offset, SecondLevelState(absmax=absmax2, code=code)


def dequantize_absmax(qabsmax: torch.Tensor, offset: torch.Tensor, state2: SecondLevelState) -> torch.Tensor:
    """Undo :func:`quantize_absmax`: (n_blocks,) uint8 -> (n_blocks,) float32 constants.

    ``code[q] * absmax2`` per block of 256 (bitsandbytes ``dequantize_blockwise``), then ``+ offset``.
    """
    n, blocksize = qabsmax.numel(), state2.blocksize
    centred = torch.index_select(state2.code, 0, qabsmax.int())  # (n,) the codes' values
    whole = n // blocksize  # whole blocks of 256; the last block may be partial
    centred[: whole * blocksize].view(whole, blocksize).mul_(state2.absmax[:whole].view(whole, 1))
    if whole * blocksize < n:
        centred[whole * blocksize :].mul_(state2.absmax[-1])  # a partial last block
    return centred.add_(offset)
