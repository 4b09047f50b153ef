"""Deployment routes for a fine-tuned adapter (notebook 08, ``python -m lorakit.deploy``).

One module per route: :mod:`~lorakit.deploy.merged` (the adapter folded into its base, a plain transformers
checkpoint), :mod:`~lorakit.deploy.onnx` (ONNX Runtime GenAI, INT4 or FP32, and adapters over one exported
base), :mod:`~lorakit.deploy.gguf` (llama.cpp's Q8_0 and Q4_1, and running them in llama.cpp when
``llama-cpp-python`` is installed), :mod:`~lorakit.deploy.serve` (peft adapters
switched per request over one bitsandbytes 4-bit base), and the command line in :mod:`~lorakit.deploy.cli`.
"""

from lorakit.deploy._files import atomic_folder, folder_bytes
from lorakit.deploy.cli import TARGETS, deploy
from lorakit.deploy.gguf import (
    GGUF_TYPES,
    LLAMA_CPP_HINT,
    LlamaCppLM,
    gguf_roundtrip,
    llama_cpp_available,
    llama_cpp_generate,
    llama_cpp_tokens_per_second,
    read_gguf,
    write_gguf,
)
from lorakit.deploy.merged import BaseSpec, DeployError, base_of, check_adapter, merge_adapter, save_merged
from lorakit.deploy.onnx import (
    ONNX_INT8,
    ONNX_PRECISIONS,
    OnnxLM,
    export_onnx,
    export_onnx_adapters,
    onnx_generate,
    onnx_tokens_per_second,
)
from lorakit.deploy.serve import PeftAdapterServer, adapter_bytes, load_bnb_4bit

__all__ = [
    "GGUF_TYPES",
    "LLAMA_CPP_HINT",
    "ONNX_INT8",
    "ONNX_PRECISIONS",
    "TARGETS",
    "BaseSpec",
    "DeployError",
    "LlamaCppLM",
    "OnnxLM",
    "PeftAdapterServer",
    "adapter_bytes",
    "atomic_folder",
    "base_of",
    "check_adapter",
    "deploy",
    "export_onnx",
    "export_onnx_adapters",
    "folder_bytes",
    "gguf_roundtrip",
    "llama_cpp_available",
    "llama_cpp_generate",
    "llama_cpp_tokens_per_second",
    "load_bnb_4bit",
    "merge_adapter",
    "onnx_generate",
    "onnx_tokens_per_second",
    "read_gguf",
    "save_merged",
    "write_gguf",
]
