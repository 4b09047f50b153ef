"""LoRALinear and add/merge/unmerge/unload_lora, checked against peft on a tiny Llama and on SmolLM2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import (
    ALL_PROJ,
    assert_same_as_peft,
    copy_lora_into_peft,
    peft_linear,
    peft_model,
    randomize_lora,
    tiny_llama,
)
from torch import nn

from lorakit import LoRALinear, add_lora, count_parameters, lora_layers, merge_lora, unload_lora, unmerge_lora

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))  # (B, T)


@pytest.fixture
def tiny():
    return tiny_llama()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- the layer


def test_shapes_init_and_scaling():
    base = nn.Linear(40, 24)
    layer = LoRALinear(base, r=4, alpha=16)
    assert layer.lora_A.shape == (4, 40) and layer.lora_B.shape == (24, 4)  # A: (r, d_in), B: (d_out, r)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 16 / 4
    assert LoRALinear(nn.Linear(40, 24), r=4, alpha=16, rslora=True).scaling == 16 / math.sqrt(4)
    assert layer.base_layer is base and (layer.in_features, layer.out_features) == (40, 24)


def test_A_init_is_peft_kaiming_uniform():
    """Kaiming-uniform with a = sqrt(5) is uniform on [-1/sqrt(d_in), 1/sqrt(d_in)], in peft as here."""
    d_in = 400
    ours = LoRALinear(nn.Linear(d_in, 300), r=64).lora_A.detach()
    theirs = peft_linear(nn.Linear(d_in, 300), r=64, alpha=16).lora_A["default"].weight.detach()
    bound = 1 / math.sqrt(d_in)
    for A in (ours, theirs):
        assert A.abs().max() <= bound
        assert A.abs().max() > 0.99 * bound  # 25,600 draws reach the edge
        assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # std of U(-b, b) is b / sqrt(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("autocast", [True, False])
def test_adapter_dtype_follows_peft(dtype, autocast):
    """peft's autocast_adapter_dtype: True (its default) upcasts fp16/bf16 adapters to fp32; False keeps the base's."""
    ours = LoRALinear(nn.Linear(8, 6, dtype=dtype), r=2, autocast_adapter_dtype=autocast)
    theirs = peft_model(nn.Sequential(nn.Linear(8, 6, dtype=dtype)), ["0"], r=2, autocast_adapter_dtype=autocast)
    expected = theirs.base_model.model[0].lora_A["default"].weight.dtype
    assert ours.lora_A.dtype == ours.lora_B.dtype == expected
    assert ours(torch.randn(3, 8, dtype=dtype)).dtype == dtype  # the output keeps the base layer's dtype


def test_zero_B_gives_exactly_the_base_output():
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    assert torch.equal(LoRALinear(base, r=3)(x), base(x))


def test_wraps_a_linear_like_layer_but_will_not_merge_it():
    """A later 4-bit layer: in_features, out_features, forward, a non-float weight."""

    class FakeQuantLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 6
            self.inner = nn.Linear(8, 6)
            self.weight = nn.Parameter(torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False)

        def forward(self, x):
            return self.inner(x)

    fake = FakeQuantLinear()
    layer = LoRALinear(fake, r=2, autocast_adapter_dtype=False)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 8)
    with torch.no_grad():
        layer.lora_B.fill_(0.5)
    expected = fake(x) + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(NotImplementedError, match="cannot merge LoRA into a FakeQuantLinear base layer"):
        layer.merge()

    class PackedLinear(nn.Linear):  # an nn.Linear subclass holding packed 4-bit codes, as bitsandbytes' Linear4bit
        def __init__(self):
            super().__init__(8, 6)
            self.weight = nn.Parameter(torch.zeros(24, 1, dtype=torch.uint8), requires_grad=False)
            self.compute_dtype = torch.bfloat16

    packed = LoRALinear(PackedLinear(), r=2, autocast_adapter_dtype=False)
    assert packed.lora_A.dtype == torch.bfloat16  # the base layer's compute dtype, not uint8
    assert LoRALinear(PackedLinear(), r=2).lora_A.dtype == torch.float32  # upcast, as peft by default
    with pytest.raises(
        NotImplementedError,
        match=(
            r"cannot merge LoRA into a PackedLinear base layer; only "
            r"an nn.Linear \(or GPT-2's Conv1D\) with a floating-point"
        ),
    ):
        unload_lora(nn.Sequential(packed))


# ---------------------------------------------------------------- against peft, tiny model


def test_same_weights_same_outputs_and_grads_as_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    randomize_lora(ours)
    theirs = peft_model(tiny, ALL_PROJ, r=4, alpha=8)
    assert copy_lora_into_peft(ours, theirs) == 14
    assert_same_as_peft(ours, theirs, input_ids=IDS, labels=IDS)


def test_rslora_matches_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), ["q_proj", "v_proj"], r=4, alpha=8, rslora=True)
    randomize_lora(ours)
    theirs = peft_model(tiny, ["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    copy_lora_into_peft(ours, theirs)
    assert torch.equal(logits(ours), logits(theirs))


def test_dropout_matches_peft_in_train_mode(tiny):
    ours = add_lora(copy.deepcopy(tiny), ["q_proj", "up_proj"], r=4, alpha=8, dropout=0.3).train()
    randomize_lora(ours)
    theirs = peft_model(tiny, ["q_proj", "up_proj"], r=4, alpha=8, lora_dropout=0.3).train()
    copy_lora_into_peft(ours, theirs)
    torch.manual_seed(5)
    a = ours(input_ids=IDS).logits
    torch.manual_seed(5)
    b = theirs(input_ids=IDS).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, logits(ours.eval()))  # dropout did act in train mode


def test_count_parameters_equals_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    theirs = peft_model(tiny, ALL_PROJ, r=4, alpha=8)
    assert tuple(count_parameters(ours)[:2]) == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_targets_match_by_dotted_suffix_as_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), ["layers.1.self_attn.q_proj", "down_proj"], r=2)
    theirs = peft_model(tiny, ["layers.1.self_attn.q_proj", "down_proj"], r=2)
    peft_wrapped = {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n
    }
    assert (
        set(lora_layers(ours))
        == peft_wrapped
        == {"model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    )
    assert set(lora_layers(add_lora(copy.deepcopy(tiny), "v_proj", r=2))) == {
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    }


def test_merge_unmerge_unload(tiny):
    model = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    randomize_lora(model)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    unmerged = logits(model)
    assert not torch.allclose(unmerged, logits(tiny), atol=1e-3)  # the update is visible
    merge_lora(model)
    assert (logits(model) - unmerged).abs().max() <= 1e-5
    model.train()
    model.eval()  # train()/eval() never merge or unmerge
    assert all(layer.merged for layer in lora_layers(model).values())
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert (layer.base_layer.weight - w0[name]).abs().max() <= 1e-6, name
    unload_lora(model)
    assert not lora_layers(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert (logits(model) - unmerged).abs().max() <= 1e-5


def test_merged_weights_equal_peft_merge_and_unload(tiny):
    ours = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    randomize_lora(ours)
    theirs = peft_model(tiny, ALL_PROJ, r=4, alpha=8)
    copy_lora_into_peft(ours, theirs)
    ours_sd, theirs_sd = unload_lora(ours).state_dict(), theirs.merge_and_unload().state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key


@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_base_matches_peft_outputs_grads_and_merge(tiny, autocast):
    """A bf16 model: peft's add-then-cast forward and its merge, with fp32 adapters (its default) and bf16 ones."""
    base = copy.deepcopy(tiny).to(torch.bfloat16)
    ours = add_lora(copy.deepcopy(base), ALL_PROJ, r=4, alpha=8, autocast_adapter_dtype=autocast)
    randomize_lora(ours)
    theirs = peft_model(base, ALL_PROJ, r=4, alpha=8, autocast_adapter_dtype=autocast)
    copy_lora_into_peft(ours, theirs)
    adapter_dtype = torch.float32 if autocast else torch.bfloat16
    assert all(layer.lora_A.dtype == adapter_dtype for layer in lora_layers(ours).values())
    logits = assert_same_as_peft(ours, theirs, sides=("lora_B",), input_ids=IDS, labels=IDS)
    assert logits.dtype == torch.bfloat16
    ours_sd, theirs_sd = unload_lora(ours).state_dict(), theirs.merge_and_unload().state_dict()
    for key in ours_sd:
        assert torch.equal(ours_sd[key], theirs_sd[key]), key


