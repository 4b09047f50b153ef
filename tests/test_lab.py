"""The lab: every claim's verdict logic on hand-made measurements, the report's shape, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lorakit.lab import CLAIMS, DEPENDS, FAILS, HOLDS, PARTLY, LabConfig, LabResult, evaluate_claims
from lorakit.lab import claims as C
from lorakit.lab.__main__ import main

# The articles' file names, as the workbook's sources list them (the texts themselves are not shipped).
ARTICLES = {
    "000_1b21abd55088a546.txt",
    "001_e5fcc8f0deb58e76.txt",
    "002_83b02849e0a2ffda.txt",
    "003_7a366c6289dd4be5.txt",
}
MB = 10**6


def ledger(weights, gradients, state, activations, peak_rss=900 * MB):
    total = weights + gradients + state + activations
    return dict(
        weights=weights,
        gradients=gradients,
        optimizer_state=state,
        activations=activations,
        total=total,
        peak_rss=peak_rss,
        peak_rss_is_step_only=True,
        peak_cuda=None,
        resident_peak=weights + gradients + activations + state,
    )


def run(step, before, after, trainable, led, **extra):
    return dict(
        step_seconds=step,
        ppl_before=before,
        ppl_after=after,
        trainable_params=trainable,
        total_params=134_515_008,
        ledger=led,
        **extra,
    )


def lat(seconds, spread=0.02):
    return dict(seconds=seconds, spread=spread)


def pair(ratio, low, high):
    return dict(ratio=ratio, low=low, high=high, significant=not low <= 1 <= high)


def variant(ppl, trainable=4_884_480, rank=8, dtype="float32", **extra):
    return dict(
        ppl=ppl, low=0.8 * ppl, high=1.2 * ppl, trainable_params=trainable, rank=rank, adapter_dtype=dtype, **extra
    )


def fake_variants() -> dict:
    """The variants job's measurements: q,v only worse, rank 1 as good, bf16 losing small updates, paging exact."""
    return dict(
        lr=2e-4,
        steps=200,
        rank=8,
        alpha=16.0,
        runs=dict(
            all_linear=variant(15.0, losses=[3.0, 2.5]),
            q_v_only=variant(15.6, trainable=921_600),
            rank_1=variant(15.1, trainable=610_560, rank=1),
            rank_32=variant(14.9, trainable=19_537_920, rank=32),
            bf16_adapters=variant(15.02, dtype="bfloat16"),
            paged_adamw=variant(
                15.0,
                losses=[3.0, 2.5],
                page_bytes=256 * 1024,
                paging=dict(page_ins=400, page_outs=399, bytes_in=10**8, bytes_out=10**8),
            ),
        ),
        paired={
            "q_v_only vs all_linear": pair(1.04, 1.02, 1.06),
            "rank_1 vs all_linear": pair(1.007, 0.99, 1.02),
            "rank_32 vs all_linear": pair(0.993, 0.98, 1.01),
            "bf16_adapters vs all_linear": pair(1.001, 0.99, 1.01),
            "paged_adamw vs all_linear": pair(1.0, 1.0, 1.0),
            "all_linear vs base": pair(0.75, 0.7, 0.8),
        },
        update_rounding=[
            dict(lr=2e-4, unmoved=0.0, relative_error=0.18),
            dict(lr=2e-5, unmoved=0.81, relative_error=0.92),
        ],
        paging_loss_max_diff=0.0,
        paging_adapter_max_diff=0.0,
        four_bit_op=dict(
            layer="model.layers.0.mlp.gate_proj",
            shape=[1536, 576],
            tokens=32,
            input_dtype="bfloat16",
            matmul_dtype="bfloat16",
            timings=dict(linear_16bit=lat(0.0002), linear_4bit=lat(0.0015), dequantize_only=lat(0.0011)),
        ),
        switch=dict(swap_seconds=0.03, reload_seconds=1.5, load_seconds=2.8, adapter_bytes=9.8 * MB),
    )


def fake_rank_task() -> dict:
    return dict(
        task_rank=16,
        dim=64,
        steps=200,
        ranks={
            1: dict(residual=0.9375, floor=0.9375),
            4: dict(residual=0.75, floor=0.75),
            16: dict(residual=1e-7, floor=0.0),
            32: dict(residual=1e-7, floor=0.0),
        },
    )


