"""merge_qlora's three strategies, checked against peft + bitsandbytes, and tokens_per_second.

The production reference for strategy "requantized" is peft's ``merge_and_unload`` on a model loaded
with transformers' ``BitsAndBytesConfig``: peft's ``tuners/lora/bnb.py`` (``Linear4bit.merge``)
dequantizes the bitsandbytes weight, adds ``get_delta_weight`` and re-quantizes it as a new
``Params4bit``. On the CPU every step is deterministic, so the codes must be bit-identical.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from tiny_models import ALL_PROJ, randomize_lora, tiny_llama
from torch import nn
from transformers import BatchEncoding

from lorakit import (
    Linear4bit,
    add_lora,
    compare_logits,
    compare_perplexity,
    heldout_perplexity,
    lora_layers,
    merge_qlora,
    perplexity,
    quantize_model,
    tokens_per_second,
    unload_lora,
)
from lorakit.codebooks import widest_gap
from lorakit.models import keep_bnb_reference_path

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def qlora(base, targets=ALL_PROJ, seed=1):
    """lorakit's QLoRA on a copy of ``base``: NF4 with double quantization, LoRA with a random B."""
    model = add_lora(quantize_model(copy.deepcopy(base)), list(targets), r=4, alpha=8)
    randomize_lora(model, seed)
    return model


@pytest.fixture
def tiny():
    return tiny_llama()


# ---------------------------------------------------------------- against peft + bitsandbytes


