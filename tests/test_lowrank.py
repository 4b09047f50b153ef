"""Low-rank helpers, the GPT-3 arithmetic, the minimal training loop and the timing helpers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_llama
from torch import nn

from lorakit import add_lora, count_parameters
from lorakit.lowrank import (
    Gpt3LoRA,
    full_finetune_delta,
    lora_param_count,
    low_rank_approx,
    order_of_magnitude,
    rank_r_error,
    rank_report,
    singular_values,
)
from lorakit.timing import interleaved_latency, median_time
from lorakit.train import eval_loss, train_step, train_steps


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 20), n=st.integers(2, 20), rank=st.integers(1, 6), seed=st.integers(0, 999))
def test_rank_r_error_is_the_error_of_the_best_rank_r_approximation(m, n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, n, generator=g, dtype=torch.float64)
    s = singular_values(M)
    assert torch.allclose(s, torch.linalg.svdvals(M)) and torch.all(s[:-1] >= s[1:])
    for r in range(1, min(m, n) + 1):
        explicit = torch.linalg.matrix_norm(M - low_rank_approx(M, r)) / torch.linalg.matrix_norm(M)
        assert math.isclose(rank_r_error(s, r), explicit.item(), rel_tol=1e-6, abs_tol=1e-9)
        assert torch.linalg.matrix_rank(low_rank_approx(M, r)) == r
    # a matrix of rank `rank` is reproduced exactly from that rank on
    k = min(rank, m, n)
    L = torch.randn(m, k, generator=g, dtype=torch.float64) @ torch.randn(k, n, generator=g, dtype=torch.float64)
    assert rank_r_error(singular_values(L), k) < 1e-6


def test_rank_report_numbers():
    s = torch.tensor([3.0, 4.0, 0.0])  # ||M||^2 = 25
    report = rank_report(s, d_in=3, d_out=5, r=1)
    assert (report.r, report.lora_params, report.full_params) == (1, 8, 15)
    assert math.isclose(report.rel_error, 4 / 5)
    assert str(report) == "r = 1: 8 trainable parameters (53.33% of 15); rank-1 error of dW: 80.0%"
    with pytest.raises(ValueError, match=r"2 singular values do not belong to a \(5, 3\) matrix; expected 3"):
        rank_report(s[:2], d_in=3, d_out=5, r=1)
    with pytest.raises(ValueError, match=r"rank r=0 is invalid for a \(3, 3\) matrix; use 1 <= r <= 3"):
        rank_r_error(s, 0)
    with pytest.raises(ValueError, match="the matrix is zero"):
        rank_r_error(torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r"expected a 2-D matrix, got shape \(3,\)"):
        singular_values(s)


def test_lora_param_count_equals_add_lora():
    model = add_lora(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10)), ["0", "2"], r=3)
    assert count_parameters(model).trainable == lora_param_count(40, 24, 3) + lora_param_count(24, 10, 3)


def test_gpt3_arithmetic_matches_the_papers_figures():
    gpt3 = Gpt3LoRA()
    assert abs(gpt3.total_params - 175e9) / 175e9 < 0.01  # "175B" from the architecture
    assert gpt3.lora_params == 96 * 2 * 4 * (12288 + 12288) == 18_874_368
    assert order_of_magnitude(gpt3.reduction) == 4  # "10,000 times" (LoRA abstract)
    assert Gpt3LoRA(r=1).lora_params == 4_718_592  # Table 4: "LoRA 4.7M" on W_q, W_v
    full, lora = gpt3.training_bytes(lora=False), gpt3.training_bytes(lora=True)
    assert abs(lora - 350e9) / 350e9 < 0.01  # §4.2: "350GB", the frozen fp16 weights
    assert 3 <= full / lora <= 4.5  # "3 times" measured (1.2TB -> 350GB); 4x by this byte count


def test_full_finetune_delta_trains_one_weight_and_restores_the_model():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    batch = {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    dW, losses = full_finetune_delta(model, "model.layers.0.self_attn.q_proj", [batch], steps=3, lr=1e-2)
    assert dW.shape == (32, 32) and dW.abs().max() > 0
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn' is a LlamaAttention, not an nn.Linear"):
        full_finetune_delta(model, "model.layers.0.self_attn", [batch], steps=1)


# ---------------------------------------------------------------- the training step


def test_train_step_is_one_sgd_step():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1))
    ref_loss = reference(**batch).loss
    ref_loss.backward()
    assert loss == ref_loss.item()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q.detach().add(q.grad, alpha=-0.1)), name  # SGD: p <- p - lr * grad
        assert torch.equal(p.grad, q.grad), name  # this step's gradient is kept until the next step starts


def test_train_step_clears_the_old_gradients_first():
    """Two steps are two SGD steps, not one step on the sum of two gradients (zero_grad before backward)."""
    model, reference = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step(model, batch, optimizer)
    train_step(model, batch, optimizer)
    for _ in range(2):
        reference.zero_grad(set_to_none=True)
        reference(**batch).loss.backward()
        with torch.no_grad():
            for q in reference.parameters():
                q.add_(q.grad, alpha=-0.1)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_train_steps_cycles_batches_and_lowers_the_loss():
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    val = eval_loss(model, ids)
    losses = train_steps(model, [batch], torch.optim.AdamW(model.parameters(), lr=1e-2), steps=5)
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert eval_loss(model, ids) < val
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        train_steps(model, [batch], torch.optim.SGD(model.parameters(), lr=0.1), steps=0)
    with pytest.raises(ValueError, match="batches is empty"):
        train_steps(model, [], torch.optim.SGD(model.parameters(), lr=0.1), steps=1)


def test_median_time_calls_warmup_plus_repeats():
    calls = []
    t = median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and t >= 0
    with pytest.raises(ValueError, match="median_time needs repeats >= 1"):
        median_time(lambda: None, repeats=0)


def test_interleaved_latency_times_every_function_in_every_round():
    calls = {"a": 0, "b": 0}

    def count(name):
        def call():
            calls[name] += 1

        return call

    result = interleaved_latency({"a": count("a"), "b": count("b")}, rounds=3, repeats=2)
    assert calls == {"a": 1 + 3 * 2, "b": 1 + 3 * 2}  # one warm-up call, then rounds * repeats
    assert set(result) == {"a", "b"} and all(r["seconds"] >= 0 and r["spread"] >= 0 for r in result.values())
    with pytest.raises(ValueError, match="rounds >= 1"):
        interleaved_latency({"a": count("a")}, rounds=0, repeats=1)


def test_first_step_update_alpha_over_r_shrinks_rslora_does_not():
    """rsLoRA's argument, measured: after one Adam step ||(alpha/r) B A|| falls like 1/sqrt(r)."""
    from lorakit.lowrank import first_step_update

    plain = {r: first_step_update(128, r, alpha=16) for r in (4, 16)}
    rs = {r: first_step_update(128, r, alpha=16, rslora=True) for r in (4, 16)}
    assert plain[16] / plain[4] == pytest.approx(0.5, rel=0.2)  # 1 / sqrt(16 / 4)
    assert rs[16] / rs[4] == pytest.approx(1.0, rel=0.2)
