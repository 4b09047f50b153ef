"""The comparison articles' claims, each with a check that turns the lab's measurements into a verdict.

The articles are the four texts this workbook answers (``000_...txt`` to ``003_...txt``); each
claim names its article by file name, quotes it briefly, and has a ``check(runs) -> Finding``:
what was measured here, a verdict (``holds`` / ``does not hold here`` / ``depends``) and one
sentence why (``partly`` where one half of a claim holds and the other does not). Claims about
scales a CPU cannot reach (65B, GPT-3 175B) are answered with the estimator and the arithmetic
(``estimated=True``); claims about published results are judged against the QLoRA paper's own
figures (``cited=True``, :data:`QLORA_PAPER`). Their "measured" text says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

HOLDS, FAILS, DEPENDS, PARTLY = "holds", "does not hold here", "depends", "partly"
VERDICTS = (HOLDS, FAILS, DEPENDS, PARTLY)  # "partly": one half of the claim holds, the other does not

# The four articles (file names as the workbook's sources list them).
ARTICLE_2025 = "000_1b21abd55088a546.txt"  # "LoRA vs QLoRA: Which is better in 2025?"
ARTICLE_TECH = "001_e5fcc8f0deb58e76.txt"  # "QLoRA vs LoRA: Efficient LLM Fine-Tuning Techniques Compared"
ARTICLE_DOMAINS = "002_83b02849e0a2ffda.txt"  # "LoRA vs QLoRA Overview" (domains, trade-off table)
ARTICLE_EVERYDAY = "003_7a366c6289dd4be5.txt"  # "Why is QLoRA Better Than LoRA? A Deep Dive for the Everyday User"

# Thresholds, each named once.
SIGNIFICANT_MEMORY_RATIO = 0.75  # "significantly lower": QLoRA's step needs at most 3/4 of LoRA's
SLIGHTLY_SLOWER = 1.5  # "slightly slower": at most 1.5x the LoRA step
TIMING_NOISE = 0.05  # step times within 5% are "the same" on a shared machine
LATENCY_TOLERANCE = 0.15  # merged vs base forward: equal within 15% (or the measured spread, if larger)
COMPARABLE_LATENCY = 1.25  # "comparable" inference: at most 1.25x
TWO_X_BAND = (1.7, 2.3)  # "halves" / "2x"
THREE_X_BAND = (2.0, 4.0)  # "~3x"
TWO_TO_THREE_X = (2.0 * (1 - TIMING_NOISE), 3.0 * (1 + TIMING_NOISE))  # "2-3x", with the timing noise
SMALL_SHARE = 0.05  # "small": under 5%
TYPICAL_SLOWDOWN = (0.15, 0.35)  # "20-30% slower", with 5 points of slack either side
DQ_EFFECT = 0.005  # double quantization "mitigates noise" only if it lowers perplexity by more than 0.5%
LOST_UPDATES = 0.10  # bf16 adapters "lose" updates when a tenth of an update's entries do not move at all
PAGING_TOLERANCE = 1e-6  # paged and resident AdamW: the same losses within this (nats); bit-identical is 0
SWITCH_FACTOR = 10  # "efficient" task switching: an adapter swap at least 10x faster than reloading the model
MATCHED_POINTS = 2.0  # "matched" on a benchmark scored in percent: within 2 points

# The QLoRA paper's own figures (Dettmers et al. 2023), cited, not measured: the claims about published
# results are judged against them. Vicuna benchmark: score as a percentage of ChatGPT's, GPT-4 as the judge
# (the paper's Vicuna table; the abstract's "99.3% of the performance level of ChatGPT"). MMLU: mean 5-shot
# test accuracy of LLaMA 7B-65B fine-tuned on Alpaca and FLAN v2 (Table 4). Pile Common Crawl: mean
# perplexity after quantization, before any fine-tuning (Table 2).
QLORA_PAPER = dict(
    vicuna_pct_of_chatgpt={"GPT-4": 114.5, "Guanaco 65B, 4-bit": 99.3},
    mmlu_5shot_mean={"BFloat16": 53.0, "Float4": 52.2, "NFloat4 + DQ": 53.1},
    pile_cc_ppl={"Int4": 34.34, "Float4 (E2M1)": 31.07, "Float4 (E3M0)": 29.48, "NFloat4 + DQ": 27.41},
)


@dataclass(frozen=True)
class Finding:
    measured: str
    verdict: str
    why: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


@dataclass(frozen=True)
class Claim:
    source: str  # the article's file name
    claim: str  # a short quote
    check: Callable[[dict], Finding]
    estimated: bool = False  # answered with the estimator and arithmetic: a CPU cannot reach the scale
    cited: bool = False  # judged against the paper's own published figures (QLORA_PAPER), not measured here

    def evaluate(self, runs: dict) -> dict:
        f = self.check(runs)
        return dict(source=self.source, claim=self.claim, measured=f.measured, verdict=f.verdict, why=f.why)


# -- formatting ----------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e7 else f"{n / 1e6:,.1f} MB"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:,.0f} ms" if seconds >= 0.01 else f"{1e3 * seconds:,.2f} ms"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _where(runs: dict) -> str:
    s = runs["settings"]
    return f"{s['device_name']} ({s['dtype']})"


def _in(x: float, band: tuple[float, float]) -> bool:
    return band[0] <= x <= band[1]


def interval_order(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Two unpaired intervals ``(low, high)``: ``"lower"`` when ``a`` lies wholly below ``b``, ``"higher"`` when
    wholly above, ``"overlap"`` when they share a point (closed intervals: touching ends overlap).

    Conservative: two models measured on the same blocks are better compared by a *paired* interval
    (:func:`lorakit.compare_perplexity`), which can resolve a difference that the two intervals' overlap hides.
    """
    (a_low, a_high), (b_low, b_high) = a, b
    if a_low > a_high or b_low > b_high:
        raise ValueError(f"an interval is (low, high) with low <= high, got {a} and {b}")
    if a_high < b_low:
        return "lower"
    if a_low > b_high:
        return "higher"
    return "overlap"


# -- shared checks -------------------------------------------------------------------------------


def quality(runs: dict, run: str, reference: str, tolerance: float) -> Finding:
    """``run``'s held-out perplexity after training against ``reference``'s: within ``tolerance``?

    Too few steps for a verdict (``min_quality_steps``) answer "depends": both runs are then still
    close to where they started, and the 4-bit base starts higher.
    """
    a, b = runs[run], runs[reference]
    d = a["ppl_after"] / b["ppl_after"] - 1
    steps, needed = runs["settings"]["steps"], runs["settings"]["min_quality_steps"]
    measured = (
        f"held-out perplexity after {steps} steps: {run} {a['ppl_after']:.2f} vs {reference} "
        f"{b['ppl_after']:.2f} ({_pct(d)}; before training {a['ppl_before']:.2f} vs {b['ppl_before']:.2f})"
    )
    if steps < needed:
        return Finding(
            measured,
            DEPENDS,
            f"{steps} steps are too few to judge quality (a verdict needs at least "
            f"{needed}: run python -m lorakit.lab --full); perplexity is also not the benchmarks the "
            "articles cite",
        )
    if d <= tolerance:
        return Finding(
            measured,
            HOLDS,
            f"{run}'s perplexity is within {100 * tolerance:g}% of {reference}'s "
            "(perplexity on held-out text, not the articles' benchmarks)",
        )
    return Finding(
        measured,
        FAILS,
        f"{run}'s perplexity is {_pct(d)} off {reference}'s, more than {100 * tolerance:g}%, at these settings",
    )


