"""A readable causal-LM training loop: gradient accumulation, warmup + cosine, checkpoint and resume.

It trains whatever parameters of ``model`` require grad (all of them for full fine-tuning, the
``lora_A``/``lora_B`` matrices after ``add_lora``). The batch for every step is a function of the
seed and the step alone (see ``batch_for``), so a resumed run sees exactly the batches an
uninterrupted run would, and with the optimizer, scheduler and RNG states restored from the
checkpoint it ends at the same loss.

It refuses settings it would ignore, and a checkpoint written with other settings. A loss or gradient
that is not finite stops it before the bad update is taken; an update that overflowed the weights
stops it too, and the last checkpoint's weights are put back. ``TrainResult.diverged`` says when and
the likely cause, and no checkpoint is ever written with non-finite weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit._io import atomic_write
from lorakit.data import perplexity
from lorakit.evaluation import heldout_perplexity

CHECKPOINT = "checkpoint.pt"
# bitsandbytes' names: AdamW with fp32 moments, paged (lorakit.paged, QLoRA section 3) or not, and with
# 8-bit blockwise moments (lorakit.adam8bit, Dettmers et al. 2022), paged or not.
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit")
DEFAULT_LR = 2e-4  # QLoRA appendix B, for LoRA on models of up to 13B parameters
# The settings that shape the trajectory: a checkpoint resumes only into a run with the same ones.
TRAJECTORY = (
    "steps",
    "lr",
    "batch_size",
    "grad_accum",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "optimizer",
)


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
    losses = [
        train_step(model, batches[i % len(batches)], optimizer)
        for i in tqdm(range(steps), desc="train", leave=False, disable=not progress)
    ]
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
    lr: float | None = None  # None: DEFAULT_LR, or the ready optimizer's own (train(optimizer=...))
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    weight_decay: float | None = None  # None: 0.0, or the ready optimizer's own
    optimizer: str | None = None  # one of OPTIMIZERS; None: "adamw", or the ready optimizer passed to train()
    page_budget_bytes: int = 16 << 20  # paged optimizers: optimizer state resident at once (the rest paged out)
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
    # (step, low, high): each evaluation's 95% bootstrap interval (lorakit.evaluation), beside ``evals``
    eval_intervals: list[tuple[int, float, float]] = field(default_factory=list)
    samples: list[tuple[int, str]] = field(default_factory=list)  # (step, generated text)
    seconds: float = 0.0  # wall time of the steps this process ran
    interrupted: bool = False
    resumed_at: int = 0  # the step a checkpoint restored (0: a fresh start)
    diverged: dict | None = None  # {"step", "reason", "last_good_step"} when a non-finite loss or gradient stopped it

    @property
    def steps_run(self) -> int:
        """Optimizer steps this process ran (a resumed run restores the others from its checkpoint)."""
        return self.step - self.resumed_at

    @property
    def seconds_per_step(self) -> float | None:
        return self.seconds / self.steps_run if self.steps_run else None


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
    # seed * a prime far above any epoch count: no two (seed, epoch) pairs share a generator seed
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    return blocks[order[position * config.batch_size : (position + 1) * config.batch_size]]


def check_inputs(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    config: TrainConfig,
    optimizer=None,
    checkpoint_dir: str | Path | None = None,
) -> None:
    """Refuse bad settings, and settings that would be silently ignored, before any training starts."""
    for name in ("steps", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(config, name)}")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"TrainConfig.lr must be a finite positive number, got {config.lr}")
    if config.optimizer is not None:
        check_optimizer(config.optimizer)
    if isinstance(optimizer, str):
        check_optimizer(optimizer)
    if isinstance(optimizer, str) and config.optimizer not in (None, optimizer):
        raise ValueError(f"optimizer={optimizer!r} and TrainConfig.optimizer={config.optimizer!r} disagree; set one")
    if optimizer is not None and not isinstance(optimizer, str):
        ignored = [
            f"{n}={getattr(config, n)!r}" for n in ("lr", "weight_decay", "optimizer") if getattr(config, n) is not None
        ]
        if ignored:
            raise ValueError(
                f"TrainConfig {', '.join(ignored)} would be ignored: the optimizer passed to train() "
                "has its own; leave them None, or pass no optimizer"
            )
    if config.checkpoint_every and checkpoint_dir is None:
        raise ValueError(
            f"TrainConfig.checkpoint_every={config.checkpoint_every} needs a checkpoint_dir to write to; "
            "pass checkpoint_dir=..., or set checkpoint_every=0"
        )
    if blocks.ndim != 2 or len(blocks) < config.batch_size:
        raise ValueError(
            f"the training data has {len(blocks)} blocks (shape {tuple(blocks.shape)}), "
            f"fewer than one batch of {config.batch_size}: use more text or a smaller batch_size"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad: nothing to train (did you call add_lora?)")


def set_gradient_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn transformers' activation checkpointing on or off (named gradient checkpointing before v5).

    Only a model in train mode recomputes: transformers checkpoints when ``self.training`` is True.
    """
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


