"""A minimal causal-LM training step and a wall-clock helper, for the short runs in notebooks 01-02.

The full training loop (schedules, checkpoints, resuming) lives elsewhere; this is only
"forward, loss, backward, optimizer step", written out so a learner can read it in one go.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step on one batch (``input_ids``, ``attention_mask``, ``labels``); returns the loss."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    loss = model(**batch).loss  # mean next-token cross-entropy over B * (T - 1) targets
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_steps(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    progress: bool = False,
) -> list[float]:
    """Run ``steps`` training steps (the model in train mode), cycling through ``batches``; returns the losses."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; give at least one batch")
    model.train()
    indices = range(steps)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="train", leave=False)
    losses = [train_step(model, batches[i % len(batches)], optimizer) for i in indices]
    model.eval()
    return losses


def eval_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats per token) on held-out ``(N, T)`` blocks: ``log(perplexity)``."""
    from lorakit.data import perplexity

    return math.log(perplexity(model, blocks, batch_size=batch_size))


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median, not the mean, so one call slowed by another process does not move the figure.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
