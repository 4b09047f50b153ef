"""The recipe study (notebook 09): which LoRA variant, rank, scaling, layers and learning rate, measured.

Every run fine-tunes SmolLM2 on the same Shakespeare training blocks, for the same steps, from the
same seed, and is scored by the workbook's one protocol (``lorakit.evaluation.heldout_perplexity``,
with its 95% bootstrap interval). The runs are grouped by the question they answer:

- ``bits``: LoRA, DoRA, PiSSA and LoftQ on a 4-bit base, and QLoRA against LoftQ at 3 and 2 bits, each
  with its perplexity *before* training too (how far the quantized start is from the model); ``bits-all``:
  QLoRA against LoftQ at the fewest bits with every linear layer adapted (LoftQ corrects only adapted layers);
- ``rank``: r in ``ranks`` with LoRA's ``alpha / r`` and with rsLoRA's ``alpha / sqrt(r)`` (Kalajdzievski 2023);
- ``targets``: q_proj and v_proj only against every linear layer (QLoRA §4: "all linear layers" matters most);
- ``lr``: the learning rates in ``lrs``;
- gradient checkpointing: saved activations (the memory ledger) and the step time, on and off, same batch.

:func:`what_to_choose` turns the measurements into a table whose every row names the runs behind it.
``python -m lorakit.recipe`` runs the quick study (minutes on a CPU); ``--full`` the longer one (a GPU).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lorakit.data import split_documents, tokenize_blocks
from lorakit.evaluation import HeldOut, Perplexity, compare_perplexity, heldout_perplexity
from lorakit.linear4bit import Linear4bit, quantize_model, set_module
from lorakit.loftq import loftq_init
from lorakit.lora import LLAMA_PROJECTIONS, add_lora
from lorakit.memory import MB, memory_ledger
from lorakit.pissa import pissa_init
from lorakit.train import TrainConfig, set_gradient_checkpointing, train

METHODS = ("lora", "dora", "pissa", "loftq")
QV = ("q_proj", "v_proj")


@dataclass(frozen=True)
class RecipeConfig:
    """The study's settings. The defaults are the quick study: tiny, so that it runs in minutes on one CPU core."""

    steps: int = 6  # optimizer steps per run
    batch_size: int = 2  # blocks per step
    seq_len: int = 64  # tokens per training block
    lr: float = 1e-3  # high, so that a few steps show a difference (QLoRA's 2e-4 suits hundreds of steps)
    r: int = 8
    alpha: float = 16
    targets: tuple[str, ...] = QV
    eval_blocks: int = 4  # held-out blocks of 128 tokens (the protocol's 32 in --full): wide intervals
    train_blocks: int = 64
    bits: tuple[int, ...] = (4, 3, 2)
    ranks: tuple[int, ...] = (2, 8, 32)
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    loftq_iters: int = 1  # peft's LoftQConfig default
    seed: int = 0


FULL = RecipeConfig(
    steps=200, batch_size=8, seq_len=128, lr=2e-4, eval_blocks=32, train_blocks=4096, ranks=(4, 16, 64),
    lrs=(5e-5, 2e-4, 1e-3), loftq_iters=5,
)  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """One run: the method, the base's bit width (None: 16/32-bit), rank, scaling, layers and learning rate."""

    group: str
    method: str = "lora"
    bits: int | None = None
    r: int = 8
    alpha: float = 16
    rslora: bool = False
    targets: tuple[str, ...] = QV
    lr: float = 1e-3

    @property
    def name(self) -> str:
        base = f"{self.bits}-bit" if self.bits else "16-bit"
        scale = "rsLoRA" if self.rslora else "alpha/r"
        layers = "q,v" if tuple(self.targets) == QV else "all"
        return f"{self.group}: {self.method} {base} r={self.r} {scale} {layers} lr={self.lr:g}"


@dataclass
class Run:
    spec: RunSpec
    before: Perplexity | None  # held-out perplexity at step 0 (the bits group only)
    after: Perplexity
    losses: list[float]
    seconds: float
    trainable: int  # trainable parameters

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Checkpointing:
    """One training step with and without gradient checkpointing, on the same batch."""

    activations_off: int  # bytes autograd saved for backward
    activations_on: int
    seconds_off: float  # median step time
    seconds_on: float
    batch: tuple[int, int]  # (B, T)

    @property
    def memory_ratio(self) -> float:
        return self.activations_on / self.activations_off

    @property
    def time_ratio(self) -> float:
        return self.seconds_on / self.seconds_off

    def __str__(self) -> str:
        return (
            f"saved activations {self.activations_off / MB:.1f} MB -> {self.activations_on / MB:.1f} MB "
            f"(x{self.memory_ratio:.2f}); step time {self.seconds_off:.2f} s -> {self.seconds_on:.2f} s "
            f"(x{self.time_ratio:.2f}); batch {self.batch[0]} x {self.batch[1]} tokens"
        )


