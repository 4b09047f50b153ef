"""The "Build it" checkers of notebooks 01 and 02 (lorakit.exercises): each accepts the right answer and
rejects plausible wrong ones with a message that names the failing case; `check` reports a stub as
"not solved yet". Checkers of later notebooks are tested beside their own modules' tests."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.exercises import (
    NOT_SOLVED,
    check,
    check_find_targets,
    check_lora_forward,
    check_lora_layer,
    check_lora_param_count,
    check_merged_weight,
    check_wrap_and_freeze,
)
from lorakit.lora import LoRALinear


# ------------------------------------------------------------------ check: the checker cells' runner
def test_check_reports_a_stub_as_not_solved_and_raises_on_a_wrong_answer(capsys):
    def stub(d_in, d_out, r):
        raise NotImplementedError()

    check(check_lora_param_count, stub)
    assert capsys.readouterr().out.startswith(f"{NOT_SOLVED}: stub")
    check(check_lora_param_count, lambda d_in, d_out, r: r * (d_in + d_out))
    assert capsys.readouterr().out.startswith("correct")
    with pytest.raises(AssertionError, match="case d_in=64, d_out=32, r=4"):
        check(check_lora_param_count, lambda d_in, d_out, r: d_in * r)


def test_check_leaves_the_notebooks_random_stream_alone(capsys):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check(check_lora_layer, LoRALinear)  # draws random weights and dropout masks
    assert torch.equal(torch.rand(3), expected) and capsys.readouterr().out.startswith("correct")


def test_an_error_in_the_learners_code_names_the_case():
    with pytest.raises(AssertionError, match=r"case x: \(3, 16\).*: your code raised RuntimeError: mat1 and mat2"):
        check_lora_forward(lambda x, W0, A, B, alpha, r: x @ W0.T + (alpha / r) * (x @ A @ B))  # A, B not transposed


# ------------------------------------------------------------------ 01: the parameter count
def test_param_count_checker():
    assert check_lora_param_count(lambda d_in, d_out, r: r * (d_in + d_out)).startswith("correct")
    wrong = {
        "full weight": (lambda d_in, d_out, r: d_in * d_out, "you counted the full weight W0"),
        "A alone": (lambda d_in, d_out, r: r * d_in, r"expected 384, got 256. Hint: you counted only one of A"),
    }
    for fn, message in wrong.values():
        with pytest.raises(AssertionError, match=f"case d_in=64, d_out=32, r=4: .*{message}"):
            check_lora_param_count(fn)
    with pytest.raises(AssertionError, match="case d_in=64, d_out=32, r=4: expected 384, got 8192. .*add up, not mult"):
        check_lora_param_count(lambda d_in, d_out, r: r * d_in * d_out)
    with pytest.raises(AssertionError, match="case d_in=16, d_out=16, r=1: expected 32, got 33"):
        check_lora_param_count(lambda d_in, d_out, r: r * (d_in + d_out) + (1 if d_in == d_out else 0))


# ------------------------------------------------------------------ 01: the forward as a formula
def test_forward_checker():
    right = lambda x, W0, A, B, alpha, r: x @ W0.T + (alpha / r) * (x @ A.T @ B.T)  # noqa: E731
    assert check_lora_forward(right).startswith("correct")
    case = r"case x: \(3, 16\), W0: \(16, 16\), r=1, alpha=3"
    with pytest.raises(AssertionError, match=f"{case}: the LoRA path is missing its scaling"):
        check_lora_forward(lambda x, W0, A, B, alpha, r: x @ W0.T + x @ A.T @ B.T)
    with pytest.raises(AssertionError, match=f"{case}: your h equals the base output"):
        check_lora_forward(lambda x, W0, A, B, alpha, r: x @ W0.T)
    with pytest.raises(AssertionError, match=r"case x: \(3, 64\), W0: \(32, 64\), r=4, alpha=9: h differs from Lo"):
        check_lora_forward(lambda x, W0, A, B, alpha, r: x @ W0.T + alpha * (x @ A.T @ B.T))  # r=1 hides this one
    with pytest.raises(AssertionError, match=rf"{case}: expected h: \(3, 16\), got \(16, 3\)"):
        check_lora_forward(lambda x, W0, A, B, alpha, r: (x @ W0.T + (alpha / r) * (x @ A.T @ B.T)).T)


# ------------------------------------------------------------------ 01: the LoRA layer's forward
class _Layer(nn.Module):
    """The exercise's class: this __init__ is given to the learner; subclasses write forward."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Parameter(torch.randn(r, base_layer.in_features) / r)  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r))  # (d_out, r)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)


