"""lorakit: LoRA and QLoRA built from scratch, readable, and checked against peft and bitsandbytes."""

from lorakit.assets import AssetError, cache_dir, fetch
from lorakit.data import load_documents, lm_batches, perplexity, split_documents, tokenize_blocks
from lorakit.models import count_parameters, generate, load_base_model, model_bytes
from lorakit.runtime import Runtime, setup

__version__ = "0.1.0"

__all__ = [
    "AssetError",
    "Runtime",
    "cache_dir",
    "count_parameters",
    "fetch",
    "generate",
    "lm_batches",
    "load_base_model",
    "load_documents",
    "model_bytes",
    "perplexity",
    "setup",
    "split_documents",
    "tokenize_blocks",
]