@dataclass
class Study:
    config: RecipeConfig
    runs: list[Run] = field(default_factory=list)
    checkpointing: Checkpointing | None = None

    def run(self, group: str, **kwargs) -> Run:
        """The run of ``group`` whose spec has these fields (``study.run("bits", method="loftq", bits=2)``)."""
        found = [
            r for r in self.runs if r.spec.group == group and all(getattr(r.spec, k) == v for k, v in kwargs.items())
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} runs of group {group!r} match {kwargs}; the study has: {self.names()}")
        return found[0]

    def names(self) -> list[str]:
        return [r.name for r in self.runs]


# ---------------------------------------------------------------------------------------------- one run
def build(base: torch.nn.Module, spec: RunSpec, loftq_iters: int = 1, quantized: dict | None = None) -> torch.nn.Module:
    """A copy of ``base`` with the spec's adapter, on a ``spec.bits``-bit NF base when set (QLoRA's NF-k, double quant).

    PiSSA and LoftQ start from the float weights, then quantize: PiSSA the residual (QPiSSA, PiSSA §4), LoftQ
    its chosen Q; the layers without LoRA are quantized the plain way. ``quantized`` caches ``{bits: base
    quantized}`` across runs, so each width is quantized once (the result is the same as quantizing again).
    """
    quantized = {} if quantized is None else quantized
    if spec.bits and spec.bits not in quantized:
        quantized[spec.bits] = quantize_model(copy.deepcopy(base), "nf", bits=spec.bits)
    kwargs = dict(r=spec.r, alpha=spec.alpha, rslora=spec.rslora)
    if spec.method in ("lora", "dora"):
        model = copy.deepcopy(quantized[spec.bits] if spec.bits else base)
        return add_lora(model, list(spec.targets), use_dora=spec.method == "dora", **kwargs)
    model = add_lora(copy.deepcopy(base), list(spec.targets), **kwargs)
    if spec.method == "pissa":
        pissa_init(model)
    elif spec.method == "loftq":
        if not spec.bits:
            raise ValueError("LoftQ chooses a quantized base: give it bits (4, 3 or 2)")
        loftq_init(model, bits=spec.bits, iters=loftq_iters)
    else:
        raise ValueError(f"method={spec.method!r} is not one of {METHODS}")
    if spec.bits:
        modules = dict(model.named_modules())
        for name, layer in quantized[spec.bits].named_modules():  # the layers without LoRA: as QLoRA's base
            if isinstance(layer, Linear4bit) and isinstance(modules.get(name), torch.nn.Linear):
                set_module(model, name, copy.deepcopy(layer))
        if spec.method == "pissa":
            quantize_model(model, "nf", bits=spec.bits)  # what is left: PiSSA's residual bases (QPiSSA)
    return model


def run_one(
    base,
    spec: RunSpec,
    train_blocks,
    heldout,
    config: RecipeConfig,
    before: bool = False,
    quantized: dict | None = None,
) -> Run:
    """Build, (optionally) measure at step 0, train ``config.steps`` steps, measure on the held-out blocks."""
    model = build(base, spec, config.loftq_iters, quantized)
    start = _measure(model, heldout) if before else None
    settings = TrainConfig(
        steps=config.steps, lr=spec.lr, batch_size=config.batch_size, warmup_steps=1, seed=config.seed, progress=False
    )
    result = train(model, train_blocks, config=settings)
    after = _measure(model, heldout)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Run(spec, start, after, result.losses, result.seconds, trainable)


def _measure(model, heldout: torch.Tensor) -> Perplexity:
    """``heldout_perplexity`` on the blocks ``data`` took from ``HeldOut`` (tokenized once), labelled as such."""
    return dataclasses.replace(heldout_perplexity(model, blocks=heldout), heldout=str(HeldOut()))


