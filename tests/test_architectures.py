"""LoRA and 4-bit quantization on model families other than Llama, checked against peft and bitsandbytes.

Each family is a tiny random model built from a config (tests/tiny_models.py, nothing downloaded):
- Llama-like (``nn.Linear`` projections, tied ``lm_head``);
- GPT-2, whose projections are ``Conv1D`` (weight stored (d_in, d_out): peft's ``fan_in_fan_out``);
- T5, whose ``T5DenseActDense.forward`` reads ``self.wo.weight.dtype`` on whatever sits at ``wo``;
- Whisper, whose output head ``proj_out`` is tied to the decoder embeddings and is not called ``lm_head``.
LoRA is compared with peft (outputs, gradients, merged weights, adapters both ways), quantization with
transformers' bitsandbytes path (which layers, and their codes). Both are deterministic on
the CPU, so every comparison with them is bit for bit (the other checks are properties, with bounds).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from tiny_models import assert_same_as_peft, peft_model, tiny_gpt2, tiny_inputs, tiny_llama, tiny_t5, tiny_whisper
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import Linear4bit, add_lora, dequantize_model, load_adapter, lora_layers, quantize_model, save_adapter
from lorakit.linear4bit import kept_in_full_precision, set_module
from lorakit.lora import unload_lora

FAMILIES = {
    "llama": lambda: tiny_llama(hidden_size=64, intermediate_size=128),  # rows of whole 64-blocks (see below)
    "gpt2": tiny_gpt2,
    "t5": tiny_t5,
    "whisper": tiny_whisper,
}


def peft_kwargs(model: nn.Module) -> dict:
    # peft sets fan_in_fan_out=True by itself for a Conv1D target, with a warning; say it up front.
    return {"fan_in_fan_out": True} if any(isinstance(m, Conv1D) for m in model.modules()) else {}


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Nonzero A and B (B = 0 at init hides the LoRA path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.in_features**0.5)
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def copy_into_peft(ours: nn.Module, theirs: nn.Module) -> None:
    peft_layers = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)


def peft_wrapped(theirs: nn.Module) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n}


# ---------------------------------------------------------------- LoRA against peft


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_lora_matches_peft(family):
    """Same layers as peft's all-linear, same outputs and LoRA gradients, same merged weights."""
    base = FAMILIES[family]()
    batch = tiny_inputs(base)
    ours = add_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8)
    randomize(ours)
    theirs = peft_model(base, "all-linear", r=4, alpha=8, **peft_kwargs(base))
    copy_into_peft(ours, theirs)
    head = base.get_output_embeddings()
    assert set(lora_layers(ours)) == peft_wrapped(theirs)
    assert not any(layer.base_layer is head for layer in lora_layers(ours).values())  # the output head is left out

    assert_same_as_peft(ours, theirs, **batch)

    with torch.no_grad():
        unmerged = ours(**batch).logits
        ours_sd, theirs_sd = unload_lora(ours).state_dict(), theirs.merge_and_unload().state_dict()
        assert ours_sd.keys() == theirs_sd.keys()
        for key in ours_sd:
            assert torch.equal(ours_sd[key], theirs_sd[key]), key
        assert (ours(**batch).logits - unmerged).abs().max() < 1e-4  # merging kept the function


def test_gpt2_conv1d_merges_transposed_and_keeps_its_type():
    model = add_lora(tiny_gpt2(), ["c_attn"], r=4, alpha=8)
    randomize(model)
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (64, 192)
    w0 = layer.base_layer.weight.detach().clone()  # (d_in, d_out) = (64, 192)
    unload_lora(model)
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D
    assert torch.equal(c_attn.weight, w0 + (layer.delta_weight()).T)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_load_both_ways_with_peft(family, tmp_path):
    from peft import PeftModel

    base = FAMILIES[family]()
    batch = tiny_inputs(base)
    ours = add_lora(copy.deepcopy(base), "all-linear", r=4, alpha=8)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D stores W0 as (d_in, d_out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # peft warns when fan_in_fan_out is wrong for the layer
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        expected = ours(**batch).logits
        assert torch.equal(loaded(**batch).logits, expected)

    theirs = peft_model(base, "all-linear", r=4, alpha=8, init_lora_weights=False, **peft_kwargs(base))
    theirs.save_pretrained(tmp_path / "theirs")
    ours_again = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(ours_again(**batch).logits, theirs(**batch).logits)
        assert not torch.equal(ours_again(**batch).logits, base(**batch).logits)  # the adapter did act


# ---------------------------------------------------------------- 4-bit against transformers + bitsandbytes


def bnb_4bit(base: nn.Module, folder) -> nn.Module:
    """``base`` saved and loaded again with transformers' BitsAndBytesConfig (NF4, double quantization)."""
    from transformers import BitsAndBytesConfig

    base.save_pretrained(folder)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=torch.uint8,
    )
    return type(base).from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"}, quantization_config=config)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_model_quantizes_what_bitsandbytes_does_bit_for_bit(family, tmp_path):
    """Same layers left in full precision (tied heads, T5's wo) and the same codes and constants.

    Every weight here has rows of whole 64-value blocks: for other rows bitsandbytes 0.50.2's native
    CPU dequantize reads the wrong block's absmax (test_quantization.py), but the codes compared here
    would still agree.
    """
    bnb = pytest.importorskip("bitsandbytes")
    base = FAMILIES[family]()
    theirs = bnb_4bit(base, tmp_path)
    ours = quantize_model(copy.deepcopy(base))
    ours_4bit = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    theirs_4bit = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert ours_4bit.keys() == theirs_4bit.keys()
    for name, q in ours_4bit.items():
        weight = theirs_4bit[name].weight
        assert torch.equal(q.weight_packed.view(-1), weight.data.view(-1)), name
        assert torch.equal(q.absmax, weight.quant_state.absmax), name
        assert torch.equal(q.absmax2, weight.quant_state.state2.absmax), name
        assert torch.equal(q.absmax_offset, weight.quant_state.offset), name


