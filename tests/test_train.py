"""The training loop: schedule, deterministic batches, accumulation, checkpoint, resume (with every
optimizer), interrupts, divergence, and the settings it refuses rather than ignores."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit.train
from lorakit.train import CHECKPOINT, OPTIMIZERS, TrainConfig, batch_for, train, warmup_cosine

sys.path.insert(0, str(Path(__file__).parent))
from train_script import CONFIG, UNSTOPPED, tiny_blocks, tiny_llama  # noqa: E402

SCRIPT = Path(__file__).parent / "train_script.py"


def test_warmup_then_cosine():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # non-increasing after warmup


def test_batches_depend_only_on_seed_and_step_and_cover_each_epoch():
    blocks = torch.arange(40).view(10, 4)
    config = TrainConfig(batch_size=2, grad_accum=1, seed=3)
    epoch = torch.cat([batch_for(blocks, s, 0, config) for s in range(5)])
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 40, 4))  # every block once per epoch
    assert torch.equal(batch_for(blocks, 2, 0, config), batch_for(blocks, 2, 0, config))
    assert not torch.equal(batch_for(blocks, 5, 0, config), batch_for(blocks, 0, 0, config))  # a new shuffle


def test_training_lowers_loss_and_held_out_perplexity():
    model = tiny_llama()
    config = TrainConfig(steps=30, lr=1e-2, batch_size=4, warmup_steps=3, progress=False)
    result = train(model, tiny_blocks(), tiny_blocks(8), config)
    assert result.step == 30 and len(result.losses) == 30 and not result.interrupted
    assert result.losses[-1] < 0.5 * result.losses[0]
    (s0, before), (s1, after) = result.evals
    assert (s0, s1) == (0, 30) and after < 0.5 * before


def test_gradient_accumulation_matches_one_big_batch():
    blocks = tiny_blocks()
    one = tiny_llama(dropout=0.0)
    two = copy.deepcopy(one)
    # SGD, so the update is lr * gradient and compares the gradients themselves
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)  # noqa: E731
    common = dict(steps=1, warmup_steps=1, max_grad_norm=None, progress=False)  # lr: the optimizer's own
    train(one, blocks, config=TrainConfig(batch_size=4, grad_accum=1, **common), optimizer=sgd(one))
    train(two, blocks, config=TrainConfig(batch_size=2, grad_accum=2, **common), optimizer=sgd(two))
    for (name, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_killed_run_resumes_to_the_same_losses(tmp_path, optimizer):
    killed = tmp_path / "killed"
    # the same run, never stopped
    whole = train(tiny_llama(), tiny_blocks(), tiny_blocks(8), dataclasses.replace(UNSTOPPED, optimizer=optimizer))
    # a killed process cannot remove its page file (paged optimizers): keep it in pytest's folder, not in /tmp
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    crashed = subprocess.run([sys.executable, str(SCRIPT), str(killed), "--kill-at", "5", "--optimizer", optimizer],
                             env=env)
    assert crashed.returncode == -9  # SIGKILL: no cleanup ran
    state = torch.load(killed / CHECKPOINT, weights_only=False)
    assert state["step"] == 4  # the last checkpoint before the kill (every 2 steps)
    assert not list(killed.glob(".*.tmp"))
    subprocess.run([sys.executable, str(SCRIPT), str(killed), "--optimizer", optimizer], check=True, env=env)
    resumed = json.loads((killed / "losses.json").read_text())
    assert resumed["resumed_at"] == 4
    assert len(resumed["losses"]) == CONFIG.steps
    assert resumed["losses"] == whole.losses  # bit for bit on the CPU
    assert [tuple(e) for e in resumed["evals"]] == whole.evals


def test_keyboard_interrupt_keeps_the_last_step_and_resumes(tmp_path):
    expected = train(tiny_llama(), tiny_blocks(), tiny_blocks(8), UNSTOPPED)

    def stop(result):
        if result.step == 3:
            raise KeyboardInterrupt

    model = tiny_llama()
    partial = train(model, tiny_blocks(), tiny_blocks(8), CONFIG, checkpoint_dir=tmp_path, on_step=stop)
    assert partial.interrupted and partial.step == 3 and len(partial.losses) == 3
    assert partial.evals == expected.evals[:1]  # no evaluation after an interrupt: no made-up "after" figure
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 3
    resumed = train(tiny_llama(seed=99), tiny_blocks(), tiny_blocks(8), CONFIG, checkpoint_dir=tmp_path)
    assert resumed.losses == expected.losses
    assert resumed.evals == expected.evals
    # this process ran 7 of the 10 steps: its seconds per step are its own time over those 7
    assert (resumed.resumed_at, resumed.steps_run) == (3, 7)
    assert resumed.seconds_per_step == resumed.seconds / 7


def test_a_checkpoint_of_other_settings_is_refused_naming_them(tmp_path):
    train(tiny_llama(), tiny_blocks(), tiny_blocks(8), dataclasses.replace(CONFIG, steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"other settings \(steps 2 -> 10, lr 0.003 -> 0.01\)"):
        train(tiny_llama(), tiny_blocks(), tiny_blocks(8), dataclasses.replace(CONFIG, lr=1e-2),
              checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data \[24, 16\] -> \[20, 16\]"):
        train(tiny_llama(), tiny_blocks(20), tiny_blocks(8), dataclasses.replace(CONFIG, steps=2),
              checkpoint_dir=tmp_path)


def test_settings_it_would_ignore_are_refused():
    model = tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="checkpoint_every=2 needs a checkpoint_dir"):
        train(model, tiny_blocks(), config=TrainConfig(checkpoint_every=2))
    with pytest.raises(ValueError, match=r"TrainConfig lr=0.001 would be ignored"):
        train(model, tiny_blocks(), config=TrainConfig(lr=1e-3), optimizer=sgd)
    with pytest.raises(ValueError, match=r"weight_decay=0.1, optimizer='adamw8bit' would be ignored"):
        train(model, tiny_blocks(), config=TrainConfig(weight_decay=0.1, optimizer="adamw8bit"), optimizer=sgd)
    with pytest.raises(ValueError, match="optimizer='adam' is not valid"):
        train(model, tiny_blocks(), optimizer="adam")


def test_a_diverging_run_stops_before_the_bad_update_and_keeps_the_last_checkpoint(tmp_path):
    config = TrainConfig(steps=6, lr=1e30, warmup_steps=1, batch_size=4, checkpoint_every=1, max_grad_norm=None,
                         progress=False)
    result = train(tiny_llama(), tiny_blocks(), tiny_blocks(8), config, checkpoint_dir=tmp_path)
    assert result.diverged is not None and not result.interrupted
    assert result.diverged["step"] == result.step + 1 <= config.steps  # the step that was not taken
    assert "learning rate" in result.diverged["reason"]
    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert checkpoint["step"] == result.diverged["last_good_step"]
    assert all(torch.isfinite(t).all() for t in checkpoint["trainable"].values())
    assert len(result.evals) == 1  # the "before" figure only: nothing evaluated after a divergence
    assert all(math.isfinite(x) for x in result.losses)


def test_a_loss_that_is_not_finite_before_any_update_names_the_inputs():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = float("nan")
    result = train(model, torch.zeros(8, 16, dtype=torch.long), config=TrainConfig(steps=3, progress=False))
    assert result.step == 0 and result.diverged["step"] == 1
    assert "before any update" in result.diverged["reason"]


class _Bar:
    """Stands in for tqdm: records what the progress bar would show."""

    shown: list[dict] = []

    def __init__(self, *args, **kwargs):
        pass

    def set_postfix(self, postfix):
        _Bar.shown.append(dict(postfix))

    def update(self, n):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("eval_every, with_ppl", [(0, []), (2, [2, 4])])
def test_the_progress_bar_shows_a_perplexity_only_at_the_step_it_was_measured(monkeypatch, eval_every, with_ppl):
    _Bar.shown = []
    monkeypatch.setattr(lorakit.train, "tqdm", _Bar)
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, eval_every=eval_every, progress=False)
    train(tiny_llama(), tiny_blocks(), tiny_blocks(8), config)
    assert all("loss" in shown for shown in _Bar.shown) and len(_Bar.shown) == 4
    assert [step for step, shown in enumerate(_Bar.shown, 1) if "ppl" in shown] == with_ppl


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    config = TrainConfig(steps=4, checkpoint_every=2, progress=False)

    def stop(result):
        if result.step == 2:
            raise KeyboardInterrupt

    train(tiny_llama(), tiny_blocks(), config=config, checkpoint_dir=tmp_path, on_step=stop)
    before = (tmp_path / CHECKPOINT).read_bytes()
    real_save = torch.save

    def broken_save(obj, path):
        real_save({"half": torch.zeros(3)}, path)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_llama(), tiny_blocks(), config=config, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_gradient_checkpointing_gives_the_same_losses():
    config = TrainConfig(steps=3, batch_size=4, progress=False)
    plain = train(tiny_llama(), tiny_blocks(), config=config)
    recomputed = train(tiny_llama(), tiny_blocks(), config=TrainConfig(**{**config.__dict__, "gradient_checkpointing": True}))
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_bad_settings_fail_before_training():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        train(model, tiny_blocks(4), config=TrainConfig(batch_size=8))
    with pytest.raises(ValueError, match="TrainConfig.steps must be at least 1, got 0"):
        train(model, tiny_blocks(), config=TrainConfig(steps=0))
    for lr in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="TrainConfig.lr must be a finite positive number"):
            train(model, tiny_blocks(), config=TrainConfig(lr=lr))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, tiny_blocks(), config=TrainConfig())