def memory_lower(runs: dict) -> Finding:
    lora, q = runs["lora"]["ledger"], runs["qlora_nf4"]["ledger"]
    ratio = q["total"] / lora["total"]
    measured = (
        f"one training step (weights + gradients + optimizer state + activations): LoRA {_mb(lora['total'])}, "
        f"QLoRA {_mb(q['total'])} ({ratio:.2f}x); weights {_mb(lora['weights'])} vs {_mb(q['weights'])}; "
        f"process peak RSS of that step {_mb(lora['peak_rss'])} vs {_mb(q['peak_rss'])}"
    )
    parts = (runs["lora"].get("rss_after_step"), runs["qlora_nf4"].get("rss_after_step"))
    if None not in parts:
        measured += f" (file-backed: {_mb(parts[0]['file'])} vs {_mb(parts[1]['file'])})"
    if ratio <= SIGNIFICANT_MEMORY_RATIO:
        why = (
            f"the 4-bit base shrinks the weights {lora['weights'] / q['weights']:.1f}x, while gradients, optimizer "
            "state and activations are LoRA's own"
        )
        if q["peak_rss"] >= lora["peak_rss"]:
            why += (
                "; the process RSS hides it here: quantize_model read every full-precision weight from the "
                "memory-mapped checkpoint, and those clean file pages stay counted until the kernel needs them"
            )
        return Finding(measured, HOLDS, why)
    return Finding(
        measured,
        FAILS,
        "at these settings the lines QLoRA does not shrink (activations, optimizer state) outweigh the weights it does",
    )


def step_ratio(runs: dict, slow: str, fast: str) -> float:
    return runs[slow]["step_seconds"] / runs[fast]["step_seconds"]


def _step_measured(runs: dict, a: str, b: str) -> str:
    return (
        f"median step on {_where(runs)}: {a} {runs[a]['step_seconds']:.2f} s, {b} "
        f"{runs[b]['step_seconds']:.2f} s ({step_ratio(runs, a, b):.2f}x)"
    )


_DEQUANT_WHY = (
    "lorakit's 4-bit layer dequantizes every weight in plain PyTorch, in the forward pass and again "
    "in backward; the overhead is set by that kernel and the hardware, not by QLoRA itself"
)


def slightly_slower(runs: dict) -> Finding:
    r = step_ratio(runs, "qlora_nf4", "lora")
    measured = _step_measured(runs, "qlora_nf4", "lora")
    if r < 1 - TIMING_NOISE:
        return Finding(measured, FAILS, "QLoRA's step was faster than LoRA's here")
    if r <= 1 + TIMING_NOISE:
        return Finding(measured, DEPENDS, "the two steps are within timing noise of each other here")
    if r <= SLIGHTLY_SLOWER:
        return Finding(measured, HOLDS, f"QLoRA's step is {_pct(r - 1)} slower: LoRA is faster, QLoRA slightly slower")
    return Finding(measured, FAILS, f"QLoRA is {r:.1f}x slower here, not slightly: {_DEQUANT_WHY}")


def slower_20_30(runs: dict) -> Finding:
    r = step_ratio(runs, "qlora_nf4", "lora")
    measured = _step_measured(runs, "qlora_nf4", "lora")
    if _in(r - 1, TYPICAL_SLOWDOWN):
        return Finding(measured, HOLDS, f"QLoRA's step is {_pct(r - 1)} slower, inside 20-30% (with 5 points of slack)")
    return Finding(measured, FAILS, f"QLoRA's step is {_pct(r - 1)} against LoRA's: {_DEQUANT_WHY}")


def latency(runs: dict, name: str) -> float:
    return runs["inference"]["latency"][name]["seconds"]


def _latency_measured(runs: dict, *names: str) -> str:
    tokens = runs["inference"]["latency_tokens"]
    parts = ", ".join(f"{n} {_ms(latency(runs, n))}" for n in names)
    return f"one forward pass over {tokens} tokens on {_where(runs)}: {parts}"


def merged_no_latency(runs: dict) -> Finding:
    inf = runs["inference"]
    base, merged = latency(runs, "base"), latency(runs, "lora_merged")
    d = merged / base - 1
    tolerance = max(LATENCY_TOLERANCE, inf["latency"]["base"]["spread"], inf["latency"]["lora_merged"]["spread"])
    measured = _latency_measured(runs, "base", "lora_merged", "lora_unmerged") + f" (merged vs base {_pct(d)})"
    if not inf["merged_same_structure_as_base"]:
        return Finding(measured, FAILS, "the merged model does not have the base's modules: it does other work")
    if abs(d) <= tolerance:
        return Finding(
            measured,
            HOLDS,
            "merged, the model has the base's modules and parameter shapes, so a forward "
            f"pass does the same work; equal within the timing noise ({100 * tolerance:.0f}%)",
        )
    return Finding(
        measured,
        DEPENDS,
        "the merged model has the base's modules and shapes, but the timings here "
        f"differ by more than the noise allowance ({100 * tolerance:.0f}%): a busy machine; run again",
    )


def qlora_merge_needs_dequant(runs: dict) -> Finding:
    inf, ppl = runs["inference"], runs["inference"]["ppl"]
    d = ppl["qlora_merged"] / ppl["qlora"] - 1
    measured = (
        f"merge_lora into the 4-bit base: {inf['qlora_merge_into_4bit']}; "
        "merged into the dequantized weights (merge_qlora): "
        f"perplexity {ppl['qlora_merged']:.3f} vs {ppl['qlora']:.3f} unmerged (max logit difference "
        f"{inf['qlora_merge_max_logit_diff']:.1e}); merged weights {_mb(inf['weight_bytes']['qlora_merged'])} "
        f"vs {_mb(inf['weight_bytes']['qlora'])} in 4 bit; merged then re-quantized to NF4: perplexity "
        f"{ppl['qlora_merged_requantized']:.3f}"
    )
    if inf["qlora_merge_into_4bit"].startswith("refused") and abs(d) <= 0.01:
        requant = ppl["qlora_merged_requantized"] / ppl["qlora"] - 1
        return Finding(
            measured,
            HOLDS,
            "a 4-bit code cannot hold W0 + (alpha/r) B A, so the base is dequantized and "
            f"the merged model is full size again; quantizing it back changes perplexity by {_pct(requant)}",
        )
    return Finding(
        measured,
        FAILS,
        "the merge into the 4-bit base went through, or the merged model does not compute what the unmerged one does",
    )


