"""The lab's settings: the four fine-tunes, the settings they share, and where they run."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lorakit.finetune import FinetuneConfig
from lorakit.models import DEFAULT_MODEL
from lorakit.runtime import pick_device, pick_dtype

# The four fine-tunes; every other setting is shared (LabConfig).
RUNS = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),
    "qlora_nf4": dict(method="qlora", kind="nf", double_quant=True),
    "qlora_fp4": dict(method="qlora", kind="fp", double_quant=True),
}


@dataclass
class LabConfig:
    """The lab's settings. The defaults are the quick ones (a few minutes on a 2-core CPU);
    :meth:`full_settings` gives the longer run behind ``python -m lorakit.lab --full``."""

    steps: int = 6
    batch_size: int = 2
    seq_len: int = 64
    train_blocks: int | None = 32  # blocks of training text tokenized (None: the whole split)
    eval_blocks: int = 4  # held-out blocks for perplexity
    rank: int = 8
    alpha: float = 16.0
    latency_tokens: int = 32  # one forward pass over this many tokens is timed
    latency_rounds: int = 3  # rounds of interleaved timing; each round times every model
    latency_repeats: int = 3  # calls per model per round (median)
    spike_seq_len: int = 384  # the long-sequence batch of the paging measurement (0: skip it)
    page_kib: int = 1024  # PagedOptimizer page size
    page_budget_pages: int = 2  # pages of optimizer state allowed on the fast tier
    min_quality_steps: int = 100  # fewer steps than this: quality claims answer "depends"
    sweep_ranks: tuple[int, ...] = (1,)  # LoRA ranks trained beside ``rank`` in the variants job
    batch_budget_mb: int = 1000  # "larger batches": the largest batch whose training step fits this many MB
    variants: bool = True  # the variants job (targets, ranks, bf16 adapters, paging, 4-bit op, task switch)
    seed: int = 0
    corpus: str = "shakespeare"
    model: str = DEFAULT_MODEL
    device: str | None = None  # None: CUDA when there is one, else the CPU
    isolate: bool = True  # each run in a fresh process (its own peak RSS)

    @classmethod
    def full_settings(cls, **overrides) -> LabConfig:
        """Longer runs: enough steps for the quality claims to get a verdict."""
        settings = dict(
            steps=150,
            batch_size=4,
            seq_len=128,
            train_blocks=None,
            eval_blocks=32,
            latency_tokens=128,
            latency_rounds=7,
            latency_repeats=5,
            spike_seq_len=2048,
            sweep_ranks=(1, 4, 32, 64),
            batch_budget_mb=4000,
        )
        return cls(**{**settings, **overrides})

    def validate(self) -> None:
        """Refuse impossible settings before anything is loaded, naming the setting and what is valid."""
        for name in (
            "steps",
            "batch_size",
            "eval_blocks",
            "rank",
            "latency_tokens",
            "latency_rounds",
            "latency_repeats",
            "page_kib",
            "page_budget_pages",
            "min_quality_steps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabConfig.{name}={value!r} is not valid; it must be an integer of at least 1")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"LabConfig.seq_len={self.seq_len!r} is not valid; use at least 8 tokens")
        if self.latency_tokens > self.seq_len * self.eval_blocks:
            raise ValueError(
                f"LabConfig.latency_tokens={self.latency_tokens} is more than the held-out text "
                f"tokenized ({self.eval_blocks} blocks of {self.seq_len}); lower it"
            )
        if self.train_blocks is not None and self.train_blocks < self.batch_size:
            raise ValueError(
                f"LabConfig.train_blocks={self.train_blocks} is fewer than one batch of "
                f"{self.batch_size}; raise it (or None for the whole training split)"
            )
        if not self.sweep_ranks or not all(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 192 for r in self.sweep_ranks
        ):
            raise ValueError(
                f"LabConfig.sweep_ranks={self.sweep_ranks!r} is not valid; give ranks from 1 to 192 "
                "(SmolLM2's smallest projection, k_proj and v_proj, has 192 outputs)"
            )
        if (
            isinstance(self.batch_budget_mb, bool)
            or not isinstance(self.batch_budget_mb, int)
            or self.batch_budget_mb < 1
        ):
            raise ValueError(
                f"LabConfig.batch_budget_mb={self.batch_budget_mb!r} is not valid; use a positive number of MB"
            )
        if self.spike_seq_len < 0:
            raise ValueError(f"LabConfig.spike_seq_len={self.spike_seq_len} is not valid; use 0 (skip) or a length")
        if not self.alpha > 0:
            raise ValueError(f"LabConfig.alpha={self.alpha!r} is not valid; use a positive number (often 2 * rank)")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"LabConfig.device={self.device!r} is not a torch device; use 'cpu' or 'cuda'"
                ) from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"LabConfig.device={self.device!r}, but torch sees no CUDA GPU here; use 'cpu'")


def lab_config(settings: dict) -> LabConfig:
    known = {f.name for f in fields(LabConfig)}
    return LabConfig(**{k: v for k, v in settings.items() if k in known})


def device_and_dtype(config: LabConfig) -> tuple[torch.device, torch.dtype]:
    """The runtime's choice (lorakit.setup): CUDA in bf16 (fp16 on a T4) when there is one, else CPU fp32."""
    device = pick_device(config.device)
    return device, pick_dtype(device)


def finetune_config(name: str, config: LabConfig) -> FinetuneConfig:
    """The shared settings plus run ``name``'s method; the learning rate is each method's default."""
    return FinetuneConfig(
        rank=config.rank,
        alpha=config.alpha,
        steps=config.steps,
        batch_size=config.batch_size,
        seq_len=config.seq_len,
        train_blocks=config.train_blocks,
        eval_blocks=config.eval_blocks,
        warmup_steps=min(6, config.steps),
        corpus=config.corpus,
        seed=config.seed,
        model=config.model,
        **RUNS[name],
    )