def specs(config: RecipeConfig) -> list[tuple[RunSpec, bool]]:
    """Every run of the study, with whether its step-0 perplexity is measured too."""
    plain = dict(r=config.r, alpha=config.alpha, targets=config.targets, lr=config.lr)
    out = []
    for bits in config.bits:  # the 4-bit row holds every method; the others QLoRA against LoftQ
        for method in METHODS if bits == max(config.bits) else ("lora", "loftq"):
            out.append((RunSpec("bits", method, bits, **plain), method != "dora"))  # DoRA starts as LoRA does
    for method in ("lora", "loftq"):  # LoftQ corrects only the layers it adapts: at the fewest bits, adapt them all
        every = {**plain, "targets": tuple(LLAMA_PROJECTIONS)}
        out.append((RunSpec("bits-all", method, min(config.bits), **every), True))
    for r in config.ranks:
        for rslora in (False, True):
            out.append(
                (RunSpec("rank", r=r, alpha=config.alpha, rslora=rslora, targets=config.targets, lr=config.lr), False)
            )
    out.append((RunSpec("targets", **{**plain, "targets": tuple(LLAMA_PROJECTIONS)}), False))  # q,v: the rank run
    for lr in config.lrs:
        if lr != config.lr:  # config.lr: the rank group's run at r, alpha/r
            out.append((RunSpec("lr", **{**plain, "lr": lr}), False))
    return out