def inference_comparable(runs: dict) -> Finding:
    r = latency(runs, "qlora_unmerged") / latency(runs, "lora_merged")
    measured = _latency_measured(runs, "lora_merged", "qlora_unmerged", "qlora_merged")
    if r <= COMPARABLE_LATENCY:
        return Finding(measured, HOLDS, f"QLoRA with its 4-bit base runs within {r:.2f}x of merged LoRA")
    return Finding(
        measured,
        FAILS,
        f"kept in 4 bit, QLoRA is {r:.1f}x slower than merged LoRA (every forward "
        "dequantizes every weight); merged into a dequantized base it runs at LoRA's speed",
    )


def dequant_overhead(runs: dict) -> Finding:
    r = latency(runs, "qlora_unmerged") / latency(runs, "lora_unmerged")
    measured = _latency_measured(runs, "lora_unmerged", "qlora_unmerged") + f" ({r:.2f}x)"
    if r > 1 + TIMING_NOISE:
        return Finding(
            measured,
            HOLDS,
            "the same adapters over a 4-bit base take longer: each weight is dequantized before its matrix multiply",
        )
    return Finding(measured, FAILS, "no overhead from dequantization was measurable here")


def four_bit_inference_2x(runs: dict) -> Finding:
    speedup = latency(runs, "lora_unmerged") / latency(runs, "qlora_unmerged")
    measured = (
        _latency_measured(runs, "lora_unmerged", "qlora_unmerged")
        + f" (the same adapters over a 4-bit base: speed-up {speedup:.2f}x)"
    )
    if speedup >= TWO_X_BAND[0]:
        return Finding(measured, HOLDS, "the 4-bit model ran about twice as fast here")
    return Finding(
        measured,
        DEPENDS,
        f"here the 4-bit model ran {speedup:.2f}x as fast: lorakit dequantizes in "
        "plain PyTorch; a gain needs kernels that multiply straight from 4-bit codes, which this lab does not have",
    )


def lora_then_quantize(runs: dict) -> Finding:
    ppl, wb = runs["inference"]["ppl"], runs["inference"]["weight_bytes"]
    ratio = wb["lora_then_nf4_adapter"] / wb["qlora"]
    measured = (
        f"LoRA trained in {runs['settings']['dtype']}, base quantized to NF4 afterwards: weights "
        f"{_mb(wb['lora_then_nf4_adapter'])} vs QLoRA's {_mb(wb['qlora'])}; "
        f"perplexity {ppl['lora_then_nf4_adapter']:.2f} "
        f"(adapter over the NF4 base) and {ppl['lora_merged_then_nf4']:.2f} (merged, then NF4) vs "
        f"{ppl['qlora']:.2f} for QLoRA trained directly and {ppl['lora']:.2f} for LoRA unquantized"
    )
    if abs(ratio - 1) <= 0.05:
        return Finding(
            measured,
            HOLDS,
            "the memory is the same (the same NF4 base); the quality is not guaranteed: "
            "the adapter was trained against the full-precision base, never against the quantization error",
        )
    return Finding(measured, FAILS, "quantizing afterwards did not reach QLoRA's memory")


def no_special_hardware(runs: dict) -> Finding:
    q = runs["qlora_nf4"]
    measured = (
        f"QLoRA trained {runs['settings']['steps']} steps on {_where(runs)}: perplexity "
        f"{q['ppl_before']:.2f} -> {q['ppl_after']:.2f}"
    )
    if math.isfinite(q["ppl_after"]):
        return Finding(
            measured,
            HOLDS,
            "lorakit's 4-bit layer is plain PyTorch (an absmax per block, a 16-entry "
            "codebook); fast kernels want a GPU, QLoRA itself does not",
        )
    return Finding(measured, FAILS, "the QLoRA run did not produce a finite perplexity here")


def trainable_10000x(runs: dict) -> Finding:
    r = runs["full"]["trainable_params"] / runs["lora"]["trainable_params"]
    g = runs["estimates"]["gpt3"]
    s = runs["settings"]
    measured = (
        f"SmolLM2 here, r={s['rank']} on every linear layer: {runs['full']['trainable_params']:,} vs "
        f"{runs['lora']['trainable_params']:,} trainable ({r:,.0f}x fewer); GPT-3 175B with r=4 on W_q, W_v "
        f"(arithmetic): {g['reduction']:,.0f}x"
    )
    if round(math.log10(r)) >= 4:
        return Finding(measured, HOLDS, "LoRA trains about 10,000x fewer parameters at this size")
    return Finding(
        measured,
        DEPENDS,
        "the factor is the model's size over the adapters' size: 10,000x is the LoRA "
        "paper's GPT-3 175B with r=4 on two matrices per layer, not a property of LoRA",
    )


def gpt3_10000x_3x(runs: dict) -> Finding:
    g = runs["estimates"]["gpt3"]
    mem = g["full_bytes"] / g["lora_bytes"]
    measured = (
        f"estimated, not measured (no 175B model here): {g['lora_params'] / 1e6:.1f}M trainable "
        f"(r=4 on W_q, W_v of 96 layers) of {g['total_params'] / 1e9:.0f}B = {g['reduction']:,.0f}x fewer; "
        f"weights + gradients + Adam in 16 bit: {_gb(g['full_bytes'])} vs {_gb(g['lora_bytes'])} ({mem:.1f}x)"
    )
    if round(math.log10(g["reduction"])) == 4 and _in(mem, (2.5, 4.5)):
        return Finding(
            measured,
            HOLDS,
            f"the LoRA paper's setting gives both figures by arithmetic ({mem:.1f}x, counting "
            "16-bit weights, gradients and Adam, no activations); the paper's own 3x is a measurement, "
            "1.2 TB -> 350 GB of VRAM, a different accounting whose full-fine-tuning total is below this one's",
        )
    return Finding(measured, FAILS, "the arithmetic does not give 10,000x and 3x")


def optimizer_states_3x(runs: dict) -> Finding:
    full, lora = runs["full"]["ledger"]["optimizer_state"], runs["lora"]["ledger"]["optimizer_state"]
    r = full / lora
    measured = f"AdamW state, measured: full fine-tuning {_mb(full)}, LoRA {_mb(lora)} ({r:,.0f}x less)"
    if _in(r, THREE_X_BAND):
        return Finding(measured, HOLDS, "the optimizer state shrinks about 3x")
    return Finding(
        measured,
        FAILS,
        "optimizer state follows the trainable parameters, so it shrinks by their ratio; "
        "the 3x is the LoRA paper's total training memory for GPT-3, not the optimizer state",
    )


