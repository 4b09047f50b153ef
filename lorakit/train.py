"""A readable causal-LM training loop: gradient accumulation, warmup + cosine, checkpoint and resume.

It trains whatever parameters of ``model`` require grad (all of them for full fine-tuning, the
``lora_A``/``lora_B`` matrices after ``add_lora``). The batch for every step is a function of the
seed and the step alone (see ``batch_for``), so a resumed run sees exactly the batches an
uninterrupted run would, and with the optimizer, scheduler and RNG states restored from the
checkpoint it ends at the same loss.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from lorakit.data import perplexity

CHECKPOINT = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------
# The minimal loop (notebooks 01, 02 and 05): forward, loss, backward, optimizer step, nothing else.
# train() below is the same step with gradient accumulation, clipping, a schedule and checkpoints.
# ----------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """One optimizer step on one batch (``input_ids``, ``attention_mask``, ``labels``); returns the loss.

    The old gradients are cleared *before* the backward pass, as :func:`train` does, so after the
    call every ``p.grad`` holds this step's gradient.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss  # mean next-token cross-entropy over B * (T - 1) targets
    loss.backward()
    optimizer.step()
    return loss.item()


def train_steps(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    progress: bool = False,
) -> list[float]:
    """Run ``steps`` training steps (the model in train mode), cycling through ``batches``; returns the losses.

    The model is left in eval mode with no gradients held.
    """
    if steps < 1:
        raise ValueError(f"train_steps: steps must be at least 1, got {steps}")
    batches = list(batches)
    if not batches:
        raise ValueError("train_steps: batches is empty; give at least one batch")
    model.train()
    losses = [train_step(model, batches[i % len(batches)], optimizer)
              for i in tqdm(range(steps), desc="train", leave=False, disable=not progress)]
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return losses


def eval_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss (nats per token) on held-out ``(N, T)`` blocks.

    :func:`lorakit.data.perplexity` is ``exp`` of this mean, so its log is the mean itself.
    """
    return math.log(perplexity(model, blocks, batch_size=batch_size))


# ----------------------------------------------------------------------------------------------
# The full loop: TrainConfig, train(), checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 2e-4
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    eval_every: int = 0  # 0: evaluate only before and after
    eval_blocks: int = 32
    checkpoint_every: int = 0  # 0: no checkpoints
    sample_prompt: str | None = None  # generated before and after training, when a tokenizer is given
    seed: int = 0
    progress: bool = True


@dataclass
class TrainResult:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of each optimizer step
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out perplexity)
    samples: list[tuple[int, str]] = field(default_factory=list)  # (step, generated text)
    seconds: float = 0.0
    interrupted: bool = False


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The learning-rate multiplier: linear warmup to 1, then a cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_for(blocks: torch.Tensor, step: int, micro: int, config: TrainConfig) -> torch.Tensor:
    """The ``(B, T)`` micro-batch ``micro`` of optimizer step ``step``, the same in every run.

    Blocks are visited in a seeded permutation per epoch, so no loader state needs saving.
    """
    per_epoch = len(blocks) // config.batch_size
    index = step * config.grad_accum + micro
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    return blocks[order[position * config.batch_size : (position + 1) * config.batch_size]]


def check_inputs(model: torch.nn.Module, blocks: torch.Tensor, config: TrainConfig) -> None:
    """Refuse bad settings before any training starts."""
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(config, name)}")
    if config.lr <= 0:
        raise ValueError(f"TrainConfig.lr must be positive, got {config.lr}")
    if blocks.ndim != 2 or len(blocks) < config.batch_size:
        raise ValueError(
            f"the training data has {len(blocks)} blocks (shape {tuple(blocks.shape)}), "
            f"fewer than one batch of {config.batch_size}: use more text or a smaller batch_size"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad: nothing to train (did you call add_lora?)")


def _checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn transformers' activation checkpointing on or off (named gradient checkpointing before v5)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif hasattr(model, "gradient_checkpointing_enable"):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
    else:
        raise ValueError(f"gradient_checkpointing needs a transformers model; {type(model).__name__} has none")


def _save_checkpoint(folder: Path, model, optimizer, scheduler, result: TrainResult, config: TrainConfig) -> None:
    """Write the checkpoint atomically: a temporary file in the same folder, then a rename."""
    state = {
        "step": result.step,
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
        },
        "losses": result.losses,
        "evals": result.evals,
        "config": asdict(config),
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT)


def _load_checkpoint(folder: Path, model, optimizer, scheduler, result: TrainResult) -> None:
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(params))
    if missing:
        raise ValueError(f"checkpoint in {folder} has parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    random.setstate(state["rng"]["python"])
    result.step, result.losses, result.evals = state["step"], list(state["losses"]), list(state["evals"])


def train(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor | None = None,
    config: TrainConfig | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    tokenizer=None,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``(N, T)`` token blocks; resume from ``checkpoint_dir`` if it holds one.

    A KeyboardInterrupt (the stop button in Jupyter) ends training cleanly: the last finished
    step is checkpointed (when ``checkpoint_dir`` is set) and the results so far are returned.
    """
    config = config or TrainConfig()
    check_inputs(model, train_blocks, config)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    optimizer = optimizer or torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    result = TrainResult()
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder and (folder / CHECKPOINT).is_file():
        _load_checkpoint(folder, model, optimizer, scheduler, result)
    if config.gradient_checkpointing:
        # Recompute each layer's activations in backward instead of keeping them (Chen et al., 2016).
        _checkpointing(model, True)

    def evaluate() -> None:
        if val_blocks is not None and (not result.evals or result.evals[-1][0] != result.step):
            result.evals.append((result.step, perplexity(model, val_blocks[: config.eval_blocks])))

    def sample() -> None:
        if tokenizer is not None and config.sample_prompt:
            from lorakit.models import generate

            result.samples.append((result.step, generate(model, tokenizer, config.sample_prompt, chat=False)))

    if result.step == 0:  # a resumed run has its "before" figures in the checkpoint already
        evaluate()
        sample()
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.steps, initial=result.step, desc="training", disable=not config.progress)
    try:
        while result.step < config.steps:
            # book: one training step (book/source/training.md shows the lines down to its end marker)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.grad_accum):
                input_ids = batch_for(train_blocks, result.step, micro, config).to(device)  # (B, T)
                loss = model(input_ids=input_ids, labels=input_ids).loss / config.grad_accum
                loss.backward()
                step_loss += loss.item()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.step += 1
            result.losses.append(step_loss)
            # book: end of one training step
            if config.eval_every and result.step % config.eval_every == 0:
                evaluate()
                model.train()
            if folder and config.checkpoint_every and result.step % config.checkpoint_every == 0:
                _save_checkpoint(folder, model, optimizer, scheduler, result, config)
            postfix = {"loss": f"{step_loss:.3f}"}
            if result.evals:
                postfix["ppl"] = f"{result.evals[-1][1]:.1f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if on_step:
                on_step(result)
    except KeyboardInterrupt:
        result.interrupted = True
        if folder and result.step:
            _save_checkpoint(folder, model, optimizer, scheduler, result, config)
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        model.eval()
        if config.gradient_checkpointing:
            _checkpointing(model, False)
    if not result.interrupted:
        evaluate()
        sample()
    return result