def fake_runs(steps=200) -> dict:
    """Plausible measurements of a long CPU run, every claim answerable from them."""
    lora_led = ledger(540 * MB, 20 * MB, 39 * MB, 150 * MB, peak_rss=1200 * MB)
    q_led = ledger(170 * MB, 20 * MB, 39 * MB, 150 * MB)
    quantized = dict(params=106_000_000, bytes=55 * MB, bits_per_param=4.127)
    return {
        "settings": dict(
            steps=steps,
            min_quality_steps=100,
            rank=8,
            batch_size=2,
            seq_len=64,
            eval_blocks=8,
            seed=0,
            batch_budget_mb=1000,
            device="cpu",
            dtype="float32",
            device_name="CPU",
            seconds=100.0,
        ),
        "full": run(
            6.0, 20.0, 15.0, 134_515_008, ledger(540 * MB, 540 * MB, 1080 * MB, 300 * MB), checkpoint_bytes=538 * MB
        ),
        "lora": run(2.5, 20.0, 15.2, 4_884_480, lora_led, adapter_bytes=19.6 * MB),
        "qlora_nf4": run(
            3.0,
            21.0,
            15.4,
            4_884_480,
            q_led,
            quantized=quantized,
            spike=dict(
                ordinary_tokens=128,
                long_tokens=512,
                budget_bytes=2 * 2**20,
                ordinary_plain=ledger(170 * MB, 20 * MB, 39 * MB, 150 * MB),
                long_plain=ledger(170 * MB, 20 * MB, 39 * MB, 600 * MB),
                long_paged=ledger(170 * MB, 20 * MB, 2 * MB, 600 * MB),
            ),
        ),
        "qlora_fp4": run(3.0, 24.0, 16.0, 4_884_480, q_led, quantized=quantized),
        "inference": dict(
            latency_tokens=64,
            latency=dict(
                base=lat(0.100),
                lora_merged=lat(0.101),
                lora_unmerged=lat(0.120),
                qlora_unmerged=lat(0.320),
                qlora_merged=lat(0.100),
            ),
            merged_same_structure_as_base=True,
            qlora_merge_into_4bit="refused: NotImplementedError",
            qlora_merge_max_logit_diff=2e-5,
            ppl=dict(
                base=20.0,
                base_nf4_dq=21.0,
                base_nf4=20.98,
                lora=15.2,
                lora_merged=15.2,
                qlora=15.4,
                qlora_merged=15.4,
                qlora_merged_requantized=15.9,
                lora_then_nf4_adapter=16.3,
                lora_merged_then_nf4=16.1,
            ),
            bits=dict(
                nf4_dq=dict(bits_per_param=4.127), nf4=dict(bits_per_param=4.5), fp4_dq=dict(bits_per_param=4.127)
            ),
            weight_bytes=dict(
                base=538 * MB,
                base_nf4_dq=170 * MB,
                qlora=190 * MB,
                qlora_merged=558 * MB,
                lora_then_nf4_adapter=190 * MB,
                lora_merged_then_nf4=170 * MB,
            ),
        ),
        "estimates": dict(
            qlora_65b_48gb_paged=dict(total=38.6e9, fits=True),
            qlora_65b_48gb_adamw=dict(total=45e9, fits=True),
            full_65b_16bit=799e9,
            qlora_24gb={
                "7B": dict(total=4.8e9, fits=True),
                "13B": dict(total=8.6e9, fits=True),
                "33B": dict(total=20e9, fits=True),
                "65B": dict(total=38.6e9, fits=False),
            },
            lora_24gb={
                "7B": dict(total=14.4e9, fits=True),
                "13B": dict(total=27.4e9, fits=False),
                "33B": dict(total=67.6e9, fits=False),
                "65B": dict(total=134.7e9, fits=False),
            },
            gpt3=dict(
                total_params=174_588_899_328,
                lora_params=18_874_368,
                reduction=9250.05,
                full_bytes=1.3967e12,
                lora_bytes=3.4933e11,
            ),
            deploy={"7B": dict(four_bit=3.87e9, sixteen_bit=13.48e9)},
            largest_batch_24gb=dict(lora=3, qlora=6),
        ),
        "variants": fake_variants(),
        "rank_task": fake_rank_task(),
    }


def with_(runs: dict, path: str, value) -> dict:
    """A copy of ``runs`` with the value at the dotted ``path`` replaced."""
    out = copy.deepcopy(runs)
    *head, last = path.split(".")
    node = out
    for key in head:
        node = node[key]
    node[last] = value
    return out


# -- the claims list -----------------------------------------------------------------------------


def test_every_claim_names_an_article_and_quotes_it():
    assert {c.source for c in CLAIMS} == ARTICLES  # every article is answered, and nothing else is cited
    for c in CLAIMS:
        assert c.claim.strip() and len(c.claim) <= 140, c.claim


