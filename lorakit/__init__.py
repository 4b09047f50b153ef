"""lorakit: LoRA and QLoRA built from scratch, readable, and checked against peft and bitsandbytes."""
from lorakit.adam8bit import AdamW8bit
from lorakit.adapter import load_adapter, save_adapter
from lorakit.assets import AssetError, cache_dir, fetch
from lorakit.blockwise import (
    QuantState,
    Storage,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
    storage,
)
from lorakit.codebooks import codebook, create_dynamic_map, dynamic_map, fp4, integer, nf_offset, normal_float
from lorakit.data import lm_batches, load_documents, perplexity, split_documents, tokenize_blocks
from lorakit.double_quant import dequantize_absmax, quantize_absmax
from lorakit.explore import Tradeoff, TradeoffControl, quantization_tradeoff, tradeoff_widget
from lorakit.finetune import FinetuneConfig, finetune
from lorakit.finetune.controls import RunBoard, SettingReport, finetune_widget, setting_report
from lorakit.linear4bit import Linear4bit, dequantize_model, quantize_model
from lorakit.lora import LoRALinear, add_lora, lora_layers, merge_lora, unload_lora, unmerge_lora
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
from lorakit.merge import MERGE_STRATEGIES, Comparison, codes_changed, compare_logits, merge_qlora
from lorakit.models import (
    count_parameters,
    generate,
    keep_bnb_reference_path,
    load_base_model,
    model_bytes,
    tokens_per_second,
)
from lorakit.paged import PagedOptimizer
from lorakit.runtime import Runtime, setup
from lorakit.lab import LabConfig, LabResult, run_lab
from lorakit.snapshot import Pictured, PicturedControl, figure_png, text_figure

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit",
    "AssetError",
    "Comparison",
    "FinetuneConfig",
    "LabConfig",
    "LabResult",
    "Linear4bit",
    "LoRALinear",
    "MERGE_STRATEGIES",
    "MemoryCalculator",
    "MemoryEstimate",
    "MemoryLedger",
    "ModelShape",
    "PagedOptimizer",
    "Pictured",
    "PicturedControl",
    "QuantState",
    "RunBoard",
    "Runtime",
    "SettingReport",
    "Storage",
    "Tradeoff",
    "TradeoffControl",
    "add_lora",
    "cache_dir",
    "check_fit",
    "codebook",
    "codes_changed",
    "compare_logits",
    "count_parameters",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_blockwise",
    "dequantize_model",
    "dynamic_map",
    "estimate_memory",
    "fetch",
    "figure_png",
    "finetune",
    "finetune_widget",
    "fp4",
    "generate",
    "integer",
    "keep_bnb_reference_path",
    "lm_batches",
    "load_adapter",
    "load_base_model",
    "load_documents",
    "lora_layers",
    "memory_ledger",
    "merge_lora",
    "merge_qlora",
    "model_bytes",
    "nf_offset",
    "normal_float",
    "perplexity",
    "quantization_tradeoff",
    "quantize_4bit",
    "quantize_absmax",
    "quantize_blockwise",
    "quantize_model",
    "quantized_bits_per_param",
    "run_lab",
    "save_adapter",
    "setting_report",
    "setup",
    "split_documents",
    "storage",
    "text_figure",
    "tokenize_blocks",
    "tokens_per_second",
    "tradeoff_widget",
    "unload_lora",
    "unmerge_lora",
]
