"""lorakit: LoRA and QLoRA built from scratch, readable, and checked against peft and bitsandbytes."""

from lorakit.adapter import load_adapter, save_adapter
from lorakit.assets import AssetError, cache_dir, fetch
from lorakit.data import load_documents, lm_batches, perplexity, split_documents, tokenize_blocks
from lorakit.lora import LoRALinear, add_lora, lora_layers, merge_lora, unload_lora, unmerge_lora
from lorakit.models import count_parameters, generate, load_base_model, model_bytes
from lorakit.runtime import Runtime, setup

__version__ = "0.1.0"

__all__ = [
    "AssetError",
    "LoRALinear",
    "Runtime",
    "add_lora",
    "cache_dir",
    "count_parameters",
    "fetch",
    "generate",
    "lm_batches",
    "load_adapter",
    "load_base_model",
    "load_documents",
    "lora_layers",
    "merge_lora",
    "model_bytes",
    "perplexity",
    "save_adapter",
    "setup",
    "split_documents",
    "tokenize_blocks",
    "unload_lora",
    "unmerge_lora",
]
