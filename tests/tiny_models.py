"""A tiny Llama (the SmolLM2 architecture, a few thousand parameters) and peft helpers for the LoRA tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def peft_model(base: nn.Module, targets, r: int = 4, alpha: float = 8, **kwargs):
    """peft's LoRA on a deep copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), **kwargs)
    return get_peft_model(copy.deepcopy(base), config)


def randomize_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every lorakit LoRA layer a nonzero B (B = 0 at init hides the LoRA path)."""
    from lorakit import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def copy_lora_into_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copy lorakit's A and B into the matching peft layers; returns how many layers were copied."""
    from lorakit import lora_layers

    peft_layers = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = peft_layers[name]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    return len(lora_layers(ours))


def peft_linear(base: nn.Module, r: int, alpha: float, **kwargs):
    """peft's LoRA ``Linear`` layer around ``base`` (the layer class ``get_peft_model`` inserts)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    return Linear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha, **kwargs), r=r, lora_alpha=alpha)
