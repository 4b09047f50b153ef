"""What one QLoRA setting costs, and a table of short runs: the logic behind notebook 06's controls.

Widgets stay thin (STYLE.md): :func:`setting_report` computes everything a control shows and
:class:`RunBoard` keeps the runs; both are tested without a browser.
:class:`lorakit.widgets.finetune.FinetuneControl` only wires ipywidgets to them.

For one setting of rank ``r``, bit width ``k`` and data type (NF, Int, FP), the report shows

* the trainable parameters, ``r * (d_in + d_out)`` per targeted Linear (LoRA section 4.1);
* the memory of one training step, line by line (weights, gradients, optimizer state,
  activations), from :func:`lorakit.estimate_memory` (notebook 05 checks it against the
  measured ledger within a fraction of a percent);
* the quantization error of the base weights at ``k`` bits, measured on a real decoder block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lorakit.codebooks import BITS, check_codebook
from lorakit.memory import MB, MemoryEstimate, estimate_memory, lora_params, model_shape
from lorakit.tradeoff import Tradeoff, quantization_tradeoff

RANKS = (1, 64)  # the rank control's range


@dataclass
class SettingReport:
    """What one (rank, bits, data type) setting costs: parameters, memory, quantization error."""

    rank: int
    bits: int
    quant_type: str
    trainable_params: int
    base_params: int
    memory: MemoryEstimate  # QLoRA at this setting
    lora_memory: MemoryEstimate  # the same adapters on a 16/32-bit base, for comparison
    quantization: Tradeoff  # error of the base weights of one decoder block at this setting

    @property
    def label(self) -> str:
        return f"r={self.rank} {self.quant_type}{self.bits}"

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.base_params

    def lines_mb(self) -> dict[str, float]:
        """The memory ledger's lines in MB (the weights line split into its storage kinds)."""
        return {name: value / MB for name, value in self.memory.lines().items()}

    def __str__(self) -> str:
        rows = [
            f"setting: rank {self.rank}, {self.quant_type.upper()}{self.bits} base weights",
            f"trainable params: {self.trainable_params:,} of {self.base_params:,} ({self.trainable_percent:.3f}%)",
            f"quantization error (one decoder block): {self.quantization.relative_error:.2%} relative, "
            f"{self.quantization.bits_per_parameter:.3f} bits/param",
            "memory of one training step (estimated):",
        ]
        rows += [f"  {name:<36}{mb:>10,.1f} MB" for name, mb in self.lines_mb().items()]
        rows.append(
            f"  {'total':<36}{self.memory.total / MB:>10,.1f} MB"
            f"   (LoRA on a {self.lora_memory.settings['bits']}-bit base: {self.lora_memory.total / MB:,.1f} MB)"
        )
        return "\n".join(rows)


