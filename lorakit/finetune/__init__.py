"""``finetune``: full fine-tuning, LoRA or QLoRA of the base model, from lorakit's readable parts.

The package, by concept:

* ``config``: :class:`FinetuneConfig` and :func:`validate`, every check that runs before anything is
  loaded or written (settings, device, output folder, the model's limits from its config.json);
* ``fit``: will the run fit in the free memory? lorakit's own estimate, asked before training;
* ``output``: the run folder, and the rules that never delete a file lorakit did not write;
* ``pipeline``: :func:`finetune` itself: build the model, load the data, train, measure, save;
* ``instruct``: ``finetune(data="my.jsonl")``, instruction tuning on the learner's own file (:mod:`lorakit.chat`).

Command line (prints held-out perplexity before and after, writes the adapter and metrics.json)::

    python -m lorakit.finetune --method qlora --rank 8 --bits 4 --steps 60 --out runs/qlora
    python -m lorakit.finetune --method qlora --data my.jsonl --steps 60 --out runs/mine
"""

from lorakit.finetune.config import (
    ALL_LINEAR,
    BACKENDS,
    FinetuneConfig,
    check_output,
    model_config,
    settings_of,
    validate,
)
from lorakit.finetune.fit import WontFit, available_memory, check_memory
from lorakit.finetune.output import METRICS_FILE, RUN_FILE, RunComplete, prepare_output
from lorakit.finetune.pipeline import FinetuneResult, build_model, finetune, load_data, parameter_count

__all__ = [
    "ALL_LINEAR",
    "BACKENDS",
    "FinetuneConfig",
    "FinetuneResult",
    "METRICS_FILE",
    "RUN_FILE",
    "RunComplete",
    "WontFit",
    "available_memory",
    "build_model",
    "check_memory",
    "check_output",
    "finetune",
    "load_data",
    "model_config",
    "parameter_count",
    "prepare_output",
    "settings_of",
    "validate",
]
