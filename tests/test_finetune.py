"""finetune: every setting checked before anything is loaded or written, output folders never clobbered,
the memory asked before training, divergence kept honest, a tiny QLoRA run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lorakit.finetune import (
    METRICS_FILE,
    RUN_FILE,
    FinetuneConfig,
    RunComplete,
    WontFit,
    build_model,
    check_memory,
    finetune,
    fit,
    model_config,
    parameter_count,
    prepare_output,
    settings_of,
    validate,
)
from lorakit.finetune.__main__ import main
from lorakit.finetune.pipeline import _settings_with_aliases
from lorakit.runtime import run_main

TINY = dict(steps=2, seq_len=32, batch_size=2, train_blocks=8, eval_blocks=2, warmup_steps=1, progress=False)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "prefix"}, "method='prefix' is not valid; choose one of 'full', 'lora', 'qlora'"),
        ({"rank": 0}, "rank=0 is not valid"),
        ({"rank": -3}, "rank=-3 is not valid"),
        ({"rank": 100000}, "rank=100000 is not valid; use an integer from 1 to 512"),
        ({"bits": 1}, "bits=1 is not valid"),
        ({"alpha": 0.0}, "alpha=0.0 is not valid"),
        ({"batch_size": 0}, "batch_size=0 is not valid"),
        ({"grad_accum": 0}, "grad_accum=0 is not valid"),
        ({"eval_blocks": 0}, "eval_blocks=0 is not valid"),
        ({"blocksize": 0}, "blocksize=0 is not a power of two"),
        ({"backend": "hf", "bits": 3}, "offers NF4 and FP4 only, not nf3"),
        ({"alpha": -1.0}, "alpha=-1.0 is not valid"),
        ({"bits": 5}, "bits=5 is not valid; choose one of 2, 3, 4, 8"),
        ({"kind": "nf5"}, "kind='nf5' is not valid; choose one of 'nf', 'int', 'fp'"),
        ({"kind": "fp", "bits": 8}, "FP4 \\(E2M1\\) has 4 bits"),
        ({"backend": "hf", "kind": "int"}, "backend='hf' \\(bitsandbytes\\) offers NF4 and FP4 only, not int4"),
        ({"backend": "jax"}, "backend='jax' is not valid"),
        ({"steps": 0}, "steps=0 is not valid"),
        ({"corpus": "wiki"}, "corpus='wiki' is not valid"),
        # newcomer.md part B1: each was late, a traceback, or silently wrong
        ({"lr": float("inf")}, "lr=inf is not valid; use a finite positive learning rate"),
        ({"lr": float("nan")}, "lr=nan is not valid"),
        ({"lr": -1.0}, "lr=-1.0 is not valid"),
        ({"blocksize": 63}, "blocksize=63 is not a power of two"),
        ({"train_blocks": -5}, "train_blocks=-5 is not valid; it must be an integer of at least 1"),
        ({"train_blocks": 0}, "train_blocks=0 is not valid; it must be an integer of at least 1"),
        ({"seq_len": 1}, "seq_len=1 is not valid"),
        ({"optimizer": "adam"}, "optimizer='adam' is not valid"),
        ({"targets": ("qproj",)}, "targets=\\['qproj'\\] is not valid"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(settings, message):
    with pytest.raises(ValueError, match=message):
        validate(FinetuneConfig(**settings))


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"rank": 300},
            "rank=300 is not valid for smollm2-135m-instruct: LoRA on k_proj needs r <= "
            "min\\(d_in, d_out\\) = min\\(576, 192\\) = 192",
        ),
        ({"rank": 193, "targets": ("v_proj",)}, "rank=193 is not valid .* v_proj .* = 192"),
        ({"seq_len": 9000}, "seq_len=9000 is not valid for smollm2-135m-instruct: it has 8192 positions"),
        ({"seq_len": 100000}, "seq_len=100000 is not valid .* at most 8192"),
    ],
)
def test_settings_against_the_models_shapes_read_from_its_config_json(settings, message):
    with pytest.raises(ValueError, match=message):
        validate(FinetuneConfig(**settings))
    validate(FinetuneConfig(**{**settings, "rank": 192, "seq_len": 8192}))  # the limits themselves are fine


def test_devices_that_are_not_here_are_refused_listing_those_that_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not available on this machine; available here: cpu"):
        validate(FinetuneConfig(), device="cuda")
    with pytest.raises(ValueError, match="device='tpu' is not a device torch knows; available here: cpu"):
        validate(FinetuneConfig(), device="tpu")
    validate(FinetuneConfig(), device="cpu")


def test_output_paths_that_cannot_be_a_run_folder_are_refused(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    for out, message in [
        (afile, "is not a folder"),
        ("/dev/null", "is not a folder"),
        (afile / "sub", "is a file, not a folder"),
        ("/proc/lorakit-no-such", "cannot be created"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate(FinetuneConfig(), out=out)
    assert afile.read_text() == "mine"
    assert not list(tmp_path.glob(".lorakit-probe-*"))  # the writability probe leaves nothing


def test_a_missing_asset_is_an_error_before_anything_is_written(tmp_path, monkeypatch):
    from lorakit.assets import AssetError

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AssetError, match="Fetch it with"):
        finetune(method="lora", out=tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()


def test_a_corpus_too_small_for_one_batch_is_refused_before_training():
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        finetune(method="lora", batch_size=8, train_blocks=4, steps=1, eval_blocks=1, seq_len=32, progress=False)


def _plant(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_output_folder_rules(tmp_path):
    settings = settings_of(FinetuneConfig(method="lora", steps=3))
    run = prepare_output(tmp_path / "run", settings)
    assert json.loads((run / RUN_FILE).read_text())["method"] == "lora"
    _plant(run, {"checkpoint/checkpoint.pt": "step 1"})
    prepare_output(run, settings)  # the same run again: kept, to resume
    assert (run / "checkpoint/checkpoint.pt").read_text() == "step 1"
    other = settings_of(FinetuneConfig(method="lora", steps=4))
    with pytest.raises(FileExistsError, match="holds a different run \\(steps 3 -> 4\\).*--overwrite"):
        prepare_output(run, other)
    assert (run / "checkpoint/checkpoint.pt").exists()  # nothing was touched
    prepare_output(run, other, overwrite=True)  # a lorakit run: replaced
    assert not (run / "checkpoint").exists()
    assert json.loads((run / RUN_FILE).read_text())["steps"] == 4
    # a run that never trained a step (refused after run.json was written) has nothing to lose
    prepare_output(run, settings)
    assert json.loads((run / RUN_FILE).read_text())["steps"] == 3


@pytest.mark.parametrize(
    "planted",
    [
        {"thesis.txt": "mine", "sub/data.csv": "1,2"},  # next to a run
        {"checkpoint/notes.md": "mine"},  # inside the run's own folders
        {"adapter/my_adapter.bin": "mine"},
        {"run.json": "not json"},  # no readable run.json: nothing here is known to be lorakit's
    ],
)
def test_overwrite_never_deletes_a_learners_files(tmp_path, planted):
    settings = settings_of(FinetuneConfig(method="lora", steps=3))
    run = prepare_output(tmp_path / "run", settings)
    _plant(run, {"checkpoint/checkpoint.pt": "step 1", "metrics.json": "{}", **planted})
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = settings_of(FinetuneConfig(method="lora", steps=4))
    for overwrite in (False, True):  # the planted files are refused before the run's own are considered
        with pytest.raises(FileExistsError, match="not a lorakit run's .*never deletes them, with or without"):
            prepare_output(run, other, overwrite=overwrite)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_adapter_folder_without_run_json_is_not_a_run_to_replace(tmp_path):
    _plant(tmp_path, {"adapter/adapter_config.json": "{}", "adapter/adapter_model.safetensors": "weights"})
    with pytest.raises(FileExistsError, match="not a lorakit run's \\(adapter\\)"):
        prepare_output(tmp_path, settings_of(FinetuneConfig()), overwrite=True)
    assert (tmp_path / "adapter/adapter_model.safetensors").read_text() == "weights"


def test_a_finished_run_says_it_is_complete_instead_of_training_again(tmp_path):
    settings = settings_of(FinetuneConfig(method="lora", steps=3))
    run = prepare_output(tmp_path / "run", settings)
    metrics = {"steps": 3, "ppl_before": 90.96, "ppl_after": 75.62}
    (run / METRICS_FILE).write_text(json.dumps(metrics))
    with pytest.raises(RunComplete, match="already complete.*90.96 -> 75.62 \\(-16.9%\\)") as done:
        prepare_output(run, settings)
    assert done.value.metrics == metrics
    prepare_output(run, settings, overwrite=True)
    assert not (run / METRICS_FILE).exists()


def _small_memory(monkeypatch, free: int) -> None:
    monkeypatch.setattr(fit, "available_memory", lambda device: (free, "a test's limit"))


def test_a_run_that_will_not_fit_is_refused_with_its_breakdown_and_a_setting_that_fits(monkeypatch):
    config = FinetuneConfig(seq_len=2048, batch_size=8)
    model_cfg = model_config(config.model)
    need = fit.estimate(config, model_cfg, torch.float32)[1]
    _small_memory(monkeypatch, need // 2)
    with pytest.raises(WontFit) as refused:
        check_memory(config, model_cfg, torch.device("cpu"), torch.float32)
    message = str(refused.value)
    assert f"needs about {need / 1e9:.2f} GB" in message and "a test's limit" in message
    assert "activations" in message and "optimizer_state" in message  # the breakdown
    assert "--gradient-checkpointing" in message and "--force" in message
    # the suggested setting does fit
    fix, fix_need = fit.suggest(config, model_cfg, torch.float32, need // 2)
    assert fix_need <= need // 2
    assert fit.estimate(dataclasses.replace(config, **fix), model_cfg, torch.float32)[1] < need
    _small_memory(monkeypatch, 100 * need)
    assert "GB free (a test's limit)" in check_memory(config, model_cfg, torch.device("cpu"), torch.float32)


def test_finetune_asks_about_memory_before_writing_and_force_skips_the_question(monkeypatch, tmp_path):
    _small_memory(monkeypatch, 10**6)
    with pytest.raises(WontFit):
        finetune(method="lora", out=tmp_path / "run", **TINY)
    assert not (tmp_path / "run").exists()


def test_the_estimate_of_the_newcomers_out_of_memory_case():
    """newcomer.md B1: --seq-len 9000 --batch-size 1 ran out of memory under a 12 GB cap after 6 minutes."""
    config = FinetuneConfig(seq_len=9000, batch_size=1, eval_blocks=1)
    step, need = fit.estimate(config, model_config(config.model), torch.float32)
    assert need + fit.MARGIN > 12e9  # refused on that machine's 12 GB before any work


def test_the_old_name_quant_type_still_sets_kind():
    assert _settings_with_aliases({"quant_type": "fp"}) == {"kind": "fp"}
    assert _settings_with_aliases({"quant_type": "nf4"}) == {"kind": "nf", "bits": 4}
    with pytest.raises(ValueError, match="pass kind=... only"):
        _settings_with_aliases({"quant_type": "nf", "kind": "fp"})
    assert FinetuneConfig(kind="fp", bits=4).quant_type == "fp4"


def test_parameter_counts_include_the_4bit_weights():
    from tiny_models import tiny_llama

    from lorakit.linear4bit import quantize_model
    from lorakit.lora import add_lora
    from lorakit.models import count_parameters

    model = tiny_llama()
    plain = count_parameters(model).total
    quantize_model(model, skip=("lm_head",))
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    counted = parameter_count(model)
    assert counted.total == plain + counted.trainable  # every base weight counted once, plus the adapters
    assert count_parameters(model).total < counted.total  # the packed codes are buffers, not parameters


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert run_main(main, ["--method", "qlora", "--bits", "7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bits=7 is not valid" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before the folder was made
    with pytest.raises(ValueError, match="bits=7"):
        run_main(main, ["--bits", "7", "--out", str(tmp_path / "x"), "--debug"])


@pytest.mark.model
def test_a_diverging_finetune_keeps_its_last_checkpoint_and_saves_no_adapter(tmp_path, capsys):
    args = [
        "--method",
        "lora",
        "--lr",
        "1e30",
        "--steps",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "1",
        "--train-blocks",
        "2",
        "--eval-blocks",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert run_main(main, args) == 1
    assert "diverged at step" in capsys.readouterr().err
    metrics = json.loads((tmp_path / METRICS_FILE).read_text())
    assert metrics["diverged"]["step"] >= 1 and "learning rate" in metrics["diverged"]["reason"]
    assert metrics["ppl_after"] is None
    assert not (tmp_path / "adapter").exists()
    if metrics["diverged"]["last_good_step"]:
        assert (tmp_path / "checkpoint" / "checkpoint.pt").exists()
    assert run_main(main, args) == 0  # the same command again: it reports, it does not train
    assert "diverged at step" in capsys.readouterr().out


@pytest.mark.model
def test_an_interrupted_finetune_reports_no_after_figure_and_resumes(tmp_path):
    def stop(result):
        if result.step == 1:
            raise KeyboardInterrupt

    settings = dict(TINY, steps=4, method="lora")
    partial = finetune(out=tmp_path, on_step=stop, **settings)
    assert partial.metrics["interrupted"] and partial.metrics["ppl_after"] is None  # no evaluation ran
    assert partial.metrics["ppl_before"] is not None and not (tmp_path / METRICS_FILE).exists()
    resumed = finetune(out=tmp_path, **settings)
    m = resumed.metrics
    assert (m["steps"], m["steps_this_process"]) == (4, 3) and m["ppl_after"] is not None
    assert m["seconds_per_step"] == pytest.approx(m["seconds"] / 3, rel=1e-2)


@pytest.mark.model
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
    for key in ("ppl_before", "ppl_after", "steps", "seconds", "peak_rss_mb", "memory_check"):
        assert metrics[key] is not None
    assert metrics["steps"] == metrics["steps_this_process"] == 2 and metrics["settings"]["method"] == "qlora"
    assert metrics["total_params"] - metrics["trainable_params"] == metrics["base_params"] > 130e6  # 134.5 M
    assert not (tmp_path / "checkpoint").exists()  # removed once the run completed
    # the saved adapter, loaded onto a freshly built QLoRA model, gives the same logits
    fresh = build_model(FinetuneConfig(method="qlora"), "cpu", getattr(torch, metrics["dtype"]))[0]  # the run's dtype
    load_adapter(fresh, tmp_path / "adapter")
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=1e-5)
    with pytest.raises(RunComplete):  # the same run again: complete, not trained again
        finetune(method="qlora", out=tmp_path, **TINY)


def test_free_memory_on_a_gpu_is_what_cuda_reports_free(monkeypatch):
    monkeypatch.delenv("LORAKIT_FREE_MEMORY", raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (5 * 10**9, 8 * 10**9))
    assert fit.available_memory(torch.device("cuda:0")) == (5 * 10**9, "free memory of cuda:0")


def test_pick_device_refuses_a_device_that_is_not_here(monkeypatch):
    from lorakit.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LORAKIT_DEVICE", "cuda")
    with pytest.raises(ValueError, match="device='cuda' is not available on this machine"):
        pick_device()
    assert pick_device("cpu") == torch.device("cpu")


# --- finetune(data=...): instruction tuning on the learner's file (lorakit.chat) ---


def tiny_chat_model_folder(folder):
    """A tiny Llama and a tiny ChatML tokenizer saved as a checkpoint folder (what --model accepts)."""
    from chat_tokenizers import tiny_chat_tokenizer
    from tiny_models import tiny_llama

    tokenizer = tiny_chat_tokenizer("chatml")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=128)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chat_file(path, n=12, bad_line=None):
    lines = [
        json.dumps(
            {"messages": [{"role": "user", "content": f"Psalm {i}?"}, {"role": "assistant", "content": "Psalms"}]}
        )
        if i % 2
        else json.dumps({"prompt": f"Genesis {i}?", "completion": "Genesis"})
        for i in range(n)
    ]
    if bad_line is not None:
        lines[bad_line - 1] = '{"prompt": "oops"}'
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_on_a_data_file_writes_adapter_and_metrics(tmp_path):
    folder = tiny_chat_model_folder(tmp_path / "model")
    data = chat_file(tmp_path / "mine.jsonl")
    out = tmp_path / "run"
    result = finetune(
        method="qlora", model=str(folder), data=str(data), out=out, steps=4, batch_size=2, seq_len=64,
        test_fraction=0.25, warmup_steps=1, lr=1e-2, progress=False,
    )  # fmt: skip
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["examples"] == {"train": 9, "test": 3, "too_long_dropped": 0, "max_len": 64}
    assert metrics["steps"] == 4 and metrics["settings"]["data"] == str(data)
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"]
    for key in ("accuracy_before", "accuracy_after"):
        low, high = metrics[f"{key}_ci"]
        assert 0 <= low <= metrics[key] <= high <= 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(RunComplete, match="held-out loss per answer token"):
        finetune(
            method="qlora", model=str(folder), data=str(data), out=out, steps=4, batch_size=2, seq_len=64,
            test_fraction=0.25, warmup_steps=1, lr=1e-2, progress=False,
        )  # fmt: skip


def test_a_malformed_line_is_refused_with_its_number_before_anything_is_loaded(tmp_path, monkeypatch):
    from lorakit.chat import DataError
    from lorakit.finetune import pipeline

    monkeypatch.setattr(pipeline, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    data = chat_file(tmp_path / "mine.jsonl", bad_line=7)
    with pytest.raises(DataError, match="mine.jsonl:7: missing key 'completion'"):
        finetune(method="qlora", data=str(data), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="test_fraction=1.5 is not valid"):
        finetune(data=str(data), test_fraction=1.5)
