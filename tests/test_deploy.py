"""lorakit.deploy: every route on a tiny Llama built here (ONNX INT4 and FP32, GGUF Q8_0 and Q4_1 read back,
adapters switched per request over one 4-bit base, two ways), the command line's errors, and atomic output.

The tiny model has a byte-level BPE tokenizer trained here (the builder, GGUF and transformers' GGUF reader
all need a real tokenizer), rows of 64 and 128 weights (GGUF blocks are 32 weights) and NF4 blocks of 64.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import ALL_PROJ, tiny_llama

from lorakit import add_lora, generate, lora_layers, quantize_model, save_adapter
from lorakit.deploy import (
    OnnxLM,
    PeftAdapterServer,
    export_onnx,
    export_onnx_adapters,
    gguf_roundtrip,
    load_bnb_4bit,
    merge_adapter,
    onnx_generate,
    read_gguf,
    write_gguf,
)
from lorakit.deploy.cli import main
from lorakit.deploy.gguf import LlamaCppLM, llama_cpp_available, llama_cpp_generate, llama_cpp_tokens_per_second
from lorakit.deploy.merged import BaseSpec
from lorakit.runtime import run_main

TEXT = "to be or not to be that is the question whether tis nobler in the mind to suffer "
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits.float()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (SmolLM2's kind) with 300 tokens, trained on one line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_model(hidden_size=64):
    return tiny_llama(vocab_size=320, hidden_size=hidden_size, intermediate_size=128, bos_token_id=1, eos_token_id=2)


def make_adapter(base, folder, seed, targets=ALL_PROJ, r=4):
    """A QLoRA adapter for ``base`` (NF4 base, random nonzero B) saved in peft's format; returns the folder."""
    model = add_lora(quantize_model(copy.deepcopy(base)), list(targets), r=r, alpha=2 * r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, model, tokenizer, adapters)``: the tiny base saved as a checkpoint, and two adapters."""
    root = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_model(), tiny_tokenizer()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {"a": make_adapter(model, root / "a", seed=1), "b": make_adapter(model, root / "b", seed=2)}
    return root / "base", model, tokenizer, adapters


@pytest.fixture(scope="module")
def merged(tiny):
    """The merged model of adapter "a" saved as a float32 checkpoint: ``(folder, model, tokenizer)``."""
    folder, _, _, adapters = tiny
    model, tokenizer = merge_adapter(adapters["a"], BaseSpec(model=str(folder)))
    out = folder.parent / "merged_a"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


# ---------------------------------------------------------------- the merged model


def test_merge_adapter_reproduces_the_unmerged_qlora_model(tiny):
    folder, base, _, adapters = tiny
    from lorakit import load_adapter

    unmerged = load_adapter(quantize_model(copy.deepcopy(base)), adapters["a"])
    model, _ = merge_adapter(adapters["a"], BaseSpec(model=str(folder)))
    assert not lora_layers(model)
    torch.testing.assert_close(logits(model), logits(unmerged), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- ONNX Runtime GenAI


def test_onnx_fp32_matches_the_merged_model_and_generates_the_same_text(merged, tmp_path):
    folder, model, tokenizer = merged
    lm = OnnxLM(export_onnx(folder, tmp_path / "fp32", "fp32"), threads=1)
    torch.testing.assert_close(logits(lm), logits(model), rtol=0, atol=1e-4)
    ours = onnx_generate(lm, tokenizer, "to be or", max_new_tokens=8, chat=False)
    assert ours == generate(model, tokenizer, "to be or", max_new_tokens=8, chat=False)


def test_onnx_int4_is_matmulnbits_and_close_to_the_merged_model(merged, tmp_path):
    import onnx

    folder, model, _ = merged
    out = export_onnx(folder, tmp_path / "int4", "int4")
    nodes = onnx.load(out / "model.onnx", load_external_data=False).graph.node
    assert "MatMul" not in {node.op_type for node in nodes}  # every projection and the head are quantized
    bits = {n.name: next((a.i for a in n.attribute if a.name == "bits"), None) for n in nodes}
    assert bits["/lm_head/MatMul_Q8"] == 8  # lorakit's default: the head in 8 bits
    assert {b for name, b in bits.items() if "/layers." in name and name.endswith("_Q4")} == {4}
    assert "/model/embed_tokens/Gather_Q4" in bits  # the embedding, no longer shared, 4-bit on its own
    fp32 = OnnxLM(export_onnx(folder, tmp_path / "fp32", "fp32"), threads=1)
    lm = OnnxLM(out, threads=1)
    error = (logits(lm) - logits(model)).abs()
    # quantized: close, not equal (a random tiny model's logits are small, so the relative error is large)
    assert 0 < error.mean() < 0.5 * logits(model).abs().mean()
    assert (logits(lm).argmax(-1) == logits(fp32).argmax(-1)).float().mean() > 0.5
    assert len(lm.generate_ids([5, 6, 7], 5, min_new_tokens=5)) == 5


def test_onnx_int8_choices(merged, tmp_path, caplog):
    import onnx

    folder, model, _ = merged
    ops = {}
    for int8 in ("none", "mixed"):
        path = export_onnx(folder, tmp_path / int8, "int4", int8=int8) / "model.onnx"
        nodes = onnx.load(path, load_external_data=False).graph.node
        ops[int8] = {n.name: next((a.i for a in n.attribute if a.name == "bits"), None) for n in nodes}
    assert ops["none"]["/lm_head/MatMul_Q4"] == 4  # the builder's default: the head 4-bit too
    assert any(name.startswith("/model/layers.") and b == 8 for name, b in ops["mixed"].items())
    assert not [r for r in caplog.records if r.levelno >= 40]  # no error logged (the Gather notice is filtered)
    with pytest.raises(ValueError, match="int8="):
        export_onnx(folder, tmp_path / "x", "int4", int8="all")


def test_onnx_sampling_is_seeded(merged, tmp_path):
    folder, _, tokenizer = merged
    lm = OnnxLM(export_onnx(folder, tmp_path / "fp32", "fp32"), threads=1)
    runs = [onnx_generate(lm, tokenizer, "to be", 12, chat=False, temperature=1.0, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- GGUF


@pytest.mark.parametrize("qtype", ["q8_0", "q4_1"])
def test_gguf_reads_back_as_its_quantization(merged, tmp_path, qtype):
    _, model, tokenizer = merged
    path = write_gguf(model, tokenizer, tmp_path / f"m.{qtype}.gguf", qtype)
    loaded, loaded_tokenizer = read_gguf(path, tokenizer=True)
    expected = gguf_roundtrip(model, qtype)  # the same quantization, in memory
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=0, atol=1e-5)
    assert (logits(loaded) - logits(model)).abs().max() > 0  # really quantized
    assert loaded_tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert loaded_tokenizer.eos_token_id == tokenizer.eos_token_id


def test_gguf_q4_1_loses_more_than_q8_0_and_is_smaller(merged, tmp_path):
    _, model, tokenizer = merged
    errors, sizes = {}, {}
    for qtype in ("q8_0", "q4_1"):
        errors[qtype] = (logits(gguf_roundtrip(model, qtype)) - logits(model)).abs().mean()
        sizes[qtype] = write_gguf(model, tokenizer, tmp_path / f"m.{qtype}.gguf", qtype).stat().st_size
    assert errors["q4_1"] > 3 * errors["q8_0"] > 0
    assert sizes["q4_1"] < sizes["q8_0"]


needs_llama_cpp = pytest.mark.skipif(
    not llama_cpp_available(), reason="llama-cpp-python is not installed (optional: pip install llama-cpp-python)"
)


@needs_llama_cpp
def test_llama_cpp_runs_both_gguf_types_as_transformers_reads_them(merged, tmp_path):
    """llama.cpp loads each file, tokenizes like the transformers tokenizer (the file's tokenizer.ggml.* keys),
    and computes the logits of the read-back weights up to its own 8-bit rounding of the activations."""
    _, model, tokenizer = merged
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :24]  # (1, T)
    q8_error = None
    for qtype in ("q8_0", "q4_1"):
        path = write_gguf(model, tokenizer, tmp_path / f"m.{qtype}.gguf", qtype)
        lm = LlamaCppLM(path, threads=1, n_ctx=256, logits=True)
        assert lm.tokenize(TEXT) == tokenizer(TEXT)["input_ids"]
        read_back = logits(read_gguf(path), ids)
        if q8_error is None:  # Q8_0's own weight rounding, the scale of 8-bit rounding on this model
            q8_error = (read_back - logits(model, ids)).abs().mean()
        ours = lm(input_ids=ids).logits
        lm.close()
        assert ours.shape == read_back.shape
        # llama.cpp rounds the activations to 8 bits per block of 32 (Q8_0 / Q8_1) before each product: an error
        # of the order of Q8_0's (stated tolerance: twice it); a wrong layout (rotary permutation) would be far off
        assert 0 < (ours - read_back).abs().mean() < 2 * q8_error


@needs_llama_cpp
def test_llama_cpp_greedy_generation_and_speed(merged, tmp_path):
    _, model, tokenizer = merged
    path = write_gguf(model, tokenizer, tmp_path / "m.q8_0.gguf", "q8_0")
    lm = LlamaCppLM(path, threads=1, n_ctx=256)
    ids = tokenizer("to be or")["input_ids"]
    new = lm.generate_ids(ids, 6, min_new_tokens=6)
    assert len(new) == 6  # exactly the tokens asked for, as tokens_per_second times them
    expected = read_gguf(path).generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert new == expected[0, len(ids) :].tolist()  # greedy: the most likely token each step, as transformers
    assert isinstance(llama_cpp_generate(lm, tokenizer, "to be or", 4, chat=False), str)
    assert llama_cpp_tokens_per_second(lm, tokenizer, "to be or", new_tokens=4, repeats=1) > 0
    with pytest.raises(ValueError, match="logits=True"):
        lm(input_ids=torch.tensor([ids]))
    with pytest.raises(ValueError, match="context"):
        lm.generate_ids(ids, 300)
    lm.close()


def test_llama_cpp_missing_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr("lorakit.deploy.gguf.llama_cpp_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match="pip install 'llama-cpp-python"):
        LlamaCppLM(tmp_path / "m.gguf")


def test_gguf_refuses_rows_that_are_not_whole_blocks(tmp_path):
    model = tiny_llama(vocab_size=320, hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match="multiple of 32"):
        write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------- adapters over one 4-bit base


def test_onnx_adapters_switched_equal_single_adapter_exports(tiny, tmp_path):
    folder, _, _, adapters = tiny
    files = export_onnx_adapters(folder, adapters, tmp_path / "served", "int4")
    server = OnnxLM(tmp_path / "served", threads=1, adapters=files)
    plain = OnnxLM(export_onnx(folder, tmp_path / "plain", "int4"), threads=1)
    torch.testing.assert_close(logits(server), logits(plain), rtol=0, atol=1e-5)  # no adapter: the base
    outputs = {}
    for name, adapter in adapters.items():
        alone = OnnxLM(export_onnx(folder, tmp_path / f"alone_{name}", "int4", adapter=adapter), threads=1)
        outputs[name] = logits(server, adapter=name)
        torch.testing.assert_close(outputs[name], logits(alone), rtol=0, atol=1e-5)
        ids = server.generate_ids([5, 6, 7], 6, adapter=name)
        assert ids == alone.generate_ids([5, 6, 7], 6)
    assert (outputs["a"] - outputs["b"]).abs().max() > 0.1
    with pytest.raises(ValueError, match="not loaded"):
        server(input_ids=IDS, adapter="c")


def test_onnx_adapter_for_other_layers_is_refused(tiny, tmp_path):
    folder, base, _, adapters = tiny
    other = make_adapter(base, tmp_path / "q_only", seed=3, targets=["q_proj"])
    with pytest.raises(ValueError, match="same layers"):
        export_onnx_adapters(folder, {"a": adapters["a"], "q": other}, tmp_path / "served", "int4")


def test_peft_adapters_switched_equal_single_adapter_models(tiny):
    from peft import PeftModel

    folder, _, _, adapters = tiny
    server = PeftAdapterServer(load_bnb_4bit(str(folder))[0], adapters)
    outputs = {}
    for name in ("a", "b", "a"):  # switch back and forth
        outputs[name] = server.logits(IDS, adapter=name).float()
        alone = PeftModel.from_pretrained(load_bnb_4bit(str(folder))[0], str(adapters[name])).eval()
        torch.testing.assert_close(outputs[name], logits(alone), rtol=0, atol=0)
    assert (outputs["a"] - outputs["b"]).abs().max() > 0.1


# ---------------------------------------------------------------- the command line


def cli(*argv):
    return run_main(main, list(map(str, argv)))


@pytest.mark.parametrize("target", ["merged", "onnx-int4", "onnx-fp32", "gguf-q8_0", "gguf-q4_1"])
def test_cli_produces_and_verifies_each_target(tiny, tmp_path, target, capsys):
    folder, _, _, adapters = tiny
    out = tmp_path / "out"
    assert cli("--adapter", adapters["a"], "--to", target, "--out", out, "--base", folder) == 0
    manifest = json.loads((out / "deploy.json").read_text())
    check = manifest["verification"]
    assert manifest["target"] == target and manifest["bytes"] > 0
    if target in ("merged", "onnx-fp32"):
        assert check["max_logit_error_vs_merged"] < 1e-3 and check["top1_agreement_with_merged"] == 1
    if target.startswith("gguf"):
        assert check["max_logit_error_vs_same_quantization_in_memory"] < 1e-3
        assert len(list(out.glob("*.gguf"))) == 1
    if target.startswith("onnx"):
        assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def refuse(capsys, *argv, match):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a refused call starts merging."""

    def fail(*a, **k):
        raise AssertionError("the command started work before refusing")

    monkeypatch.setattr("lorakit.deploy.merged.merge_adapter", fail)


def test_cli_refuses_before_any_work(tiny, tmp_path, capsys, no_work):
    folder, model, _, adapters = tiny
    a = adapters["a"]
    refuse(capsys, "--adapter", a, "--to", "tflite", "--out", tmp_path / "o", "--base", folder, match="'tflite'")
    refuse(capsys, "--adapter", tmp_path / "none", "--to", "merged", "--out", tmp_path / "o", match="not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse(capsys, "--adapter", empty, "--to", "merged", "--out", tmp_path / "o", match="adapter_config.json")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text("{not json")
    (corrupt / "adapter_model.safetensors").write_bytes((Path(a) / "adapter_model.safetensors").read_bytes())
    refuse(capsys, "--adapter", corrupt, "--to", "merged", "--out", tmp_path / "o", match="corrupt")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "adapter_config.json").write_text((Path(a) / "adapter_config.json").read_text())
    (torn / "adapter_model.safetensors").write_bytes((Path(a) / "adapter_model.safetensors").read_bytes()[:100])
    refuse(capsys, "--adapter", torn, "--to", "merged", "--out", tmp_path / "o", match="corrupt")
    wider = make_adapter(tiny_model(hidden_size=96), tmp_path / "wider", seed=4)
    refuse(capsys, "--adapter", wider, "--to", "gguf-q8_0", "--out", tmp_path / "o", "--base", folder, match="shape")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    config = json.loads((Path(a) / "adapter_config.json").read_text())
    (gpt2 / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    (gpt2 / "adapter_model.safetensors").write_bytes((Path(a) / "adapter_model.safetensors").read_bytes())
    refuse(capsys, "--adapter", gpt2, "--to", "merged", "--out", tmp_path / "o", "--base", folder, match="c_attn")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    refuse(capsys, "--adapter", a, "--to", "merged", "--out", full, "--base", folder, match="--overwrite")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "o").exists()


def test_cli_overwrite_replaces_the_folder(tiny, tmp_path):
    folder, _, _, adapters = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert cli("--adapter", adapters["a"], "--to", "gguf-q8_0", "--out", out, "--base", folder, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.q8_0.gguf").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_interrupted_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch, overwrite):
    folder, _, _, adapters = tiny
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "old.txt").write_text("old")

    def half_written(model, tokenizer, path, qtype, name=""):
        Path(path).write_bytes(b"GGUF" + b"\0" * 100)  # part of a file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.deploy.gguf.write_gguf", half_written)
    argv = ["--adapter", adapters["a"], "--to", "gguf-q4_1", "--out", out, "--base", folder]
    with pytest.raises(KeyboardInterrupt):
        cli(*argv, *(["--overwrite"] if overwrite else []))
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if overwrite else [])
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["old.txt"]  # the previous output, untouched


# ---------------------------------------------------------------- SmolLM2


def test_smollm2_q4_1_gguf_is_the_file_it_came_from(smollm2, tmp_path):
    """The offline SmolLM2 was dequantized from a Q4_1 GGUF file: written back as Q4_1 (embeddings Q8_0, as
    that file has them) it loads with exactly its logits, which checks every tensor's layout and the
    rotary permutation on the real model."""
    model, tokenizer = smollm2
    ids = tokenizer("ROMEO: But soft, what light through yonder window breaks?", return_tensors="pt")["input_ids"]
    loaded = read_gguf(write_gguf(model, tokenizer, tmp_path / "smollm2.q4_1.gguf", "q4_1"))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=1e-4)