def test_the_issue_claims_are_all_there():
    text = " ".join(c.claim for c in CLAIMS)
    for phrase in (
        "significantly lower",
        "20-30% slower",
        "within 1-2%",
        "~0.5 bits",
        "halves raw memory",
        "no extra inference latency",
        "must first be dequantized",
        "to a trained LoRA model",
        "10,000x fewer trainable params and 3x less memory",
        "65B parameter models on a single 48GB GPU",
        "memory spikes",
    ):
        assert phrase in text, phrase


def test_every_claim_answers_from_measurements():
    rows = evaluate_claims(fake_runs())
    assert len(rows) == len(CLAIMS)
    for row, claim in zip(rows, CLAIMS):
        assert set(row) == {"source", "claim", "measured", "verdict", "why"}
        assert row["measured"] and row["why"]
        if claim.estimated:
            assert row["measured"].startswith("estimated, not measured"), row
        if claim.cited:
            assert row["measured"].startswith("cited, not measured"), row


def test_finding_refuses_an_unknown_verdict():
    with pytest.raises(ValueError, match="verdict 'maybe' is not one of"):
        C.Finding("x", "maybe", "y")


# -- each verdict branch, on hand-made measurements ------------------------------------------------


def test_quality_depends_on_too_few_steps_then_compares():
    assert C.quality(fake_runs(steps=8), "qlora_nf4", "lora", 0.02).verdict == DEPENDS
    runs = fake_runs()
    assert C.quality(runs, "qlora_nf4", "lora", 0.02).verdict == HOLDS  # 15.4 vs 15.2: +1.3%
    assert C.quality(runs, "qlora_nf4", "lora", 0.01).verdict == FAILS
    assert C.quality(with_(runs, "qlora_nf4.ppl_after", 14.0), "qlora_nf4", "lora", 0.0).verdict == HOLDS  # better


def test_memory_lower():
    runs = fake_runs()
    assert C.memory_lower(runs).verdict == HOLDS
    assert "hides" not in C.memory_lower(runs).why
    more_rss = C.memory_lower(with_(runs, "qlora_nf4.ledger.peak_rss", 1300 * MB))
    assert more_rss.verdict == HOLDS and "the process RSS hides it here" in more_rss.why
    big_activations = ledger(170 * MB, 20 * MB, 39 * MB, 5000 * MB)
    assert (
        C.memory_lower(
            with_(
                with_(runs, "qlora_nf4.ledger", big_activations),
                "lora.ledger",
                ledger(540 * MB, 20 * MB, 39 * MB, 5000 * MB),
            )
        ).verdict
        == FAILS
    )


@pytest.mark.parametrize(
    "qlora_step, slight, typical",
    [
        (2.0, FAILS, FAILS),  # faster than LoRA
        (2.55, DEPENDS, FAILS),  # within noise
        (3.1, HOLDS, HOLDS),  # +24%
        (3.6, HOLDS, FAILS),  # +44%
        (6.0, FAILS, FAILS),  # 2.4x: not "slightly"
    ],
)
def test_training_speed_claims(qlora_step, slight, typical):
    runs = with_(fake_runs(), "qlora_nf4.step_seconds", qlora_step)
    assert C.slightly_slower(runs).verdict == slight
    assert C.slower_20_30(runs).verdict == typical


@pytest.mark.parametrize("full_step, verdict", [(2.6, FAILS), (4.65, FAILS), (6.0, HOLDS), (12.0, FAILS)])
def test_lora_two_to_three_times_faster(full_step, verdict):
    assert C.lora_faster_than_full(with_(fake_runs(), "full.step_seconds", full_step)).verdict == verdict


def test_merged_latency():
    runs = fake_runs()
    assert C.merged_no_latency(runs).verdict == HOLDS
    assert C.merged_no_latency(with_(runs, "inference.latency.lora_merged", lat(0.140))).verdict == DEPENDS
    noisy = with_(runs, "inference.latency.base", lat(0.100, spread=0.5))
    assert C.merged_no_latency(with_(noisy, "inference.latency.lora_merged", lat(0.140))).verdict == HOLDS
    assert C.merged_no_latency(with_(runs, "inference.merged_same_structure_as_base", False)).verdict == FAILS


def test_qlora_merge_needs_dequantization():
    runs = fake_runs()
    assert C.qlora_merge_needs_dequant(runs).verdict == HOLDS
    assert C.qlora_merge_needs_dequant(with_(runs, "inference.qlora_merge_into_4bit", "merged")).verdict == FAILS
    assert C.qlora_merge_needs_dequant(with_(runs, "inference.ppl.qlora_merged", 17.0)).verdict == FAILS