def check_optimizer(name: str) -> None:
    """Refuse an optimizer name lorakit does not offer, listing those it does."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not valid; choose one of {OPTIMIZERS}")


def make_optimizer(
    name: str,
    params,
    lr: float = DEFAULT_LR,
    weight_decay: float = 0.0,
    page_budget_bytes: int = 16 << 20,
    page_dir: str | None = None,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (bitsandbytes' names, see ``OPTIMIZERS``) over ``params``.

    ``paged_*`` wrap the optimizer in :class:`lorakit.paged.PagedOptimizer`: its state lives in pages,
    at most ``page_budget_bytes`` of them on the parameters' device at once.
    """
    from lorakit.adam8bit import AdamW8bit
    from lorakit.paged import PagedOptimizer

    check_optimizer(name)
    params = list(params)
    if name.endswith("adamw8bit"):
        inner = AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    else:
        inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if not name.startswith("paged_"):
        return inner
    page_bytes = min(1 << 20, page_budget_bytes)
    return PagedOptimizer(inner, budget_bytes=page_budget_bytes, page_bytes=page_bytes, page_dir=page_dir)


def _trajectory(config: TrainConfig, blocks: torch.Tensor) -> dict:
    """What a checkpoint must share with the run that resumes it: the settings and the data's shape."""
    return {**{n: getattr(config, n) for n in TRAJECTORY}, "data": list(blocks.shape)}


def _save_checkpoint(folder: Path, model, optimizer, scheduler, result: TrainResult, trajectory: dict) -> None:
    """Write the checkpoint atomically (lorakit._io: a temporary file in the same folder, then a rename)."""
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
        "eval_intervals": result.eval_intervals,
        "config": trajectory,
    }
    atomic_write(folder / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(folder: Path, model, optimizer, scheduler, result: TrainResult, trajectory: dict | None) -> None:
    """Restore a checkpoint; with ``trajectory``, refuse one written by a run with other settings."""
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
    if trajectory is not None:
        saved = state.get("config", {})
        differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in trajectory.items() if saved.get(k) != v]
        if differ:
            raise ValueError(
                f"the checkpoint in {str(folder)!r} was written by a run with other settings "
                f"({', '.join(differ)}); resume with the same settings, or use another checkpoint_dir"
            )
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
    result.eval_intervals = list(state.get("eval_intervals", []))


def _non_finite(step_loss: float, grad_norm: torch.Tensor, lr: float, step: int) -> str | None:
    """Why this step must not be taken (a non-finite loss or gradient), with the likely cause; None if fine."""
    if not math.isfinite(step_loss):
        if step == 0:
            return (
                f"the loss is {step_loss} before any update: check the weights, the data and the compute "
                "dtype (float16 overflows easily)"
            )
        return (
            f"the loss became {step_loss}: the learning rate lr={lr:g} is likely too high for this "
            "setting; lower it (2e-4 is QLoRA's)"
        )
    if not torch.isfinite(grad_norm):
        return (
            f"the gradient norm is {grad_norm.item()}: lower the learning rate lr={lr:g}, keep gradient "
            "clipping (max_grad_norm) on, or use float32 or bfloat16 instead of float16"
        )
    return None