# ---------------------------------------------------------------- notebook 08's exercises


def test_quantize_q8_0_is_gguf_bit_for_bit():
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from lorakit.deploy.gguf import dequantize_q8_0, quantize_q8_0

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0))
    w[1, :32] = 0  # a zero block
    w[2, 0], w[2, 1] = 127.0, 2.5  # d = 1: 2.5 rounds away from zero, to 3
    codes, scales = quantize_q8_0(w)
    raw = quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0).reshape(6, 3, 34)  # (rows, blocks, 2 + 32 bytes)
    assert np.array_equal(raw[..., :2].copy().view(np.float16)[..., 0], scales.numpy())
    assert np.array_equal(raw[..., 2:].copy().view(np.int8).reshape(6, 96), codes.numpy())
    assert codes[2, 1] == 3
    back = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize_q8_0(codes, scales).numpy(), back)


def fold_right(codes, absmax, codebook, A, B, alpha, r, blocksize=64):
    d_out, d_in = B.shape[0], A.shape[1]
    w0 = codebook[codes] * absmax.repeat_interleave(blocksize)[: len(codes)]
    return w0.view(d_out, d_in) + (alpha / r) * (B @ A)


def fold_no_scaling(codes, absmax, codebook, A, B, alpha, r, blocksize=64):
    w0 = codebook[codes] * absmax.repeat_interleave(blocksize)[: len(codes)]
    return w0.view(B.shape[0], A.shape[1]) + B @ A


