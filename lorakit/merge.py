"""Merging a QLoRA adapter for deployment: three ways to fold ``(alpha / r) B A`` into a 4-bit base.

LoRA merges for free (LoRA §4.1): ``W = W0 + (alpha / r) B A`` and the adapter is gone. Under QLoRA
(Dettmers et al. 2023, §3) ``W0`` is stored as NF4 codes, so the sum has no 4-bit home. A merged
model needs a choice:

``"dequantized"`` (a)
    ``W = dequant(W_nf4) + (alpha / r) B A``, kept in 16/32 bits: the very weights the adapter was
    trained against, so it reproduces the unmerged QLoRA model up to float rounding.
``"requantized"`` (b)
    the same ``W``, quantized again with the layer's own settings (NF4, blocksize, double quant):
    4-bit memory again, but the update is now rounded to NF4 codes. This is what peft's
    ``merge_and_unload`` does for a bitsandbytes ``Linear4bit`` (``tuners/lora/bnb.py``,
    ``Linear4bit.merge``: ``dequantize_bnb_weight``, add ``get_delta_weight``, ``Params4bit(...)``).
``"original"`` (c)
    ``W = W0 + (alpha / r) B A`` with the *unquantized* ``W0`` of the base model: a model that never
    existed during training; it differs from the QLoRA model by the quantization error of ``W0``.

(a) and (c) return a plain transformers model (``nn.Linear`` everywhere) that ``save_pretrained``
writes and ``AutoModelForCausalLM.from_pretrained`` reads back without lorakit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.blockwise import quantize_blockwise, unpack_codes
from lorakit.codebooks import widest_gap
from lorakit.double_quant import dequantize_absmax
from lorakit.evaluation import Perplexity, perplexity_from_losses
from lorakit.linear4bit import Linear4bit, dequantize_model, set_module, to_float_layer
from lorakit.lora import check_finite_merge, lora_layers

MERGE_STRATEGIES = ("dequantized", "requantized", "original")


@torch.no_grad()
def merge_qlora(
    model: nn.Module, strategy: str, original: nn.Module | Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """Fold every LoRA update of a QLoRA model into its base weight and remove the LoRA layers.

    ``strategy`` is ``"dequantized"``, ``"requantized"`` or ``"original"`` (see the module docstring);
    ``original`` (the unquantized base model or its ``state_dict``) is needed by ``"original"`` only.
    Like peft's ``merge_and_unload`` the model is changed in place and returned (``copy.deepcopy``
    it first to try several strategies). Every ``Linear4bit`` left without LoRA becomes an
    ``nn.Linear`` too under (a) (its dequantized weight) and (c) (its original weight), so no 4-bit
    layer remains; under (b) every layer stays 4-bit.
    """
    if strategy not in MERGE_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not valid; choose one of {', '.join(map(repr, MERGE_STRATEGIES))}")
    if strategy == "original" and original is None:
        raise ValueError("strategy='original' needs original=<the unquantized base model or its state_dict>")
    if strategy != "original" and original is not None:
        raise ValueError(f"original= is used by strategy='original' only, not by strategy={strategy!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"merge_qlora: {type(model).__name__} has no LoRA layers; there is nothing to merge")
    not_4bit = [name for name, layer in layers.items() if not isinstance(layer.base_layer, Linear4bit)]
    if not_4bit:
        raise ValueError(
            f"merge_qlora: {len(not_4bit)} LoRA layers wrap a full-precision layer, not a Linear4bit "
            f"(e.g. {not_4bit[0]!r}); merge a LoRA (not QLoRA) model with unload_lora(model)"
        )
    weights = _original_weights(model, original) if strategy == "original" else {}

    # Build every merged layer first and check it (peft's safe_merge), so that a NaN or Inf adapter
    # raises before any module of the model is replaced.
    merged_layers = {}
    for name, layer in layers.items():
        base = layer.base_layer
        w0 = weights[name] if strategy == "original" else base.dequantize()  # (d_out, d_in)
        w = w0 + layer.delta_weight()  # W0 + (alpha / r) B A in the promoted dtype, as peft's bnb merge adds them
        check_finite_merge(f"merge_qlora: LoRA layer {name!r}", layer, w.to(w0.dtype))
        if strategy == "requantized":  # peft: Params4bit(w_data) quantizes the sum before any rounding to W0's dtype
            packed, state = quantize_blockwise(
                w, base.quant_type, base.blocksize, base.double_quant, base.bits, name=f"{name}.weight"
            )
            state = dataclasses.replace(state, dtype=base.weight_dtype)  # decodes to W0's dtype, as before the merge
            merged_layers[name] = Linear4bit(packed, state, base.bias, base.from_conv1d).to(base.weight_packed.device)
        else:
            merged_layers[name] = _linear(w, base)  # rounded once to W0's dtype
    for name, merged in merged_layers.items():
        set_module(model, name, merged)

    if strategy == "dequantized":
        dequantize_model(model)  # the 4-bit layers that had no LoRA
    elif strategy == "original":
        for name, q in _four_bit_layers(model).items():  # the 4-bit layers that had no LoRA
            set_module(model, name, _linear(weights[name], q))
    return model


def _linear(weight: torch.Tensor, like: Linear4bit) -> nn.Module:
    """A frozen float layer holding ``weight`` (d_out, d_in) in ``like``'s weight dtype, with its bias
    (an ``nn.Linear``, or GPT-2's ``Conv1D`` if ``like`` was quantized from one)."""
    return to_float_layer(weight, like).requires_grad_(False)


def _four_bit_layers(model: nn.Module) -> dict[str, Linear4bit]:
    """Every ``Linear4bit`` of ``model`` under the name it had before LoRA wrapped it."""
    layers = {name: layer.base_layer for name, layer in lora_layers(model).items()}
    wrapped = {f"{name}.base_layer" for name in layers}
    layers.update({n: m for n, m in model.named_modules() if isinstance(m, Linear4bit) and n not in wrapped})
    return layers


def _original_weights(model: nn.Module, original) -> dict[str, torch.Tensor]:
    """``{module name: W0}`` for every 4-bit layer of ``model``, each checked against its 4-bit copy."""
    state = original.state_dict() if isinstance(original, nn.Module) else original
    if not isinstance(state, Mapping):
        raise TypeError(f"original must be an nn.Module or a state_dict, got {type(original).__name__}")
    weights = {}
    for name, q in _four_bit_layers(model).items():
        key = f"{name}.weight"
        if key not in state:
            raise KeyError(f"original has no {key!r} for the 4-bit layer {name!r}; pass the model that was quantized")
        w0 = state[key].to(device=q.weight_packed.device, dtype=q.weight_dtype)
        if q.from_conv1d:  # GPT-2's Conv1D stores (d_in, d_out)
            w0 = w0.T
        if tuple(w0.shape) != (q.out_features, q.in_features):
            raise ValueError(
                f"original's {key!r} has shape {tuple(w0.shape)}, but the 4-bit layer {name!r} holds "
                f"({q.out_features}, {q.in_features}); pass the model that was quantized"
            )
        _check_quantized_from(w0, q, key)
        weights[name] = w0
    return weights


def _check_quantized_from(w0: torch.Tensor, q: Linear4bit, key: str) -> None:
    """Refuse a ``W0`` that ``q`` cannot hold a quantization of.

    Rounding to the nearest code moves a value by at most half the codebook's widest gap times its
    block's absmax (0.15 x absmax for NF4), plus the error of the stored (double-quantized) absmax,
    plus one rounding step of the weights' dtype (a bfloat16 ``W0`` was scaled in bfloat16, so a value
    near the middle of two codes may go to the farther one: 2**-7 x absmax at most).
    """
    dtype_step = torch.finfo(w0.dtype).eps if w0.dtype.is_floating_point else 0.0
    deq, w0 = q.dequantize(torch.float32).flatten(), w0.float().flatten()
    pad = -w0.numel() % q.blocksize
    blocks = nn.functional.pad(w0, (0, pad)).view(-1, q.blocksize)  # (n_blocks, blocksize)
    error = (blocks - nn.functional.pad(deq, (0, pad)).view(-1, q.blocksize)).abs().amax(dim=1)  # (n_blocks,)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,) the true constants
    state = q.state
    stored = dequantize_absmax(state.absmax, state.offset, state.state2) if state.nested else state.absmax
    allowed = (1.01 * widest_gap(q.code) / 2 + dtype_step) * absmax  # (n_blocks,)
    allowed = allowed + (absmax - stored.float()).abs() + 1e-12
    worst = int(torch.argmax(error - allowed))
    if error[worst] > allowed[worst]:
        raise ValueError(
            f"original's {key!r} is not the weight that was quantized: block {worst} differs from the 4-bit "
            f"weight by {error[worst]:.3g}, more than rounding allows ({allowed[worst]:.3g}); "
            "pass the model that was quantized"
        )


def codes_changed(before: nn.Module, after: nn.Module) -> float:
    """The fraction of k-bit codes that differ between two 4-bit models with the same layers.

    For QLoRA's base and its re-quantized merge (b): how much of ``(alpha / r) B A`` was large
    enough to move a weight to another code; the rest was rounded away.
    """
    a, b = _four_bit_layers(before), _four_bit_layers(after)
    if not a or a.keys() != b.keys():
        raise ValueError(
            f"the models' 4-bit layers differ: {len(a)} and {len(b)} layers, "
            f"{len(a.keys() ^ b.keys())} names in one only; compare two quantizations of one model"
        )
    changed = total = 0
    for name, qa in a.items():
        qb, n = b[name], qa.out_features * qa.in_features
        changed += int((unpack_codes(qa.weight_packed, qa.bits, n) != unpack_codes(qb.weight_packed, qb.bits, n)).sum())
        total += n
    return changed / total


@dataclass(frozen=True)
class Comparison:
    """One model measured against a reference model on the same held-out tokens."""

    max_error: float  # max |logits - reference logits|
    mean_error: float  # mean |logits - reference logits|
    perplexity: float  # the model's own held-out perplexity
    heldout: Perplexity  # the same perplexity with its 95% bootstrap interval (lorakit.evaluation's protocol)


@torch.no_grad()
def compare_logits(
    reference: nn.Module, models: Mapping[str, nn.Module], blocks: torch.Tensor, batch_size: int = 4
) -> dict[str, Comparison]:
    """Each model's logit error against ``reference`` and its perplexity, on ``(N, T)`` token blocks.

    One reference forward per batch serves every model (the reference itself, among ``models``, is not run
    again: its error is 0); the perplexity is computed from the same
    logits as ``lorakit.data.perplexity`` computes it (exp of the mean next-token cross-entropy), and
    ``heldout`` holds it as :func:`lorakit.heldout_perplexity` reports it: with a bootstrap interval
    over the blocks, comparable by :func:`lorakit.compare_perplexity` with any result on the same blocks.
    """
    device = next(reference.parameters()).device
    worst = dict.fromkeys(models, 0.0)
    error_sum = dict.fromkeys(models, 0.0)
    losses: dict[str, list[torch.Tensor]] = {name: [] for name in models}  # per-block mean losses
    n_logits = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)  # (B, T)
        ref = reference(input_ids=ids).logits.float()  # (B, T, vocab)
        targets = ids[:, 1:].flatten()  # (B * (T - 1),) each position predicts the next token
        n_logits += ref.numel()
        for name, model in models.items():
            logits = ref if model is reference else model(input_ids=ids).logits.float()  # (B, T, vocab)
            nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets, reduction="none")  # (B * (T - 1),)
            losses[name].append(nll.view(len(ids), -1).double().mean(dim=1).cpu())  # (B,)
            if model is not reference:  # the reference itself: error 0, and its forward is not run twice
                error = logits.sub_(ref).abs_()  # in place: this model's logits are not needed any more
                worst[name] = max(worst[name], error.max().item())
                error_sum[name] += error.sum().item()
    out = {}
    for name in models:
        heldout = perplexity_from_losses(torch.cat(losses[name]), blocks)
        out[name] = Comparison(worst[name], error_sum[name] / n_logits, heldout.ppl, heldout)
    return out