def measure_checkpointing(base, config: RecipeConfig, blocks: torch.Tensor, repeats: int = 3) -> Checkpointing:
    """Saved activations (``lorakit.memory.memory_ledger``) and the median step time, checkpointing off then on."""
    model = add_lora(copy.deepcopy(base), list(config.targets), r=config.r, alpha=config.alpha)
    batch = {"input_ids": blocks, "labels": blocks, "use_cache": False}  # no KV cache to keep while training
    found = {}
    for on in (False, True):
        set_gradient_checkpointing(model, on)
        ledger = memory_ledger(model, batch)  # one forward and backward, no optimizer: the weights stay
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**batch).loss.backward()
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        found[on] = (ledger.activations, sorted(times)[len(times) // 2])
    set_gradient_checkpointing(model, False)
    return Checkpointing(found[False][0], found[True][0], found[False][1], found[True][1], tuple(blocks.shape))


def data(tokenizer, config: RecipeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_blocks, heldout_blocks)``: the training split's first blocks, and the protocol's held-out blocks."""
    train_docs, _ = split_documents("shakespeare", seed=0)
    train_blocks = tokenize_blocks(tokenizer, train_docs, config.seq_len, max_blocks=config.train_blocks)
    return train_blocks, HeldOut(n_blocks=config.eval_blocks).blocks(tokenizer)


def run_study(base, tokenizer, config: RecipeConfig = RecipeConfig(), progress: bool = True) -> Study:
    """Every run of :func:`specs` on the same data, steps and seed, then the checkpointing measurement."""
    train_blocks, heldout = data(tokenizer, config)
    study = Study(config)
    todo = specs(config)
    quantized: dict[int, torch.nn.Module] = {}  # each width quantized once
    for spec, before in tqdm(todo, desc="recipe runs", disable=not progress):
        study.runs.append(run_one(base, spec, train_blocks, heldout, config, before, quantized))
    study.checkpointing = measure_checkpointing(base, config, train_blocks[: config.batch_size])
    return study


# ---------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    question: str
    choice: str
    evidence: str  # the measured figures
    runs: tuple[str, ...]  # the names of the runs that support it


def _change(a: Run, b: Run) -> str:
    """b against a: the perplexity change with its paired interval, and whether it is outside the noise."""
    change = compare_perplexity(a.after, b.after)
    noise = "outside the noise" if change.significant else "within the noise"
    return f"{change.percent:+.1f}% ({100 * (change.low - 1):+.1f}% to {100 * (change.high - 1):+.1f}%, {noise})"


def _best(runs: list[Run]) -> Run:
    return min(runs, key=lambda r: r.after.ppl)


def what_to_choose(study: Study) -> list[Row]:
    """One row per question, each choice read off the measurements and citing the runs behind it."""
    c = study.config
    rows = []
    top = max(c.bits)
    for bits in c.bits:
        q, lq = study.run("bits", method="lora", bits=bits), study.run("bits", method="loftq", bits=bits)
        start = compare_perplexity(q.before, lq.before)
        helps = start.significant and start.ratio < 1
        choice = (
            f"LoftQ ({start.percent:+.0f}% at step 0)" if helps else "either: LoftQ's start is not measurably better"
        )
        evidence = (
            f"step 0: QLoRA {q.before.ppl:.3g}, LoftQ {lq.before.ppl:.3g} ({start.percent:+.0f}%); "
            f"after {c.steps} steps: {q.after.ppl:.3g} vs {lq.after.ppl:.3g}, LoftQ {_change(q, lq)}"
        )
        rows.append(Row(f"Init at {bits} bits (q,v adapted)", choice, evidence, (q.name, lq.name)))
    low = min(c.bits)
    q, lq = study.run("bits-all", method="lora", bits=low), study.run("bits-all", method="loftq", bits=low)
    start = compare_perplexity(q.before, lq.before)
    full = study.run("rank", r=c.r, rslora=False)  # 16-bit LoRA, same steps
    rows.append(
        Row(
            f"Init at {low} bits, all linear layers adapted",
            "LoftQ, on every layer" if start.significant and start.ratio < 1 else "neither: LoftQ's start is no better",
            f"step 0: QLoRA {q.before.ppl:.3g}, LoftQ {lq.before.ppl:.3g} (x{start.ratio:.2g}); after {c.steps} "
            f"steps: {q.after.ppl:.3g} vs {lq.after.ppl:.3g} (16-bit LoRA: {full.after.ppl:.3g})",
            (q.name, lq.name, full.name),
        )
    )
    variants = [study.run("bits", method=m, bits=top) for m in METHODS]
    best = _best(variants)
    lora = variants[0]
    rows.append(
        Row(
            f"Variant on a {top}-bit base",
            f"{best.spec.method}" + ("" if best is lora else f" ({_change(lora, best)} against LoRA)"),
            ", ".join(f"{r.spec.method} {r.after.ppl:.1f}" for r in variants),
            tuple(r.name for r in variants),
        )
    )
    for rslora in (False, True):
        sweep = [study.run("rank", r=r, rslora=rslora) for r in c.ranks]
        best = _best(sweep)
        rows.append(
            Row(
                f"Rank with {'rsLoRA (alpha/sqrt r)' if rslora else 'alpha/r'}",
                f"r={best.spec.r}",
                ", ".join(f"r={r.spec.r}: {r.after.ppl:.1f}" for r in sweep),
                tuple(r.name for r in sweep),
            )
        )
    big = max(c.ranks)
    a, b = study.run("rank", r=big, rslora=False), study.run("rank", r=big, rslora=True)
    rows.append(
        Row(
            f"Scaling at r={big}",
            "rsLoRA" if b.after.ppl < a.after.ppl else "alpha/r",
            f"alpha/r {a.after.ppl:.1f}, rsLoRA {b.after.ppl:.1f}: rsLoRA {_change(a, b)}",
            (a.name, b.name),
        )
    )
    qv, every = study.run("rank", r=c.r, rslora=False), study.run("targets")
    rows.append(
        Row(
            "Layers",
            "all linear layers" if every.after.ppl < qv.after.ppl else "q_proj, v_proj",
            f"q,v {qv.after.ppl:.1f} ({qv.trainable:,} params), all {every.after.ppl:.1f} "
            f"({every.trainable:,} params): all {_change(qv, every)}",
            (qv.name, every.name),
        )
    )
    sweep = sorted([qv, *(r for r in study.runs if r.spec.group == "lr")], key=lambda r: r.spec.lr)
    best = _best(sweep)
    rows.append(
        Row(
            f"Learning rate ({c.steps} steps)",
            f"{best.spec.lr:g}",
            ", ".join(f"{r.spec.lr:g}: {r.after.ppl:.1f}" for r in sweep),
            tuple(r.name for r in sweep),
        )
    )
    if study.checkpointing is not None:
        ck = study.checkpointing
        rows.append(
            Row(
                "Gradient checkpointing",
                "on when activations do not fit, off otherwise",
                str(ck),
                ("checkpointing",),
            )
        )
    return rows


def table_markdown(rows: list[Row]) -> str:
    lines = ["| question | choose | measured | runs |", "|---|---|---|---|"]
    lines += [f"| {r.question} | {r.choice} | {r.evidence} | {'; '.join(r.runs)} |" for r in rows]
    return "\n".join(lines)


def plot_study(study: Study):
    """Six panels: init and result by bit width, the variants, the rank sweep, layers, learning rate, checkpointing.

    Every point is a held-out perplexity with its 95% bootstrap interval (the error bars).
    """
    import matplotlib.pyplot as plt

    c = study.config

    def bars(ax, x, perplexities, **kwargs):
        y = [p.ppl for p in perplexities]
        err = [[p.ppl - p.low for p in perplexities], [p.high - p.ppl for p in perplexities]]
        ax.errorbar(x, y, yerr=err, capsize=3, marker="o", **kwargs)

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    for method, color in (("lora", "tab:blue"), ("loftq", "tab:red")):
        runs = [study.run("bits", method=method, bits=b) for b in c.bits]
        label = "QLoRA" if method == "lora" else "LoftQ"
        bars(ax, c.bits, [r.before for r in runs], color=color, linestyle=":", label=f"{label}, step 0")
        bars(ax, c.bits, [r.after for r in runs], color=color, label=f"{label}, after {c.steps} steps")
        every = study.run("bits-all", method=method, bits=min(c.bits))
        ax.errorbar([min(c.bits) + 0.1], [every.after.ppl], marker="s", color=color, label=f"{label}, all linear")
    ax.set(xlabel="bits of the frozen base (NF-k)", ylabel="held-out perplexity", yscale="log", xticks=c.bits)
    ax.set_title("Where LoftQ helps: the start at few bits")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    top = max(c.bits)
    runs = [study.run("bits", method=m, bits=top) for m in METHODS]
    bars(ax, range(len(runs)), [r.after for r in runs], linestyle="none", color="tab:green")
    ax.set_xticks(range(len(runs)), [r.spec.method for r in runs])
    ax.set(ylabel="held-out perplexity", title=f"Variants on a {top}-bit base, {c.steps} steps")
    ax = axes[0, 2]
    for rslora, color in ((False, "tab:blue"), (True, "tab:orange")):
        runs = [study.run("rank", r=r, rslora=rslora) for r in c.ranks]
        bars(ax, c.ranks, [r.after for r in runs], color=color, label="rsLoRA: alpha/sqrt(r)" if rslora else "alpha/r")
    ax.set(xlabel="rank r", ylabel="held-out perplexity", xscale="log", title=f"Rank sweep, alpha={c.alpha:g}")
    ax.set_xticks(c.ranks, [str(r) for r in c.ranks])
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    runs = [study.run("rank", r=c.r, rslora=False), study.run("targets")]
    bars(ax, [0, 1], [r.after for r in runs], linestyle="none", color="tab:purple")
    ax.set_xticks([0, 1], [f"q,v\n{runs[0].trainable:,} params", f"all linear\n{runs[1].trainable:,} params"])
    ax.set(ylabel="held-out perplexity", title="Which layers (QLoRA §4)")
    ax = axes[1, 1]
    runs = sorted([runs[0], *(r for r in study.runs if r.spec.group == "lr")], key=lambda r: r.spec.lr)
    bars(ax, [r.spec.lr for r in runs], [r.after for r in runs], color="tab:brown")
    ax.set(xlabel="learning rate", ylabel="held-out perplexity", xscale="log", yscale="log", title="Learning rate")
    ax = axes[1, 2]
    ck = study.checkpointing
    if ck is not None:
        ax.bar([0, 1], [ck.activations_off / MB, ck.activations_on / MB], color=["tab:gray", "tab:cyan"])
        ax.set_xticks([0, 1], [f"off\n{ck.seconds_off:.2f} s/step", f"on\n{ck.seconds_on:.2f} s/step"])
        ax.set(ylabel="saved activations (MB)", title=f"Gradient checkpointing, batch {ck.batch[0]} x {ck.batch[1]}")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lorakit.recipe", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the long study (200 steps per run; meant for a GPU)")
    args = parser.parse_args(argv)
    from lorakit.models import load_base_model
    from lorakit.runtime import setup

    rt = setup(seed=0)
    print(rt)
    model, tokenizer = load_base_model(device=rt.device, dtype=rt.dtype)
    config = FULL if args.full else RecipeConfig()
    study = run_study(model, tokenizer, config)
    for run in study.runs:
        before = f"step 0 {run.before.ppl:.2f}, " if run.before else ""
        print(f"{run.name:<60} {before}after {run.after}")
    print(study.checkpointing)
    print(table_markdown(what_to_choose(study)))


if __name__ == "__main__":
    main()