def fold_tiled_constants(codes, absmax, codebook, A, B, alpha, r, blocksize=64):
    w0 = codebook[codes] * absmax.repeat(blocksize)[: len(codes)]  # tiles a0 a1 a2 a0 ..., not a0 a0 ... a1 a1 ...
    return w0.view(B.shape[0], A.shape[1]) + (alpha / r) * (B @ A)


def fold_codes_as_values(codes, absmax, codebook, A, B, alpha, r, blocksize=64):
    w0 = codes.float() * absmax.repeat_interleave(blocksize)[: len(codes)]  # the index, not codebook[index]
    return w0.view(B.shape[0], A.shape[1]) + (alpha / r) * (B @ A)


def test_check_fold_into_dequantized_accepts_the_right_answer_and_rejects_wrong_ones():
    from lorakit.exercises import check_fold_into_dequantized

    assert "correct" in check_fold_into_dequantized(fold_right)
    with pytest.raises(AssertionError, match=r"case \(8, 64\).*scaling alpha / r"):
        check_fold_into_dequantized(fold_no_scaling)
    with pytest.raises(AssertionError, match=r"case \(8, 64\).*absmax\[i // blocksize\]"):
        check_fold_into_dequantized(fold_tiled_constants)
    with pytest.raises(AssertionError, match=r"case \(8, 64\)"):
        check_fold_into_dequantized(fold_codes_as_values)