def lora_faster_than_full(runs: dict) -> Finding:
    r = step_ratio(runs, "full", "lora")
    measured = _step_measured(runs, "full", "lora")
    why = (
        "LoRA skips the weight gradients and the optimizer update of every base weight, but the forward pass and "
        "the activation gradients still run through the whole model; the factor is the share of the step those "
        "skipped parts took (the LoRA paper, section 4.2, reports 25% higher throughput on GPT-3 175B, not 2-3x)"
    )
    if _in(r, TWO_TO_THREE_X):
        return Finding(measured, HOLDS, f"{r:.2f}x is inside 2-3x (with {100 * TIMING_NOISE:g}% timing noise): {why}")
    return Finding(measured, FAILS, f"LoRA's step is {r:.2f}x faster here, outside 2-3x: {why}")


def halves_memory(runs: dict) -> Finding:
    bits = runs["inference"]["bits"]["nf4_dq"]["bits_per_param"]
    r = 16 / bits
    measured = (
        f"NF4 with double quantization, measured from the stored tensors: {bits:.3f} bits per weight "
        f"vs 16 ({r:.1f}x less)"
    )
    if _in(r, TWO_X_BAND):
        return Finding(measured, HOLDS, "a 4-bit base takes about half the memory of a 16-bit one")
    return Finding(
        measured, FAILS, "4 bits instead of 16 is a quarter, not a half (the quantization constants add only a little)"
    )


def scales_small(runs: dict) -> Finding:
    dq, plain = (
        runs["inference"]["bits"]["nf4_dq"]["bits_per_param"],
        runs["inference"]["bits"]["nf4"]["bits_per_param"],
    )
    share = (dq - 4) / dq
    measured = (
        f"constants per weight, measured: {dq - 4:.3f} bits of {dq:.3f} ({100 * share:.1f}%) with double "
        f"quantization, {plain - 4:.3f} of {plain:.3f} ({100 * (plain - 4) / plain:.1f}%) without"
    )
    if share <= SMALL_SHARE:
        return Finding(measured, HOLDS, "one 8-bit absmax per 64 weights plus one fp32 per 256 blocks is small")
    return Finding(measured, FAILS, "the quantization constants are not small at this block size")


def dq_half_bit(runs: dict) -> Finding:
    bits = runs["inference"]["bits"]
    saved = bits["nf4"]["bits_per_param"] - bits["nf4_dq"]["bits_per_param"]
    measured = (
        f"measured from the stored tensors: {bits['nf4']['bits_per_param']:.3f} bits per weight without, "
        f"{bits['nf4_dq']['bits_per_param']:.3f} with double quantization: {saved:.3f} bits saved"
    )
    if abs(saved - 0.5) <= 0.05:
        return Finding(measured, HOLDS, "double quantization saves about half a bit per weight")
    return Finding(
        measured,
        FAILS,
        "per block of 64 the fp32 absmax (32/64 = 0.5 bits) becomes 8 bits (8/64) plus "
        "one fp32 per 256 blocks (32/16384): 0.5 - 0.127 = 0.373 bits, the QLoRA paper's own figure",
    )


def fits_65b_48gb(runs: dict) -> Finding:
    e = runs["estimates"]
    paged, plain = e["qlora_65b_48gb_paged"], e["qlora_65b_48gb_adamw"]
    measured = (
        f"estimated, not measured (no 65B model here): LLaMA-65B QLoRA, r=64, batch 1 x 512, gradient "
        f"checkpointing: {_gb(paged['total'])} with the optimizer state paged out, {_gb(plain['total'])} "
        f"with it on the GPU; 16-bit full fine-tuning: {_gb(e['full_65b_16bit'])}"
    )
    if paged["fits"]:
        return Finding(
            measured,
            HOLDS,
            "the estimator (checked against the QLoRA paper's Figure 6) puts it under 48 GB, "
            "with a few GB left for the framework",
        )
    return Finding(measured, FAILS, "the estimate exceeds 48 GB")


def modest_gpus(runs: dict) -> Finding:
    fits = runs["estimates"]["qlora_24gb"]
    measured = "estimated, not measured: QLoRA in 24 GB, r=64, batch 1 x 512: " + ", ".join(
        f"{size} {_gb(v['total'])} ({'fits' if v['fits'] else 'does not fit'})" for size, v in fits.items()
    )
    wanted = ("13B", "33B", "65B")
    if all(fits[s]["fits"] for s in wanted):
        return Finding(measured, HOLDS, "13B to 65B all fit under 24 GB")
    too_big = [s for s in wanted if not fits[s]["fits"]]
    return Finding(
        measured,
        FAILS,
        f"{', '.join(too_big)} does not fit under 24 GB: its 4-bit weights alone are "
        "over 30 GB; that takes a 48 GB GPU",
    )


def bigger_models_than_lora(runs: dict) -> Finding:
    q, lora = runs["estimates"]["qlora_24gb"], runs["estimates"]["lora_24gb"]
    measured = "estimated, not measured: a 24 GB GPU, r=64, batch 1 x 512: " + "; ".join(
        f"{s} LoRA {_gb(lora[s]['total'])}, QLoRA {_gb(q[s]['total'])}" for s in q
    )
    largest = lambda fits: max((s for s in fits if fits[s]["fits"]), key=lambda s: fits[s]["total"], default=None)  # noqa: E731
    lq, ll = largest(q), largest(lora)
    if lq is not None and (ll is None or q[lq]["total"] > lora[ll]["total"]) and lq != ll:
        return Finding(measured, HOLDS, f"in 24 GB LoRA reaches {ll}, QLoRA {lq}")
    return Finding(measured, FAILS, "QLoRA does not reach a larger model than LoRA on this GPU")


def deploy_4x(runs: dict) -> Finding:
    q = runs["qlora_nf4"]["quantized"]
    total = runs["full"]["total_params"]
    sixteen = 2 * total
    four = q["bytes"] + 2 * (total - q["params"])  # the rest (embeddings, norms) stays 16-bit
    r = sixteen / four
    dep = runs["estimates"]["deploy"]
    measured = (
        f"SmolLM2, measured storage: {_mb(four)} with 4-bit linear layers vs {_mb(sixteen)} in 16 bit ({r:.1f}x); "
        + "; ".join(
            f"LLaMA-{s} (estimated) {_gb(v['four_bit'])} vs {_gb(v['sixteen_bit'])} "
            f"({v['sixteen_bit'] / v['four_bit']:.1f}x)"
            for s, v in dep.items()
        )
    )
    if r >= 3.5:
        return Finding(measured, HOLDS, "the 4-bit model is about 4x smaller")
    return Finding(
        measured,
        DEPENDS,
        "embeddings and norms stay 16-bit, so the factor approaches 4x only where they "
        f"are a small share of the model: {100 * (total - q['params']) / total:.0f}% of SmolLM2's weights",
    )


def adapters_small(runs: dict) -> Finding:
    a, full = runs["lora"]["adapter_bytes"], runs["full"]["checkpoint_bytes"]
    measured = f"LoRA adapter on disk {_mb(a)} vs the full fine-tune's weights {_mb(full)} ({full / a:,.0f}x)"
    if a <= 0.1 * full:
        return Finding(measured, HOLDS, "an adapter holds only lora_A and lora_B of each wrapped layer")
    return Finding(measured, FAILS, "the adapter is not much smaller than the model at this rank")