def layer_with(forward):
    return type("MyLoRALinear", (_Layer,), {"forward": forward})


def right_forward(self, x):
    return self.base_layer(x) + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T)


LAYER_WRONG = {
    "A and B swapped": (
        lambda self, x: self.base_layer(x) + self.scaling * (self.dropout(x) @ self.lora_B @ self.lora_A),
        r"case d_in=16, d_out=16, r=2, .*h differs from LoRALinear's",
    ),
    "alpha / r missing": (
        lambda self, x: self.base_layer(x) + self.dropout(x) @ self.lora_A.T @ self.lora_B.T,
        "case d_in=16, d_out=16, r=2, .*missing its scaling",
    ),
    "dropout on the base path": (
        lambda self, x: (lambda d: self.base_layer(d) + self.scaling * (d @ self.lora_A.T @ self.lora_B.T))(
            self.dropout(x)
        ),
        r"case d_in=48, .*dropout=0.5, .*train mode: dropout is applied to the base path too",
    ),
    "no dropout": (
        lambda self, x: self.base_layer(x) + self.scaling * (x @ self.lora_A.T @ self.lora_B.T),
        r"case d_in=48, .*dropout=0.5, .*train mode: dropout is missing on the LoRA path",
    ),
    "dropout in eval mode too": (
        lambda self, x: (
            self.base_layer(x) + self.scaling * (F.dropout(x, self.dropout.p) @ self.lora_A.T @ self.lora_B.T)
        ),
        r"case d_in=32, .*dropout=0.3, .*eval mode: .*is dropout still on\?",
    ),
    "bias left out": (
        lambda self, x: x @ self.base_layer.weight.T + self.scaling * (self.dropout(x) @ self.lora_A.T @ self.lora_B.T),
        r"case d_in=32, d_out=24, r=4, alpha=16, bias=True, dropout=0.0, x: \(2, 5, 32\), train mode: h differs",
    ),
    "a detached LoRA path": (
        lambda self, x: (
            self.base_layer(x) + self.scaling * (self.dropout(x) @ self.lora_A.detach().T @ self.lora_B.detach().T)
        ),
        "case d_in=16, .*no gradient reaches lora_A or lora_B",
    ),
}


def test_layer_checker_accepts_the_right_forward():
    assert check_lora_layer(layer_with(right_forward)).startswith("correct")
    assert check_lora_layer(LoRALinear).startswith("correct")  # lorakit's own layer, of course


@pytest.mark.parametrize("mistake", LAYER_WRONG, ids=lambda k: k.replace(" ", "-"))
def test_layer_checker_rejects(mistake):
    forward, message = LAYER_WRONG[mistake]
    with pytest.raises(AssertionError, match=message):
        check_lora_layer(layer_with(forward))


def test_layer_checker_reports_a_stub_as_not_solved(capsys):
    def forward(self, x):
        raise NotImplementedError()

    check(check_lora_layer, layer_with(forward))
    assert capsys.readouterr().out.startswith(f"{NOT_SOLVED}: MyLoRALinear")


# ------------------------------------------------------------------ 01: the merged weight
def test_merge_checker():
    assert check_merged_weight(lambda W0, A, B, alpha, r: W0 + (alpha / r) * B @ A).startswith("correct")
    case = r"case W0: \(16, 16\), r=1, alpha=3"
    with pytest.raises(AssertionError, match=rf"{case}: the merged weight must be .* = \(16, 16\), got \(16, 16, 1\)"):
        check_merged_weight(lambda W0, A, B, alpha, r: (W0 + (alpha / r) * B @ A)[..., None])
    with pytest.raises(AssertionError, match=f"{case}: your merged weight is W0 \\+ B A, without the scaling"):
        check_merged_weight(lambda W0, A, B, alpha, r: W0 + B @ A)
    with pytest.raises(AssertionError, match=f"{case}: your merged weight differs"):
        check_merged_weight(lambda W0, A, B, alpha, r: W0 + (alpha / r) * (B @ A).T)  # transposed update
    with pytest.raises(AssertionError, match=f"{case}: your merged weight differs"):
        check_merged_weight(lambda W0, A, B, alpha, r: W0 + (alpha / r) * A @ B)  # A and B swapped: (1, 1) here


