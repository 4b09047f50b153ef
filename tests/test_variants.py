"""DoRA, PiSSA, LoftQ and LoRA+ against peft 0.21: outputs, gradients, merged weights, inits, optimizer groups,
adapters in peft's format, and the errors for settings that do not fit.

Tolerances: DoRA (outputs, gradients, merged weights), PiSSA (factors and residual) and LoftQ (quantized base and
factors, given lorakit's NF4, which equals bitsandbytes') are bit-identical to peft on the CPU; PiSSA's and LoftQ's
factors up to the SVD's paired sign flips (lorakit.pissa.sign_convention), which leave B A unchanged.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from tiny_models import peft_model, tiny_inputs, tiny_llama

from lorakit import add_lora, load_adapter, lora_layers, merge_lora, quantize_model, save_adapter, unmerge_lora
from lorakit.blockwise import dequantize_blockwise
from lorakit.dora import DoRALinear
from lorakit.loftq import loftq_factors, loftq_init
from lorakit.loraplus import create_loraplus_optimizer, loraplus_param_groups
from lorakit.pissa import pissa_factors, pissa_init

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture
def tiny():
    return tiny_llama(hidden_size=64, intermediate_size=128)  # rows of 64 and 128: whole NF4 blocks


def peft_layers(theirs) -> dict:
    return dict(theirs.base_model.model.named_modules())


def perturb_dora(ours, theirs, seed: int = 1) -> None:
    """Nonzero B and a magnitude off its init in lorakit's DoRA layers, copied into peft's."""
    g = torch.Generator().manual_seed(seed)
    layers = peft_layers(theirs)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))
            layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
            target = layers[name]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            target.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)


def dora_pair(tiny, **kwargs):
    ours = add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=8, use_dora=True, **kwargs)
    theirs = peft_model(tiny, TARGETS, r=4, alpha=8, use_dora=True, **kwargs)
    return ours, theirs


def aligned(ours: torch.Tensor, theirs: torch.Tensor, dim: int) -> torch.Tensor:
    """``theirs`` with each rank component's sign flipped to agree with ``ours`` (the SVD's paired signs)."""
    signs = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    return theirs * signs


def peft_loftq_init():
    """peft's ``loftq_init``, run from its own source with the compute device set to the CPU (peft hard-codes
    "cuda" there; nothing else changes)."""
    import peft.utils.loftq_utils as loftq_utils

    namespace = dict(vars(loftq_utils))
    exec(inspect.getsource(loftq_utils.loftq_init).replace('"cuda"', '"cpu"'), namespace)
    return namespace["loftq_init"]


# ---------------------------------------------------------------- DoRA
def test_dora_magnitude_starts_at_the_column_norm_as_peft(tiny):
    ours, theirs = dora_pair(tiny)
    layers = peft_layers(theirs)
    for name, layer in lora_layers(ours).items():
        assert isinstance(layer, DoRALinear)
        assert torch.equal(layer.magnitude, layers[name].lora_magnitude_vector["default"].weight)
        assert torch.equal(layer.magnitude, layer.base_layer.weight.norm(dim=1))  # one norm per output row
    batch = tiny_inputs(tiny)
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, tiny(**batch).logits)  # B = 0, m = ||W0||_c: the base model


def test_dora_outputs_and_gradients_equal_peft(tiny):
    ours, theirs = dora_pair(tiny)
    perturb_dora(ours, theirs)
    batch = tiny_inputs(tiny)
    a, b = ours(**batch), theirs(**batch)
    assert torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    layers = peft_layers(theirs)
    for name, layer in lora_layers(ours).items():
        target = layers[name]
        assert torch.equal(layer.lora_A.grad, target.lora_A["default"].weight.grad), name
        assert torch.equal(layer.lora_B.grad, target.lora_B["default"].weight.grad), name
        assert torch.equal(layer.magnitude.grad, target.lora_magnitude_vector["default"].weight.grad), name


def test_dora_with_dropout_in_train_mode_equals_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=8, use_dora=True, dropout=0.2)
    theirs = peft_model(tiny, TARGETS, r=4, alpha=8, use_dora=True, lora_dropout=0.2)
    perturb_dora(ours, theirs)
    ours.train()
    theirs.train()
    batch = tiny_inputs(tiny)
    torch.manual_seed(3)
    a = ours(**batch)
    torch.manual_seed(3)
    b = theirs(**batch)
    assert torch.equal(a.logits, b.logits)  # the same masks: one dropout call per layer, in the same order


def test_dora_merged_weights_equal_peft_and_unmerge_restores(tiny):
    ours, theirs = dora_pair(tiny)
    perturb_dora(ours, theirs)
    before = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(ours).items()}
    batch = tiny_inputs(tiny)
    with torch.no_grad():
        unmerged = ours(**batch).logits
        merge_lora(ours)
        assert torch.allclose(ours(**batch).logits, unmerged, atol=1e-5)
    merged = theirs.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.base_layer.weight, merged.get_submodule(name).weight), name
    unmerge_lora(ours)
    for name, layer in lora_layers(ours).items():
        assert torch.allclose(layer.base_layer.weight, before[name], atol=1e-6), name


def test_dora_adapter_round_trips_through_peft(tiny, tmp_path):
    from peft import PeftModel

    ours, theirs = dora_pair(tiny)
    perturb_dora(ours, theirs)
    batch = tiny_inputs(tiny)
    save_adapter(ours, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny), tmp_path / "ours")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, ours(**batch).logits)
    theirs.save_pretrained(tmp_path / "peft")
    back = load_adapter(copy.deepcopy(tiny), tmp_path / "peft")
    assert all(isinstance(layer, DoRALinear) for layer in lora_layers(back).values())
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, theirs(**batch).logits)
        assert not torch.allclose(back(**batch).logits, tiny(**batch).logits, atol=1e-3)


def test_a_dora_adapter_will_not_load_into_plain_lora_and_the_reverse(tiny, tmp_path):
    dora, _ = dora_pair(tiny)
    save_adapter(dora, tmp_path / "dora")
    plain = add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=8)
    save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="is a DoRA .* adapter, but the model's layer .* is plain LoRA"):
        load_adapter(copy.deepcopy(plain), tmp_path / "dora")
    with pytest.raises(ValueError, match="is a plain LoRA adapter, but the model's layer .* is DoRA"):
        load_adapter(copy.deepcopy(dora), tmp_path / "plain")


def test_dora_will_not_merge_into_a_4bit_base(tiny):
    from lorakit import merge_qlora

    model = add_lora(quantize_model(copy.deepcopy(tiny)), TARGETS, r=4, alpha=8, use_dora=True)
    batch = tiny_inputs(tiny)
    with torch.no_grad():
        model(**batch)  # the forward works on a 4-bit base (QDoRA)
    with pytest.raises(NotImplementedError, match="cannot merge DoRA into a 4-bit base layer"):
        merge_lora(model)
    with pytest.raises(NotImplementedError, match="rescales every row of W0"):
        merge_qlora(model, "dequantized")


# ---------------------------------------------------------------- PiSSA
def test_pissa_equals_peft_up_to_the_svd_signs(tiny):
    ours = pissa_init(add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=8))
    theirs = peft_model(tiny, TARGETS, r=4, alpha=8, init_lora_weights="pissa")
    layers = peft_layers(theirs)
    for name, layer in lora_layers(ours).items():
        A, B = layers[name].lora_A["default"].weight, layers[name].lora_B["default"].weight
        assert torch.equal(layer.lora_A, aligned(layer.lora_A, A, dim=1)), name  # rows of A
        assert torch.equal(layer.lora_B, aligned(layer.lora_B.T, B.T, dim=1).T), name  # columns of B, same signs
        assert torch.equal(layer.base_layer.weight, layers[name].base_layer.weight), name  # the residual
    batch = tiny_inputs(tiny)
    with torch.no_grad():  # W_res + s B A = W0: the model starts where it was
        assert torch.allclose(ours(**batch).logits, tiny(**batch).logits, atol=1e-5)


def test_pissa_sign_convention_is_fixed():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    A, B, residual = pissa_factors(w, r=4, scaling=2.0)
    A2, B2, residual2 = pissa_factors(w.clone(), r=4, scaling=2.0)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    biggest = B.abs().argmax(dim=0)
    assert (B[biggest, torch.arange(4)] > 0).all()  # the largest entry of each column of B is positive
    assert torch.allclose(residual + 2.0 * B @ A, w, atol=1e-5)


def test_pissa_rank_above_the_layers(tiny):
    low_rank = torch.randn(32, 2) @ torch.randn(2, 32)  # rank 2
    with pytest.raises(ValueError, match="rank r=4 exceeds the numerical rank 2"):
        pissa_factors(low_rank, r=4, scaling=1.0, name="layer")
    with pytest.raises(ValueError, match=r"exceeds min\(d_in, d_out\)"):
        add_lora(copy.deepcopy(tiny), ["k_proj"], r=40)  # k_proj is 64 -> 32
    q = add_lora(quantize_model(copy.deepcopy(tiny)), ["q_proj"], r=4)
    with pytest.raises(TypeError, match="4-bit base; PiSSA needs the full-precision W0"):
        pissa_init(q)


# ---------------------------------------------------------------- LoftQ
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_given_the_same_quantizer(iters):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(iters))
    q, A, B = peft_loftq_init()(w, num_bits=4, reduced_rank=4, num_iter=iters)
    ours_A, ours_B, packed, state, errors = loftq_factors(w, r=4, scaling=1.0, bits=4, iters=iters)
    assert torch.equal(dequantize_blockwise(packed, state), q)
    assert torch.equal(ours_A, aligned(ours_A, A, dim=1))
    assert torch.equal(ours_B, aligned(ours_B.T, B.T, dim=1).T)
    assert len(errors) == iters + 1 and errors[-1] < errors[0]  # LoftQ starts closer to W than QLoRA


def test_loftq_init_equals_peft_loftq_config_on_a_model(tiny, monkeypatch):
    """peft's whole path, ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``, against
    ``loftq_init`` on the same tiny model (alpha = r, see lorakit.loftq; peft's loftq_init run on the CPU)."""
    from peft import LoftQConfig

    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", peft_loftq_init())
    ours = add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=4)
    loftq_init(ours, bits=4, iters=2, double_quant=False)
    theirs = peft_model(
        tiny, TARGETS, r=4, alpha=4, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)
    )
    layers = peft_layers(theirs)
    for name, layer in lora_layers(ours).items():
        target = layers[name]
        assert torch.equal(layer.base_layer.dequantize(), target.base_layer.weight), name  # the same Q
        A, B = target.lora_A["default"].weight, target.lora_B["default"].weight
        assert torch.equal(layer.lora_A, aligned(layer.lora_A, A, dim=1)), name
        assert torch.equal(layer.lora_B, aligned(layer.lora_B.T, B.T, dim=1).T), name