def bnb_qlora(base, folder, dtype=torch.float32):
    """transformers + bitsandbytes NF4 (double quant) + peft LoRA with random A and B, from ``base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base.save_pretrained(folder)
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map={"": "cpu"}, quantization_config=config
    )
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ, init_lora_weights=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_requantized_is_bit_identical_to_peft_merge_into_bitsandbytes_4bit(tmp_path, dtype):
    """In bfloat16 both keep fp32 adapters (peft's autocast_adapter_dtype) and quantize the fp32 sum W0 + dW."""
    pytest.importorskip("bitsandbytes")
    # Rows a whole number of blocks long, as in SmolLM2 (576, 1536): for rows shorter than a block,
    # bitsandbytes 0.50.2's native CPU dequantize (AVX-512 machines) reads the wrong block's absmax
    # (see blocks_follow_rows in test_quantization.py), and peft's merge dequantizes through it.
    from transformers import AutoModelForCausalLM

    tiny = tiny_llama(hidden_size=64, intermediate_size=128)
    theirs = bnb_qlora(tiny, tmp_path, dtype)  # its LoRA weights are overwritten with ours below
    keep_bnb_reference_path(theirs)  # AVX512-BF16 CPUs: no bfloat16 repacking at the first no-grad forward
    # The same bf16 model for us: from_pretrained keeps the rotary inv_freq in fp32, where .to(dtype) would cast it.
    ours = qlora(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype) if dtype != torch.float32 else tiny)
    peft_layers = dict(theirs.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    assert torch.equal(logits(ours), logits(theirs))  # same 4-bit base, same adapter
    codes_before = {name: layer.base_layer.weight_packed.clone() for name, layer in lora_layers(ours).items()}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
        theirs = theirs.merge_and_unload()
    keep_bnb_reference_path(theirs)  # the merge made new bitsandbytes layers
    ours = merge_qlora(ours, "requantized")
    assert not lora_layers(ours)
    changed = 0
    for name, codes in codes_before.items():
        q, weight = ours.get_submodule(name), theirs.get_submodule(name).weight
        assert isinstance(q, Linear4bit) and q.double_quant
        assert torch.equal(q.weight_packed.view(-1), weight.data.view(-1)), name  # the packed NF4 codes
        assert torch.equal(q.absmax, weight.quant_state.absmax), name  # the 8-bit absmax codes (double quant)
        assert torch.equal(q.absmax2, weight.quant_state.state2.absmax), name
        assert torch.equal(q.absmax_offset, weight.quant_state.offset), name
        changed += not torch.equal(q.weight_packed, codes)
    assert changed == len(codes_before)  # the merge moved codes in every layer: the comparison is not vacuous
    assert torch.equal(logits(ours), logits(theirs))


def lora_gradients(model, evaluate_first: bool) -> dict[str, torch.Tensor | None]:
    if evaluate_first:
        model.eval()
        logits(model)  # a no-grad forward in eval mode, as an evaluation before training does
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_an_evaluation_leaves_bitsandbytes_training_gradients_unchanged(tiny, tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes 0.50 would repack the 4-bit weights at the first no-grad forward
    into a kernel with no backward; keep_bnb_reference_path keeps training's gradients exact."""
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit as BnbLinear4bit

    expected = lora_gradients(bnb_qlora(tiny, tmp_path / "a"), evaluate_first=False)
    model = bnb_qlora(tiny, tmp_path / "b")
    keep_bnb_reference_path(model)
    layers = [m for m in model.modules() if isinstance(m, BnbLinear4bit)]
    assert len(layers) == 14 and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    got = lora_gradients(model, evaluate_first=True)
    assert got.keys() == expected.keys() and len(got) == 28
    for name, grad in got.items():
        assert grad is not None and torch.equal(grad, expected[name]), name
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


# ---------------------------------------------------------------- the three strategies' properties


def test_dequantized_is_the_unmerged_model_in_plain_linears(tiny):
    model = qlora(tiny)
    expected = {
        name: layer.base_layer.dequantize() + layer.delta_weight() for name, layer in lora_layers(model).items()
    }
    unmerged = logits(model)
    merged = merge_qlora(copy.deepcopy(model), "dequantized")
    assert not lora_layers(merged)
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    for name, w in expected.items():
        linear = merged.get_submodule(name)
        assert type(linear) is nn.Linear and torch.equal(linear.weight, w), name
        assert not linear.weight.requires_grad
    # The same arithmetic in another order: x (W + dW)^T instead of x W^T + (x A^T) B^T * scaling.
    assert (logits(merged) - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    assert type(merged) is type(tiny) and [type(m) for m in merged.modules()] == [type(m) for m in tiny.modules()]


def test_requantized_differs_from_dequantized_by_one_rounding_to_nf4(tiny):
    model = qlora(tiny)
    a = merge_qlora(copy.deepcopy(model), "dequantized")
    b = merge_qlora(copy.deepcopy(model), "requantized")
    for name in lora_layers(model):
        w, q = a.get_submodule(name).weight, b.get_submodule(name)
        error = (q.dequantize() - w).view(-1, q.blocksize).abs()  # (n_blocks, blocksize)
        absmax = w.view(-1, q.blocksize).abs().amax(dim=1, keepdim=True)  # (n_blocks, 1)
        # half the widest NF4 gap times the block's absmax, plus the double-quantized absmax's own error
        bound = (
            widest_gap(q.code) / 2 * absmax
            + (absmax - q.dequantize().view(-1, q.blocksize).abs().amax(1, keepdim=True)).abs()
        )
        assert torch.all(error <= 1.001 * bound + 1e-7), name
        assert error.max() > 0, name


def test_original_with_zero_B_is_exactly_the_original_model(tiny):
    model = add_lora(quantize_model(copy.deepcopy(tiny)), ALL_PROJ, r=4, alpha=8)  # B = 0 at init
    merged = merge_qlora(model, "original", original=tiny)
    assert merged.state_dict().keys() == tiny.state_dict().keys()
    for key, value in tiny.state_dict().items():
        assert torch.equal(merged.state_dict()[key], value), key
    assert torch.equal(logits(merged), logits(tiny))


def test_original_equals_merging_lora_into_the_unquantized_model(tiny):
    """(c) is LoRA's own merge with the QLoRA-trained A and B: bit-identical to unload_lora."""
    model = qlora(tiny)
    lora = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            lora_layers(lora)[name].lora_A.copy_(layer.lora_A)
            lora_layers(lora)[name].lora_B.copy_(layer.lora_B)
    merged = merge_qlora(copy.deepcopy(model), "original", original=tiny.state_dict())
    expected = unload_lora(lora).state_dict()
    for key, value in merged.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_original_accepts_the_bfloat16_model_that_was_quantized(tiny):
    """A bf16 W0 was scaled in bf16, so the check allows one bf16 step (SmolLM2's q_proj in notebook 08
    exceeded the float32 bound by 1%); the looser bound still refuses another model of the same shapes."""
    base = copy.deepcopy(tiny).to(torch.bfloat16)
    model = qlora(base)
    merged = merge_qlora(copy.deepcopy(model), "original", original=base)
    assert merged.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="is not the weight that was quantized"):
        merge_qlora(model, "original", original=tiny_llama(seed=7).to(torch.bfloat16))


@pytest.mark.parametrize("strategy", ["dequantized", "requantized", "original"])
def test_layers_without_lora(tiny, strategy):
    """(a) and (c) leave no 4-bit layer behind; (b) keeps the untouched ones as they were."""
    model = qlora(tiny, targets=["q_proj"])
    untouched = "model.layers.0.mlp.up_proj"
    q = model.get_submodule(untouched)
    merged = merge_qlora(model, strategy, original=tiny if strategy == "original" else None)
    layer = merged.get_submodule(untouched)
    if strategy == "requantized":
        assert layer is q
    else:
        assert type(layer) is nn.Linear
        w0 = tiny.get_submodule(untouched).weight
        assert torch.equal(layer.weight, q.dequantize() if strategy == "dequantized" else w0)


@pytest.mark.parametrize("strategy", ["dequantized", "original"])
def test_save_pretrained_and_reload_with_plain_transformers(tiny, tmp_path, strategy):
    from transformers import AutoModelForCausalLM

    merged = merge_qlora(qlora(tiny), strategy, original=tiny if strategy == "original" else None)
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(tiny)
    assert torch.equal(logits(reloaded), logits(merged))


def test_errors(tiny):
    model = qlora(tiny)
    before = logits(model)
    with pytest.raises(
        ValueError, match="strategy='nf4' is not valid; choose one of 'dequantized', 'requantized', 'original'"
    ):
        merge_qlora(model, "nf4")
    with pytest.raises(ValueError, match="strategy='original' needs original="):
        merge_qlora(model, "original")
    with pytest.raises(
        ValueError, match="original= is used by strategy='original' only, not by strategy='dequantized'"
    ):
        merge_qlora(model, "dequantized", original=tiny)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no LoRA layers"):
        merge_qlora(quantize_model(copy.deepcopy(tiny)), "dequantized")
    with pytest.raises(ValueError, match="wrap a full-precision layer, not a Linear4bit .*unload_lora"):
        merge_qlora(add_lora(copy.deepcopy(tiny), ["q_proj"]), "dequantized")
    with pytest.raises(TypeError, match="original must be an nn.Module or a state_dict, got str"):
        merge_qlora(model, "original", original="smollm2")
    state = tiny.state_dict()
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(KeyError, match="no 'model.layers.1.mlp.down_proj.weight' for the 4-bit layer"):
        merge_qlora(model, "original", original=missing)
    wrong_shape = {**state, "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 48)}
    with pytest.raises(
        ValueError,
        match=r"has shape \(32, 48\), but the 4-bit layer 'model.layers.0.self_attn.q_proj' holds \(32, 32\)",
    ):
        merge_qlora(model, "original", original=wrong_shape)
    with pytest.raises(
        ValueError, match="'model.layers.0.self_attn.q_proj.weight' is not the weight that was quantized"
    ):
        merge_qlora(model, "original", original=tiny_llama(seed=7))  # another model of the same shapes
    # none of the refusals changed the model
    assert len(lora_layers(model)) == 14 and torch.equal(logits(model), before)


def test_lora_merge_on_a_4bit_base_points_to_merge_qlora(tiny):
    model = qlora(tiny)
    with pytest.raises(NotImplementedError, match="Linear4bit base layer in place.*merge_qlora\\(model, strategy\\)"):
        unload_lora(model)


def test_compare_logits(tiny):
    model = qlora(tiny)
    blocks = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(3))  # (N, T), 5 = 2 + 2 + 1
    result = compare_logits(tiny, {"base": tiny, "qlora": model}, blocks, batch_size=2)
    assert (result["base"].max_error, result["base"].mean_error) == (0.0, 0.0)
    diff = (logits(model, blocks) - logits(tiny, blocks)).abs()  # (N, T, vocab)
    assert result["qlora"].max_error == diff.max().item()
    assert math.isclose(result["qlora"].mean_error, diff.mean().item(), rel_tol=1e-5)
    for name, m in (("base", tiny), ("qlora", model)):  # the perplexity of lorakit.data, from the same logits
        assert math.isclose(result[name].perplexity, perplexity(m, blocks), rel_tol=1e-5), name


def test_compare_logits_runs_the_reference_once_per_batch(tiny):
    model = qlora(tiny)  # made before the hook, so the copy does not carry it
    calls = []
    hook = tiny.register_forward_hook(lambda module, args, output: calls.append(1))
    blocks = torch.randint(0, 64, (5, 9), generator=torch.Generator().manual_seed(3))  # 3 batches of 2, 2, 1
    try:
        compare_logits(tiny, {"base": tiny, "qlora": model}, blocks, batch_size=2)
    finally:
        hook.remove()
    assert len(calls) == 3  # one forward per batch, though the reference is also among the models


def test_compare_logits_reports_the_workbook_protocol(tiny):
    """``heldout`` is what heldout_perplexity gives on the same blocks: same figure, interval and digest."""
    model = qlora(tiny)
    blocks = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(4))  # (N, T)
    result = compare_logits(tiny, {"qlora": model}, blocks, batch_size=4)["qlora"]
    direct = heldout_perplexity(model, blocks=blocks)
    assert result.heldout.blocks_digest == direct.blocks_digest
    assert math.isclose(result.heldout.ppl, direct.ppl, rel_tol=1e-5)
    assert math.isclose(result.heldout.low, direct.low, rel_tol=1e-4)
    assert math.isclose(result.heldout.high, direct.high, rel_tol=1e-4)
    assert result.heldout.low < result.heldout.ppl < result.heldout.high
    assert compare_perplexity(direct, result.heldout).n_blocks == len(blocks)  # comparable with the protocol's results


# ---------------------------------------------------------------- tokens per second


class ToyTokenizer:
    """Enough of a tokenizer for tokens_per_second: characters to ids below the tiny vocabulary."""

    pad_token_id = None
    eos_token_id = 0

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([[1 + ord(c) % 60 for c in text]])  # (1, T)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_tokens_per_second_generates_exactly_new_tokens(tiny):
    tokenizer = ToyTokenizer()
    inputs = tokenizer("to be or not")
    first = tiny.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1].item()
    tiny.generation_config.eos_token_id = first  # greedy decoding would stop after one token...
    lengths = []
    generate = tiny.generate

    def counting_generate(**kwargs):
        out = generate(**kwargs)
        lengths.append(out.shape[1] - inputs["input_ids"].shape[1])
        return out

    tiny.generate = counting_generate
    speed = tokens_per_second(tiny, tokenizer, "to be or not", new_tokens=7, repeats=2)
    assert lengths == [7, 7, 7]  # ...but runs to 7 new tokens: one warm-up and two timed runs
    assert math.isfinite(speed) and speed > 0
    with pytest.raises(ValueError, match="need new_tokens >= 1 and repeats >= 1, got new_tokens=0"):
        tokens_per_second(tiny, tokenizer, "x", new_tokens=0)