def paging_spike(runs: dict) -> Finding:
    sp = runs["qlora_nf4"].get("spike")
    if not sp:
        return Finding("not measured (spike_seq_len=0)", DEPENDS, "the paging measurement was switched off")
    ordinary, long_plain, long_paged = sp["ordinary_plain"], sp["long_plain"], sp["long_paged"]
    spike = long_plain["resident_peak"] - ordinary["resident_peak"]
    freed = long_plain["resident_peak"] - long_paged["resident_peak"]
    measured = (
        f"QLoRA, resident peak (weights + gradients + activations + resident optimizer state): "
        f"{sp['ordinary_tokens']} tokens {_mb(ordinary['resident_peak'])}; {sp['long_tokens']} tokens "
        f"{_mb(long_plain['resident_peak'])} with AdamW, {_mb(long_paged['resident_peak'])} paged "
        f"({_mb(sp['budget_bytes'])} of pages resident)"
    )
    if long_paged["resident_peak"] <= ordinary["resident_peak"]:
        return Finding(
            measured,
            HOLDS,
            f"paging moved {_mb(freed)} of optimizer state off the fast tier, more than the spike of {_mb(spike)}",
        )
    return Finding(
        measured,
        DEPENDS,
        f"paging moved {_mb(freed)} of optimizer state off the fast tier, the long batch "
        f"added {_mb(spike)}: paging absorbs a spike only up to the optimizer state's size, which for "
        "adapters is small",
    )


def nf4_for_normal(runs: dict) -> Finding:
    nf, fp = runs["qlora_nf4"], runs["qlora_fp4"]
    measured = (
        f"the base quantized with double quantization: perplexity {nf['ppl_before']:.2f} (NF4) vs "
        f"{fp['ppl_before']:.2f} (FP4), {runs['lora']['ppl_before']:.2f} unquantized; after "
        f"{runs['settings']['steps']} steps: {nf['ppl_after']:.2f} vs {fp['ppl_after']:.2f}"
    )
    if nf["ppl_before"] < fp["ppl_before"]:
        return Finding(
            measured,
            HOLDS,
            "NF4's levels are quantiles of a normal distribution, where trained weights "
            "lie, so the same 4 bits lose less than FP4's",
        )
    return Finding(measured, FAILS, "NF4 did not lose less than FP4 on this model")


def noise_mitigated(runs: dict) -> Finding:
    ppl = runs["inference"]["ppl"]
    nf4_dq, fp4_dq = runs["qlora_nf4"]["ppl_before"], runs["qlora_fp4"]["ppl_before"]
    dq = ppl["base_nf4_dq"] / ppl["base_nf4"] - 1  # what double quantization does to the error
    measured = (
        f"base perplexity {ppl['base']:.3f}; NF4 {ppl['base_nf4']:.3f}, NF4 + double quantization "
        f"{ppl['base_nf4_dq']:.3f} ({_pct(dq)}), FP4 + double quantization {fp4_dq:.3f}"
    )
    if nf4_dq >= fp4_dq:
        if dq < -DQ_EFFECT:
            return Finding(
                measured, PARTLY, "double quantization lowered the error, but NF4 did not lose less than FP4 here"
            )
        return Finding(measured, FAILS, "NF4 did not lose less than FP4 here, and double quantization did not help")
    if dq < -DQ_EFFECT:
        return Finding(measured, HOLDS, "NF4 loses less than FP4, and double quantization lowered the error too")
    return Finding(
        measured,
        PARTLY,
        "the NF4 half holds: NF4 loses less than FP4; the double-quantization half does not: it "
        f"quantizes the constants to save memory (0.373 bits per weight), and moves perplexity by {_pct(dq)}",
    )


# -- the variants job: targets, rank, adapter precision, paging, the 4-bit op, task switching -----


def _variants(runs: dict) -> dict | None:
    return runs.get("variants")


_NO_VARIANTS = Finding(
    "not measured (LabConfig.variants=False)", DEPENDS, "the variants job was switched off; run the lab with it"
)


def _paired(v: dict, key: str) -> str:
    p = v["paired"][key]
    noise = "outside the noise" if p["significant"] else "within the noise"
    return f"{_pct(p['ratio'] - 1)} (95% CI {_pct(p['low'] - 1)} to {_pct(p['high'] - 1)}, paired: {noise})"


def _variant_line(v: dict, name: str) -> str:
    r = v["runs"][name]
    return f"{name} {r['ppl']:.2f} ({r['trainable_params']:,} trainable)"


def attention_only(runs: dict) -> Finding:
    """LoRA on q_proj and v_proj only against LoRA on every linear layer, same steps, rank and rate."""
    v = _variants(runs)
    if not v:
        return _NO_VARIANTS
    steps, needed = runs["settings"]["steps"], runs["settings"]["min_quality_steps"]
    measured = (
        f"held-out perplexity after {steps} steps, r={v['rank']}: {_variant_line(v, 'q_v_only')} vs "
        f"{_variant_line(v, 'all_linear')}: q,v only {_paired(v, 'q_v_only vs all_linear')}"
    )
    p = v["paired"]["q_v_only vs all_linear"]
    if steps < needed:
        return Finding(
            measured,
            DEPENDS,
            f"{steps} steps are too few to judge quality (at least {needed}: python -m lorakit.lab --full); "
            "QLoRA section 4 found LoRA on every linear layer of the blocks necessary to match full fine-tuning",
        )
    if p["significant"] and p["ratio"] > 1:
        return Finding(
            measured,
            FAILS,
            "q,v only ends above all-linear's perplexity, outside the noise: as QLoRA section 4 found, the adapters "
            "belong on every linear layer (the number of adapters matters more than their rank)",
        )
    return Finding(measured, HOLDS, "q,v only reaches all-linear's perplexity within the noise at these settings")


