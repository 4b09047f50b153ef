"""Where a notebook runs: Colab or not, which device, which compute dtype, and the seeds.

Also the two things every command line shares: which devices exist here (``check_device``), and
how lorakit's errors reach a terminal (``run_main``: one line, exit code 2, ``--debug`` for the
traceback).
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype for models and adapters
    colab: bool
    seed: int

    def __str__(self) -> str:
        where = "Colab" if self.colab else "local"
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        why = ""
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not os.environ.get("LORAKIT_DTYPE"):
            why = " (this CPU has native bfloat16; LORAKIT_DTYPE=float32 to change)"
        return (f"{where} | device: {self.device} ({name}) | compute dtype: "
                f"{str(self.dtype).removeprefix('torch.')}{why} | seed: {self.seed}")


def in_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def available_devices() -> list[str]:
    """The devices torch can use on this machine: ``cpu``, then ``cuda:0``..., ``mps``, ``xpu:0``..."""
    devices = ["cpu"]
    devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    devices += ["mps"] if mps is not None and mps.is_available() else []
    xpu = getattr(torch, "xpu", None)
    devices += [f"xpu:{i}" for i in range(xpu.device_count())] if xpu is not None and xpu.is_available() else []
    return devices


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if it exists and is available here, else a ValueError listing those that are.

    torch itself would fail later and deeper: ``torch.device("tpu")`` raises a RuntimeError that lists every
    device type torch knows, and ``.to("cuda")`` on a machine without a GPU fails inside torch.cuda.
    """
    available = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={str(device)!r} is not a device torch knows; available here: "
                         f"{', '.join(available)}") from None
    index = 0 if dev.index is None else dev.index
    name = dev.type if dev.type in ("cpu", "mps") else f"{dev.type}:{index}"
    if dev.type != "cpu" and name not in available:
        raise ValueError(f"device={str(device)!r} is not available on this machine; available here: "
                         f"{', '.join(available)}")
    return dev


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (or ``$LORAKIT_DEVICE``), else CUDA when available, else the CPU."""
    device = device or os.environ.get("LORAKIT_DEVICE")
    if device:
        return check_device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively: AMX tiles or AVX512-BF16 (oneDNN uses either)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu, since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype: ``$LORAKIT_DTYPE`` if set, else the fastest one the hardware runs natively.

    * GPUs: bfloat16 where they have it, float16 where they do not (a Colab T4).
    * CPUs with native bfloat16 (AMX or AVX512-BF16): bfloat16, QLoRA's own compute dtype (NF4
      storage, bf16 compute; QLoRA section 3). On this workbook's CI CPU (AVX512-BF16) a QLoRA step
      of SmolLM2 ran about 2x faster than in float32, with held-out perplexity after a short
      fine-tune inside the float32 run's interval (notebook 06 measures both).
    * Other CPUs: float32, since bfloat16 there is emulated and slower.
    """
    name = os.environ.get("LORAKIT_DTYPE")
    if name:
        if name not in DTYPES:
            raise ValueError(f"LORAKIT_DTYPE={name!r} is not a dtype lorakit computes in; choose one of {list(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def setup(seed: int = 0, device: str | None = None) -> Runtime:
    """The first cell of every notebook: pick device and dtype, seed everything, report."""
    seed_everything(seed)
    dev = pick_device(device)
    return Runtime(device=dev, dtype=pick_dtype(dev), colab=in_colab(), seed=seed)


def _errors_to_report() -> tuple[type[BaseException], ...]:
    from lorakit.assets import AssetError

    # ValueError: lorakit's validation; AssetError: a missing or broken cache entry; FileExistsError: an
    # output folder that holds something else. All of them say what to do in their message.
    return (ValueError, AssetError, FileExistsError)


def run_main(main: Callable[[list[str]], int], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a command line's ``main(argv)``; lorakit's errors become one line on stderr and exit code 2.

    With ``--debug`` in ``argv`` (``main``'s parser declares it) the error raises, with its traceback.
    An error whose class sets ``keep_lines = True`` (a breakdown of figures) keeps its line breaks.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except _errors_to_report() as e:
        if "--debug" in argv:
            raise
        message = str(e) if getattr(e, "keep_lines", False) else " ".join(str(e).split())
        print(f"{prog or 'lorakit'}: error: {message}", file=sys.stderr)
        return 2
