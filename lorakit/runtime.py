"""Where a notebook runs: Colab or not, which device, which compute dtype, and the seeds."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

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
        return f"{where} | device: {self.device} ({name}) | compute dtype: {str(self.dtype).removeprefix('torch.')} | seed: {self.seed}"


def in_colab() -> bool:
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (or ``$LORAKIT_DEVICE``), else CUDA when available, else the CPU."""
    device = device or os.environ.get("LORAKIT_DEVICE")
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that have it, float16 on those that do not (a Colab T4), float32 on the CPU.

    bf16 matmuls on a laptop CPU are slow and lose precision the lessons compare against,
    so CPU runs stay in float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
