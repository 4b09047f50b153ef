"""lorakit: LoRA and QLoRA built from scratch, readable, and checked against peft and bitsandbytes."""

from lorakit.adam8bit import AdamW8bit, create_dynamic_map
from lorakit.assets import AssetError, cache_dir, fetch
from lorakit.data import load_documents, lm_batches, perplexity, split_documents, tokenize_blocks
from lorakit.memory import (
    MemoryCalculator,
    MemoryEstimate,
    MemoryLedger,
    ModelShape,
    check_fit,
    estimate_memory,
    memory_ledger,
    quantized_bits_per_param,
)
from lorakit.models import count_parameters, generate, load_base_model, model_bytes
from lorakit.paged import PagedOptimizer
from lorakit.runtime import Runtime, setup

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit",
    "AssetError",
    "MemoryCalculator",
    "MemoryEstimate",
    "MemoryLedger",
    "ModelShape",
    "PagedOptimizer",
    "Runtime",
    "cache_dir",
    "check_fit",
    "count_parameters",
    "create_dynamic_map",
    "estimate_memory",
    "fetch",
    "generate",
    "lm_batches",
    "load_base_model",
    "load_documents",
    "memory_ledger",
    "model_bytes",
    "perplexity",
    "quantized_bits_per_param",
    "setup",
    "split_documents",
    "tokenize_blocks",
]