# ------------------------------------------------------------------ 02: finding the targets
def right_find(model, targets):
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)
    ]


FIND_WRONG = {
    "substring": (
        lambda model, targets: [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(t in n for t in targets)
        ],
        r"case gpt_neox model, .*'dense' must not match.*names too many, e.g. 'gpt_neox.layers.0.mlp.dense_h_to_4h'",
    ),
    "endswith without the dot": (
        lambda model, targets: [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n.endswith(t) for t in targets)
        ],
        r"case t5 model, .*names too many, e.g. '.*DenseReluDense.wo'",
    ),
    "not only Linears": (
        lambda model, targets: [
            n for n, _ in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
        ],
        r"case llama model, targets=\['q_proj', 'mlp'\].*'model.layers.0.mlp'.*is a LlamaMLP, not a Linear",
    ),
    "the first layer only": (
        lambda model, targets: [n for n in right_find(model, targets) if ".0." in n],
        r"case llama model, targets=\['q_proj', 'v_proj'\] .*2 names missing, e.g. 'model.layers.1.self_attn.q_proj'",
    ),
}


def test_find_targets_checker_accepts_the_right_walk():
    assert check_find_targets(right_find).startswith("correct")


@pytest.mark.parametrize("mistake", FIND_WRONG, ids=lambda k: k.replace(" ", "-"))
def test_find_targets_checker_rejects(mistake):
    fn, message = FIND_WRONG[mistake]
    with pytest.raises(AssertionError, match=message):
        check_find_targets(fn)


# ------------------------------------------------------------------ 02: wrapping and freezing
def right_wrap(model, names, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r=r, alpha=alpha))
    return model


def wrap_by_dotted_setattr(model, names, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        setattr(model, name, LoRALinear(model.get_submodule(name), r=r, alpha=alpha))
    return model


def wrap_then_freeze(model, names, r, alpha):
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r=r, alpha=alpha))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def right_wrap_unfrozen(model, names, r, alpha):
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), r=r, alpha=alpha))
    return model


def wrap_a_copy(model, names, r, alpha):
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        layer = LoRALinear(copy.deepcopy(model.get_submodule(name)), r=r, alpha=alpha)
        setattr(model.get_submodule(parent), child, layer)
    return model


def wrap_without_alpha(model, names, r, alpha):
    return right_wrap(model, names, r, 16)


def wrap_returns_nothing(model, names, r, alpha):
    right_wrap(model, names, r, alpha)


CASE1 = r"case llama model, 2 targets \['q_proj', 'v_proj'\]..., r=4, alpha=8"
WRAP_WRONG = {
    "base left trainable": (right_wrap_unfrozen, f"{CASE1}: .* base parameters still train, e.g. 'lm_head.weight'"),
    "LoRA frozen": (
        wrap_then_freeze,
        f"{CASE1}: 8 LoRA factors are frozen, e.g. 'model.layers.0.self_attn.q_proj.lora_A'",
    ),
    "dotted setattr": (wrap_by_dotted_setattr, f"{CASE1}: the model got a new attribute named 'model.layers.0"),
    "a copy wrapped": (wrap_a_copy, f"{CASE1}: model.layers.0.self_attn.q_proj.base_layer is not the model's original"),
    "alpha left out": (wrap_without_alpha, f"{CASE1}: model.layers.0.self_attn.q_proj: expected r=4, scaling=2, got"),
    "model not returned": (wrap_returns_nothing, f"{CASE1}: expected the model itself back, got NoneType"),
}


def test_wrap_checker_accepts_the_right_surgery():
    assert check_wrap_and_freeze(right_wrap).startswith("correct")


@pytest.mark.parametrize("mistake", WRAP_WRONG, ids=lambda k: k.replace(" ", "-"))
def test_wrap_checker_rejects(mistake):
    fn, message = WRAP_WRONG[mistake]
    with pytest.raises(AssertionError, match=message):
        check_wrap_and_freeze(fn)


def test_checkers_run_under_python_O():
    """No bare assert in the checkers: they must still reject a wrong answer with -O."""
    import subprocess
    import sys

    code = (
        "from lorakit.exercises import check_lora_param_count\n"
        "try:\n    check_lora_param_count(lambda d_in, d_out, r: 0)\n"
        "except AssertionError as e:\n    print('rejected', e)\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("rejected case d_in=64")