def test_inference_latency_claims():
    runs = fake_runs()
    assert C.inference_comparable(runs).verdict == FAILS  # 4-bit unmerged: 3.2x merged LoRA
    assert C.inference_comparable(with_(runs, "inference.latency.qlora_unmerged", lat(0.11))).verdict == HOLDS
    assert C.dequant_overhead(runs).verdict == HOLDS
    assert C.dequant_overhead(with_(runs, "inference.latency.qlora_unmerged", lat(0.12))).verdict == FAILS
    assert C.four_bit_inference_2x(runs).verdict == DEPENDS
    assert C.four_bit_inference_2x(with_(runs, "inference.latency.qlora_unmerged", lat(0.05))).verdict == HOLDS


def test_lora_then_quantize():
    runs = fake_runs()
    assert C.lora_then_quantize(runs).verdict == HOLDS
    assert C.lora_then_quantize(with_(runs, "inference.weight_bytes.lora_then_nf4_adapter", 540 * MB)).verdict == FAILS


def test_no_special_hardware():
    assert C.no_special_hardware(fake_runs()).verdict == HOLDS
    assert C.no_special_hardware(with_(fake_runs(), "qlora_nf4.ppl_after", float("nan"))).verdict == FAILS


def test_parameter_and_optimizer_ratios():
    runs = fake_runs()
    assert C.trainable_10000x(runs).verdict == DEPENDS  # 28x on SmolLM2
    assert C.trainable_10000x(with_(runs, "lora.trainable_params", 13_000)).verdict == HOLDS
    assert C.gpt3_10000x_3x(runs).verdict == HOLDS
    assert C.gpt3_10000x_3x(with_(runs, "estimates.gpt3.reduction", 900.0)).verdict == FAILS
    assert C.optimizer_states_3x(runs).verdict == FAILS  # 1080 / 39 = 28x
    assert C.optimizer_states_3x(with_(runs, "lora.ledger.optimizer_state", 360 * MB)).verdict == HOLDS


def test_quantized_storage_claims():
    runs = fake_runs()
    assert C.halves_memory(runs).verdict == FAILS  # 16 / 4.127 = 3.9x
    assert C.halves_memory(with_(runs, "inference.bits.nf4_dq.bits_per_param", 8.1)).verdict == HOLDS
    assert C.scales_small(runs).verdict == HOLDS  # 0.127 of 4.127 bits
    assert C.scales_small(with_(runs, "inference.bits.nf4_dq.bits_per_param", 4.5)).verdict == FAILS
    assert C.dq_half_bit(runs).verdict == FAILS  # 0.373 bits
    assert C.dq_half_bit(with_(runs, "inference.bits.nf4.bits_per_param", 4.62)).verdict == HOLDS
    assert C.deploy_4x(runs).verdict == DEPENDS  # SmolLM2: embeddings are a fifth of it
    assert C.deploy_4x(with_(runs, "qlora_nf4.quantized", dict(params=134_000_000, bytes=69 * MB))).verdict == HOLDS


def test_scale_claims_from_the_estimator():
    runs = fake_runs()
    assert C.fits_65b_48gb(runs).verdict == HOLDS
    assert C.fits_65b_48gb(with_(runs, "estimates.qlora_65b_48gb_paged.fits", False)).verdict == FAILS
    assert C.modest_gpus(runs).verdict == FAILS  # 65B does not fit in 24 GB
    assert C.modest_gpus(with_(runs, "estimates.qlora_24gb.65B.fits", True)).verdict == HOLDS
    assert C.bigger_models_than_lora(runs).verdict == HOLDS  # LoRA 7B, QLoRA 33B
    assert (
        C.bigger_models_than_lora(with_(runs, "estimates.qlora_24gb", fake_runs()["estimates"]["lora_24gb"])).verdict
        == FAILS
    )


def test_adapters_small():
    assert C.adapters_small(fake_runs()).verdict == HOLDS
    assert C.adapters_small(with_(fake_runs(), "lora.adapter_bytes", 300 * MB)).verdict == FAILS


def test_paging_spike():
    runs = fake_runs()
    assert C.paging_spike(runs).verdict == DEPENDS  # 37 MB of state against a 450 MB spike
    absorbed = with_(runs, "qlora_nf4.spike.long_paged", ledger(170 * MB, 20 * MB, 2 * MB, 180 * MB))
    assert C.paging_spike(absorbed).verdict == HOLDS
    del runs["qlora_nf4"]["spike"]
    assert C.paging_spike(runs).verdict == DEPENDS


