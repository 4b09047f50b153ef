"""The lab's inference measurements: merged and unmerged latency, merging a QLoRA adapter, quantizing afterwards.

:func:`inference_run` loads the adapters :func:`lorakit.lab.measure.train_run` saved into fresh
copies of the base and measures what the comparison articles say about merging, latency and
quantizing a LoRA model after training.
"""

from __future__ import annotations

import copy

import torch

from lorakit.adapter import load_adapter
from lorakit.evaluation import compare_perplexity, heldout_perplexity
from lorakit.finetune import load_data
from lorakit.lab.config import device_and_dtype, finetune_config, lab_config
from lorakit.lab.measure import storage_line
from lorakit.linear4bit import Linear4bit, quantize_model
from lorakit.lora import merge_lora, unload_lora
from lorakit.memory import model_bytes
from lorakit.merge import merge_qlora
from lorakit.models import count_parameters, load_base_model
from lorakit.timing import StageClock, interleaved_latency

# (before, after) pairs the inference job compares on the same held-out blocks
PAIRS = (
    ("base", "base_nf4_dq"),
    ("base_nf4", "base_nf4_dq"),
    ("qlora", "lora_then_nf4_adapter"),
    ("qlora", "lora_merged_then_nf4"),
    ("qlora", "qlora_merged_requantized"),
    ("lora", "qlora"),
)


