"""PagedOptimizer: bit-identical to the optimizer it wraps for any budget; pages and files accounted."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys

import pytest
import torch

from lorakit.paged import PagedOptimizer


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 200), torch.nn.GELU(), torch.nn.Linear(200, 7), torch.nn.LayerNorm(7)
    )


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 48, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


PAGE = 4096


@pytest.mark.parametrize("budget_pages", [1, 2, 5, 1000])
@pytest.mark.parametrize("steps", [1, 4])
def test_adamw_bit_identical_for_any_budget(tmp_path, budget_pages, steps):
    ref, paged = make_model(), make_model()
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), weight_decay=0.1)
    opt_ref = torch.optim.AdamW(ref.parameters(), **hyper)
    opt = PagedOptimizer(
        torch.optim.AdamW(paged.parameters(), **hyper),
        budget_bytes=budget_pages * PAGE,
        page_bytes=PAGE,
        page_dir=str(tmp_path),
    )
    train(ref, opt_ref, steps)
    train(paged, opt, steps)
    for a, b in zip(ref.parameters(), paged.parameters()):
        assert torch.equal(a, b)
        state = opt.state_of(b)
        assert torch.equal(opt_ref.state[a]["exp_avg"], state["exp_avg"])
        assert torch.equal(opt_ref.state[a]["exp_avg_sq"], state["exp_avg_sq"])
        assert torch.equal(opt_ref.state[a]["step"], state["step"])
    assert opt.peak_resident_bytes <= budget_pages * PAGE
    if budget_pages < len(opt._page_layout):  # every step must page everything in again
        assert opt.bytes_in == steps * len(opt._page_layout) * PAGE and opt.bytes_out > 0
    else:  # everything stays resident after the first step
        assert opt.bytes_in == len(opt._page_layout) * PAGE and opt.bytes_out == 0
    opt.close()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.1),
        lambda ps: torch.optim.AdamW(
            [{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 1e-3, "weight_decay": 0}]
        ),
    ],
)
def test_other_optimizers_and_param_groups_bit_identical(tmp_path, make_opt):
    ref, paged = make_model(), make_model()
    opt_ref = make_opt(list(ref.parameters()))
    opt = PagedOptimizer(
        make_opt(list(paged.parameters())), budget_bytes=2 * PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    train(ref, opt_ref, 3)
    train(paged, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), paged.parameters()))
    opt.close()


def test_parameters_without_grad_are_skipped_like_torch(tmp_path):
    ref, paged = make_model(), make_model()
    for m in (ref, paged):
        m[0].bias.requires_grad_(False)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = PagedOptimizer(
        torch.optim.AdamW(paged.parameters(), lr=1e-2), budget_bytes=PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    train(ref, opt_ref, 2)
    train(paged, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), paged.parameters()))
    assert opt.state_of(paged[0].bias) == {}


def test_a_page_dir_that_is_not_a_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="page_dir=.*missing.* is not a folder"):
        PagedOptimizer(
            torch.optim.AdamW(make_model().parameters()),
            budget_bytes=PAGE,
            page_bytes=PAGE,
            page_dir=str(tmp_path / "missing"),
        )


def test_budget_smaller_than_one_page_is_an_error():
    with pytest.raises(ValueError, match=r"budget_bytes=4,095 is smaller than one page \(4,096 bytes\)"):
        PagedOptimizer(torch.optim.AdamW(make_model().parameters()), budget_bytes=PAGE - 1, page_bytes=PAGE)


def test_unsupported_optimizer_and_started_optimizer_are_errors():
    params = list(make_model().parameters())
    with pytest.raises(TypeError, match="LBFGS is not supported"):
        PagedOptimizer(torch.optim.LBFGS(params), budget_bytes=PAGE, page_bytes=PAGE)
    opt = torch.optim.AdamW(params)
    params[0].grad = torch.zeros_like(params[0])
    opt.step()
    with pytest.raises(ValueError, match="before its first step"):
        PagedOptimizer(opt, budget_bytes=PAGE, page_bytes=PAGE)


def mapped_page_files() -> list[tuple[str, int]]:
    """The page files this process has mapped, with their mapped sizes (Linux's /proc/self/maps)."""
    spans = []
    for line in open("/proc/self/maps"):
        if "lorakit-pages-" in line:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            spans.append((line.split(None, 5)[5].strip(), hi - lo))
    return spans


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_page_file_lives_on_disk_unlinked_at_once_and_is_unmapped_on_close(tmp_path):
    model = make_model()
    opt = PagedOptimizer(
        torch.optim.AdamW(model.parameters()), budget_bytes=PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    assert os.path.dirname(opt.path) == str(tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as it is mapped
    [(name, size)] = mapped_page_files()  # the pages are still a file on disk, reachable through the mapping
    assert name == f"{opt.path} (deleted)" and size >= opt.state_bytes()
    train(model, opt, 1)
    opt.close()
    opt.close()  # idempotent
    del opt
    gc.collect()
    assert mapped_page_files() == [] and list(tmp_path.iterdir()) == []


def test_a_killed_process_leaves_no_page_file(tmp_path):
    """SIGKILL runs no cleanup at all: only a file that is already unlinked leaves nothing behind."""
    script = f"""
import os, signal, sys, torch
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from lorakit.paged import PagedOptimizer
model = torch.nn.Linear(48, 200)
opt = PagedOptimizer(torch.optim.AdamW(model.parameters()), 4096, page_bytes=4096, page_dir={str(tmp_path)!r})
model(torch.randn(4, 48)).sum().backward()
opt.step()
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "posix", reason="on POSIX the file is unlinked when mapped (test above)")
def test_page_file_is_removed_on_garbage_collection(tmp_path):
    model = make_model()
    opt = PagedOptimizer(
        torch.optim.AdamW(model.parameters()), budget_bytes=PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    train(model, opt, 1)
    assert len(list(tmp_path.iterdir())) == 1
    del opt
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_step_leaves_no_page_file(tmp_path):
    model = make_model()
    opt = PagedOptimizer(
        torch.optim.AdamW(model.parameters()), budget_bytes=PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    train(model, opt, 1)
    groups = [list(g["params"]) for g in opt.param_groups]
    real_step, calls = opt.optimizer.step, []

    def failing_step(*args, **kwargs):  # the third window runs out of memory, say
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated out of memory")
        return real_step(*args, **kwargs)

    opt.optimizer.step = failing_step
    model(torch.randn(2, 48)).sum().backward()
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        opt.step()
    assert [list(g["params"]) for g in opt.param_groups] == groups  # the wrapped optimizer is restored
    assert opt.closed and list(tmp_path.iterdir()) == []


def test_ledger_reports_paged_state(tmp_path):
    from lorakit.memory import memory_ledger

    model = make_model()
    opt = PagedOptimizer(
        torch.optim.AdamW(model.parameters()), budget_bytes=PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    ledger = memory_ledger(model, {"x": torch.randn(4, 48)}, opt, loss_fn=lambda m, b: m(b["x"]).sum())
    n = sum(p.numel() for p in model.parameters())
    assert ledger.optimizer_state == opt.state_bytes() >= 8 * n
    opt.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' PagedAdamW)")
def test_matches_bitsandbytes_paged_adamw_on_gpu():
    """On a GPU: pinned-memory pages, bit-identical to torch's AdamW, close to bitsandbytes' PagedAdamW
    (bitsandbytes' fused kernel rounds differently from torch's, so a tolerance there)."""
    import bitsandbytes as bnb

    models = [make_model().cuda() for _ in range(3)]
    ref = torch.optim.AdamW(models[0].parameters(), lr=1e-2)
    opt = PagedOptimizer(torch.optim.AdamW(models[1].parameters(), lr=1e-2), budget_bytes=PAGE, page_bytes=PAGE)
    bnb_opt = bnb.optim.PagedAdamW(models[2].parameters(), lr=1e-2)
    assert opt._slow.is_pinned()
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 48, device="cuda", generator=g)
        for m, o in zip(models, (ref, opt, bnb_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b, c in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    opt.close()


def test_resident_peak_counts_only_resident_pages(tmp_path):
    from lorakit.memory import memory_ledger, resident_peak

    model, ref = make_model(), make_model()
    opt = PagedOptimizer(
        torch.optim.AdamW(model.parameters()), budget_bytes=2 * PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    ref_opt = torch.optim.AdamW(ref.parameters())
    batch, loss = {"x": torch.randn(4, 48)}, (lambda m, b: m(b["x"]).sum())
    paged, plain = memory_ledger(model, batch, opt, loss_fn=loss), memory_ledger(ref, batch, ref_opt, loss_fn=loss)
    base = plain.weight_bytes + plain.gradients + plain.activations
    assert resident_peak(plain, ref_opt) == base + plain.optimizer_state
    assert resident_peak(paged, opt) == base + 2 * PAGE < resident_peak(plain, ref_opt)
    opt.close()


def test_it_is_an_optimizer_that_lr_schedulers_drive(tmp_path):
    ref, paged = make_model(), make_model()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    opt = PagedOptimizer(
        torch.optim.AdamW(paged.parameters(), lr=3e-2), budget_bytes=2 * PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    assert isinstance(opt, torch.optim.Optimizer)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in (opt_ref, opt)]
    for _ in range(3):
        train(ref, opt_ref, 1)
        train(paged, opt, 1)
        for schedule in schedules:
            schedule.step()
    assert opt.optimizer.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"] == pytest.approx(3e-2 / 4)
    for a, b in zip(ref.parameters(), paged.parameters()):
        assert torch.equal(a, b)  # the scheduled learning rates reached the wrapped optimizer
    opt.close()


def test_state_dict_is_the_wrapped_optimizers_and_loads_back(tmp_path):
    hyper = dict(lr=3e-2, weight_decay=0.1)
    ref, paged = make_model(), make_model()
    opt_ref = torch.optim.AdamW(ref.parameters(), **hyper)
    opt = PagedOptimizer(
        torch.optim.AdamW(paged.parameters(), **hyper), budget_bytes=2 * PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    train(ref, opt_ref, 3)
    train(paged, opt, 3)
    saved, expected = opt.state_dict(), opt_ref.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    assert saved["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        for name, value in state.items():
            assert torch.equal(saved["state"][i][name], value), (i, name)
    # a fresh paged optimizer, loaded from the plain one's state, continues exactly as the plain one does
    resumed = make_model()
    resumed.load_state_dict(ref.state_dict())
    opt_resumed = PagedOptimizer(
        torch.optim.AdamW(resumed.parameters(), **hyper), budget_bytes=3 * PAGE, page_bytes=PAGE, page_dir=str(tmp_path)
    )
    opt_resumed.load_state_dict(expected)
    train(ref, opt_ref, 2, seed=5)
    train(resumed, opt_resumed, 2, seed=5)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="parameter groups do not match"):
        opt_resumed.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
    with pytest.raises(TypeError, match="give every parameter group to the wrapped optimizer"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    opt.close()
    opt_resumed.close()


@pytest.mark.parametrize("budget_pages", [1, 3])
def test_adamw8bit_paged_is_bit_identical_and_checkpoints_in_its_own_format(tmp_path, budget_pages):
    """Paged 8-bit AdamW (bitsandbytes' PagedAdamW8bit): segments hold whole blocks of 256, and a segment of
    a large parameter keeps 8-bit codes even when it is smaller than min_8bit_size, as the whole would."""
    from lorakit.adam8bit import AdamW8bit

    ref, paged = make_model(), make_model()
    opt_ref = AdamW8bit(ref.parameters(), lr=3e-2, weight_decay=0.1)
    opt = PagedOptimizer(
        AdamW8bit(paged.parameters(), lr=3e-2, weight_decay=0.1),
        budget_bytes=budget_pages * PAGE,
        page_bytes=PAGE,
        page_dir=str(tmp_path),
    )
    segments = {id(p): [s for s in opt._segments if s.param is p] for p in paged.parameters()}
    big = next(p for p in paged.parameters() if p.numel() >= opt_ref.min_8bit_size)
    assert len(segments[id(big)]) > 1 and all(s.start % 256 == 0 for s in segments[id(big)])
    train(ref, opt_ref, 3)
    train(paged, opt, 3)
    for a, b in zip(ref.parameters(), paged.parameters()):
        assert torch.equal(a, b)
    saved, expected = opt.state_dict(), opt_ref.state_dict()
    assert saved["state"][0]["m"].dtype == torch.uint8  # the 9,600-element weight: 8-bit codes
    for i, state in expected["state"].items():
        assert saved["state"][i].keys() == state.keys()
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(saved["state"][i][name]), torch.as_tensor(value)), (i, name)
    resumed = make_model()
    resumed.load_state_dict(ref.state_dict())
    opt_resumed = PagedOptimizer(
        AdamW8bit(resumed.parameters(), lr=3e-2, weight_decay=0.1),
        budget_bytes=budget_pages * PAGE,
        page_bytes=PAGE,
        page_dir=str(tmp_path),
    )
    opt_resumed.load_state_dict(expected)
    train(ref, opt_ref, 2, seed=5)
    train(resumed, opt_resumed, 2, seed=5)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    opt.close()
    opt_resumed.close()