def test_lora_term_is_added_then_cast_as_peft():
    """A bf16 base output plus an fp32 LoRA term: peft adds in fp32 and rounds once; cast-then-add would round twice."""
    base = nn.Linear(64, 64, dtype=torch.bfloat16)
    layer = LoRALinear(copy.deepcopy(base), r=4, alpha=8)  # fp32 adapter on a bf16 base
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        h, lora = base(x), layer.scaling * (x.float() @ layer.lora_A.T @ layer.lora_B.T)
        out = layer(x)
    assert torch.equal(out, (h + lora).to(torch.bfloat16))
    assert not torch.equal(out, h + lora.to(torch.bfloat16))  # the other order differs here, so the test can fail


def test_all_linear_matches_peft(tiny):
    ours = add_lora(copy.deepcopy(tiny), "all-linear", r=2)
    theirs = peft_model(tiny, "all-linear", r=2)
    peft_wrapped = {
        n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n
    }
    assert set(lora_layers(ours)) == peft_wrapped
    assert len(peft_wrapped) == 14 and "lm_head" not in peft_wrapped  # every projection, not the output head
    small = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # no get_output_embeddings: every Linear
    assert set(lora_layers(add_lora(small, "ALL-LINEAR", r=1))) == {"0", "2"}


# ---------------------------------------------------------------- safe merge


