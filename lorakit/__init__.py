"""lorakit: LoRA and QLoRA built from scratch, readable, and checked against peft and bitsandbytes.

``import lorakit`` loads the teaching core and the fine-tune pipeline (torch, no plotting). The
notebook UI (matplotlib, ipywidgets), the controls' logic and the lab are loaded on first use of
one of their names (PEP 562 module ``__getattr__``), so ``lorakit.TradeoffControl`` or
``from lorakit import run_lab`` work as before, and a script that never draws pays for no
plotting library.
"""

import importlib

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
from lorakit.evaluation import (
    HELDOUT,
    HeldOut,
    Perplexity,
    PerplexityChange,
    archaic_rate,
    compare_perplexity,
    heldout_perplexity,
    mean_line_words,
)
from lorakit.finetune import FinetuneConfig, finetune  # eager: the function must win over the subpackage's name
from lorakit.linear4bit import Linear4bit, dequantize_model, quantize_model
from lorakit.lora import LoRALinear, add_lora, lora_layers, merge_lora, unload_lora, unmerge_lora
from lorakit.memory import (
    MemoryEstimate,
    MemoryLedger,
    ModelShape,
    check_fit,
    estimate_memory,
    memory_ledger,
    model_bytes,
    quantized_bits_per_param,
)
from lorakit.merge import MERGE_STRATEGIES, Comparison, codes_changed, compare_logits, merge_qlora
from lorakit.models import chat_prompt, count_parameters, generate, load_base_model
from lorakit.paged import PagedOptimizer
from lorakit.runtime import Runtime, setup
from lorakit.timing import tokens_per_second
from lorakit.tradeoff import Tradeoff, quantization_tradeoff

__version__ = "0.1.0"

# name -> the module that defines it, imported the first time the name is used
_LAZY = {
    # the logic of notebook 06's controls
    "RunBoard": "lorakit.finetune.report",
    "SettingReport": "lorakit.finetune.report",
    "setting_report": "lorakit.finetune.report",
    # the lab (its runs import the whole pipeline, multiprocessing and concurrent.futures)
    "LabConfig": "lorakit.lab",
    "LabResult": "lorakit.lab",
    "run_lab": "lorakit.lab",
    # the notebook UI: matplotlib figures and ipywidgets controls
    "Pictured": "lorakit.widgets.picture",
    "PicturedControl": "lorakit.widgets.picture",
    "figure_png": "lorakit.widgets.picture",
    "text_figure": "lorakit.widgets.picture",
    "TradeoffControl": "lorakit.widgets.tradeoff",
    "MemoryCalculator": "lorakit.widgets.memory",
    "FinetuneControl": "lorakit.widgets.finetune",
}
# the notebooks' older names of two controls (04: tradeoff_widget(w), 06: finetune_widget(model, board))
_ALIASES = {
    "tradeoff_widget": ("lorakit.widgets.tradeoff", "TradeoffControl"),
    "finetune_widget": ("lorakit.widgets.finetune", "FinetuneControl"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attribute = _LAZY[name], name
    elif name in _ALIASES:
        module, attribute = _ALIASES[name]
    else:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # the next use finds it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))


__all__ = [
    "AdamW8bit",
    "AssetError",
    "Comparison",
    "FinetuneConfig",
    "FinetuneControl",
    "HELDOUT",
    "HeldOut",
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
    "Perplexity",
    "PerplexityChange",
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
    "archaic_rate",
    "cache_dir",
    "chat_prompt",
    "check_fit",
    "codebook",
    "codes_changed",
    "compare_logits",
    "compare_perplexity",
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
    "heldout_perplexity",
    "integer",
    "lm_batches",
    "load_adapter",
    "load_base_model",
    "load_documents",
    "lora_layers",
    "mean_line_words",
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