def test_loftq_model_starts_closer_than_qlora_and_any_alpha_works(tiny):
    batch = tiny_inputs(tiny)
    with torch.no_grad():
        reference = tiny(**batch).logits
        for bits in (4, 2):
            qlora = add_lora(quantize_model(copy.deepcopy(tiny), "nf", bits=bits), TARGETS, r=8, alpha=32)
            loftq = add_lora(copy.deepcopy(tiny), TARGETS, r=8, alpha=32)
            errors = loftq_init(loftq, bits=bits, iters=2)
            quantize_model(loftq, "nf", bits=bits)  # the layers without LoRA, the plain way
            gap_q = (qlora(**batch).logits - reference).abs().mean()
            gap_l = (loftq(**batch).logits - reference).abs().mean()
            assert gap_l < gap_q, bits
            assert all(e[-1] < e[0] for e in errors.values())


@pytest.mark.parametrize(("kwargs", "match"), [({"bits": 1}, "bits=1"), ({"quant_type": "fp", "bits": 2}, "FP")])
def test_loftq_refuses_a_width_its_quantizer_lacks(tiny, kwargs, match):
    model = add_lora(copy.deepcopy(tiny), TARGETS, r=4)
    with pytest.raises(ValueError, match=f"LoftQ: lorakit's quantizer has no .*{match}"):
        loftq_init(model, **kwargs)