def rank_too_low(runs: dict) -> Finding:
    """A rank below the rank of the update a task needs cannot fit it; does SmolLM2's task need more than r=1?"""
    task = runs.get("rank_task")
    if not task:
        return Finding("not measured", DEPENDS, "the rank task was not run")
    k = task["task_rank"]
    ranks = {int(r): x for r, x in task["ranks"].items()}
    low = [r for r in ranks if r < k]
    high = [r for r in ranks if r >= k]
    measured = (
        f"a {task['dim']}x{task['dim']} update of rank {k}, fitted by LoRA ({task['steps']} AdamW steps): share left "
        "unfitted "
        + ", ".join(f"r={r} {ranks[r]['residual']:.3f} (best possible {ranks[r]['floor']:.3f})" for r in ranks)
    )
    v = _variants(runs)
    lm = ""
    if v:
        sweep = sorted((run["rank"], name) for name, run in v["runs"].items() if name.startswith("rank_"))
        sweep = sorted([*sweep, (v["rank"], "all_linear")])
        measured += "; SmolLM2 after {} steps, alpha {:g}: ".format(v["steps"], v["alpha"]) + ", ".join(
            f"r={r} {v['runs'][n]['ppl']:.2f}" for r, n in sweep
        )
        lowest = sweep[0][1]
        if lowest != "all_linear":
            p = v["paired"][f"{lowest} vs all_linear"]
            lm = (
                f"; on SmolLM2's short Shakespeare run r={sweep[0][0]} is {_pct(p['ratio'] - 1)} against r={v['rank']} "
                + (
                    "(lower: no sign of a rank too low for this task; at a fixed alpha a small r also scales "
                    "its update up by alpha/r)"
                    if p["ratio"] < 1
                    else "(higher" + (", outside the noise)" if p["significant"] else ", within the noise)")
                )
            )
    underfits = bool(low) and all(ranks[r]["residual"] >= 0.9 * ranks[r]["floor"] > 0 for r in low)
    fits = bool(high) and all(ranks[r]["residual"] < 0.01 for r in high)
    if underfits and fits:
        return Finding(
            measured,
            HOLDS,
            f"a rank below the update's rank ({k}) leaves exactly the part no rank-r matrix can hold "
            "(Eckart-Young), a rank at or above it fits; whether a real task needs a high rank is the "
            f"task's property{lm}",
        )
    return Finding(measured, FAILS, f"LoRA below rank {k} fitted the rank-{k} update, or a higher rank did not{lm}")


def bf16_adapters(runs: dict) -> Finding:
    """Adapters in bfloat16 against float32 (peft's default over a 16-bit base), same steps and data."""
    v = _variants(runs)
    if not v:
        return _NO_VARIANTS
    rounding = v["update_rounding"]
    worst = max(rounding, key=lambda x: x["unmoved"])
    measured = (
        f"{v['steps']} steps, r={v['rank']}: adapters in float32 {v['runs']['all_linear']['ppl']:.2f}, in bfloat16 "
        f"{v['runs']['bf16_adapters']['ppl']:.2f} ({_paired(v, 'bf16_adapters vs all_linear')}); one AdamW update "
        "held in bfloat16: "
        + ", ".join(
            f"at lr {x['lr']:g} {100 * x['unmoved']:.0f}% of lora_A's entries do not move, "
            f"{100 * x['relative_error']:.0f}% error"
            for x in rounding
        )
    )
    p = v["paired"]["bf16_adapters vs all_linear"]
    if p["significant"] and p["ratio"] < 1:
        return Finding(measured, HOLDS, "bfloat16 adapters trained to a lower perplexity than float32 ones here")
    if (p["significant"] and p["ratio"] > 1) or worst["unmoved"] > LOST_UPDATES:
        return Finding(
            measured,
            FAILS,
            "bfloat16 holds an adapter less precisely than float32, not more stably: with 8 bits of mantissa, "
            f"an update of {worst['lr']:g} is rounded away on {100 * worst['unmoved']:.0f}% of the entries. "
            "BF16's edge over FP16 is its range (no overflow); QLoRA's 16-bit adapters are a memory figure, "
            "and peft keeps adapters in float32 (autocast_adapter_dtype), as lorakit does",
        )
    return Finding(
        measured,
        DEPENDS,
        "bfloat16 adapters trained as well as float32 ones here and lost few updates: they save 2 bytes per "
        "adapter weight, a memory choice, not a stability one",
    )


def paging_keeps_quality(runs: dict) -> Finding:
    """Paged and resident AdamW on the same run: paging moves the state, never the update."""
    v = _variants(runs)
    if not v:
        return _NO_VARIANTS
    paged = v["runs"]["paged_adamw"]
    pages = paged.get("paging") or {}
    diff = v["paging_loss_max_diff"]
    measured = (
        f"{v['steps']} steps with AdamW resident and paged ({pages.get('page_ins', 0):,} page-ins of "
        f"{_mb(paged.get('page_bytes') or 0)} pages, one resident): largest loss difference {diff:.1e} nats, "
        f"largest adapter difference {v['paging_adapter_max_diff']:.1e}; perplexity {paged['ppl']:.3f} vs "
        f"{v['runs']['all_linear']['ppl']:.3f}"
    )
    if diff <= PAGING_TOLERANCE:
        same = "bit-identical" if diff == 0 and v["paging_adapter_max_diff"] == 0 else f"within {PAGING_TOLERANCE:g}"
        return Finding(
            measured,
            PARTLY,
            f"quality is kept, but not *through* paging: the losses are {same} with and without it. Paging moves "
            "optimizer state between GPU and CPU memory to survive spikes; the quality comes from NF4 and the adapters",
        )
    return Finding(measured, FAILS, f"paging changed the training: the losses differ by {diff:.1e} nats")


def nf4_and_paging_quality(runs: dict) -> Finding:
    """003: NormalFloat and paged optimizers as the reasons for QLoRA's quality."""
    nf4, paging = nf4_for_normal(runs), paging_keeps_quality(runs)
    measured = f"NF4 vs FP4: {nf4.measured}; paging: {paging.measured}"
    if nf4.verdict == HOLDS and paging.verdict == PARTLY:
        return Finding(
            measured,
            PARTLY,
            "NormalFloat does keep quality (it loses less than FP4 at the same bits); paged optimizers leave every "
            "loss unchanged: they prevent out-of-memory crashes, they do not make the model better",
        )
    return Finding(measured, nf4.verdict if nf4.verdict != HOLDS else paging.verdict, f"{nf4.why}; {paging.why}")