def test_nf4_and_double_quantization_noise():
    runs = fake_runs()
    assert C.nf4_for_normal(runs).verdict == HOLDS
    assert C.nf4_for_normal(with_(runs, "qlora_fp4.ppl_before", 20.5)).verdict == FAILS
    assert C.noise_mitigated(runs).verdict == PARTLY  # NF4 helps; double quantization adds a little error
    assert "the NF4 half holds" in C.noise_mitigated(runs).why
    assert C.noise_mitigated(with_(runs, "inference.ppl.base_nf4", 21.2)).verdict == HOLDS
    assert C.noise_mitigated(with_(runs, "qlora_fp4.ppl_before", 20.5)).verdict == FAILS
    both = with_(with_(runs, "qlora_fp4.ppl_before", 20.5), "inference.ppl.base_nf4", 21.2)
    assert C.noise_mitigated(both).verdict == PARTLY  # double quantization helps, NF4 does not


# -- the claims the variants job makes testable ------------------------------------------------------


def test_attention_only_against_all_linear():
    runs = fake_runs()
    assert C.attention_only(runs).verdict == FAILS  # q,v only worse, outside the noise (QLoRA section 4)
    assert "QLoRA section 4" in C.attention_only(runs).why
    assert C.attention_only(with_(runs, "variants.paired.q_v_only vs all_linear", pair(1.01, 0.99, 1.03))).verdict == (
        HOLDS
    )
    assert C.attention_only(fake_runs(steps=6)).verdict == DEPENDS  # too few steps
    assert C.attention_only(with_(runs, "variants", None)).verdict == DEPENDS  # not measured


def test_rank_too_low():
    runs = fake_runs()
    found = C.rank_too_low(runs)
    assert found.verdict == HOLDS and "Eckart-Young" in found.why
    assert "r=1 15.10" in found.measured
    fitted = with_(runs, "rank_task.ranks.4", dict(residual=0.01, floor=0.75))  # a low rank fitted a rank-16 update
    assert C.rank_too_low(fitted).verdict == FAILS
    stuck = with_(runs, "rank_task.ranks.16", dict(residual=0.2, floor=0.0))  # a high enough rank did not fit
    assert C.rank_too_low(stuck).verdict == FAILS


def test_bf16_adapters():
    runs = fake_runs()
    assert C.bf16_adapters(runs).verdict == FAILS  # 81% of a small update rounded away
    precise = with_(runs, "variants.update_rounding", [dict(lr=2e-4, unmoved=0.0, relative_error=0.2)])
    assert C.bf16_adapters(precise).verdict == DEPENDS  # as good, few updates lost: a memory choice
    worse = with_(precise, "variants.paired.bf16_adapters vs all_linear", pair(1.05, 1.02, 1.08))
    assert C.bf16_adapters(worse).verdict == FAILS
    better = with_(precise, "variants.paired.bf16_adapters vs all_linear", pair(0.95, 0.92, 0.98))
    assert C.bf16_adapters(better).verdict == HOLDS


def test_paging_keeps_quality():
    runs = fake_runs()
    found = C.paging_keeps_quality(runs)
    assert found.verdict == PARTLY and "bit-identical" in found.why
    assert C.paging_keeps_quality(with_(runs, "variants.paging_loss_max_diff", 1e-8)).verdict == PARTLY
    assert C.paging_keeps_quality(with_(runs, "variants.paging_loss_max_diff", 1e-3)).verdict == FAILS
    assert C.nf4_and_paging_quality(runs).verdict == PARTLY
    assert C.nf4_and_paging_quality(with_(runs, "qlora_fp4.ppl_before", 20.5)).verdict == FAILS


def test_larger_batches():
    runs = fake_runs()
    # 1,000 MB budget: LoRA 540 + 20 + 39 fixed, 75 MB a sequence -> 5; QLoRA 170 + 20 + 39 -> 10
    assert (C.largest_batch_measured(runs, "lora"), C.largest_batch_measured(runs, "qlora_nf4")) == (5, 10)
    assert C.larger_batches(runs).verdict == HOLDS
    same = with_(runs, "qlora_nf4.ledger", runs["lora"]["ledger"])
    assert C.larger_batches(with_(same, "estimates.largest_batch_24gb", dict(lora=3, qlora=3))).verdict == FAILS
    assert C.larger_batches(same).verdict == DEPENDS  # the ledger and the 7B estimate disagree
    assert C.largest_batch_measured(with_(runs, "settings.batch_budget_mb", 100), "lora") == 0


def test_four_bit_math_and_runtime_dequantization():
    runs = fake_runs()
    found = C.four_bit_math(runs)
    assert found.verdict == FAILS and "bfloat16" in found.why
    faster = with_(runs, "variants.four_bit_op.timings.linear_4bit", lat(0.0001))
    assert C.four_bit_math(faster).verdict == HOLDS
    assert C.runtime_dequant_baseline(runs).verdict == DEPENDS  # merged: baseline; every forward: 3.2x
    assert C.runtime_dequant_baseline(with_(runs, "inference.latency.qlora_unmerged", lat(0.105))).verdict == HOLDS
    assert C.runtime_dequant_baseline(with_(runs, "inference.latency.qlora_merged", lat(0.2))).verdict == FAILS