def _poison(model, name, part="lora_B", value=float("nan")):
    with torch.no_grad():
        getattr(lora_layers(model)[name], part)[0, 0] = value


@pytest.mark.parametrize("merge", [merge_lora, unload_lora])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nan_or_inf_adapter_is_not_merged_and_the_base_is_untouched(tiny, merge, value):
    model = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    randomize_lora(model)
    bad = "model.layers.1.mlp.down_proj"  # the last layer: every other layer would merge before it
    _poison(model, bad, value=value)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    kind = "1 NaN and 0 Inf" if value != value else "0 NaN and 1 Inf"
    with pytest.raises(
        ValueError,
        match=(
            rf"{merge.__name__}: LoRA layer '{bad}'.*refusing to "
            rf"merge.*lora_B has {kind} values.*No base weight was changed"
        ),
    ):
        merge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.allclose(after[n], before[n], rtol=0, atol=0, equal_nan=True) for n in before)  # bit for bit
    assert len(lora_layers(model)) == 14 and not any(layer.merged for layer in lora_layers(model).values())


def test_unmerge_with_an_adapter_broken_after_merging_is_refused(tiny):
    model = add_lora(copy.deepcopy(tiny), ALL_PROJ, r=4, alpha=8)
    randomize_lora(model)
    merge_lora(model)
    bad = "model.layers.1.self_attn.v_proj"
    _poison(model, bad, part="lora_A")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"unmerge_lora: LoRA layer '{bad}': refusing to unmerge.*lora_A has 1 NaN"):
        unmerge_lora(model)
    after = model.state_dict()
    assert all(torch.allclose(after[n], before[n], rtol=0, atol=0, equal_nan=True) for n in before)
    assert all(layer.merged for layer in lora_layers(model).values())