def test_loftq_needs_the_float_model(tiny):
    model = add_lora(quantize_model(copy.deepcopy(tiny)), TARGETS, r=4)
    with pytest.raises(TypeError, match="already has a 4-bit base"):
        loftq_init(model)


# ---------------------------------------------------------------- LoRA+
@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_groups_and_rates_equal_peft(tiny, use_dora):
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    ours = add_lora(copy.deepcopy(tiny), TARGETS, r=4, alpha=8, use_dora=use_dora)
    theirs = peft_model(tiny, TARGETS, r=4, alpha=8, use_dora=use_dora)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-4, ratio=16, weight_decay=0.01)
    ref = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16, loraplus_weight_decay=0.01)

    def names(model, group, strip):
        ids = {id(p) for p in group["params"]}
        return sorted(strip(n) for n, p in model.named_parameters() if id(p) in ids)

    def peft_name(n):
        n = n.removeprefix("base_model.model.").replace(".default", "")
        return n.replace("lora_magnitude_vector.weight", "magnitude").removesuffix(".weight")

    ref_groups = [g for g in ref.param_groups if g["params"]]
    assert len(opt.param_groups) == len(ref_groups)
    for mine, theirs_group in zip(opt.param_groups, ref_groups, strict=True):
        assert (mine["lr"], mine["weight_decay"]) == (theirs_group["lr"], theirs_group["weight_decay"])
        assert names(ours, mine, str) == names(theirs, theirs_group, peft_name)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 16e-4]