def test_task_switching():
    runs = fake_runs()
    assert C.task_switching(runs).verdict == HOLDS  # 50x
    assert C.task_switching(with_(runs, "variants.switch.swap_seconds", 0.5)).verdict == FAILS


def test_cited_claims_against_the_papers_figures():
    runs = fake_runs()
    found = C.guanaco_vs_gpt4(runs)
    assert found.verdict == FAILS and "99.3% of *ChatGPT*" in found.why and "114.5%" in found.measured
    matched = dict(C.QLORA_PAPER, vicuna_pct_of_chatgpt={"GPT-4": 100.0, "Guanaco 65B, 4-bit": 99.3})
    assert C.guanaco_vs_gpt4({**runs, "paper": matched}).verdict == HOLDS
    found = C.no_accuracy_drop(runs)
    assert found.verdict == FAILS and "0.8 points" in found.why
    no_drop = dict(C.QLORA_PAPER, mmlu_5shot_mean={"BFloat16": 53.0, "Float4": 53.0, "NFloat4 + DQ": 53.1})
    assert C.no_accuracy_drop({**runs, "paper": no_drop}).verdict == HOLDS


def test_rank_task_reaches_the_eckart_young_floor():
    from lorakit.lab.variants import rank_task

    task = rank_task(task_rank=4, dim=16, ranks=(1, 2, 4, 8), steps=300)
    for r, x in task["ranks"].items():
        assert x["floor"] == max(0, 4 - r) / 4
        assert x["residual"] == pytest.approx(x["floor"], abs=1e-3), r


def test_update_rounding_in_bf16():
    import torch

    from lorakit.lab.variants import update_rounding

    a = torch.full((4, 64), 0.03)  # bfloat16's spacing near 0.03 is 2**-13 = 1.2e-4
    assert update_rounding(a, 2e-4)["unmoved"] == 0.0
    assert update_rounding(a, 2e-5)["unmoved"] == 1.0  # under half the spacing: rounded away
    assert update_rounding(a, 2e-5, dtype=torch.float32)["unmoved"] == 0.0


# -- the report ------------------------------------------------------------------------------------


def test_json_shape_and_markdown_table(tmp_path):
    runs = fake_runs()
    lab = LabResult(claims=evaluate_claims(runs), runs=runs)
    path = lab.write_json(tmp_path / "out" / "lab.json")
    data = json.loads(path.read_text())
    assert set(data) == {"claims", "runs"}
    assert [set(c) for c in data["claims"]] == [{"source", "claim", "measured", "verdict", "why"}] * len(CLAIMS)
    assert set(data["runs"]) >= {"full", "lora", "qlora_nf4", "qlora_fp4", "inference", "estimates", "settings"}
    md = lab.markdown()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| source | claim | measured here | verdict | why |"
    assert len(table) == 2 + len(CLAIMS)
    assert all(line.count(" | ") - line.count("\\|") == 4 for line in table[2:])  # five cells, pipes escaped
    assert lab.verdict("Double quantization") == FAILS
    with pytest.raises(KeyError, match="no claim starts with 'nothing'"):
        lab.verdict("nothing")
    assert lab.write_markdown(tmp_path / "lab.md").read_text() == md
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_markdown_escapes_pipes():
    row = dict(source="s", claim="a | b", measured="m", verdict=HOLDS, why="w")
    line = C.markdown_table([row]).splitlines()[2]
    assert "a \\| b" in line


# -- settings and the command line ----------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 0, r"LabConfig.steps=0 is not valid; it must be an integer of at least 1"),
        ("seq_len", 4, r"LabConfig.seq_len=4 is not valid; use at least 8 tokens"),
        ("latency_tokens", 10_000, r"LabConfig.latency_tokens=10000 is more than the held-out text"),
        ("train_blocks", 1, r"LabConfig.train_blocks=1 is fewer than one batch of 2"),
        ("spike_seq_len", -1, r"LabConfig.spike_seq_len=-1 is not valid"),
        ("device", "gpu0", r"LabConfig.device='gpu0' is not a torch device"),
        ("sweep_ranks", (1, 500), r"LabConfig.sweep_ranks=\(1, 500\) is not valid; give ranks from 1 to 192"),
        ("sweep_ranks", (), r"LabConfig.sweep_ranks=\(\) is not valid"),
        ("batch_budget_mb", 0, r"LabConfig.batch_budget_mb=0 is not valid"),
    ],
)
def test_config_errors_name_the_setting(field, value, message):
    with pytest.raises(ValueError, match=message):
        LabConfig(**{field: value}).validate()


