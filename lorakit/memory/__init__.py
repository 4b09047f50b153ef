"""Where the memory goes: a measured ledger of one training step, and an estimator for any model.

Two halves that check each other:

* :mod:`lorakit.memory.ledger` *measures* one real training step of the model in front of you
  (:func:`memory_ledger`), with the package's byte counters and resident-memory readers;
* :mod:`lorakit.memory.estimate` *computes* the same lines from shapes alone (:func:`estimate_memory`,
  :func:`check_fit`), for any size and method;
* ``python -m lorakit.memory 65B --method qlora`` prints an estimate (:mod:`lorakit.memory.__main__`).

Its picture and calculator widget live in :mod:`lorakit.widgets.memory`.
"""

from lorakit.memory.estimate import (
    ADAM8BIT_BLOCKSIZE,
    ATTENTION_PROJECTIONS,
    DTYPE_BYTES,
    LLAMA,
    METHODS,
    MLP_PROJECTIONS,
    QLORA_PAPER_FIGURE6_MB,
    QLORA_PAPER_SETTING,
    STATE_BYTES_PER_PARAM,
    FitCheck,
    MemoryEstimate,
    ModelShape,
    activation_bytes,
    check_fit,
    estimate_memory,
    lora_params,
    model_shape,
    quantized_bits_per_param,
    quantized_bytes,
)
from lorakit.memory.ledger import (
    GB,
    MB,
    MemoryLedger,
    StepMemory,
    memory_ledger,
    model_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
    quantized_storage,
    release_free_pages,
    resident_peak,
    return_freed_memory,
    rss_parts,
    weight_bytes_by_dtype,
)

__all__ = [
    "ADAM8BIT_BLOCKSIZE",
    "ATTENTION_PROJECTIONS",
    "DTYPE_BYTES",
    "GB",
    "LLAMA",
    "MB",
    "METHODS",
    "MLP_PROJECTIONS",
    "QLORA_PAPER_FIGURE6_MB",
    "QLORA_PAPER_SETTING",
    "STATE_BYTES_PER_PARAM",
    "FitCheck",
    "MemoryEstimate",
    "MemoryLedger",
    "ModelShape",
    "StepMemory",
    "activation_bytes",
    "check_fit",
    "estimate_memory",
    "lora_params",
    "memory_ledger",
    "model_bytes",
    "return_freed_memory",
    "model_shape",
    "optimizer_state_bytes",
    "peak_rss_bytes",
    "quantized_bits_per_param",
    "quantized_bytes",
    "quantized_storage",
    "release_free_pages",
    "resident_peak",
    "rss_parts",
    "weight_bytes_by_dtype",
]