def q8_right(w):
    from lorakit.deploy.gguf import quantize_q8_0

    return quantize_q8_0(w)


def q8_round_half_even(w):
    blocks = w.reshape(w.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.round(blocks / torch.where(d == 0, torch.ones_like(d), d))
    return codes.to(torch.int8).reshape(w.shape), d.squeeze(-1).half()


def q8_float32_scales(w):
    codes, scales = q8_right(w)
    return codes, scales.float()


def q8_divide_by_zero(w):
    blocks = w.reshape(w.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    scaled = blocks / d  # 0 / 0 = nan in an all-zero block
    codes = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return torch.nan_to_num(codes, nan=-128).to(torch.int8).reshape(w.shape), d.squeeze(-1).half()


def q8_one_scale_per_row(w):
    d = w.abs().amax(-1, keepdim=True) / 127
    codes = torch.sign(w / d) * torch.floor((w / d).abs() + 0.5)
    return codes.to(torch.int8), d.half()


def test_check_quantize_q8_0_accepts_the_right_answer_and_rejects_wrong_ones():
    from lorakit.exercises import check_quantize_q8_0

    assert "8.5 bits" in check_quantize_q8_0(q8_right)
    with pytest.raises(AssertionError, match=r"case \(1, 32\) with values halfway.*half away from zero"):
        check_quantize_q8_0(q8_round_half_even)
    with pytest.raises(AssertionError, match=r"case \(4, 64\).*float16"):
        check_quantize_q8_0(q8_float32_scales)
    with pytest.raises(AssertionError, match=r"case \(2, 32\) with an all-zero row.*codes differ"):
        check_quantize_q8_0(q8_divide_by_zero)
    with pytest.raises(AssertionError, match=r"case \(4, 64\).*one scale per block"):
        check_quantize_q8_0(q8_one_scale_per_row)


def test_check_prints_not_solved_for_a_stub(capsys):
    from lorakit.exercises import check, check_fold_into_dequantized, check_quantize_q8_0

    def stub(*args):
        raise NotImplementedError()

    check(check_fold_into_dequantized, stub)
    check(check_quantize_q8_0, stub)
    assert capsys.readouterr().out.count("not solved yet") == 2
