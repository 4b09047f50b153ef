"""The lab's measurements: four fine-tunes with the same data, steps and seed, then inference.

Each training run (``full``, ``lora``, ``qlora_nf4``, ``qlora_fp4``) goes through
:func:`lorakit.finetune` and is then measured: held-out perplexity, median step time, one more
training step under :func:`lorakit.memory_ledger` (with ``lr=0``, so no weight moves), the peak
resident memory of its process, and the adapter's size on disk. ``qlora_nf4`` also takes a
long-sequence batch with and without a :class:`lorakit.PagedOptimizer` (QLoRA §3, "Paged
Optimizers"). :func:`inference_run` then loads the saved adapters into fresh copies of the base
and measures what the comparison articles say about merging, latency and quantizing afterwards.

By default every run has a process of its own (``LabConfig.isolate``): a process's peak resident
set size (``ru_maxrss``) never goes down, so only a fresh process gives each run its own peak.
"""

from __future__ import annotations

import copy
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
import resource
import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from lorakit.adapter import load_adapter, save_adapter
from lorakit.blockwise import storage
from lorakit.data import perplexity, tokenize_blocks, split_documents
from lorakit.finetune import FinetuneConfig, finetune, load_data
from lorakit.linear4bit import Linear4bit, quantize_model
from lorakit.lora import merge_lora, unload_lora
from lorakit.merge import merge_qlora
from lorakit.memory import memory_ledger, resident_peak, weight_bytes_by_dtype
from lorakit.models import DEFAULT_MODEL, count_parameters, load_base_model, model_bytes
from lorakit.paged import PagedOptimizer
from lorakit.runtime import pick_device, pick_dtype
from lorakit.steps import median_time

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
    seed: int = 0
    corpus: str = "shakespeare"
    model: str = DEFAULT_MODEL
    device: str | None = None  # None: CUDA when there is one, else the CPU
    isolate: bool = True  # each run in a fresh process (its own peak RSS)

    @classmethod
    def full_settings(cls, **overrides) -> "LabConfig":
        """Longer runs: enough steps for the quality claims to get a verdict."""
        settings = dict(steps=150, batch_size=4, seq_len=128, train_blocks=None, eval_blocks=32,
                        latency_tokens=128, latency_rounds=7, latency_repeats=5, spike_seq_len=2048)
        return cls(**{**settings, **overrides})

    def validate(self) -> None:
        """Refuse impossible settings before anything is loaded, naming the setting and what is valid."""
        for name in ("steps", "batch_size", "eval_blocks", "rank", "latency_tokens", "latency_rounds",
                     "latency_repeats", "page_kib", "page_budget_pages", "min_quality_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LabConfig.{name}={value!r} is not valid; it must be an integer of at least 1")
        if not isinstance(self.seq_len, int) or self.seq_len < 8:
            raise ValueError(f"LabConfig.seq_len={self.seq_len!r} is not valid; use at least 8 tokens")
        if self.latency_tokens > self.seq_len * self.eval_blocks:
            raise ValueError(f"LabConfig.latency_tokens={self.latency_tokens} is more than the held-out text "
                             f"tokenized ({self.eval_blocks} blocks of {self.seq_len}); lower it")
        if self.train_blocks is not None and self.train_blocks < self.batch_size:
            raise ValueError(f"LabConfig.train_blocks={self.train_blocks} is fewer than one batch of "
                             f"{self.batch_size}; raise it (or None for the whole training split)")
        if self.spike_seq_len < 0:
            raise ValueError(f"LabConfig.spike_seq_len={self.spike_seq_len} is not valid; use 0 (skip) or a length")
        if not self.alpha > 0:
            raise ValueError(f"LabConfig.alpha={self.alpha!r} is not valid; use a positive number (often 2 * rank)")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"LabConfig.device={self.device!r} is not a torch device; use 'cpu' or 'cuda'") from None
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
    return FinetuneConfig(rank=config.rank, alpha=config.alpha, steps=config.steps, batch_size=config.batch_size,
                          seq_len=config.seq_len, train_blocks=config.train_blocks, eval_blocks=config.eval_blocks,
                          warmup_steps=min(6, config.steps), corpus=config.corpus, seed=config.seed,
                          model=config.model, **RUNS[name])


