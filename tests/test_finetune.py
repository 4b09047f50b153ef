"""finetune: settings checked before anything runs, output folders never clobbered, a tiny QLoRA run."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.finetune import METRICS_FILE, RUN_FILE, FinetuneConfig, build_model, finetune, prepare_output, validate
from lorakit.finetune.__main__ import main

TINY = dict(steps=2, seq_len=32, batch_size=2, train_blocks=8, eval_blocks=2, warmup_steps=1, progress=False)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "prefix"}, "method='prefix' is not valid; choose one of 'full', 'lora', 'qlora'"),
        ({"rank": 0}, "rank=0 is not valid"),
        ({"alpha": -1.0}, "alpha=-1.0 is not valid"),
        ({"bits": 5}, "bits=5 is not valid; choose one of 2, 3, 4, 8"),
        ({"quant_type": "nf5"}, "quant_type='nf5' is not valid; choose one of 'nf', 'int', 'fp'"),
        ({"quant_type": "fp", "bits": 8}, "FP4 \\(E2M1\\) has 4 bits"),
        ({"backend": "hf", "quant_type": "int"}, "backend='hf' \\(bitsandbytes\\) offers NF4 and FP4 only"),
        ({"backend": "jax"}, "backend='jax' is not valid"),
        ({"steps": 0}, "steps=0 is not valid"),
        ({"corpus": "wiki"}, "corpus='wiki' is not valid"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(settings, message):
    with pytest.raises(ValueError, match=message):
        validate(FinetuneConfig(**settings))


def test_a_corpus_too_small_for_one_batch_is_refused_before_training():
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        finetune(method="lora", batch_size=8, train_blocks=4, steps=1, eval_blocks=1, seq_len=32, progress=False)


def test_output_folder_rules(tmp_path):
    config = FinetuneConfig(method="lora", steps=3)
    run = prepare_output(tmp_path / "run", config)
    assert json.loads((run / RUN_FILE).read_text())["method"] == "lora"
    (run / "keep.txt").write_text("earlier work")
    prepare_output(run, config)  # the same run again: kept, to resume
    assert (run / "keep.txt").read_text() == "earlier work"
    with pytest.raises(FileExistsError, match="holds a different run.*--overwrite"):
        prepare_output(run, FinetuneConfig(method="lora", steps=4))
    assert (run / "keep.txt").exists()  # nothing was touched
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="not a lorakit run"):
        prepare_output(other, config)
    prepare_output(run, FinetuneConfig(method="lora", steps=4), overwrite=True)
    assert not (run / "keep.txt").exists()
    assert json.loads((run / RUN_FILE).read_text())["steps"] == 4


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["--method", "qlora", "--bits", "7", "--out", str(tmp_path / "x")]) == 2
    assert "bits=7 is not valid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before the folder was made


def test_tiny_qlora_run_writes_adapter_and_metrics(tmp_path):
    from lorakit.adapter import load_adapter
    from lorakit.linear4bit import Linear4bit
    from lorakit.lora import lora_layers

    result = finetune(method="qlora", out=tmp_path, **TINY)
    model = result.model
    layers = lora_layers(model)
    assert layers and all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{ab}" for name in layers for ab in ("lora_A", "lora_B")
    }
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    for key in ("ppl_before", "ppl_after", "steps", "seconds", "peak_rss_mb"):
        assert key in metrics
    assert metrics["steps"] == 2 and metrics["settings"]["method"] == "qlora"
    assert not (tmp_path / "checkpoint").exists()  # removed once the run completed
    # the saved adapter, loaded onto a freshly built QLoRA model, gives the same logits
    fresh = build_model(FinetuneConfig(method="qlora"))[0]
    load_adapter(fresh, tmp_path / "adapter")
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=1e-5)