def largest_batch_measured(runs: dict, run: str) -> int:
    """The largest batch whose step fits ``batch_budget_mb``, from ``run``'s ledger: weights, gradients and optimizer
    state are fixed, activations grow with the batch (the ledger's activations over its batch size per sequence)."""
    s = runs["settings"]
    led = runs[run]["ledger"]
    budget = s.get("batch_budget_mb", 1000) * 1e6
    fixed = led["weights"] + led["gradients"] + led["optimizer_state"]
    per_sequence = led["activations"] / s["batch_size"]
    return max(0, int((budget - fixed) // per_sequence)) if per_sequence > 0 else 0


def larger_batches(runs: dict) -> Finding:
    s = runs["settings"]
    lora, q = largest_batch_measured(runs, "lora"), largest_batch_measured(runs, "qlora_nf4")
    est = runs["estimates"].get("largest_batch_24gb")
    per = runs["lora"]["ledger"]["activations"] / s["batch_size"]
    measured = (
        f"from the ledger (SmolLM2, {s['seq_len']} tokens a sequence, {_mb(per)} of activations each): largest "
        f"batch in {s.get('batch_budget_mb', 1000):,} MB: LoRA {lora}, QLoRA {q}"
    )
    if est:
        measured += (
            f"; estimated, LLaMA-7B in 24 GB, 512 tokens, r=64, no checkpointing: LoRA {est['lora']}, "
            f"QLoRA {est['qlora']}"
        )
    both = [(q, lora)] + ([(est["qlora"], est["lora"])] if est else [])
    if all(a > b for a, b in both):
        return Finding(
            measured,
            HOLDS,
            "the memory the 4-bit base frees goes to activations, which grow with the batch; the gain is the weights "
            "saved over one sequence's activations, so it shrinks with long sequences and with gradient checkpointing",
        )
    if all(a <= b for a, b in both):
        return Finding(measured, FAILS, "QLoRA fits no larger batch than LoRA at these settings")
    return Finding(measured, DEPENDS, "the small model and the 7B estimate disagree at these settings")


def four_bit_math(runs: dict) -> Finding:
    v = _variants(runs)
    if not v:
        return _NO_VARIANTS
    op = v["four_bit_op"]
    t = op["timings"]
    sixteen, four, deq = (t[k]["seconds"] for k in ("linear_16bit", "linear_4bit", "dequantize_only"))
    measured = (
        f"one {op['shape'][0]}x{op['shape'][1]} projection ({op['layer']}) over {op['tokens']} tokens on "
        f"{_where(runs)}: {op['input_dtype']} Linear {_ms(sixteen)}, NF4 Linear4bit {_ms(four)} "
        f"(of which dequantizing {_ms(deq)}); the matrix multiply runs in {op['matmul_dtype']}"
    )
    if four < sixteen * (1 - TIMING_NOISE):
        return Finding(measured, HOLDS, "the 4-bit layer ran faster than the 16-bit one here")
    return Finding(
        measured,
        FAILS,
        f"there is no 4-bit math: the codes are dequantized to {op['matmul_dtype']} and multiplied in "
        f"{op['matmul_dtype']} (QLoRA section 3: 4-bit storage, 16-bit computation), so the 4-bit op is the 16-bit "
        f"op plus a dequantization ({four / sixteen:.1f}x here); only kernels that multiply from packed codes "
        "(inference kernels, not QLoRA's training path) can be faster",
    )


def runtime_dequant_baseline(runs: dict) -> Finding:
    lat_ = runs["inference"]["latency"]
    base, unmerged, merged = latency(runs, "base"), latency(runs, "qlora_unmerged"), latency(runs, "qlora_merged")
    tolerance = max(LATENCY_TOLERANCE, lat_["base"]["spread"], lat_["qlora_merged"]["spread"])
    measured = _latency_measured(runs, "base", "qlora_unmerged", "qlora_merged") + (
        f" (dequantized at every forward {unmerged / base:.2f}x the base; dequantized once and merged "
        f"{merged / base:.2f}x)"
    )
    once = abs(merged / base - 1) <= tolerance
    every = abs(unmerged / base - 1) <= tolerance
    if once and every:
        return Finding(measured, HOLDS, "both ways of dequantizing run at the 16-bit baseline here")
    if once:
        return Finding(
            measured,
            DEPENDS,
            "dequantized once, ahead of time (merged into full-precision weights), the model is the 16-bit model "
            f"and runs at its speed; dequantized at run time, in every forward, it is {unmerged / base:.1f}x slower",
        )
    return Finding(measured, FAILS, "even dequantized once and merged, the model does not run at the base's speed here")


def task_switching(runs: dict) -> Finding:
    v = _variants(runs)
    if not v:
        return _NO_VARIANTS
    sw = v["switch"]
    r = sw["reload_seconds"] / sw["swap_seconds"]
    measured = (
        f"swapping one {_mb(sw['adapter_bytes'])} adapter for another in the loaded model (load_adapter): "
        f"{_ms(sw['swap_seconds'])}; loading SmolLM2 again: {sw['reload_seconds']:.2f} s, from a warm file cache "
        f"({r:,.0f}x)"
    )
    if r >= SWITCH_FACTOR:
        return Finding(
            measured,
            HOLDS,
            "a task is a few MB of adapter copied into a model that stays loaded; the base is read once (LoRA "
            "section 4.2: switching tasks 'by only swapping the LoRA weights'). For a model of many GB the gap "
            "grows; a merged model must be unmerged first, or kept as a separate copy",
        )
    return Finding(measured, FAILS, f"an adapter swap was only {r:.1f}x faster than reloading the model here")


# -- claims about published results: judged against the paper's own figures, not measured --------


def _paper(runs: dict) -> dict:
    return runs.get("paper", QLORA_PAPER)


def guanaco_vs_gpt4(runs: dict) -> Finding:
    v = _paper(runs)["vicuna_pct_of_chatgpt"]
    guanaco, gpt4 = v["Guanaco 65B, 4-bit"], v["GPT-4"]
    measured = (
        f"cited, not measured: QLoRA's Vicuna-benchmark table (scores as a percentage of ChatGPT's, GPT-4 as the "
        f"judge): Guanaco 65B (4-bit) {guanaco:g}%, GPT-4 {gpt4:g}%"
    )
    if abs(guanaco - gpt4) <= MATCHED_POINTS:
        return Finding(measured, HOLDS, "Guanaco's score is within 2 points of GPT-4's")
    return Finding(
        measured,
        FAILS,
        f"the paper's claim is 99.3% of *ChatGPT*, judged *by* GPT-4; GPT-4 itself scored {gpt4:g}%, "
        f"{gpt4 - guanaco:.1f} points above Guanaco (and the paper itself finds current chatbot benchmarks 'not "
        "trustworthy to accurately evaluate the performance levels of chatbots')",
    )


def no_accuracy_drop(runs: dict) -> Finding:
    paper = _paper(runs)
    mmlu, pile = paper["mmlu_5shot_mean"], paper["pile_cc_ppl"]
    drop = mmlu["BFloat16"] - mmlu["Float4"]
    measured = (
        "cited, not measured: QLoRA Table 4, mean 5-shot MMLU after fine-tuning LLaMA 7B-65B: "
        + ", ".join(f"{k} {x:g}" for k, x in mmlu.items())
        + "; Table 2, Pile Common Crawl perplexity after quantization: "
        + ", ".join(f"{k} {x:g}" for k, x in pile.items())
    )
    if drop > 0:
        return Finding(
            measured,
            FAILS,
            f"the paper's own FP4 row is {drop:.1f} points below BFloat16 (it says FP4 'lags behind' by about one "
            "point), and Int4 and FP4 quantize worse than NF4: only NF4 with double quantization reports no drop",
        )
    return Finding(measured, HOLDS, "no 4-bit row of the paper is below its 16-bit baseline")


CLAIMS: tuple[Claim, ...] = (
    Claim(ARTICLE_2025, "Memory requirements: LoRA higher, QLoRA significantly lower", memory_lower),
    Claim(ARTICLE_2025, "Training speed: LoRA faster, QLoRA slightly slower", slightly_slower),
    Claim(ARTICLE_2025, "Inference speed: LoRA slightly faster, QLoRA comparable", inference_comparable),
    Claim(
        ARTICLE_2025,
        "Performance: LoRA potentially higher, QLoRA often comparable or slightly lower",
        lambda runs: quality(runs, "qlora_nf4", "lora", 0.05),
    ),
    Claim(
        ARTICLE_2025,
        "you can apply the quantization techniques of QLoRA to a trained LoRA model, achieving similar memory savings",
        lora_then_quantize,
    ),
    Claim(ARTICLE_2025, "Does QLoRA require specialized hardware? No", no_special_hardware),
    Claim(ARTICLE_TECH, "reducing trainable parameters by 10,000x", trainable_10000x),
    Claim(
        ARTICLE_TECH,
        "the PEFT library wraps target modules (typically q_proj, v_proj, or all attention projections)",
        attention_only,
    ),
    Claim(
        ARTICLE_TECH, "enabling fine-tuning of 65B parameter models on a single 48GB GPU", fits_65b_48gb, estimated=True
    ),
    Claim(
        ARTICLE_TECH,
        "NF4, a data type specifically designed for normally distributed neural network weights",
        nf4_for_normal,
    ),
    Claim(ARTICLE_TECH, "The adapters themselves remain in bf16 for training stability", bf16_adapters),
    Claim(
        ARTICLE_TECH, "4-bit weights are dequantized to bf16 on-the-fly, introducing compute overhead", dequant_overhead
    ),
    Claim(ARTICLE_TECH, "Double quantization ... saves an additional ~0.5 bits per parameter", dq_half_bit),
    Claim(ARTICLE_TECH, "paged optimizers to manage memory spikes", paging_spike),
    Claim(
        ARTICLE_TECH,
        "maintaining quality through the use of paged optimizers to manage memory spikes",
        paging_keeps_quality,
    ),
    Claim(
        ARTICLE_TECH, "adapters can be merged directly into base weights for zero-overhead inference", merged_no_latency
    ),
    Claim(
        ARTICLE_TECH,
        "QLoRA adapters can also be merged, but the base model must first be dequantized",
        qlora_merge_needs_dequant,
    ),
    Claim(
        ARTICLE_TECH,
        "QLoRA achieves quality within 1-2% of full LoRA fine-tuning",
        lambda runs: quality(runs, "qlora_nf4", "lora", 0.02),
    ),
    Claim(
        ARTICLE_TECH,
        "a 4-bit quantized Guanaco model fine-tuned with QLoRA ... matched GPT-4 on the Vicuna benchmark",
        guanaco_vs_gpt4,
        cited=True,
    ),
    Claim(
        ARTICLE_TECH,
        "Training throughput with QLoRA is typically 20-30% slower than LoRA due to dequantization overhead",
        slower_20_30,
    ),
    Claim(
        ARTICLE_DOMAINS,
        "~10,000x fewer trainable params and 3x less memory for GPT-3 175B",
        gpt3_10000x_3x,
        estimated=True,
    ),
    Claim(
        ARTICLE_DOMAINS,
        "LoRA's adapters can be merged into the model at deployment, introducing no extra inference latency",
        merged_no_latency,
    ),
    Claim(
        ARTICLE_DOMAINS,
        "QLoRA maintains full 16-bit fine-tuning accuracy",
        lambda runs: quality(runs, "qlora_nf4", "lora", 0.01),
    ),
    Claim(
        ARTICLE_DOMAINS,
        "LoRA achieves fine-tuning quality on par with full-tuning",
        lambda runs: quality(runs, "lora", "full", 0.02),
    ),
    Claim(
        ARTICLE_DOMAINS,
        "Only small adapter matrices are trained, cutting required optimizer states by ~3x",
        optimizer_states_3x,
    ),
    Claim(ARTICLE_DOMAINS, "higher throughput and 2-3x faster training", lora_faster_than_full),
    Claim(ARTICLE_DOMAINS, "Forward/backward use 4-bit math which can be faster per-op", four_bit_math),
    Claim(ARTICLE_DOMAINS, "Base model in 4-bit halves raw memory", halves_memory),
    Claim(ARTICLE_DOMAINS, "Extra memory for quant scales is small", scales_small),
    Claim(ARTICLE_DOMAINS, "4-bit inference can be ~2x faster on supported hardware", four_bit_inference_2x),
    Claim(
        ARTICLE_DOMAINS, "If one dequantizes at run-time, latency returns to FP16 baseline", runtime_dequant_baseline
    ),
    Claim(ARTICLE_DOMAINS, "Slight risk of underfitting if rank is too low or task needs big changes", rank_too_low),
    Claim(ARTICLE_DOMAINS, "Quantization noise is mitigated by NF4/double-quantization", noise_mitigated),
    Claim(ARTICLE_DOMAINS, "No reported accuracy drop in published results", no_accuracy_drop, cited=True),
    Claim(ARTICLE_DOMAINS, "lets you fine-tune larger models or use bigger batch sizes by using 4-bit", larger_batches),
    Claim(
        ARTICLE_DOMAINS,
        "GPU memory very tight (e.g. <24GB): makes it possible to adapt 13B-65B models on modest GPUs",
        modest_gpus,
        estimated=True,
    ),
    Claim(
        ARTICLE_DOMAINS,
        "A model fine-tuned with QLoRA is already quantized; you can deploy it as a ~4x smaller footprint",
        deploy_4x,
    ),
    Claim(ARTICLE_DOMAINS, "LoRA makes task-switching efficient", task_switching),
    Claim(
        ARTICLE_EVERYDAY,
        "By quantizing the base model to 4-bit precision, QLoRA can significantly reduce the memory footprint",
        memory_lower,
    ),
    Claim(
        ARTICLE_EVERYDAY,
        "fine-tune a powerful AI model on a consumer-grade GPU that wouldn't have been possible with standard LoRA",
        bigger_models_than_lora,
        estimated=True,
    ),
    Claim(ARTICLE_EVERYDAY, "you can often use larger batch sizes during training", larger_batches),
    Claim(
        ARTICLE_EVERYDAY, "you only save these small LoRA adapters, which are much smaller in file size", adapters_small
    ),
    Claim(
        ARTICLE_EVERYDAY,
        "often performing as well as or better than 16-bit fine-tuning",
        lambda runs: quality(runs, "qlora_nf4", "lora", 0.01),
    ),
    Claim(
        ARTICLE_EVERYDAY,
        'specific optimization strategies (like the "NormalFloat" data type and paged optimizers)',
        nf4_and_paging_quality,
    ),
    Claim(
        ARTICLE_EVERYDAY,
        "paged optimizers ... offloading data to the CPU when not actively in use, preventing crashes",
        paging_spike,
    ),
)


def evaluate_claims(runs: dict, claims: tuple[Claim, ...] = CLAIMS) -> list[dict]:
    """Every claim's ``{source, claim, measured, verdict, why}`` from the lab's measurements."""
    return [c.evaluate(runs) for c in claims]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict]) -> str:
    """The claims as a Markdown table: source, claim, measured here, verdict, why."""
    lines = ["| source | claim | measured here | verdict | why |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (r["source"], f"\u201c{r['claim']}\u201d", r["measured"], f"**{r['verdict']}**", r["why"])
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