# ---------------------------------------------------------------- on SmolLM2


@pytest.mark.model
def test_smollm2_dequantized_merge_round_trip(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    base, tokenizer = smollm2
    model = qlora(base, targets=["q_proj", "v_proj"])
    ids = tokenizer("Shall I compare thee to a summer's day?", return_tensors="pt")["input_ids"]  # (1, T)
    unmerged = logits(model, ids)
    merged = merge_qlora(model, "dequantized")
    merged_logits = logits(merged, ids)
    # 30 layers of float32 rounding in another order (see test_lora: ~1e-5 relative in peft as here)
    assert (merged_logits - unmerged).abs().max() <= 1e-4 * unmerged.abs().max()
    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded, ids), merged_logits)
    assert tokens_per_second(reloaded, tokenizer, "Shall I", new_tokens=4, repeats=1) > 0


# ---------------------------------------------------------------- safe merge


@pytest.mark.parametrize("strategy", ["dequantized", "requantized", "original"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_nan_or_inf_adapter_is_refused_and_the_model_left_as_it_was(tiny, strategy, value):
    model = qlora(tiny)
    bad = "model.layers.1.mlp.down_proj"  # the last LoRA layer: the others would be merged before it
    with torch.no_grad():
        lora_layers(model)[bad].lora_A[0, 0] = value
    before = {n: t.clone() for n, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    original = tiny if strategy == "original" else None
    with pytest.raises(
        ValueError,
        match=rf"merge_qlora: LoRA layer '{bad}': refusing to merge.*lora_A has .* values.*No base weight was changed",
    ):
        merge_qlora(model, strategy, original=original)
    assert dict(model.named_modules()) == modules  # the very same modules, none replaced
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[n], before[n], rtol=0, atol=0, equal_nan=True) for n in before)  # bit for bit
