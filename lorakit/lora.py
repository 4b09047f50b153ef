"""LoRA: a frozen weight plus a trainable low-rank update (Hu et al. 2021, "LoRA", §4.1).

For a frozen linear layer ``h = W0 x`` with ``W0: (d_out, d_in)``, LoRA learns

    h = W0 x + (alpha / r) * B A x,        A: (r, d_in),  B: (d_out, r),  r << min(d_in, d_out)

``A`` starts random and ``B`` starts at zero, so training begins exactly at the base model.
``merge_lora`` folds ``(alpha / r) * B A`` into ``W0`` ("no additional inference latency", §4.1).

The layer follows peft's ``tuners/lora/layer.py`` (``Linear.forward``, ``get_delta_weight``,
``reset_lora_parameters``, ``merge(safe_merge=True)``) so that the same weights give the same numbers,
and adapters are saved in peft's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).
Besides ``nn.Linear`` it wraps GPT-2's ``Conv1D`` (a Linear whose weight is stored transposed,
``(d_in, d_out)``: peft's ``fan_in_fan_out``) and lorakit's ``Linear4bit`` (QLoRA).

The variants live beside it, one module each, and leave this layer plain: ``lorakit.dora`` (``DoRALinear``,
a subclass that adds a magnitude; ``add_lora(..., use_dora=True)``), ``lorakit.pissa`` and ``lorakit.loftq``
(other starting points for A, B and W0), ``lorakit.loraplus`` (optimizer groups); rsLoRA is the ``rslora`` flag.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.linear4bit import Linear4bit, embedding_module, set_module

# The seven projections of a Llama-style block (SmolLM2, Llama, Mistral, Qwen): attention, then MLP.
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen Linear-like ``base_layer`` plus the update ``(alpha / r) * B A`` (LoRA §4.1).

    ``base_layer`` is any module with ``in_features``, ``out_features`` and a ``forward``; the
    LoRA path is computed beside it, never inside it, so a quantized base layer can be wrapped
    too. Only an ``nn.Linear`` base can be merged in place; a QLoRA model (a ``Linear4bit`` base)
    is merged by ``lorakit.merge_qlora``, which chooses what the merged weight becomes.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        rslora: bool = False,
        name: str = "",
        autocast_adapter_dtype: bool = True,
    ):
        super().__init__()
        d_in, d_out = linear_features(base_layer)
        where = f"LoRA on {name!r}" if name else f"LoRA on a {type(base_layer).__name__}({d_in} -> {d_out})"
        _check_hyperparameters(where, r, alpha, dropout, d_in, d_out)
        self.base_layer = base_layer
        self.r, self.alpha, self.rslora = r, alpha, rslora
        # GPT-2's Conv1D stores W0 as (d_in, d_out) (peft's fan_in_fan_out): merging adds dW transposed.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) so larger ranks keep learning.
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype, device = _adapter_dtype_and_device(base_layer, autocast_adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))  # (d_out, r)
        # peft's reset_lora_parameters(init_lora_weights=True), after loralib: A as nn.Linear's
        # default init, B = 0, so B A = 0 and the wrapped layer starts equal to the base layer.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def in_features(self) -> int:
        return linear_features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.base_layer)[1]

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as peft's LoRA layers expose it: model code such as T5's
        ``T5DenseActDense`` reads ``self.wo.weight.dtype`` on whatever sits at ``wo``."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        h = self.base_layer(x)  # W0 x: (..., d_out)
        if self.merged:  # W0 already holds W0 + scaling * B A
            return h
        x = self.dropout(x.to(self.lora_A.dtype))
        ax = F.linear(x, self.lora_A)  # x @ A.T: (..., r)
        bax = F.linear(ax, self.lora_B)  # ax @ B.T: (..., d_out)
        lora = bax * self.scaling  # (..., d_out), in the adapter's dtype
        if isinstance(self.base_layer, Linear4bit):
            # peft's 4-bit layer (tuners/lora/bnb.py, Linear4bit.forward) casts the LoRA term to h's dtype, then adds.
            return h + lora.to(h.dtype)
        # peft's Linear.forward adds in the promoted dtype (bf16 h + fp32 term: in fp32), then casts once.
        return (h + lora).to(h.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update ``dW = (alpha / r) * B A``: ``(d_out, r) @ (r, d_in) -> (d_out, d_in)``.

        As peft's ``get_delta_weight``: half-precision factors on the CPU are multiplied in float32
        and the product is cast back to their dtype.
        """
        A, B = self.lora_A, self.lora_B
        if A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16):
            return ((B.float() @ A.float()) * self.scaling).to(A.dtype)
        return (B @ A) * self.scaling

    def merged_weight(self, sign: int = 1) -> torch.Tensor:
        """``W0 + sign * dW`` in the base weight's layout and dtype, computed without touching ``W0``.

        The sum is taken in the promoted dtype and rounded once, as peft's ``weight.data += delta``.
        """
        delta = self.delta_weight()
        if self.fan_in_fan_out:  # Conv1D: W0 is (d_in, d_out)
            delta = delta.T
        weight = self.base_layer.weight
        return (weight + sign * delta).to(weight.dtype)

    def merge(self) -> None:
        """``W0 <- W0 + dW`` (peft's ``Linear.merge``); forward then skips the LoRA path.

        The sum is rounded once, as peft's default merge; a NaN or Inf in it is refused before
        ``W0`` is written (``ValueError``), as peft's ``merge(safe_merge=True)`` refuses it.
        """
        self._check_mergeable("merge")
        if self.merged:
            raise RuntimeError(f"{self._where()} is already merged; call unmerge_lora(model) before merging again")
        with torch.no_grad():
            merged = self.merged_weight(+1)
            check_finite_merge(self._where(), self, merged, "merge")
            self.base_layer.weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """``W0 <- W0 - dW``: restores ``W0`` up to floating-point rounding."""
        self._check_mergeable("unmerge")
        if not self.merged:
            raise RuntimeError(f"{self._where()} is not merged; there is nothing to unmerge")
        with torch.no_grad():
            unmerged = self.merged_weight(-1)
            check_finite_merge(self._where(), self, unmerged, "unmerge")
            self.base_layer.weight.copy_(unmerged)
        self.merged = False

    def _check_mergeable(self, what: str) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):  # W0 + dW has no 4-bit home: which one to build is a choice
            raise NotImplementedError(
                f"cannot {what} LoRA into a Linear4bit base layer in place: W0 + (alpha / r) B A is not a 4-bit "
                "weight. Use lorakit.merge_qlora(model, strategy) with strategy 'dequantized' (16-bit), "
                "'requantized' (4-bit again) or 'original' (the unquantized W0); notebook 08 compares them"
            )
        if not isinstance(base, (nn.Linear, Conv1D)) or not base.weight.is_floating_point():  # e.g. packed codes
            raise NotImplementedError(
                f"cannot {what} LoRA into a {type(self.base_layer).__name__} base layer; only an nn.Linear "
                "(or GPT-2's Conv1D) with a floating-point weight can be merged (dequantize the base layer first)"
            )

    def _where(self) -> str:
        return f"LoRA layer on {type(self.base_layer).__name__}({self.in_features} -> {self.out_features})"

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}"