def test_a_tied_head_not_called_lm_head_is_kept():
    model = tiny_whisper()
    embedding = model.get_decoder().embed_tokens.weight
    assert model.proj_out.weight is embedding  # tied
    assert "proj_out" in kept_in_full_precision(model)
    quantize_model(model)  # the default skip names only lm_head
    assert type(model.proj_out) is nn.Linear and model.proj_out.weight is embedding  # still tied, still float
    assert any(isinstance(m, Linear4bit) for m in model.modules())


def test_t5_keeps_wo_in_full_precision_as_transformers():
    model = quantize_model(tiny_t5())
    assert {n for n, m in model.named_modules() if n.endswith(".wo")} == {
        n for n, m in model.named_modules() if n.endswith(".wo") and type(m) is nn.Linear
    }
    assert len([m for m in model.modules() if isinstance(m, Linear4bit)]) == 28


def test_t5_runs_with_a_4bit_wo_and_lora_on_it():
    """T5's forward reads ``wo.weight.dtype``: a Linear4bit (and a LoRA layer around it) answer with the float
    weight."""
    model = tiny_t5()
    batch = tiny_inputs(model)
    names = [n for n, m in model.named_modules() if n.endswith(".wo")]
    for name in names:
        set_module(model, name, Linear4bit.from_linear(model.get_submodule(name), name=f"{name}.weight"))
    float_twin = dequantize_model(copy.deepcopy(model))  # the same weights, dequantized into nn.Linear
    assert model.get_submodule(names[0]).weight.dtype == torch.float32
    model, float_twin = add_lora(model, ["wo"], r=4), add_lora(float_twin, ["wo"], r=4)
    randomize(model)
    randomize(float_twin)
    a, b = model(**batch), float_twin(**batch)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.lora_B.grad, lora_layers(float_twin)[name].lora_B.grad), name


def test_gpt2_quantizes_its_conv1d_and_dequantizes_back_to_conv1d():
    base = tiny_gpt2()
    batch = tiny_inputs(base)
    model = quantize_model(copy.deepcopy(base))
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    assert type(model.lm_head) is nn.Linear  # tied to wte, so kept
    with torch.no_grad():
        quantized = model(**batch).logits
        back = dequantize_model(model)
        assert type(back.transformer.h[0].attn.c_attn) is Conv1D
        assert torch.equal(back(**batch).logits, quantized)  # the very weights the 4-bit layers decode to
        error = (quantized - base(**batch).logits).abs().max()
    assert 0 < error < 0.5  # quantized: not the same model, but close


def test_gpt2_qlora_matches_peft_on_bitsandbytes(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    from lorakit.models import keep_bnb_reference_path

    base = tiny_gpt2()
    batch = tiny_inputs(base)
    targets = ["c_attn", "c_proj", "c_fc"]
    # bitsandbytes' Linear4bit holds (out, in) like nn.Linear, so no fan_in_fan_out here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        theirs = get_peft_model(bnb_4bit(base, tmp_path), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    keep_bnb_reference_path(theirs)
    ours = add_lora(quantize_model(copy.deepcopy(base)), targets, r=4, alpha=8)
    randomize(ours)
    copy_into_peft(ours, theirs)
    assert_same_as_peft(ours, theirs, sides=("lora_B",), **batch)


@pytest.mark.parametrize("strategy", ["dequantized", "requantized", "original"])
def test_gpt2_qlora_merges_back_into_conv1d(strategy):
    from lorakit import merge_qlora

    base = tiny_gpt2()
    batch = tiny_inputs(base)
    model = add_lora(quantize_model(copy.deepcopy(base)), "all-linear", r=4, alpha=8)
    randomize(model)
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = merge_qlora(model, strategy, original=base if strategy == "original" else None)
        c_attn = merged.transformer.h[0].attn.c_attn
        assert type(c_attn) is (Linear4bit if strategy == "requantized" else Conv1D)
        error = (merged(**batch).logits - unmerged).abs().max()
    # (a) reproduces the QLoRA model up to rounding; (b) rounds the update to NF4; (c) swaps in the unquantized W0
    assert error < (1e-4 if strategy == "dequantized" else 0.5)