def train(
    model: torch.nn.Module,
    train_blocks: torch.Tensor,
    val_blocks: torch.Tensor | None = None,
    config: TrainConfig | None = None,
    optimizer: torch.optim.Optimizer | str | None = None,
    tokenizer=None,
    checkpoint_dir: str | Path | None = None,
    on_step: Callable[[TrainResult], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``(N, T)`` token blocks; resume from ``checkpoint_dir`` if it holds one.

    ``optimizer`` is a name from ``OPTIMIZERS`` (or ``config.optimizer``), or a ready Optimizer.
    A KeyboardInterrupt (the stop button in Jupyter) ends training cleanly: the last finished
    step is checkpointed (when ``checkpoint_dir`` is set) and the results so far are returned.
    A non-finite loss or gradient stops it before the bad update, with ``result.diverged`` saying
    when and why; the last checkpoint is kept as it was.
    """
    config = config or TrainConfig()
    check_inputs(model, train_blocks, config, optimizer, checkpoint_dir)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    ready = optimizer is not None and not isinstance(optimizer, str)
    trajectory = _trajectory(config, train_blocks) if not ready else None
    if not ready:
        name = optimizer or config.optimizer or "adamw"
        lr = DEFAULT_LR if config.lr is None else config.lr
        trajectory.update(optimizer=name, lr=lr, weight_decay=config.weight_decay or 0.0)  # as resolved
        optimizer = make_optimizer(
            name, trainable, lr=lr, weight_decay=config.weight_decay or 0.0, page_budget_bytes=config.page_budget_bytes
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    result = TrainResult()
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder and (folder / CHECKPOINT).is_file():
        _load_checkpoint(folder, model, optimizer, scheduler, result, trajectory)
        result.resumed_at = result.step
    if config.gradient_checkpointing:
        # Recompute each layer's activations in backward instead of keeping them (Chen et al., 2016).
        set_gradient_checkpointing(model, True)

    def evaluate() -> None:
        if val_blocks is not None and (not result.evals or result.evals[-1][0] != result.step):
            blocks = val_blocks[: config.eval_blocks]
            if len(blocks) < 2:  # one block: no interval to give
                result.evals.append((result.step, perplexity(model, blocks)))
                return
            measured = heldout_perplexity(model, blocks=blocks)  # the workbook's one protocol, with its interval
            result.evals.append((result.step, measured.ppl))
            result.eval_intervals.append((result.step, measured.low, measured.high))

    def sample() -> None:
        if tokenizer is not None and config.sample_prompt:
            from lorakit.models import generate

            result.samples.append((result.step, generate(model, tokenizer, config.sample_prompt, chat=False)))

    def stop(step: int, reason: str) -> None:
        """Divergence: record it; if the bad update was taken, put back the last checkpoint's weights.

        Without a checkpoint they stay as the bad update left them (finetune then saves no adapter).
        """
        last = saved[-1] if saved else None
        result.diverged = {"step": step, "reason": reason, "last_good_step": last}
        if not all(torch.isfinite(p).all() for p in trainable) and last is not None:
            state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=False)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in state["trainable"]:
                        p.copy_(state["trainable"][name])

    if result.step == 0:  # a resumed run has its "before" figures in the checkpoint already
        evaluate()
        sample()
    saved = [result.step] if result.resumed_at else []  # steps checkpointed, the last one last
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
            # the total gradient norm, clipped to max_grad_norm when set (an infinite bound only measures it)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
            problem = _non_finite(step_loss, grad_norm, optimizer.param_groups[0]["lr"], result.step)
            if problem:  # stop before the update: the weights stay those of the last good step
                stop(result.step + 1, problem)
                break
            optimizer.step()
            if not all(torch.isfinite(p).all() for p in trainable):  # the update itself overflowed
                stop(
                    result.step + 1,
                    f"the update made weights non-finite: the learning rate "
                    f"{optimizer.param_groups[0]['lr']:g} is too high; lower it (2e-4 is QLoRA's)",
                )
                break
            scheduler.step()
            result.step += 1
            result.losses.append(step_loss)
            # book: end of one training step
            if config.eval_every and result.step % config.eval_every == 0:
                evaluate()
                model.train()
            if folder and config.checkpoint_every and result.step % config.checkpoint_every == 0:
                _save_checkpoint(folder, model, optimizer, scheduler, result, trajectory or {})
                saved.append(result.step)
            postfix = {"loss": f"{step_loss:.3f}"}
            if result.evals and result.evals[-1][0] == result.step:  # only a perplexity measured at this step
                postfix["ppl"] = f"{result.evals[-1][1]:.1f}"
            bar.set_postfix(postfix)
            bar.update(1)
            if on_step:
                on_step(result)
    except KeyboardInterrupt:
        result.interrupted = True
        if folder and result.step:
            _save_checkpoint(folder, model, optimizer, scheduler, result, trajectory or {})
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        model.eval()
        if config.gradient_checkpointing:
            set_gradient_checkpointing(model, False)
    if not result.interrupted and not result.diverged:
        evaluate()
        sample()
    return result