# Base layer types add_lora can wrap: plain Linears and GPT-2's Conv1D (LoRA), lorakit's 4-bit Linears (QLoRA).
LORA_BASE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D, Linear4bit)

# peft's shorthand for "every linear layer except the output head" (peft.utils.constants).
ALL_LINEAR = "all-linear"


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear-like layer; GPT-2's ``Conv1D(nf, nx)`` has ``d_in = nx``, ``d_out = nf``."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def _adapter_dtype_and_device(base_layer: nn.Module, autocast_adapter_dtype: bool) -> tuple[torch.dtype, torch.device]:
    """The dtype LoRA trains in: the base weight's (before quantization), or its compute dtype for a
    layer holding packed codes; with ``autocast_adapter_dtype`` (peft's default) float16 and bfloat16
    become float32, so the small adapter trains in full precision beside a half-precision base
    (peft's ``cast_adapter_dtype``)."""
    if isinstance(base_layer, Linear4bit):  # QLoRA: the dtype W0 had before quantization
        dtype, device = base_layer.weight_dtype, base_layer.weight_packed.device
    else:  # nn.Linear, Conv1D, or another Linear-like layer (a float weight, or a compute_dtype)
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else getattr(base_layer, "compute_dtype", torch.float32)
        device = weight.device
    if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype, device


def check_finite_merge(where: str, layer: LoRALinear, result: torch.Tensor, what: str = "merge") -> None:
    """Refuse to write a weight with NaN or Inf into a base layer (peft's ``safe_merge`` check), naming the cause."""
    if torch.isfinite(result).all():
        return
    bad = int((~torch.isfinite(result)).sum())
    causes = [
        f"{part} has {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf values"
        for part, t in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
        if not torch.isfinite(t).all()
    ]
    cause = "; ".join(causes) if causes else f"W0 + dW overflows {result.dtype} (or W0 itself holds NaN/Inf)"
    raise ValueError(
        f"{where}: refusing to {what}: the result would have {bad} NaN/Inf values ({cause}). "
        "No base weight was changed. A NaN adapter usually comes from a diverged run: lower the learning "
        "rate, check the loss curve, or load an earlier checkpoint"
    )


def _check_hyperparameters(where: str, r, alpha, dropout, d_in: int, d_out: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: rank r={r!r} is invalid; r must be an integer of at least 1")
    if r > min(d_in, d_out):
        raise ValueError(
            f"{where}: rank r={r} exceeds min(d_in, d_out) = min({d_in}, {d_out}) = {min(d_in, d_out)}; "
            f"a rank above that is not low rank. Use 1 <= r <= {min(d_in, d_out)}"
        )
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"{where}: alpha={alpha!r} is invalid; alpha must be a finite number greater than 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout={dropout!r} is invalid; use 0 <= dropout < 1")


