"""The lab's side-by-side LoRA runs: targets, rank, adapter precision and paging, from one base, in one process.

:func:`variants_run` loads SmolLM2 once and trains LoRA from copies of it several ways, with the
same batches, steps, seed and learning rate (AdamW at the LoRA rate, constant): on every linear
layer (the reference) and on ``q_proj``, ``v_proj`` only (QLoRA §4); at a few ranks; with the
adapters held in bfloat16 instead of float32; and with the optimizer state paged out
(:class:`lorakit.PagedOptimizer`) instead of resident. It also times one projection as a 4-bit
layer against the same projection in 16 bit, and an adapter swap against a model reload.

:func:`rank_task` needs no model: a weight update of known rank ``k``, fitted by LoRA at ranks
below and above ``k``, against the best any rank-``r`` matrix can do (Eckart-Young).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from lorakit.adapter import load_adapter, save_adapter
from lorakit.evaluation import compare_perplexity, heldout_perplexity
from lorakit.finetune import load_data
from lorakit.finetune.config import ALL_LINEAR
from lorakit.lab.config import device_and_dtype, finetune_config, lab_config
from lorakit.linear4bit import Linear4bit
from lorakit.lora import add_lora, lora_layers
from lorakit.models import load_base_model
from lorakit.paged import PagedOptimizer
from lorakit.timing import StageClock, interleaved_latency
from lorakit.train import train_steps

ATTENTION_ONLY = ("q_proj", "v_proj")  # the LoRA paper's GPT-3 setting (W_q, W_v), peft's default for LLaMA
PAGE_BYTES = 256 * 1024  # the paged run's page; one page resident at a time
UPDATE_LRS = (2e-4, 2e-5)  # the LoRA rate, and a tenth of it (warmup, or QLoRA's 1e-4 for 33B/65B is between)


def _lm_batch(ids: torch.Tensor, device: torch.device) -> dict:
    ids = ids.to(device)  # (B, T)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def _change(before, after) -> dict:
    c = compare_perplexity(before, after)
    return dict(ratio=c.ratio, low=c.low, high=c.high, significant=c.significant)


def _ppl(result) -> dict:
    return dict(ppl=result.ppl, low=result.low, high=result.high)


def _cast_adapters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    for layer in lora_layers(model).values():
        for p in (layer.lora_A, layer.lora_B):
            p.data = p.data.to(dtype)


def update_rounding(adapter: torch.Tensor, lr: float, dtype: torch.dtype = torch.bfloat16) -> dict:
    """What holding ``adapter`` in ``dtype`` does to one AdamW-sized update of ``lr`` per entry.

    AdamW's first step moves every entry by ``lr`` (``m / sqrt(v) = +-1``). Added in ``dtype`` and
    rounded, an entry whose spacing is wider than twice the update does not move at all.
    Returns the share of entries left unmoved and the relative error of the applied update.
    """
    w = adapter.detach().float()
    step = lr * torch.sign(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    held = w.to(dtype)
    applied = (held.float() + step).to(dtype).float() - held.float()
    return dict(
        lr=lr,
        unmoved=float((applied == 0).float().mean()),
        relative_error=float((applied - step).norm() / step.norm()),
    )


def rank_task(
    task_rank: int = 16, dim: int = 64, ranks=(1, 4, 16, 32), steps: int = 200, lr: float = 0.01, seed: int = 0
) -> dict:
    """LoRA fitted to a weight update of rank ``task_rank`` (singular values all 1), at several ranks.

    The loss is ``||dW - (alpha/r) B A||_F^2 / ||dW||_F^2`` (inputs with identity covariance make the
    mean squared output error this). No rank-``r`` matrix does better than ``(k - r) / k`` for
    ``r < k`` (Eckart-Young); a rank at least ``k`` can reach 0. Returns, per rank, the residual
    reached by AdamW from LoRA's initialization (A random, B = 0) and that floor.
    """
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, task_rank, generator=g))  # (dim, k), orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(dim, task_rank, generator=g))
    delta = u @ v.T  # (dim, dim), rank k, every singular value 1
    out = {}
    for r in ranks:
        a = torch.nn.Parameter(torch.randn(r, dim, generator=g) / dim**0.5)  # (r, d_in)
        b = torch.nn.Parameter(torch.zeros(dim, r))  # (d_out, r)
        opt = torch.optim.Adam([a, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((delta - b @ a) ** 2).sum() / (delta**2).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            residual = float(((delta - b @ a) ** 2).sum() / (delta**2).sum())
        out[r] = dict(residual=residual, floor=max(0, task_rank - r) / task_rank)
    return dict(task_rank=task_rank, dim=dim, steps=steps, ranks=out)


def variants_run(settings: dict) -> dict:
    """Train LoRA several ways from one loaded base and measure each; returns plain numbers."""
    config = lab_config(settings)
    device, dtype = device_and_dtype(config)
    clock = StageClock()
    start = time.perf_counter()
    base, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    load_seconds = time.perf_counter() - start
    fconfig = finetune_config("lora", config)
    train_blocks, val_blocks = load_data(tokenizer, fconfig)
    val_blocks = val_blocks.to(device)
    n = len(train_blocks) // config.batch_size
    batches = [
        _lm_batch(train_blocks[i * config.batch_size : (i + 1) * config.batch_size], device)
        for i in range(min(n, config.steps))
    ]
    lr = fconfig.learning_rate
    base_ppl = heldout_perplexity(base, blocks=val_blocks)
    clock("load")
    out: dict = dict(lr=lr, steps=config.steps, rank=config.rank, alpha=config.alpha, runs={}, paired={})
    measured = {}
    models = {}

    def train(name, targets=ALL_LINEAR, r=config.rank, adapter_dtype=None, page_bytes=None, keep=False):
        torch.manual_seed(config.seed)
        model = add_lora(copy.deepcopy(base), list(targets), r=r, alpha=config.alpha)
        if adapter_dtype is not None:
            _cast_adapters(model, adapter_dtype)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        if page_bytes is not None:  # one page resident at a time: every step pages the state in and out
            optimizer = PagedOptimizer(optimizer, budget_bytes=page_bytes, page_bytes=page_bytes)
        t0 = time.perf_counter()
        try:
            losses = train_steps(model, batches, optimizer, config.steps)
        finally:
            counters = optimizer.counters() if page_bytes is not None else None
            if page_bytes is not None:
                optimizer.close()
        seconds = time.perf_counter() - t0
        result = heldout_perplexity(model, blocks=val_blocks)
        measured[name] = result
        adapter = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        run = dict(
            targets=list(targets),
            rank=r,
            trainable_params=sum(p.numel() for p in trainable),
            adapter_dtype=str(trainable[0].dtype).removeprefix("torch."),
            losses=losses,
            seconds=seconds,
            **_ppl(result),
        )
        if counters is not None:
            run["paging"] = {k: counters[k] for k in ("page_ins", "page_outs", "bytes_in", "bytes_out")}
        run["page_bytes"] = page_bytes
        out["runs"][name] = run
        if keep:
            models[name] = model
        return model, adapter

    reference, ref_adapter = train("all_linear", keep=True)
    clock("reference")
    train("q_v_only", targets=ATTENTION_ONLY)
    clock("q, v only")
    for r in config.sweep_ranks:
        if r != config.rank:
            train(f"rank_{r}", r=r)
    clock("rank sweep")
    # the adapters in bfloat16: the same initialization, rounded, and every update rounded again
    _, bf16_adapter = train("bf16_adapters", adapter_dtype=torch.bfloat16)
    a_name = next(n for n in ref_adapter if n.endswith("lora_A"))
    out["update_rounding"] = [update_rounding(ref_adapter[a_name], x) for x in UPDATE_LRS]
    out["update_rounding_tensor"] = dict(name=a_name, shape=list(ref_adapter[a_name].shape))
    out["adapter_bytes_per_param"] = dict(float32=4, bfloat16=2)
    clock("bf16 adapters")
    # the optimizer state paged out: one page resident at a time, so every step moves all of it
    paged, _ = train("paged_adamw", page_bytes=PAGE_BYTES, keep=True)
    a, b = out["runs"]["all_linear"]["losses"], out["runs"]["paged_adamw"]["losses"]
    out["paging_loss_max_diff"] = max(abs(x - y) for x, y in zip(a, b))
    out["paging_adapter_max_diff"] = max(
        float((p.detach().float() - ref_adapter[n]).abs().max()) for n, p in paged.named_parameters() if p.requires_grad
    )
    clock("paged optimizer")
    names = [k for k in out["runs"] if k != "all_linear"]
    out["paired"] = {f"{k} vs all_linear": _change(measured["all_linear"], measured[k]) for k in names}
    out["paired"]["all_linear vs base"] = _change(base_ppl, measured["all_linear"])
    out["base_ppl"] = _ppl(base_ppl)
    out.update(four_bit_op(base, config))
    clock("4-bit op timing")
    out["switch"] = task_switch(reference, paged, config, load_seconds)
    clock("task switch")
    out["stage_seconds"] = clock.seconds
    return out


def _largest_projection(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("_proj")]
    return max(linears, key=lambda nm: nm[1].weight.numel())


@torch.inference_mode()
def four_bit_op(base: torch.nn.Module, config) -> dict:
    """One projection of the base as ``nn.Linear`` and as NF4 ``Linear4bit``, timed on the same input."""
    name, linear = _largest_projection(base)
    four = Linear4bit.from_linear(linear, "nf4", double_quant=True)
    x = torch.randn(1, config.latency_tokens, linear.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(linear.weight.device, linear.weight.dtype)  # (1, T, d_in), the compute dtype
    timings = interleaved_latency(
        {
            "linear_16bit": lambda: linear(x),
            "linear_4bit": lambda: four(x),
            "dequantize_only": lambda: four.dequantize(x.dtype),
        },
        config.latency_rounds,
        max(config.latency_repeats, 5),
    )
    return dict(
        four_bit_op=dict(
            layer=name,
            shape=[linear.out_features, linear.in_features],
            tokens=config.latency_tokens,
            input_dtype=str(x.dtype).removeprefix("torch."),
            matmul_dtype=str(four.dequantize(x.dtype).dtype).removeprefix("torch."),
            timings=timings,
        )
    )


def task_switch(model: torch.nn.Module, other: torch.nn.Module, config, load_seconds: float) -> dict:
    """Seconds to swap one adapter for another in a loaded model, against loading the base model again."""
    device, dtype = device_and_dtype(config)
    with tempfile.TemporaryDirectory(prefix="lorakit-switch-") as folder:
        first, second = save_adapter(model, Path(folder) / "a"), save_adapter(other, Path(folder) / "b")
        size = sum(f.stat().st_size for f in first.iterdir() if f.is_file())
        swaps = []
        for target in (second, first, second, first, second):
            t0 = time.perf_counter()
            load_adapter(model, target)
            swaps.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    reloaded, _ = load_base_model(config.model, dtype=dtype, device=device)
    reload_seconds = time.perf_counter() - t0
    del reloaded
    return dict(
        swap_seconds=sorted(swaps)[len(swaps) // 2],
        reload_seconds=reload_seconds,
        load_seconds=load_seconds,
        adapter_bytes=size,
    )