def test_merge_that_overflows_the_base_dtype_is_refused():
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.float16), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_A.fill_(300.0)
        layer.lora_B.fill_(300.0)  # dW = 2 * 300 * 300 = 180,000 > float16's max 65,504
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(
        ValueError,
        match=r"refusing to merge: the result would have 16 NaN/Inf values \(W0 \+ dW overflows torch.float16",
    ):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r_frac=st.floats(0, 1),
    alpha=st.floats(0.5, 64),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    rslora=st.booleans(),
    seed=st.integers(0, 99),
)
def test_properties_against_peft(d_in, d_out, r_frac, alpha, dtype, rslora, seed):
    r = 1 + int(r_frac * (min(d_in, d_out) - 1))
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    x = torch.randn(3, 2, d_in, dtype=dtype)  # (B, T, d_in)
    # peft's Linear layer on its own keeps the base dtype (the upcast is get_peft_model's): compare like with like.
    ours = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha, rslora=rslora, autocast_adapter_dtype=False)
    assert torch.equal(ours(x), base(x))  # B = 0: exactly the base output
    with torch.no_grad():
        ours.lora_B.normal_()
    theirs = peft_linear(copy.deepcopy(base), r=r, alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        w0, unmerged, delta = base.weight.clone(), ours(x), ours.delta_weight()
        # Rounding bounds scale with the magnitudes involved: merging rounds W0 + dW once per
        # element (and the matmuls round again); unmerging rounds twice. eps is the dtype's.
        eps = torch.finfo(dtype).eps
        size = (w0.abs() + delta.abs()).double()  # (d_out, d_in)
        ours.merge()
        bound = 4 * eps * (x.abs().double() @ size.T + unmerged.abs().double() + 1e-30)  # (B, T, d_out)
        assert torch.all((ours(x) - unmerged).abs().double() <= bound)
        ours.unmerge()
        assert torch.all((ours.base_layer.weight - w0).abs().double() <= 2 * eps * size)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_below_one_or_not_an_int(tiny, r):
    with pytest.raises(
        ValueError,
        match=(
            rf"LoRA on 'model.layers.0.self_attn.q_proj': rank "
            rf"r={r!r} is invalid; r must be an integer of at least 1"
        ),
    ):
        add_lora(copy.deepcopy(tiny), ["q_proj"], r=r)


def test_rank_above_min_dims(tiny):
    # k_proj is (16, 32): 2 key-value heads of 8
    with pytest.raises(
        ValueError,
        match=(
            r"'model.layers.0.self_attn.k_proj': rank r=17 exceeds "
            r"min\(d_in, d_out\) = min\(32, 16\) = 16.*1 <= r <= 16"
        ),
    ):
        add_lora(copy.deepcopy(tiny), ["k_proj"], r=17)


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan"), float("inf")])
def test_alpha_not_positive(alpha):
    with pytest.raises(ValueError, match=r"alpha=.* is invalid; alpha must be a finite number greater than 0"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=alpha)


def test_dropout_out_of_range():
    with pytest.raises(ValueError, match=r"dropout=1.0 is invalid; use 0 <= dropout < 1"):
        LoRALinear(nn.Linear(4, 4), r=2, dropout=1.0)


def test_targets_that_match_nothing_list_the_linear_modules(tiny):
    with pytest.raises(
        ValueError,
        match=r"targets \['qproj'\] match no Linear module of LlamaForCausalLM; the model has 15 Linear modules, "
        r"named \.\.\.down_proj, \.\.\.gate_proj, \.\.\.k_proj, \.\.\.lm_head, .*\.\.\.v_proj",
    ):
        add_lora(copy.deepcopy(tiny), ["q_proj", "qproj"])
    small = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(
        ValueError,
        match=(
            r"targets \['1'\] match no Linear module of Sequential \(matched "
            r"non-Linear modules: 1 \(ReLU\)\); the Linear modules are: 0, 2"
        ),
    ):
        add_lora(small, ["1"])
    with pytest.raises(ValueError, match=r"targets=\[\] is invalid; give module name suffixes"):
        add_lora(small, [])


def test_adding_twice_merging_twice_unmerging_unmerged(tiny):
    model = add_lora(copy.deepcopy(tiny), ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already has LoRA layers; call unload_lora"):
        add_lora(model, ["v_proj"])
    with pytest.raises(
        RuntimeError, match=r"unmerge_lora: 2 LoRA layers are not merged \(e.g. 'model.layers.0.self_attn.q_proj'\)"
    ):
        unmerge_lora(model)
    merge_lora(model)
    with pytest.raises(
        RuntimeError,
        match=(
            r"merge_lora: 2 LoRA layers are already merged \(e.g. "
            r"'model.layers.0.self_attn.q_proj'\); call unmerge_lora"
        ),
    ):
        merge_lora(model)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    with pytest.raises(RuntimeError, match=r"LoRA layer on Linear\(32 -> 32\) is already merged"):
        layer.merge()


@pytest.mark.parametrize("fn", [merge_lora, unmerge_lora, unload_lora])
def test_lora_calls_on_a_model_without_lora(tiny, fn):
    with pytest.raises(ValueError, match=rf"{fn.__name__}: LlamaForCausalLM has no LoRA layers; call add_lora"):
        fn(tiny)


# ---------------------------------------------------------------- SmolLM2


@pytest.mark.model
def test_smollm2_against_peft(smollm2):
    base, _ = smollm2
    ids = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    targets = ["q_proj", "v_proj", "down_proj"]
    ours = add_lora(copy.deepcopy(base), targets, r=8, alpha=16)
    theirs = peft_model(base, targets, r=8, alpha=16)
    assert tuple(count_parameters(ours)[:2]) == theirs.get_nb_trainable_parameters()
    assert count_parameters(ours).trainable == 30 * 8 * ((576 + 576) + (576 + 192) + (1536 + 576))
    assert torch.equal(logits(ours, ids), logits(base, ids))  # B = 0
    randomize_lora(ours)
    copy_lora_into_peft(ours, theirs)
    unmerged = logits(ours, ids)
    assert (unmerged - logits(theirs, ids)).abs().max() <= 1e-5
    assert (unmerged - logits(base, ids)).abs().max() > 1e-2
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(ours).items()}
    x = torch.randn(1, 16, 576, generator=torch.Generator().manual_seed(1))  # (B, T, d_model)
    q_proj = lora_layers(ours)["model.layers.7.self_attn.q_proj"]
    with torch.no_grad():
        layer_unmerged = q_proj(x)
    merge_lora(ours)
    with torch.no_grad():
        assert (q_proj(x) - layer_unmerged).abs().max() <= 1e-5 * layer_unmerged.abs().max()  # one layer
    merged = logits(ours, ids)
    # fp32 rounding: merged and unmerged differ by ~1 ulp per layer, ~6e-5 on logits of size ~20
    # after 30 layers, in peft exactly as here. So: bit-equal to peft's merge, within 1e-5 relative.
    assert torch.equal(merged, logits(theirs.merge_and_unload(), ids))
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    del theirs
    unmerge_lora(ours)
    assert max((layer.base_layer.weight - w0[n]).abs().max().item() for n, layer in lora_layers(ours).items()) <= 1e-6