def _lm_batch(ids: torch.Tensor, device: torch.device) -> dict:
    ids = ids.to(device)  # (B, T)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def _peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts() -> dict | None:
    """The process's resident memory now, split as Linux reports it: anonymous pages (what the
    process allocated) and file-backed ones (such as a memory-mapped checkpoint); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields_kb = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile")))
    except OSError:
        return None
    return {key.removeprefix("Rss").lower(): int(value.split()[0]) * 1024 for key, value in fields_kb.items()}


def _ledger_line(ledger, optimizer=None) -> dict:
    return dict(weights=ledger.weight_bytes, gradients=ledger.gradients, optimizer_state=ledger.optimizer_state,
                activations=ledger.activations, total=ledger.total, peak_rss=ledger.peak_rss,
                peak_rss_is_step_only=ledger.peak_rss_is_step_only, peak_cuda=ledger.peak_cuda,
                resident_peak=resident_peak(ledger, optimizer))


def quantized_storage(model: torch.nn.Module) -> dict:
    """Bytes and bits per weight of the model's 4-bit layers, counted from their real tensors."""
    n = per_block = total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            s = storage(module.weight_packed, module.state)
            n += s.n_params
            per_block += s.code_bytes + s.absmax_bytes + s.absmax2_bytes
            total += s.total_bytes
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no Linear4bit layers; call quantize_model first")
    return dict(params=n, bytes=total, bits_per_param=8 * per_block / n)


class _Clock:
    """Seconds per stage of a run, for the report (where the lab's time goes)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def _frozen_ledger(model, batch, optimizer) -> dict:
    line = _ledger_line(memory_ledger(model, batch, optimizer), optimizer)
    model.zero_grad(set_to_none=True)
    return line


def paging_spike(model, ordinary: dict, long: dict, page_bytes: int, budget_pages: int) -> dict:
    """Resident peaks of an ordinary batch and a long one, the long one with plain and paged AdamW.

    ``lr=0``: the steps allocate and update the optimizer state, but no weight moves.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    ordinary_plain = _frozen_ledger(model, ordinary, torch.optim.AdamW(trainable, lr=0.0))
    long_plain = _frozen_ledger(model, long, torch.optim.AdamW(trainable, lr=0.0))
    paged = PagedOptimizer(torch.optim.AdamW(trainable, lr=0.0), budget_bytes=budget_pages * page_bytes,
                           page_bytes=page_bytes)
    try:
        long_paged = _frozen_ledger(model, long, paged)
    finally:
        paged.close()
    return dict(ordinary_tokens=ordinary["input_ids"].numel(), long_tokens=long["input_ids"].numel(),
                ordinary_plain=ordinary_plain, long_plain=long_plain, long_paged=long_paged,
                budget_bytes=budget_pages * page_bytes)


