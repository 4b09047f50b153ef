"""LoRA vs QLoRA, measured: the comparison articles' claims checked on the learner's machine.

``run_lab()`` fine-tunes SmolLM2 four ways with the same data, steps and seed (full, LoRA, QLoRA
with NF4 + double quantization, QLoRA with FP4), measures memory, step time, held-out
perplexity, inference latency merged and unmerged, and adapter size, then answers every claim
in :data:`lorakit.lab.claims.CLAIMS`::

    from lorakit import run_lab
    lab = run_lab()                      # quick settings; LabConfig.full_settings() for longer
    print(lab.markdown())

Command line: ``python -m lorakit.lab [--full] [--json PATH] [--markdown PATH]``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit.lab.claims import CLAIMS, DEPENDS, FAILS, HOLDS, VERDICTS, Claim, Finding, evaluate_claims, markdown_table
from lorakit.lab.runs import (
    RUNS,
    LabConfig,
    device_and_dtype,
    in_fresh_process,
    inference_run,
    merge_adapter,
    scale_estimates,
    train_run,
)


@dataclass
class LabResult:
    """The claims table (``claims``: one dict per claim) and every measurement behind it (``runs``)."""

    claims: list[dict]
    runs: dict

    def to_dict(self) -> dict:
        return {"claims": self.claims, "runs": self.runs}

    def markdown(self) -> str:
        s = self.runs["settings"]
        head = (f"# LoRA vs QLoRA, measured\n\nSmolLM2 on {s['device_name']} ({s['dtype']}), {s['steps']} steps of "
                f"{s['batch_size']} x {s['seq_len']} tokens, seed {s['seed']}; lab run took {s['seconds']:.0f} s.\n\n")
        return head + markdown_table(self.claims)

    def verdict(self, claim_start: str) -> str:
        """The verdict of the first claim whose text starts with ``claim_start``."""
        for row in self.claims:
            if row["claim"].startswith(claim_start):
                return row["verdict"]
        raise KeyError(f"no claim starts with {claim_start!r}")

    def write_json(self, path: str | os.PathLike) -> Path:
        return _atomic_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def write_markdown(self, path: str | os.PathLike) -> Path:
        return _atomic_text(Path(path), self.markdown())


def _atomic_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def run_lab(config: LabConfig | None = None, adapter_dir: str | os.PathLike | None = None, progress: bool = True,
            **settings) -> LabResult:
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
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="lab", disable=not progress)
    runs: dict = {}
    try:
        for job in bar:
            bar.set_postfix_str(job)
            if job == "inference":
                adapters = {name: runs[name]["adapter_dir"] for name in ("lora", "qlora_nf4")}
                runs[job] = call(inference_run, plain, adapters)
            else:
                runs[job] = call(train_run, job, plain, str(folder))
    finally:
        bar.close()
        if adapter_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    for name in ("lora", "qlora_nf4", "qlora_fp4"):  # a folder path is no measurement (and may be temporary)
        runs[name].pop("adapter_dir", None)
    runs["estimates"] = scale_estimates()
    runs["settings"] = dict(
        plain, device=str(device), dtype=str(dtype).removeprefix("torch."),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        cpu_threads=torch.get_num_threads(), torch=torch.__version__, seconds=round(time.perf_counter() - start, 1),
    )
    return LabResult(claims=evaluate_claims(runs), runs=runs)


__all__ = [
    "CLAIMS", "DEPENDS", "FAILS", "HOLDS", "RUNS", "VERDICTS", "Claim", "Finding", "LabConfig", "LabResult",
    "evaluate_claims", "markdown_table", "merge_adapter", "run_lab",
]