def _change(change) -> dict:
    """A :class:`lorakit.evaluation.PerplexityChange` as plain numbers (the lab's results are JSON)."""
    return dict(ratio=change.ratio, low=change.low, high=change.high, significant=change.significant)


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every LoRA update into its base weight and drop the wrappers; returns the plain model.

    A 4-bit base cannot absorb ``(alpha / r) B A`` (its weights are codes), so QLoRA's adapter is
    merged into the dequantized weights (``merge_qlora``'s strategy "dequantized", notebook 08):
    the merged model holds full-precision weights.
    """
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        return merge_qlora(model, "dequantized")
    return unload_lora(model)


def _same_structure(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same module types in the same places, same parameter shapes: the same work per forward."""
    types_a = [(n, type(m).__name__) for n, m in a.named_modules()]
    types_b = [(n, type(m).__name__) for n, m in b.named_modules()]
    shapes_a = [(n, tuple(p.shape)) for n, p in a.named_parameters()]
    shapes_b = [(n, tuple(p.shape)) for n, p in b.named_parameters()]
    return types_a == types_b and shapes_a == shapes_b


@torch.inference_mode()
def inference_run(settings: dict, adapters: dict[str, str]) -> dict:
    """Latency merged and unmerged, merging a QLoRA adapter, and quantizing a LoRA model afterwards.

    ``adapters`` maps ``lora`` and ``qlora_nf4`` to the folders :func:`train_run` saved them in.
    """
    config = lab_config(settings)
    device, dtype = device_and_dtype(config)
    base, tokenizer = load_base_model(config.model, dtype=dtype, device=device)
    _, val_blocks = load_data(tokenizer, finetune_config("lora", config))
    val_blocks = val_blocks.to(device)
    prompt = val_blocks.reshape(-1)[: config.latency_tokens].view(1, -1)  # (1, T)

    out: dict = dict(ppl={}, ppl_ci={}, bits={}, weight_bytes={})
    measured: dict = {}  # name -> lorakit.evaluation.Perplexity, for the paired comparisons below

    def ppl(model, name: str) -> float:
        """The workbook's protocol on the lab's held-out blocks; the interval goes to out["ppl_ci"]."""
        result = heldout_perplexity(model, blocks=val_blocks)
        measured[name] = result
        out["ppl_ci"][name] = [result.low, result.high]
        return result.ppl

    def nf4(model, double_quant=True, quant_type="nf"):
        return quantize_model(copy.deepcopy(model), quant_type=quant_type, double_quant=double_quant)

    clock = StageClock()
    out["ppl"]["base"] = ppl(base, "base")
    out["weight_bytes"]["base"] = model_bytes(base)
    # the base in NF4 with and without double quantization (FP4: the qlora_fp4 run's own base)
    base_nf4 = nf4(base)
    plain_nf4 = nf4(base, double_quant=False)
    out["bits"] = dict(nf4_dq=storage_line(base_nf4), nf4=storage_line(plain_nf4))
    out["ppl"]["base_nf4_dq"], out["ppl"]["base_nf4"] = ppl(base_nf4, "base_nf4_dq"), ppl(plain_nf4, "base_nf4")
    del plain_nf4
    out["weight_bytes"]["base_nf4_dq"] = model_bytes(base_nf4)
    clock("quantize the base")
    # LoRA: as trained (unmerged) and merged
    lora = load_adapter(copy.deepcopy(base), adapters["lora"])
    out["ppl"]["lora"] = ppl(lora, "lora")
    lora_merged = merge_adapter(copy.deepcopy(lora))
    out["ppl"]["lora_merged"] = ppl(lora_merged, "lora_merged")
    out["merged_same_structure_as_base"] = _same_structure(lora_merged, base)
    clock("LoRA unmerged and merged")
    # QLoRA: merging into the 4-bit base is refused; dequantize, then merge
    qlora = load_adapter(copy.deepcopy(base_nf4), adapters["qlora_nf4"])
    out["ppl"]["qlora"] = ppl(qlora, "qlora")
    try:
        merge_lora(copy.deepcopy(qlora))
        out["qlora_merge_into_4bit"] = "merged"
    except NotImplementedError as e:
        out["qlora_merge_into_4bit"] = f"refused: {type(e).__name__}"
    qlora_merged = merge_adapter(copy.deepcopy(qlora))
    logits = qlora(input_ids=prompt).logits.float()
    out["qlora_merge_max_logit_diff"] = float((qlora_merged(input_ids=prompt).logits.float() - logits).abs().max())
    out["ppl"]["qlora_merged"] = ppl(qlora_merged, "qlora_merged")
    out["weight_bytes"]["qlora_merged"] = model_bytes(qlora_merged)
    requantized = nf4(qlora_merged)
    out["ppl"]["qlora_merged_requantized"] = ppl(requantized, "qlora_merged_requantized")
    del requantized
    clock("QLoRA merge")
    # LoRA in 16 bit, quantized afterwards: the adapter over an NF4 base, or the merged model in NF4
    lora_over_nf4 = load_adapter(copy.deepcopy(base_nf4), adapters["lora"])
    out["ppl"]["lora_then_nf4_adapter"] = ppl(lora_over_nf4, "lora_then_nf4_adapter")
    out["weight_bytes"]["lora_then_nf4_adapter"] = model_bytes(lora_over_nf4)
    out["weight_bytes"]["qlora"] = model_bytes(qlora)
    del lora_over_nf4
    lora_merged_nf4 = nf4(lora_merged)
    out["ppl"]["lora_merged_then_nf4"] = ppl(lora_merged_nf4, "lora_merged_then_nf4")
    out["weight_bytes"]["lora_merged_then_nf4"] = model_bytes(lora_merged_nf4)
    del lora_merged_nf4
    clock("LoRA quantized afterwards")
    # paired comparisons on the same blocks (lorakit.compare_perplexity): is a difference outside the noise?
    out["paired"] = {f"{b} vs {a}": _change(compare_perplexity(measured[a], measured[b])) for a, b in PAIRS}

    def forward(model):
        def call():
            model(input_ids=prompt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return call

    models = {
        "base": base,
        "lora_merged": lora_merged,
        "lora_unmerged": lora,
        "qlora_unmerged": qlora,
        "qlora_merged": qlora_merged,
    }
    out["latency"] = interleaved_latency(
        {k: forward(m) for k, m in models.items()}, config.latency_rounds, config.latency_repeats
    )
    out["latency_tokens"] = int(prompt.shape[1])
    clock("latency")
    out["stage_seconds"] = clock.seconds
    out["params"] = dict(base=count_parameters(base).total, lora_merged=count_parameters(lora_merged).total)
    return out