def block_weights(model: torch.nn.Module, layer: int | None = None) -> torch.Tensor:
    """Every Linear weight of one decoder block (the middle one by default), flattened: ``(n,)``."""
    layers = model.model.layers
    block = layers[len(layers) // 2 if layer is None else layer]
    weights = [m.weight.detach().float().reshape(-1) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if not weights:
        raise ValueError(
            f"decoder block {layer} of {type(model).__name__} has no nn.Linear weights "
            "(quantized already? pass an unquantized model)"
        )
    return torch.cat(weights)


def check_setting(rank: int, bits: int, quant_type: str) -> None:
    """Refuse a setting the fine-tune cannot run, saying what is valid."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not RANKS[0] <= rank <= RANKS[1]:
        raise ValueError(f"rank={rank!r} is not valid here; choose an integer from {RANKS[0]} to {RANKS[1]}")
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not valid; choose one of {BITS}")
    check_codebook(quant_type, bits)  # the data type (one of KINDS), and FP at 4 bits only


def setting_report(
    model: torch.nn.Module,
    rank: int = 8,
    bits: int = 4,
    quant_type: str = "nf",
    targets: str | tuple[str, ...] = "all",
    batch_size: int = 4,
    seq_len: int = 128,
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    double_quant: bool = True,
    weights: torch.Tensor | None = None,
) -> SettingReport:
    """Everything the rank / bit-width controls show for one setting of an (unquantized) ``model``.

    ``weights`` (default: :func:`block_weights`) is the tensor the quantization error is measured
    on; pass it in to avoid gathering it again for every setting.
    """
    check_setting(rank, bits, quant_type)
    shape = model_shape(model.config)
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(rank=rank, targets=targets, batch_size=batch_size, seq_len=seq_len, dtype=dtype_name)
    memory = estimate_memory(shape, "qlora", bits=bits, blocksize=blocksize, double_quant=double_quant, **common)
    lora_memory = estimate_memory(shape, "lora", **common)
    weights = block_weights(model) if weights is None else weights
    quantization = quantization_tradeoff(weights, quant_type, bits, blocksize, double_quant)
    return SettingReport(
        rank=rank,
        bits=bits,
        quant_type=quant_type,
        trainable_params=lora_params(shape, rank, targets),
        base_params=shape.n_params,
        memory=memory,
        lora_memory=lora_memory,
        quantization=quantization,
    )


@dataclass
class Run:
    """One finished fine-tune in the runs table."""

    rank: int
    bits: int
    quant_type: str
    steps: int
    trainable_params: int
    ppl_before: float
    ppl_after: float
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"r={self.rank} {self.quant_type}{self.bits}"

    @property
    def ppl_change(self) -> float:
        """Relative change of held-out perplexity (-0.3 = 30% lower)."""
        return self.ppl_after / self.ppl_before - 1.0


class RunBoard:
    """Runs short QLoRA fine-tunes at chosen settings and keeps their results in a table.

    ``train_settings`` are passed to :func:`lorakit.finetune` for every run (steps, seq_len, ...);
    ``trainer`` is :func:`lorakit.finetune` unless a test passes another.
    """

    def __init__(self, trainer=None, device=None, dtype=None, **train_settings):
        if trainer is None:
            from lorakit.finetune import finetune as trainer
        self.trainer = trainer
        self.device, self.dtype = device, dtype
        self.train_settings = train_settings
        self.runs: list[Run] = []

    def train(self, rank: int, bits: int, quant_type: str, on_step=None, progress: bool = True) -> Run:
        """Fine-tune with QLoRA at this setting (the other settings as given to the board); add the run."""
        check_setting(rank, bits, quant_type)
        start = time.perf_counter()
        result = self.trainer(
            method="qlora",
            rank=rank,
            alpha=2.0 * rank,
            bits=bits,
            kind=quant_type,
            device=self.device,
            dtype=self.dtype,
            progress=progress,
            on_step=on_step,
            **self.train_settings,
        )
        metrics = result.metrics
        run = Run(
            rank=rank,
            bits=bits,
            quant_type=quant_type,
            steps=metrics["steps"],
            trainable_params=metrics["trainable_params"],
            ppl_before=metrics["ppl_before"],
            ppl_after=metrics["ppl_after"],
            seconds=time.perf_counter() - start,
            losses=list(result.train.losses),
        )
        self.runs.append(run)
        return run

    def table(self) -> str:
        """The runs as a Markdown table."""
        rows = [
            "| run | setting | steps | trainable | ppl before | ppl after | change | seconds |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(self.runs, 1):
            rows.append(
                f"| {i} | {r.label} | {r.steps} | {r.trainable_params:,} | {r.ppl_before:.2f} | "
                f"{r.ppl_after:.2f} | {r.ppl_change:+.1%} | {r.seconds:.0f} |"
            )
        return "\n".join(rows)

    def html(self) -> str:
        """The runs as an HTML table (what the widget shows)."""
        head = "".join(
            f"<th>{h}</th>"
            for h in ("run", "setting", "steps", "trainable", "ppl before", "ppl after", "change", "seconds")
        )
        rows = "".join(
            f"<tr><td>{i}</td><td>{r.label}</td><td>{r.steps}</td><td>{r.trainable_params:,}</td>"
            f"<td>{r.ppl_before:.2f}</td><td>{r.ppl_after:.2f}</td><td>{r.ppl_change:+.1%}</td>"
            f"<td>{r.seconds:.0f}</td></tr>"
            for i, r in enumerate(self.runs, 1)
        )
        return f"<table><tr>{head}</tr>{rows}</table>"

    def figure(self):
        """Held-out perplexity before and after each run, as a bar chart.

        Drawn by :func:`lorakit.widgets.finetune.runs_figure`.
        """
        from lorakit.widgets.finetune import runs_figure

        return runs_figure(self.runs)