def _matches(name: str, targets: Sequence[str]) -> bool:
    """peft's ``target_modules`` rule for a list: the dotted name equals a target or ends with ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by dotted module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _describe_linears(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, LORA_BASE_TYPES) and n]
    if not names:
        return "the model has no Linear modules"
    if len(names) <= 12:
        return "the Linear modules are: " + ", ".join(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"the model has {len(names)} Linear modules, named ...{', ...'.join(short)} (e.g. {names[0]!r})"


def add_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    rslora: bool = False,
    autocast_adapter_dtype: bool = True,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap every Linear whose dotted name ends with a target in a ``LoRALinear``; freeze the rest.

    ``targets`` follows peft's ``target_modules`` list rule (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``); ``"all-linear"`` picks every Linear (and Conv1D) except
    the output head, as peft's ``all-linear`` does. The model is changed in place and returned;
    only the ``lora_A``/``lora_B`` parameters are left trainable (peft's ``bias="none"``).
    ``autocast_adapter_dtype`` (peft's default, True) keeps the adapter in float32 on a float16 or
    bfloat16 base; False keeps it in the base weight's dtype. ``use_dora=True`` (peft's name) wraps in
    ``lorakit.dora.DoRALinear`` instead: LoRA plus a trainable magnitude per output (DoRA).
    """
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = all_linear_names(model)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets={targets!r} is invalid; give module name suffixes such as ['q_proj', 'v_proj']")
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; call unload_lora(model) before adding new ones")
    chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    wrong_type = [(n, m) for n, m in chosen if not isinstance(m, LORA_BASE_TYPES)]
    chosen = [(n, m) for n, m in chosen if isinstance(m, LORA_BASE_TYPES)]
    unmatched = [t for t in targets if not any(_matches(n, [t]) for n, _ in chosen)]
    if unmatched:
        others = ", ".join(f"{n} ({type(m).__name__})" for n, m in wrong_type[:3])
        hint = f" (matched non-Linear modules: {others})" if wrong_type else ""
        raise ValueError(
            f"targets {unmatched} match no Linear module of {type(model).__name__}{hint}; {_describe_linears(model)}"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layer_type = LoRALinear
    if use_dora:
        from lorakit.dora import DoRALinear  # a LoRALinear subclass: imported here, where it is chosen

        layer_type = DoRALinear
    for name, base in chosen:
        layer = layer_type(
            base,
            r=r,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
            name=name,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        set_module(model, name, layer)
    return model


def all_linear_names(model: nn.Module) -> list[str]:
    """Full names of every Linear-like module except the output head (peft's ``_maybe_include_all_linear_layers``).

    The head is the module ``model.get_output_embeddings()`` returns, whatever its name (``lm_head``,
    Whisper's ``proj_out``); a model without that method keeps every Linear.
    """
    head = embedding_module(model, "output")
    names = [n for n, m in model.named_modules() if n and isinstance(m, LORA_BASE_TYPES) and m is not head]
    if not names:
        raise ValueError(
            f"targets='all-linear' found no Linear module in {type(model).__name__} besides its output head"
        )
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (``W0 <- W0 + (alpha / r) B A``); returns the model.

    Every merged weight is checked for NaN and Inf before any is written (peft's ``safe_merge``), so
    a broken adapter raises ``ValueError`` naming its layer and leaves every base weight as it was.
    """
    layers = _layers_not_yet(model, "merge_lora", merged=True)
    _check_all_merges(layers, "merge_lora")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo ``merge_lora``: ``W0 <- W0 - (alpha / r) B A``; returns the model (checked as ``merge_lora``)."""
    layers = _layers_not_yet(model, "unmerge_lora", merged=False)
    _check_all_merges(layers, "unmerge_lora", sign=-1)
    for layer in layers.values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge (where not merged yet) and put the plain base layers back (peft's ``merge_and_unload``)."""
    layers = _require_lora(model, "unload_lora")
    _check_all_merges({n: m for n, m in layers.items() if not m.merged}, "unload_lora")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        set_module(model, name, layer.base_layer)
    return model


@torch.no_grad()
def _check_all_merges(layers: dict[str, LoRALinear], what: str, sign: int = 1) -> None:
    """Compute each ``W0 + sign * dW`` (one layer at a time) and refuse before anything is written."""
    verb = "merge" if sign > 0 else "unmerge"
    for name, layer in layers.items():
        layer._check_mergeable(verb)
        check_finite_merge(f"{what}: LoRA layer {name!r}", layer, layer.merged_weight(sign), verb)


def _layers_not_yet(model: nn.Module, what: str, merged: bool) -> dict[str, LoRALinear]:
    """The LoRA layers for ``what``, refusing if any is already ``merged`` (True) or unmerged (False)."""
    layers = _require_lora(model, what)
    done = [n for n, m in layers.items() if m.merged == merged]
    if done:
        state, undo = ("already merged", "unmerge_lora") if merged else ("not merged", "merge_lora")
        raise RuntimeError(f"{what}: {len(done)} LoRA layers are {state} (e.g. {done[0]!r}); call {undo}(model) first")
    return layers


def _require_lora(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call add_lora(model, targets) first")
    return layers