def test_loraplus_refuses_bad_rates(tiny):
    model = add_lora(copy.deepcopy(tiny), TARGETS, r=4)
    with pytest.raises(ValueError, match="ratio=0.5 >= 1"):
        loraplus_param_groups(model, lr=1e-4, ratio=0.5)


# ---------------------------------------------------------------- SmolLM2 (slow)
def test_variants_equal_peft_on_smollm2(smollm2):
    """DoRA's logits, LoRA+'s groups, PiSSA's init and LoftQ's init on the real model's weights, against peft."""
    model, _ = smollm2
    ids = torch.arange(100, 116).view(1, 16)  # (B, T)
    ours = add_lora(copy.deepcopy(model), ["q_proj", "v_proj"], r=8, alpha=16, use_dora=True)
    theirs = peft_model(model, ["q_proj", "v_proj"], r=8, alpha=16, use_dora=True)
    perturb_dora(ours, theirs)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-4, ratio=16).param_groups
    ref = [
        g for g in peft_loraplus(theirs, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16).param_groups if g["params"]
    ]
    assert [(g["lr"], len(g["params"])) for g in mine] == [(g["lr"], len(g["params"])) for g in ref]
    del ours, theirs
    weight = model.model.layers[0].self_attn.q_proj.weight.detach()  # (576, 576)
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    layer = Linear(torch.nn.Linear(576, 576, bias=False), "default", config=LoraConfig(r=8, lora_alpha=16,
                   init_lora_weights="pissa"), r=8, lora_alpha=16)  # fmt: skip
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.pissa_init("default", "pissa")
    A, B, residual = pissa_factors(weight, r=8, scaling=2.0)
    assert torch.equal(A, aligned(A, layer.lora_A["default"].weight, dim=1))
    assert torch.equal(residual, layer.base_layer.weight)
    q, A, B = peft_loftq_init()(weight, num_bits=4, reduced_rank=8, num_iter=1)
    ours_A, ours_B, packed, state, _ = loftq_factors(weight, r=8, bits=4, iters=1)
    assert torch.equal(dequantize_blockwise(packed, state), q)
    assert torch.equal(ours_A, aligned(ours_A, A, dim=1))


# ---------------------------------------------------------------- notebook 09's exercises
def dora_right(x, W0, A, B, m, scaling):
    W = W0 + scaling * B @ A  # (d_out, d_in)
    return x @ (m[:, None] * W / W.norm(dim=1, keepdim=True)).T


def dora_lora_only(x, W0, A, B, m, scaling):
    return x @ (W0 + scaling * B @ A).T


def dora_norm_by_column(x, W0, A, B, m, scaling):
    W = W0 + scaling * B @ A
    return x @ (m[:, None] * W / W.norm(dim=0, keepdim=True)).T


