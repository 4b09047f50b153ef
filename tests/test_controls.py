"""Notebook 06's controls without a browser: the report of one setting, the runs board, the widget."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from tiny_models import ALL_PROJ, tiny_llama

from lorakit import add_lora, count_parameters, estimate_memory, figure_png, quantization_tradeoff, quantize_model
from lorakit.finetune.report import RunBoard, SettingReport, block_weights, check_setting, setting_report
from lorakit.linear4bit import Linear4bit
from lorakit.widgets.finetune import FinetuneControl, loss_figure, memory_figure


@pytest.mark.parametrize(
    "rank,bits,quant_type", [(1, 2, "int"), (8, 4, "nf"), (16, 4, "fp"), (12, 8, "nf"), (4, 3, "nf")]
)
def test_report_matches_the_lorakit_functions(rank, bits, quant_type):
    model = tiny_llama()
    report = setting_report(model, rank, bits, quant_type, batch_size=2, seq_len=16)
    # trainable parameters: what add_lora really adds on every projection
    lora = add_lora(copy.deepcopy(model), ALL_PROJ, r=rank, alpha=2 * rank)
    assert report.trainable_params == count_parameters(lora).trainable
    # the base: every parameter of the unquantized model
    assert report.base_params == count_parameters(model).total
    # memory: the estimator at this setting, and LoRA for comparison
    expected = estimate_memory(model.config, "qlora", bits=bits, rank=rank, batch_size=2, seq_len=16, dtype="float32")
    assert report.memory.lines() == expected.lines()
    assert (
        report.lora_memory.total
        == estimate_memory(model.config, "lora", rank=rank, batch_size=2, seq_len=16, dtype="float32").total
    )
    # quantization error: measured on the middle block's real weights
    tradeoff = quantization_tradeoff(block_weights(model), quant_type, bits, 64, double_quant=True)
    assert report.quantization == tradeoff
    assert f"rank {rank}" in str(report) and f"{report.trainable_params:,}" in str(report)


def test_more_bits_less_error_and_more_weight_memory():
    model = tiny_llama()
    weights = block_weights(model)
    reports = [setting_report(model, 8, bits, "nf", weights=weights) for bits in (2, 3, 4, 8)]
    errors = [r.quantization.relative_error for r in reports]
    codes = [r.memory.weights[f"{b}-bit codes"] for r, b in zip(reports, (2, 3, 4, 8))]
    assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[-1]
    assert codes == sorted(codes) and codes[-1] == 4 * codes[0]


def test_qlora_weights_estimate_equals_quantize_model_storage():
    """The 4-bit codes line is what quantize_model really stores for the blocks' Linears."""
    model = tiny_llama()
    report = setting_report(model, 8, 3, "int", double_quant=False)
    q = quantize_model(copy.deepcopy(model), quant_type="int", bits=3, double_quant=False)
    packed = sum(m.weight_packed.numel() for m in q.modules() if isinstance(m, Linear4bit))
    assert report.memory.weights["3-bit codes"] == packed


def test_block_weights_is_the_middle_block():
    model = tiny_llama()
    block = model.model.layers[1]
    expected = torch.cat([m.weight.reshape(-1) for m in block.modules() if isinstance(m, torch.nn.Linear)])
    assert torch.equal(block_weights(model), expected)
    with pytest.raises(ValueError, match="no nn.Linear weights"):
        block_weights(quantize_model(copy.deepcopy(model)))


@pytest.mark.parametrize(
    "rank,bits,quant_type,message",
    [
        (0, 4, "nf", "rank=0 is not valid here; choose an integer from 1 to 64"),
        (65, 4, "nf", "rank=65"),
        (8, 5, "nf", r"bits=5 is not valid; choose one of \(2, 3, 4, 8\)"),
        (8, 4, "nf4", r"kind='nf4' is not known; valid kinds are \('nf', 'int', 'fp'\)"),
        (8, 3, "fp", r"kind='fp' is FP4 \(E2M1\) only, so bits must be 4, got bits=3"),
    ],
)
def test_bad_settings_are_refused_clearly(rank, bits, quant_type, message):
    with pytest.raises(ValueError, match=message):
        check_setting(rank, bits, quant_type)


class FakeTrainer:
    """Stands in for lorakit.finetune: records the call, reports made-up metrics, calls on_step."""

    def __init__(self):
        self.calls = []

    def __call__(self, on_step=None, **kwargs):
        self.calls.append(kwargs)
        losses = [3.0, 2.5, 2.25][: kwargs["steps"]]
        for i in range(len(losses)):
            if on_step:
                on_step(SimpleNamespace(losses=losses[: i + 1], step=i + 1))
        metrics = dict(
            steps=len(losses), trainable_params=100 * kwargs["rank"], ppl_before=50.0, ppl_after=50.0 - kwargs["bits"]
        )
        return SimpleNamespace(metrics=metrics, train=SimpleNamespace(losses=losses))