def train_run(name: str, settings: dict, adapter_dir: str | None) -> dict:
    """Fine-tune by run ``name`` and measure it; returns plain numbers (it may run in another process)."""
    config = lab_config(settings)
    device, dtype = device_and_dtype(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fconfig = finetune_config(name, config)
    clock = _Clock()
    stamps: list[float] = []
    result = finetune(fconfig, device=device, dtype=dtype, progress=False,
                      on_step=lambda _: stamps.append(time.perf_counter()))
    model, tokenizer = result.model, result.tokenizer
    peak_rss_run = _peak_rss_bytes()  # loading + training + the two evaluations
    clock("load, evaluate, train, evaluate")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N: the first one allocates the optimizer
    out = dict(
        method=fconfig.method, quant_type=fconfig.kind if fconfig.method == "qlora" else None,
        lr=fconfig.learning_rate, ppl_before=result.metrics["ppl_before"], ppl_after=result.metrics["ppl_after"],
        final_loss=result.metrics["final_loss"],
        step_seconds=statistics.median(gaps) if gaps else result.metrics["seconds_per_step"],
        trainable_params=result.metrics["trainable_params"], total_params=result.metrics["total_params"],
        peak_rss_run=peak_rss_run,
        peak_cuda_run=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    )
    train_blocks, _ = load_data(tokenizer, fconfig)
    ordinary = _lm_batch(train_blocks[: config.batch_size], device)  # (B, T), the training batch shape
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["ledger"] = _frozen_ledger(model, ordinary, torch.optim.AdamW(trainable, lr=0.0))
    out["rss_after_step"] = rss_parts()
    clock("ledger")
    out["weights_by_dtype"] = weight_bytes_by_dtype(model)
    if fconfig.method == "qlora":
        out["quantized"] = quantized_storage(model)
    if name == "qlora_nf4" and config.spike_seq_len:
        train_docs, _ = split_documents(config.corpus, seed=0)
        long_ids = tokenize_blocks(tokenizer, train_docs, config.spike_seq_len, max_blocks=1)  # (1, T_long)
        out["spike"] = paging_spike(model, ordinary, _lm_batch(long_ids, device), config.page_kib * 1024,
                                    config.page_budget_pages)
        clock("paging spike")
    if fconfig.method == "full":
        out["checkpoint_bytes"] = model_bytes(model)  # every weight: what a full fine-tune must save
    elif adapter_dir is not None:
        folder = save_adapter(model, Path(adapter_dir) / name)
        out["adapter_dir"] = str(folder)
        out["adapter_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    out["stage_seconds"] = clock.seconds
    return out


# -- merging: one small function, so a merge strategy can replace it ----------------------------


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every LoRA update into its base weight and drop the wrappers; returns the plain model.

    A 4-bit base cannot absorb ``(alpha / r) B A`` (its weights are codes), so QLoRA's adapter is
    merged into the dequantized weights (``merge_qlora``'s strategy "dequantized", notebook 07):
    the merged model holds full-precision weights.
    """
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        return merge_qlora(model, "dequantized")
    return unload_lora(model)


# -- inference ---------------------------------------------------------------------------------


def interleaved_latency(fns: dict[str, Callable[[], object]], rounds: int, repeats: int) -> dict:
    """Median seconds of each ``fn``, timed in interleaved rounds so load on the machine hits all alike.

    Every round times every function (``lorakit.steps.median_time`` over ``repeats`` calls); the
    result is the median over rounds, and ``spread`` is (max - min) / median over rounds: the noise.
    """
    for fn in fns.values():  # warm up once each
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(median_time(fn, repeats=repeats, warmup=0))
    return {name: dict(seconds=statistics.median(t), spread=(max(t) - min(t)) / statistics.median(t))
            for name, t in times.items()}


def _same_structure(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same module types in the same places, same parameter shapes: the same work per forward."""
    types_a = [(n, type(m).__name__) for n, m in a.named_modules()]
    types_b = [(n, type(m).__name__) for n, m in b.named_modules()]
    shapes_a = [(n, tuple(p.shape)) for n, p in a.named_parameters()]
    shapes_b = [(n, tuple(p.shape)) for n, p in b.named_parameters()]
    return types_a == types_b and shapes_a == shapes_b


@torch.inference_mode()
def inference_run(settings: dict, adapters: dict[str, str]) -> dict:
    """Latency merged and unmerged, merging a QLoRA adapter, and quantizing a LoRA model afterwards.

    ``adapters`` maps ``lora`` and ``qlora_nf4`` to the folders :func:`train_run` saved them in.
    """
    config = lab_config(settings)
    device, dtype = device_and_dtype(config)
    base, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    _, val_blocks = load_data(tokenizer, finetune_config("lora", config))
    val_blocks = val_blocks.to(device)
    prompt = val_blocks.reshape(-1)[: config.latency_tokens].view(1, -1)  # (1, T)

    def ppl(model) -> float:
        return perplexity(model, val_blocks)

    def nf4(model, double_quant=True, quant_type="nf"):
        return quantize_model(copy.deepcopy(model), quant_type=quant_type, double_quant=double_quant)

    out: dict = dict(ppl={}, bits={}, weight_bytes={})
    clock = _Clock()
    out["ppl"]["base"] = ppl(base)
    out["weight_bytes"]["base"] = model_bytes(base)
    # the base in NF4 with and without double quantization (FP4: the qlora_fp4 run's own base)
    base_nf4 = nf4(base)
    plain_nf4 = nf4(base, double_quant=False)
    out["bits"] = dict(nf4_dq=quantized_storage(base_nf4), nf4=quantized_storage(plain_nf4))
    out["ppl"]["base_nf4_dq"], out["ppl"]["base_nf4"] = ppl(base_nf4), ppl(plain_nf4)
    del plain_nf4
    out["weight_bytes"]["base_nf4_dq"] = model_bytes(base_nf4)
    clock("quantize the base")
    # LoRA: as trained (unmerged) and merged
    lora = load_adapter(copy.deepcopy(base), adapters["lora"])
    out["ppl"]["lora"] = ppl(lora)
    lora_merged = merge_adapter(copy.deepcopy(lora))
    out["ppl"]["lora_merged"] = ppl(lora_merged)
    out["merged_same_structure_as_base"] = _same_structure(lora_merged, base)
    clock("LoRA unmerged and merged")
    # QLoRA: merging into the 4-bit base is refused; dequantize, then merge
    qlora = load_adapter(copy.deepcopy(base_nf4), adapters["qlora_nf4"])
    out["ppl"]["qlora"] = ppl(qlora)
    try:
        merge_lora(copy.deepcopy(qlora))
        out["qlora_merge_into_4bit"] = "merged"
    except NotImplementedError as e:
        out["qlora_merge_into_4bit"] = f"refused: {type(e).__name__}"
    qlora_merged = merge_adapter(copy.deepcopy(qlora))
    logits = qlora(input_ids=prompt).logits.float()
    out["qlora_merge_max_logit_diff"] = float((qlora_merged(input_ids=prompt).logits.float() - logits).abs().max())
    out["ppl"]["qlora_merged"] = ppl(qlora_merged)
    out["weight_bytes"]["qlora_merged"] = model_bytes(qlora_merged)
    requantized = nf4(qlora_merged)
    out["ppl"]["qlora_merged_requantized"] = ppl(requantized)
    del requantized
    clock("QLoRA merge")
    # LoRA in 16 bit, quantized afterwards: the adapter over an NF4 base, or the merged model in NF4
    lora_over_nf4 = load_adapter(copy.deepcopy(base_nf4), adapters["lora"])
    out["ppl"]["lora_then_nf4_adapter"] = ppl(lora_over_nf4)
    out["weight_bytes"]["lora_then_nf4_adapter"] = model_bytes(lora_over_nf4)
    out["weight_bytes"]["qlora"] = model_bytes(qlora)
    del lora_over_nf4
    lora_merged_nf4 = nf4(lora_merged)
    out["ppl"]["lora_merged_then_nf4"] = ppl(lora_merged_nf4)
    out["weight_bytes"]["lora_merged_then_nf4"] = model_bytes(lora_merged_nf4)
    del lora_merged_nf4
    clock("LoRA quantized afterwards")

    def forward(model):
        def call():
            model(input_ids=prompt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return call

    models = {"base": base, "lora_merged": lora_merged, "lora_unmerged": lora, "qlora_unmerged": qlora,
              "qlora_merged": qlora_merged}
    out["latency"] = interleaved_latency({k: forward(m) for k, m in models.items()},
                                         config.latency_rounds, config.latency_repeats)
    out["latency_tokens"] = int(prompt.shape[1])
    clock("latency")
    out["stage_seconds"] = clock.seconds
    out["params"] = dict(base=count_parameters(base).total, lora_merged=count_parameters(lora_merged).total)
    return out


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new Python process (spawned, so CUDA works there too); returns its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()



# -- scales a CPU cannot reach: the estimator and the arithmetic ---------------------------------


def scale_estimates() -> dict:
    """The figures behind the claims about 65B, 24 GB GPUs, GPT-3 175B and deployment size.

    Computed by :func:`lorakit.estimate_memory` (checked against the ledger and the QLoRA paper's
    Figure 6 in ``tests/test_memory.py``) and :class:`lorakit.lowrank.Gpt3LoRA`; nothing here is measured.
    """
    from lorakit.lowrank import Gpt3LoRA
    from lorakit.memory import LLAMA, QLORA_PAPER_SETTING, check_fit, estimate_memory

    def fit(gpu_gb, size, method, **kw):
        check = check_fit(gpu_gb, model=size, method=method, **kw)
        return dict(total=check.estimate.total, fits=check.fits)

    paper = dict(QLORA_PAPER_SETTING)
    lora_paper = {k: v for k, v in paper.items() if k != "bits"}
    gpt3 = Gpt3LoRA()
    deploy = {}
    for size in ("7B", "65B"):
        est = estimate_memory(size, "qlora")
        four_bit = sum(v for k, v in est.weights.items() if k != "LoRA adapters")
        deploy[size] = dict(four_bit=four_bit, sixteen_bit=2 * LLAMA[size].n_params)
    return dict(
        qlora_65b_48gb_paged=fit(48, "65B", "qlora", **paper),
        qlora_65b_48gb_adamw=fit(48, "65B", "qlora", **{**paper, "optimizer": "adamw"}),
        full_65b_16bit=estimate_memory("65B", "full", bits=16).total,
        qlora_24gb={size: fit(24, size, "qlora", **paper) for size in LLAMA},
        lora_24gb={size: fit(24, size, "lora", **lora_paper) for size in LLAMA},
        gpt3=dict(total_params=gpt3.total_params, lora_params=gpt3.lora_params, reduction=gpt3.reduction,
                  full_bytes=gpt3.training_bytes(lora=False), lora_bytes=gpt3.training_bytes(lora=True)),
        deploy=deploy,
    )
