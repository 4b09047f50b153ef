"""``run_lab``: the four fine-tunes and the inference measurements, each in a fresh process, then every claim answered.

The runs live in :mod:`lorakit.lab.measure` and :mod:`lorakit.lab.inference`, the claims in
:mod:`lorakit.lab.claims`. By default every run has a process of its own (``LabConfig.isolate``):
a process's peak resident set size never goes down, so only a fresh process gives each run its own peak.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lorakit._io import atomic_write_json, atomic_write_text
from lorakit.lab.claims import evaluate_claims, markdown_table
from lorakit.lab.config import RUNS, LabConfig, device_and_dtype
from lorakit.lab.inference import inference_run
from lorakit.lab.measure import train_run
from lorakit.lab.variants import rank_task, variants_run
from lorakit.lowrank import Gpt3LoRA
from lorakit.memory import LLAMA, QLORA_PAPER_SETTING, check_fit, estimate_memory


@dataclass
class LabResult:
    """The claims table (``claims``: one dict per claim) and every measurement behind it (``runs``)."""

    claims: list[dict]
    runs: dict

    def to_dict(self) -> dict:
        return {"claims": self.claims, "runs": self.runs}

    def markdown(self) -> str:
        s = self.runs["settings"]
        head = (
            f"# LoRA vs QLoRA, measured\n\nSmolLM2 on {s['device_name']} ({s['dtype']}), {s['steps']} steps of "
            f"{s['batch_size']} x {s['seq_len']} tokens, seed {s['seed']}; held-out perplexity on {s['eval_blocks']} "
            f"evenly spaced blocks of {s['seq_len']} tokens (lorakit.HeldOut), with 95% bootstrap intervals; "
            f"lab run took {s['seconds']:.0f} s.\n\n"
        )
        return head + markdown_table(self.claims)

    def verdict(self, claim_start: str) -> str:
        """The verdict of the first claim whose text starts with ``claim_start``."""
        for row in self.claims:
            if row["claim"].startswith(claim_start):
                return row["verdict"]
        raise KeyError(f"no claim starts with {claim_start!r}")

    def perplexity(self, name: str) -> dict:
        """``{ppl, low, high}`` of a measured model by name: a training run (after training, ``"lora"``), an
        inference-job model (``"lora_then_nf4_adapter"``) or a variants-job run (``"q_v_only"``)."""
        inf = self.runs["inference"]
        if name in inf["ppl"]:
            low, high = inf["ppl_ci"][name]
            return dict(ppl=inf["ppl"][name], low=low, high=high)
        variants = self.runs.get("variants") or {"runs": {}}
        if name in variants["runs"]:
            r = variants["runs"][name]
            return dict(ppl=r["ppl"], low=r["low"], high=r["high"])
        if name in RUNS:
            low, high = self.runs[name]["ppl_after_ci"]
            return dict(ppl=self.runs[name]["ppl_after"], low=low, high=high)
        known = [*RUNS, *inf["ppl"], *variants["runs"]]
        raise KeyError(f"no perplexity named {name!r}; measured: {', '.join(known)}")

    def paired(self, key: str) -> dict:
        """The paired comparison ``"after vs before"`` (``{ratio, low, high, significant}``) of either job."""
        for job in ("inference", "variants"):
            pairs = (self.runs.get(job) or {}).get("paired", {})
            if key in pairs:
                return pairs[key]
        raise KeyError(f"no paired comparison {key!r}")

    def write_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    def write_markdown(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.markdown())


def run_lab(
    config: LabConfig | None = None, adapter_dir: str | os.PathLike | None = None, progress: bool = True, **settings
) -> LabResult:
    """Run the four fine-tunes and the inference measurements, then answer every claim.

    ``settings`` override ``config``'s fields (``run_lab(steps=4)``). Adapters are saved under
    ``adapter_dir`` (kept) or a temporary folder (removed at the end).
    """
    config = LabConfig(**{**asdict(config or LabConfig()), **settings})
    config.validate()
    device, dtype = device_and_dtype(config)
    call = in_fresh_process if config.isolate else (lambda fn, *args: fn(*args))
    plain = asdict(config)
    start = time.perf_counter()
    folder = Path(adapter_dir) if adapter_dir is not None else Path(tempfile.mkdtemp(prefix="lorakit-lab-"))
    jobs = [*RUNS, "inference"]
    bar = tqdm(jobs, desc="lab", disable=not progress)
    runs: dict = {}
    try:
        for job in bar:
            bar.set_postfix_str(job)
            if job == "inference":
                adapters = {name: runs[name]["adapter_dir"] for name in ("lora", "qlora_nf4")}
                runs[job], runs["variants"] = call(inference_and_variants, plain, adapters)
            else:
                runs[job] = call(train_run, job, plain, str(folder))
    finally:
        bar.close()
        if adapter_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    if runs["variants"] is None:
        del runs["variants"]
    for name in ("lora", "qlora_nf4", "qlora_fp4"):  # a folder path is no measurement (and may be temporary)
        runs[name].pop("adapter_dir", None)
    runs["estimates"] = scale_estimates()
    runs["rank_task"] = rank_task(seed=config.seed)
    runs["settings"] = dict(
        plain,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        seconds=round(time.perf_counter() - start, 1),
    )
    return LabResult(claims=evaluate_claims(runs), runs=runs)


def inference_and_variants(settings: dict, adapters: dict[str, str]) -> tuple[dict, dict | None]:
    """The inference job, then (``LabConfig.variants``) the variants job in the same process: one start saved."""
    inference = inference_run(settings, adapters)
    return inference, variants_run(settings) if settings.get("variants", True) else None


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new Python process (spawned, so CUDA works there too); returns its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def scale_estimates() -> dict:
    """The figures behind the claims about 65B, 24 GB GPUs, GPT-3 175B and deployment size.

    Computed by :func:`lorakit.estimate_memory` (checked against the ledger and the QLoRA paper's
    Figure 6 in ``tests/test_memory.py``) and :class:`lorakit.lowrank.Gpt3LoRA`; nothing here is measured.
    """

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
        gpt3=dict(
            total_params=gpt3.total_params,
            lora_params=gpt3.lora_params,
            reduction=gpt3.reduction,
            full_bytes=gpt3.training_bytes(lora=False),
            lora_bytes=gpt3.training_bytes(lora=True),
        ),
        deploy=deploy,
        largest_batch_24gb={method: largest_batch(24, "7B", method, seq_len=512) for method in ("lora", "qlora")},
    )


def largest_batch(gpu_gb: float, size: str, method: str, seq_len: int = 512, limit: int = 4096) -> int:
    """The largest batch of ``seq_len``-token sequences whose training step the estimator fits in ``gpu_gb``
    (r=64 on every linear layer, AdamW, no gradient checkpointing); 0 when not even one fits."""

    def fits(batch: int) -> bool:
        return check_fit(gpu_gb, model=size, method=method, rank=64, batch_size=batch, seq_len=seq_len).fits

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low