def test_board_passes_the_setting_and_keeps_runs():
    trainer = FakeTrainer()
    board = RunBoard(trainer=trainer, steps=3, seq_len=32)
    run = board.train(16, 3, "int", progress=False)
    expected = dict(method="qlora", rank=16, alpha=32.0, bits=3, kind="int", steps=3, seq_len=32)
    assert {key: trainer.calls[0][key] for key in expected} == expected
    assert (run.rank, run.bits, run.quant_type, run.steps, run.trainable_params) == (16, 3, "int", 3, 1600)
    assert run.ppl_change == pytest.approx(47 / 50 - 1)
    board.train(4, 4, "nf", progress=False)
    table = board.table().splitlines()
    assert len(table) == 4 and "| 1 | r=16 int3 | 3 | 1,600 | 50.00 | 47.00 | -6.0% |" in table[2]
    assert "r=4 nf4" in table[3]
    fig = board.figure()
    assert len(fig.axes[0].patches) == 4  # before and after bars for two runs
    assert board.html().count("<tr>") == 3 and "<td>r=4 nf4</td>" in board.html()
    with pytest.raises(ValueError, match="FP4"):
        board.train(8, 2, "fp")
    assert len(board.runs) == 2


def test_widget_redraws_when_controls_move_and_train_adds_a_run():
    model = tiny_llama()
    trainer = FakeTrainer()
    control = FinetuneControl(model, RunBoard(trainer=trainer, steps=2), batch_size=2, seq_len=16)
    assert isinstance(control.report, SettingReport) and control.report.rank == 8
    first_picture = control.plot.value
    control.controls["rank"].value = 32
    control.controls["bits"].value = 2
    control.controls["quant_type"].value = "int"
    assert control.report == setting_report(model, 32, 2, "int", batch_size=2, seq_len=16)
    assert "rank 32" in control.text.value and f"{control.report.trainable_params:,}" in control.text.value
    assert control.plot.value == figure_png(memory_figure(control.report)) != first_picture
    control.controls["quant_type"].value = "fp"  # FP with 2 bits: a message, not a crash
    assert isinstance(control.report, str) and "FP4 (E2M1) only" in control.text.value
    assert control.button.disabled
    assert control.train() is None and trainer.calls == []  # nothing trains on an invalid setting
    control.controls["bits"].value = 4
    assert not control.button.disabled
    run = control.train()
    assert run.label == "r=32 fp4" and len(control.board.runs) == 1 and trainer.calls[0]["rank"] == 32
    assert control.loss_plot.value == figure_png(loss_figure([3.0, 2.5], 2))  # the live plot's last frame
    assert "r=32 fp4" in control.runs_text.value and control.runs_plot.value == figure_png(control.board.figure())
    assert not control.button.disabled
    bundle = control._repr_mimebundle_()  # the live widget and, for the book, a picture of its state
    assert "application/vnd.jupyter.widget-view+json" in bundle and "image/png" in bundle


@pytest.mark.model
def test_board_runs_a_real_tiny_qlora_finetune():
    from transformers import AutoConfig

    from lorakit.assets import require
    from lorakit.memory import lora_params, model_shape

    board = RunBoard(steps=1, seq_len=16, batch_size=2, train_blocks=4, eval_blocks=2, warmup_steps=1)
    run = board.train(2, 3, "nf", progress=False)
    shape = model_shape(AutoConfig.from_pretrained(require("smollm2-135m-instruct")))
    assert run.steps == 1 and run.trainable_params == lora_params(shape, 2)
    assert run.ppl_before > 1 and run.ppl_after > 1 and len(run.losses) == 1


def test_trainable_params_exercise_checker():
    from lorakit.exercises import check_trainable_params

    config = tiny_llama().config

    def right(c, r):
        kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
        h, i = c.hidden_size, c.intermediate_size
        return c.num_hidden_layers * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))

    def square(c, r):
        h, i = c.hidden_size, c.intermediate_size
        return c.num_hidden_layers * r * (4 * (h + h) + 2 * (h + i) + (i + h))

    assert check_trainable_params(right, config).startswith("correct")
    with pytest.raises(AssertionError, match="num_key_value_heads"):
        check_trainable_params(square, config)
    with pytest.raises(AssertionError, match="expected"):
        check_trainable_params(lambda c, r: 0, config)
