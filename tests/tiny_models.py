"""Tiny random models built from configs (nothing downloaded) and peft helpers, shared by the tests.

``tiny_llama`` is the SmolLM2 architecture with a few thousand parameters; the one home for it
(the other tests import it from here, with keyword overrides for their own sizes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.lora import LLAMA_PROJECTIONS

ALL_PROJ = list(LLAMA_PROJECTIONS)


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 48,
    *,
    vocab_size: int = 64,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    eval_mode: bool = True,
    **config,
):
    """A random ``LlamaForCausalLM`` (seeded); ``config`` passes further ``LlamaConfig`` fields
    (e.g. ``attention_dropout``). In eval mode unless ``eval_mode=False``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    return model.eval() if eval_mode else model


def peft_model(base: nn.Module, targets, r: int = 4, alpha: float = 8, autocast_adapter_dtype: bool = True, **kwargs):
    """peft's LoRA on a deep copy of ``base``; ``targets`` a list of names or peft's ``"all-linear"``."""
    from peft import LoraConfig, get_peft_model

    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kwargs)
    return get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=autocast_adapter_dtype)


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


# ---------------------------------------------------------------- other architectures (tests/test_architectures.py)
def tiny_gpt2(seed: int = 0):
    """GPT-2: every projection is a ``Conv1D`` (weight stored (d_in, d_out)); lm_head is tied to wte."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def tiny_t5(seed: int = 0):
    """T5 (encoder-decoder): ``T5DenseActDense.forward`` reads ``self.wo.weight.dtype``; ``wo`` is kept in fp32."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=64,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_whisper(seed: int = 0):
    """Whisper: its output head ``proj_out`` is tied to the decoder's embeddings and is not called ``lm_head``."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return WhisperForConditionalGeneration(config).eval()


def tiny_inputs(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small batch with labels for any of the tiny models (so ``model(**batch).loss`` exists)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 10), generator=g)  # (B, T)
    name = type(model).__name__
    if name.startswith("Whisper"):
        features = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=g)
        return {"input_features": features, "labels": ids}  # (B, n_mels, 2 * positions)
    return {"input_ids": ids, "labels": ids}


def assert_same_as_peft(ours: nn.Module, theirs: nn.Module, sides=("lora_A", "lora_B"), **batch) -> torch.Tensor:
    """lorakit's LoRA model and peft's give bit-identical logits on ``batch`` and, after backward, the same
    gradients on every LoRA matrix in ``sides``; returns our logits."""
    from lorakit import lora_layers

    a, b = ours(**batch), theirs(**batch)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    peft_layers = dict(theirs.base_model.model.named_modules())
    for name, layer in lora_layers(ours).items():
        for side in sides:
            theirs_grad = getattr(peft_layers[name], side)["default"].weight.grad
            assert torch.equal(getattr(layer, side).grad, theirs_grad), f"{name}.{side}"
    return a.logits
