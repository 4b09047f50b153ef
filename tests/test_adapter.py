"""Adapters in peft's format: lorakit -> peft and peft -> lorakit round trips, clear errors, atomic writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import peft_model, randomize_lora, tiny_llama

from lorakit import add_lora, load_adapter, lora_layers, merge_lora, save_adapter

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture
def trained(tiny):
    """A tiny Llama with LoRA on q_proj and down_proj and a nonzero B."""
    model = add_lora(copy.deepcopy(tiny), ["q_proj", "down_proj"], r=4, alpha=8)
    randomize_lora(model)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lorakit_adapter_loads_in_peft(tiny, trained, tmp_path):
    from peft import PeftModel

    save_adapter(trained, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path)
    assert (logits(theirs) - logits(trained)).abs().max() <= 1e-5
    assert not torch.allclose(logits(theirs), logits(tiny), atol=1e-3)  # the adapter did change the model


def test_peft_adapter_loads_in_lorakit(tiny, tmp_path):
    theirs = peft_model(tiny, ["k_proj", "up_proj"], r=4, alpha=8, init_lora_weights=False, use_rslora=True)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(tiny), tmp_path)
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(ours)} == {"k_proj", "up_proj"}
    assert all(layer.rslora and layer.r == 4 for layer in lora_layers(ours).values())
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5
    assert not torch.allclose(logits(ours), logits(tiny), atol=1e-3)


def test_files_keys_and_config_match_peft(tiny, trained, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    save_adapter(trained, tmp_path / "ours")
    peft_model(tiny, ["q_proj", "down_proj"], r=4, alpha=8).save_pretrained(tmp_path / "peft")
    ours, theirs = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        load_file(tmp_path / "peft/adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)
    config = LoraConfig.from_pretrained(tmp_path / "ours")
    assert (config.r, config.lora_alpha, set(config.target_modules), config.use_rslora) == (
        4,
        8,
        {"q_proj", "down_proj"},
        False,
    )
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_partial_targets_are_saved_as_full_names(tiny, tmp_path):
    from peft import PeftModel

    model = add_lora(copy.deepcopy(tiny), ["layers.1.self_attn.v_proj"], r=2, alpha=4)
    randomize_lora(model)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "model.layers.1.self_attn.v_proj"
    ]
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path)
    assert (logits(theirs) - logits(model)).abs().max() <= 1e-5


def test_load_into_a_model_that_already_has_matching_lora(tiny, trained, tmp_path):
    save_adapter(trained, tmp_path)
    fresh = add_lora(copy.deepcopy(tiny), ["q_proj", "down_proj"], r=4, alpha=8)
    assert torch.equal(logits(load_adapter(fresh, tmp_path)), logits(trained))


@pytest.mark.model
def test_smollm2_round_trips_both_ways(smollm2, tmp_path):
    from peft import PeftModel

    base, _ = smollm2
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    ours = add_lora(copy.deepcopy(base), ["q_proj", "v_proj", "o_proj", "up_proj"], r=8, alpha=16)
    randomize_lora(ours)
    save_adapter(ours, tmp_path / "ours")
    expected = logits(ours, ids)
    del ours
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-5
    with torch.no_grad():  # change the peft adapter, save it with peft, load it with lorakit
        for name, p in theirs.named_parameters():
            if "lora_A" in name:
                p.mul_(-0.5)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs, ids)
    del theirs
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert (logits(ours, ids) - expected).abs().max() <= 1e-5


# ---------------------------------------------------------------- errors


def test_missing_folder_or_file(tiny, trained, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"adapter folder '.*nowhere' has no adapter_config.json; an adapter folder"
    ):
        load_adapter(tiny, tmp_path / "nowhere")
    save_adapter(trained, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=(
            r"has no adapter_model.safetensors; an adapter folder .* "
            r"holds adapter_config.json and adapter_model.safetensors"
        ),
    ):
        load_adapter(tiny, tmp_path)


def test_corrupt_files(tiny, trained, tmp_path):
    save_adapter(trained, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by an interrupted copy
    with pytest.raises(
        ValueError, match=r"adapter_model.safetensors in '.*' is corrupt \(.*\); save the adapter again"
    ):
        load_adapter(copy.deepcopy(tiny), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match=r"adapter_config.json in '.*' is corrupt \(not valid JSON"):
        load_adapter(copy.deepcopy(tiny), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match=r"has peft_type='IA3'; only 'LORA' adapters can be loaded"):
        load_adapter(copy.deepcopy(tiny), tmp_path)


def test_adapter_for_another_model_shape(trained, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    save_adapter(trained, tmp_path)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.self_attn.q_proj.lora_A has shape \(4, 32\), but the model expects \(4, 48\) "
        r"\(lora_A: \(r, d_in\), lora_B: \(d_out, r\) with r=4, d_in=48, "
        r"d_out=48\); was it trained for another model or rank\?",
    ):
        load_adapter(wider, tmp_path)


def test_adapter_with_another_rank_or_targets(tiny, trained, tmp_path):
    save_adapter(trained, tmp_path)
    other_rank = add_lora(copy.deepcopy(tiny), ["q_proj", "down_proj"], r=2, alpha=8)
    with pytest.raises(
        ValueError,
        match=r"has r=4, lora_alpha=8, but the model's LoRA layer 'model.layers.0.self_attn.q_proj' has r=2, alpha=8",
    ):
        load_adapter(other_rank, tmp_path)
    other_targets = add_lora(copy.deepcopy(tiny), ["q_proj", "v_proj"], r=4, alpha=8)
    with pytest.raises(
        ValueError,
        match=(
            r"does not fit LlamaForCausalLM: it targets 2 modules the model "
            r"has no LoRA layer for \(e.g. 'model.layers.0.mlp.down_proj'\); "
            r"it has no weights for 2 LoRA layers of the model \(e.g. 'model.layers.0.self_attn.v_proj'\)"
        ),
    ):
        load_adapter(other_targets, tmp_path)
    shallow = tiny_llama()
    del shallow.model.layers[1]  # a one-layer model: the adapter's layer-1 weights have no home
    with pytest.raises(
        ValueError,
        match=r"it targets 2 modules the model has no LoRA layer for \(e.g. 'model.layers.1.mlp.down_proj'\)",
    ):
        load_adapter(shallow, tmp_path)


def test_unsupported_variants_and_merged_models(tiny, trained, tmp_path):
    save_adapter(trained, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = json.loads(config_path.read_text())
    for key, value in [("lora_bias", True), ("bias", "all"), ("rank_pattern", {"q_proj": 2})]:
        config_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=rf"sets {key}={value!r}; lorakit implements plain LoRA and DoRA only"):
            load_adapter(copy.deepcopy(tiny), tmp_path)
    config_path.write_text(json.dumps({**good, "use_dora": True}))  # DoRA without its magnitude vectors
    with pytest.raises(ValueError, match=r"has no lora_magnitude_vector tensor for 'model.layers.0.self_attn.q_proj'"):
        load_adapter(copy.deepcopy(tiny), tmp_path)
    config_path.write_text(json.dumps({**good, "target_modules": ".*q_proj"}))
    with pytest.raises(ValueError, match=r"gives target_modules as the regex '.\*q_proj'; lorakit reads a list"):
        load_adapter(copy.deepcopy(tiny), tmp_path)
    config_path.write_text(json.dumps(good))
    merged = merge_lora(copy.deepcopy(trained))
    with pytest.raises(
        RuntimeError, match=r"LoRA layer 'model.layers.0.self_attn.q_proj' is merged; call unmerge_lora"
    ):
        load_adapter(merged, tmp_path)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no LoRA layers to save; call add_lora"):
        save_adapter(tiny, tmp_path / "empty")


def test_an_interrupted_save_leaves_no_half_written_adapter(trained, tmp_path, monkeypatch):
    from safetensors import torch as st_torch

    save_adapter(trained, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half an adapter")
        raise KeyboardInterrupt  # as if the learner stopped the kernel mid-write

    monkeypatch.setattr(st_torch, "save_file", crash_halfway)
    with torch.no_grad():
        next(iter(lora_layers(trained).values())).lora_A.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old adapter intact, no temp files
    with pytest.raises(KeyboardInterrupt):
        save_adapter(trained, tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # nothing half-written in a fresh folder


def test_adapter_files_get_the_umask_mode(trained, tmp_path):
    """Written by lorakit._io.atomic_write: 0666 less the umask, as open() would give (mkstemp's 0600 would not)."""
    from lorakit._io import default_file_mode

    save_adapter(trained, tmp_path / "shared")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir()}
    assert modes == {"adapter_config.json": default_file_mode(), "adapter_model.safetensors": default_file_mode()}


def test_save_to_an_existing_file_names_the_path(trained, tmp_path):
    target = tmp_path / "adapter.bin"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match=rf"save_adapter: '{target}' is an existing file, not a folder"):
        save_adapter(trained, target)
    assert target.read_text() == "not a folder"