def test_full_settings_are_longer_and_reach_a_quality_verdict():
    quick, full = LabConfig(), LabConfig.full_settings()
    quick.validate()
    full.validate()
    assert full.steps > quick.steps and full.steps >= full.min_quality_steps > quick.steps


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: 0 is not valid; it must be at least 1"),
        (["--steps", "many"], "--steps: 'many' is not an integer"),
        (["--seq-len", "4"], "LabConfig.seq_len=4 is not valid"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--device", "gpu0"], "LabConfig.device='gpu0' is not a torch device"),
        (["--sweep-ranks", "1", "500"], "LabConfig.sweep_ranks=(1, 500) is not valid"),
    ],
)
def test_cli_argument_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.model
def test_cli_tiny_real_run(tmp_path, capsys, monkeypatch):
    """The whole lab on tiny settings, in this process: every claim gets a verdict from real measurements."""
    import tempfile

    from lorakit.lab import run as lab_run

    made: list[str] = []  # the lab's temporary adapter folder, to check that it is removed afterwards
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        folder = real_mkdtemp(*args, **kwargs)
        if kwargs.get("prefix") == "lorakit-lab-":
            made.append(folder)
        return folder

    monkeypatch.setattr(lab_run.tempfile, "mkdtemp", mkdtemp)
    out = tmp_path / "lab.json"
    assert (
        main(
            [
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--eval-blocks",
                "2",
                "--train-blocks",
                "4",
                "--spike-seq-len",
                "32",
                "--latency-rounds",
                "1",
                "--latency-repeats",
                "1",
                "--sweep-ranks",
                "2",
                "--in-process",
                "--no-progress",
                "--json",
                str(out),
                "--markdown",
                str(tmp_path / "lab.md"),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert [c["claim"] for c in data["claims"]] == [c.claim for c in CLAIMS]
    runs = data["runs"]
    assert runs["lora"]["trainable_params"] < runs["full"]["trainable_params"] / 20
    assert runs["qlora_nf4"]["ledger"]["weights"] < 0.5 * runs["lora"]["ledger"]["weights"]
    assert (
        abs(
            runs["inference"]["bits"]["nf4"]["bits_per_param"]
            - runs["inference"]["bits"]["nf4_dq"]["bits_per_param"]
            - 0.373
        )
        < 0.001
    )
    assert runs["inference"]["qlora_merge_into_4bit"].startswith("refused")
    # the inference job reloads the saved QLoRA adapter: it computes what the trained model did
    assert runs["inference"]["ppl"]["qlora"] == pytest.approx(runs["qlora_nf4"]["ppl_after"], rel=1e-4)
    # every perplexity comes with its bootstrap interval (the workbook's protocol), and the pairs are compared
    inference = runs["inference"]
    assert set(inference["ppl_ci"]) == set(inference["ppl"])
    for name, ppl in inference["ppl"].items():
        low, high = inference["ppl_ci"][name]
        assert low <= ppl <= high, name
    low, high = runs["qlora_nf4"]["ppl_after_ci"]
    assert low - 0.01 <= runs["qlora_nf4"]["ppl_after"] <= high + 0.01  # the metrics round the interval to 0.01
    pair = inference["paired"]["lora_then_nf4_adapter vs qlora"]
    assert pair["ratio"] == pytest.approx(inference["ppl"]["lora_then_nf4_adapter"] / inference["ppl"]["qlora"])
    assert pair["significant"] == (not pair["low"] <= 1 <= pair["high"])
    variants = runs["variants"]
    assert set(variants["runs"]) == {"all_linear", "q_v_only", "rank_2", "bf16_adapters", "paged_adamw"}
    assert variants["runs"]["q_v_only"]["trainable_params"] < variants["runs"]["all_linear"]["trainable_params"]
    assert variants["runs"]["bf16_adapters"]["adapter_dtype"] == "bfloat16"
    assert variants["runs"]["paged_adamw"]["paging"]["page_ins"] > 0
    assert variants["paging_loss_max_diff"] <= 1e-6  # paging moves the state, not the update
    assert variants["four_bit_op"]["matmul_dtype"] == runs["settings"]["dtype"]  # 4-bit storage, 16-bit math
    assert runs["estimates"]["largest_batch_24gb"]["qlora"] > runs["estimates"]["largest_batch_24gb"]["lora"]
    assert "held-out perplexity on 2 evenly spaced blocks" in (tmp_path / "lab.md").read_text()
    assert "| source | claim |" in capsys.readouterr().out
    assert len(made) == 1 and not Path(made[0]).exists()


# -- notebook 10's exercises: the checkers pass the right answer and name the case of a wrong one ----------


def _bootstrap(losses, resamples=1000, seed=0, confidence=0.95, *, replace=True, exp_mean=True, q=None, in_ppl=True):
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(losses)
    if replace:
        picks = torch.randint(n, (resamples, n), generator=g)  # (R, N)
    else:
        picks = torch.stack([torch.randperm(n, generator=g) for _ in range(resamples)])  # (R, N)
    means = losses[picks].mean(dim=1)  # (R,)
    q = q or ((1 - confidence) / 2, (1 + confidence) / 2)
    low, high = torch.quantile(means, torch.tensor(q, dtype=means.dtype)).tolist()
    ppl = math.exp(losses.mean().item()) if exp_mean else losses.exp().mean().item()
    return (ppl, math.exp(low), math.exp(high)) if in_ppl else (ppl, low, high)


def test_check_bootstrap_perplexity():
    from lorakit.exercises import check_bootstrap_perplexity

    assert check_bootstrap_perplexity(_bootstrap).startswith("correct")
    wrong = {
        "you averaged exp\\(loss\\)": lambda x, **k: _bootstrap(x, **k, exp_mean=False),
        "case 8 blocks: interval .* \\*with\\* replacement": lambda x, **k: _bootstrap(x, **k, replace=False),
        "case 8 blocks: interval .* must be in perplexity": lambda x, **k: _bootstrap(x, **k, in_ppl=False),
        "case 8 blocks: interval .* narrower than the 95% one": lambda x, **k: _bootstrap(x, **k, q=(0.05, 0.95)),
        "case 8 blocks: interval .* torch.randint": lambda x, **k: _bootstrap(x, **{**k, "seed": k["seed"] + 1}),
        "expected a tuple": lambda x, **k: _bootstrap(x, **k)[0],
    }
    for message, fn in wrong.items():
        with pytest.raises(AssertionError, match=message):
            check_bootstrap_perplexity(fn)


def test_check_interval_order():
    from lorakit.exercises import check_interval_order
    from lorakit.lab.claims import interval_order

    assert check_interval_order(interval_order).startswith("correct")

    def by_centre(a, b):  # compares midpoints: orders overlapping intervals
        ca, cb = sum(a) / 2, sum(b) / 2
        return "lower" if ca < cb else "higher" if ca > cb else "overlap"

    def strict(a, b):  # touching ends counted as ordered
        return "lower" if a[1] <= b[0] else "higher" if a[0] >= b[1] else "overlap"

    def lows_only(a, b):  # compares the low ends
        return "lower" if a[0] < b[0] else "higher"

    for fn, message in (
        (by_centre, "case overlapping, a's centre lower: .* expected 'overlap', got 'lower'"),
        (strict, "case touching ends: .* expected 'overlap', got 'lower'"),
        (lows_only, "case overlapping, a's centre lower"),
    ):
        with pytest.raises(AssertionError, match=message):
            check_interval_order(fn)
    with pytest.raises(ValueError, match="low <= high"):
        interval_order((2.0, 1.0), (0.0, 3.0))


def test_lab_result_accessors():
    runs = fake_runs()
    runs["inference"]["ppl_ci"] = {k: [0.9 * v, 1.1 * v] for k, v in runs["inference"]["ppl"].items()}
    for name in ("full", "lora", "qlora_nf4", "qlora_fp4"):
        runs[name]["ppl_after_ci"] = [0.9 * runs[name]["ppl_after"], 1.1 * runs[name]["ppl_after"]]
    runs["inference"]["paired"] = {"lora vs qlora": pair(1.01, 0.99, 1.03)}
    lab = LabResult(claims=evaluate_claims(runs), runs=runs)
    assert lab.perplexity("qlora") == dict(ppl=15.4, low=pytest.approx(0.9 * 15.4), high=pytest.approx(1.1 * 15.4))
    assert lab.perplexity("q_v_only")["ppl"] == 15.6  # a variants-job run
    assert lab.perplexity("qlora_fp4")["ppl"] == 16.0  # a training run, after training
    assert lab.paired("lora vs qlora")["ratio"] == 1.01
    assert lab.paired("q_v_only vs all_linear")["significant"]
    with pytest.raises(KeyError, match="no perplexity named 'nope'; measured: full, lora"):
        lab.perplexity("nope")
    with pytest.raises(KeyError, match="no paired comparison"):
        lab.paired("a vs b")
    assert lab.verdict("The adapters themselves remain in bf16") == FAILS
