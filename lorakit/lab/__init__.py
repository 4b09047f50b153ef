"""LoRA vs QLoRA, measured: the comparison articles' claims checked on the learner's machine.

``run_lab()`` fine-tunes SmolLM2 four ways with the same data, steps and seed (full, LoRA, QLoRA
with NF4 + double quantization, QLoRA with FP4), measures memory, step time, held-out
perplexity, inference latency merged and unmerged, and adapter size; then trains LoRA side by
side from one base (q,v only against every linear layer, a few ranks, bfloat16 adapters, a paged
optimizer) and times a 4-bit projection and an adapter swap (:mod:`lorakit.lab.variants`); then
answers every claim in :data:`lorakit.lab.claims.CLAIMS`::

    from lorakit import run_lab
    lab = run_lab()                      # quick settings; LabConfig.full_settings() for longer
    print(lab.markdown())

Command line: ``python -m lorakit.lab [--full] [--json PATH] [--markdown PATH]``.
"""

from lorakit.lab.claims import (
    CLAIMS,
    DEPENDS,
    FAILS,
    HOLDS,
    PARTLY,
    QLORA_PAPER,
    VERDICTS,
    Claim,
    Finding,
    evaluate_claims,
    markdown_table,
)
from lorakit.lab.config import RUNS, LabConfig
from lorakit.lab.inference import merge_adapter
from lorakit.lab.run import LabResult, run_lab

__all__ = [
    "CLAIMS",
    "DEPENDS",
    "FAILS",
    "HOLDS",
    "PARTLY",
    "QLORA_PAPER",
    "RUNS",
    "VERDICTS",
    "Claim",
    "Finding",
    "LabConfig",
    "LabResult",
    "evaluate_claims",
    "markdown_table",
    "merge_adapter",
    "run_lab",
]
