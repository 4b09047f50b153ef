"""LoRA+: a larger learning rate for B than for A (Hayou et al. 2024, "LoRA+", §3 and §4).

With one learning rate for both factors, LoRA's feature learning is inefficient when the width is
large: the paper's analysis (§3, Theorem 1) shows that ``B`` should move faster than ``A``, with a
ratio ``lr_B / lr_A = lambda`` well above 1 (it suggests ``lambda = 2**4 = 16`` for language models, §4).

The groups mirror peft's ``create_loraplus_optimizer`` (peft/optimizers/loraplus.py), so the same
model gets the same rates: ``lora_A`` at ``lr``; ``lora_B`` and every other 1-D trainable parameter
(DoRA's magnitude) at ``lr * ratio``; those 1-D ones whose name holds "bias" without weight decay.
peft's fourth group (LoRA on embedding layers, ``loraplus_lr_embedding``) stays empty in lorakit,
which puts LoRA on Linear layers only.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_RATIO = 16.0  # LoRA+ §4: lambda = 2**4 worked well across their language-model tasks


def loraplus_param_groups(
    model: nn.Module, lr: float, ratio: float = DEFAULT_RATIO, weight_decay: float = 0.0
) -> list[dict]:
    """The optimizer's parameter groups: A at ``lr``, B (and 1-D parameters) at ``lr * ratio``.

    Named groups in peft's order (``A``, ``embedding``, ``B``, ``B_no_decay``); empty groups are dropped.
    """
    if not lr > 0 or not ratio >= 1:
        raise ValueError(f"LoRA+: lr={lr!r} must be > 0 and ratio={ratio!r} >= 1 (lr_B / lr_A; the paper suggests 16)")
    groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:  # B, and DoRA's magnitude: the fast group
            groups["B_no_decay" if "bias" in name else "B"].append(param)
        else:
            groups["A"].append(param)
    if not groups["A"] and not groups["B"]:
        raise ValueError("LoRA+: the model has no trainable LoRA parameters; call add_lora(model, targets) first")
    rates = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [
        {"name": key, "params": params, "lr": rates[key][0], "weight_decay": rates[key][1]}
        for key, params in groups.items()
        if params
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 2e-4,
    ratio: float = DEFAULT_RATIO,
    weight_decay: float = 0.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over :func:`loraplus_param_groups` (peft's ``create_loraplus_optimizer``)."""
    return optimizer_cls(loraplus_param_groups(model, lr, ratio, weight_decay), lr=lr, **kwargs)