def dora_not_normalized(x, W0, A, B, m, scaling):
    return x @ (m[:, None] * (W0 + scaling * B @ A)).T


def test_check_dora_forward():
    from lorakit.exercises import check_dora_forward

    assert check_dora_forward(dora_right).startswith("correct")
    with pytest.raises(AssertionError, match="d_in=16, d_out=16, r=2: you returned LoRA's output"):
        check_dora_forward(dora_lora_only)
    with pytest.raises(AssertionError, match="d_in=16, d_out=16, r=2: you normalized W's columns"):
        check_dora_forward(dora_norm_by_column)
    with pytest.raises(AssertionError, match="r=2: the direction is not normalized"):
        check_dora_forward(dora_not_normalized)


def loftq_right(W, lora, r, scaling, quantize):
    Q = quantize(W - lora)
    U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root, Q


def loftq_quantizes_w(W, lora, r, scaling, quantize):
    return loftq_right(W, torch.zeros_like(W), r, scaling, quantize)


def loftq_no_scaling(W, lora, r, scaling, quantize):
    return loftq_right(W, lora, r, 1.0, quantize)


def loftq_svd_of_w(W, lora, r, scaling, quantize):
    Q = quantize(W - lora)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[:r] / scaling).sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root, Q


def test_check_loftq_step():
    from lorakit.exercises import check_loftq_step

    assert check_loftq_step(loftq_right).startswith("correct")
    with pytest.raises(AssertionError, match=r"W: \(32, 64\), r=4, 4 bits: you quantized W"):
        check_loftq_step(loftq_quantizes_w)
    with pytest.raises(AssertionError, match="r=4, 4 bits: B A is the error's top-r part"):
        check_loftq_step(loftq_no_scaling)
    with pytest.raises(AssertionError, match="r=4, 4 bits: you took the SVD of W"):
        check_loftq_step(loftq_svd_of_w)


# ---------------------------------------------------------------- the recipe study (on a tiny model)
def test_recipe_study_runs_and_every_row_cites_its_runs():
    import matplotlib

    matplotlib.use("Agg")
    from transformers import AutoTokenizer

    from lorakit.assets import require
    from lorakit.recipe import RecipeConfig, plot_study, run_study, table_markdown, what_to_choose

    tokenizer = AutoTokenizer.from_pretrained(str(require("smollm2-135m-instruct")))
    base = tiny_llama(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, max_position_embeddings=128)
    config = RecipeConfig(
        steps=1, seq_len=16, eval_blocks=2, train_blocks=8, bits=(4, 2), ranks=(2, 4), lrs=(1e-3, 1e-2), r=4
    )
    study = run_study(base, tokenizer, config, progress=False)
    names = study.names()
    assert len(names) == len(set(names)) == 6 + 2 + 4 + 1 + 1  # bits, bits-all, ranks x scalings, targets, lr
    assert all(r.before is not None for r in study.runs if r.spec.group.startswith("bits") and r.spec.method != "dora")
    rows = what_to_choose(study)
    for row in rows:
        assert row.runs and all(name in names or name == "checkpointing" for name in row.runs), row
    assert table_markdown(rows).count("\n") == len(rows) + 1
    assert study.checkpointing.activations_on < study.checkpointing.activations_off
    assert len(plot_study(study).axes) == 6
    with pytest.raises(KeyError, match="0 runs of group 'bits' match"):
        study.run("bits", method="loftq", bits=3)


def test_dora_on_gpt2_conv1d_equals_peft():
    """GPT-2's Conv1D stores W0 as (d_in, d_out): the magnitude is still one per output, the merge scales columns."""
    from tiny_models import tiny_gpt2

    gpt2 = tiny_gpt2()
    ours = add_lora(copy.deepcopy(gpt2), ["c_attn", "c_fc"], r=4, alpha=8, use_dora=True)
    theirs = peft_model(gpt2, ["c_attn", "c_fc"], r=4, alpha=8, use_dora=True, fan_in_fan_out=True)
    perturb_dora(ours, theirs)
    batch = tiny_inputs(gpt2)
    with torch.no_grad():
        assert torch.equal(ours(**batch).logits, theirs(**batch).logits)
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.base_layer.weight, merged.get_submodule(name).weight), name
