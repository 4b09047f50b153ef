"""The evaluation protocol: per-block losses against transformers' loss and lorakit.data.perplexity,
the bootstrap interval's properties, the paired comparison's error rates, the held-out set, and the
archaic-forms rate on real Shakespeare against modern English."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import logging
import math
import textwrap
import unittest
from pathlib import Path

import pytest
import torch
from test_models import char_tokenizer
from tiny_models import tiny_llama

from lorakit.data import load_documents, perplexity, split_documents, tokenize_blocks
from lorakit.evaluation import (
    HELDOUT,
    HeldOut,
    Perplexity,
    archaic_rate,
    block_losses,
    compare_perplexity,
    heldout_perplexity,
    mean_line_words,
    words,
)

ROOT = Path(__file__).resolve().parents[1]


def random_blocks(n: int, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(64, (n, seq_len), generator=torch.Generator().manual_seed(seed))  # (N, T)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def with_losses(template: Perplexity, losses: torch.Tensor) -> Perplexity:
    """A result as heldout_perplexity would return it for these per-block losses, on template's blocks."""
    return dataclasses.replace(template, ppl=math.exp(losses.mean().item()), block_losses=tuple(losses.tolist()))


def test_block_losses_equal_transformers_loss_block_by_block(tiny):
    blocks = random_blocks(10)
    ours = block_losses(tiny, blocks, batch_size=4)  # 4 + 4 + 2: the last batch is short
    reference = torch.stack([tiny(input_ids=b[None], labels=b[None]).loss for b in blocks])  # (N,)
    torch.testing.assert_close(ours, reference.double(), rtol=1e-6, atol=0)  # float32 sums in another order


def test_heldout_perplexity_equals_lorakit_data_perplexity(tiny):
    blocks = random_blocks(10)
    result = heldout_perplexity(tiny, blocks=blocks, batch_size=3)
    assert result.ppl == pytest.approx(perplexity(tiny, blocks, batch_size=8), rel=1e-6)
    assert (result.n_blocks, result.seq_len, result.n_tokens, result.heldout) == (10, 16, 160, "given blocks")
    assert not tiny.training


def test_the_interval_contains_the_estimate_agrees_with_the_normal_approximation_and_narrows(tiny):
    blocks = random_blocks(256)
    few = heldout_perplexity(tiny, blocks=blocks[:16])
    many = heldout_perplexity(tiny, blocks=blocks)
    for r in (few, many):
        assert r.low < r.ppl < r.high
        # half the interval's width in log space against 1.96 standard errors of the mean loss
        losses = torch.tensor(r.block_losses)
        half_width = math.log(r.high / r.low) / 2
        assert half_width == pytest.approx(1.96 * losses.std().item() / math.sqrt(r.n_blocks), rel=0.2)
    # a standard error shrinks as 1 / sqrt(N): 16 times the blocks, about a quarter of the width
    assert math.log(many.high / many.low) < 0.5 * math.log(few.high / few.low)


def test_the_interval_is_deterministic_under_its_seed(tiny):
    blocks = random_blocks(12)
    first = heldout_perplexity(tiny, blocks=blocks, seed=7)
    assert heldout_perplexity(tiny, blocks=blocks, seed=7) == first
    other = heldout_perplexity(tiny, blocks=blocks, seed=8)
    assert other.ppl == first.ppl and (other.low, other.high) != (first.low, first.high)
    wider = heldout_perplexity(tiny, blocks=blocks, seed=7, confidence=0.99)
    assert wider.low < first.low and wider.high > first.high


def test_the_paired_comparison_flags_a_real_difference_and_not_a_null_one():
    """200 simulated pairs of models on 32 blocks. Per-block losses vary a lot between blocks (sd 0.3
    nats, shared by both models) and a little between models (sd 0.05). With no true difference
    about 5-9% of pairs are flagged (the 95% interval's error rate, which the percentile bootstrap
    exceeds a little with 32 blocks: 6-9% over five seeds); with a true difference of 0.03
    nats (3% in perplexity, far inside either model's own interval, 3.4 standard errors of the
    paired mean) about 90% (88-95% over the same seeds)."""
    g = torch.Generator().manual_seed(0)
    template = heldout_perplexity(tiny_llama(seed=0), blocks=random_blocks(32), resamples=500)
    flagged = {"null": 0, "real": 0}
    for trial in range(200):
        base = 4.0 + 0.3 * torch.randn(32, generator=g, dtype=torch.float64)  # (N,) a model's block losses
        before = with_losses(template, base)
        for kind, shift in (("null", 0.0), ("real", 0.03)):
            noise = 0.05 * torch.randn(32, generator=g, dtype=torch.float64)  # what differs between two models
            after = with_losses(template, base + noise + shift)
            flagged[kind] += compare_perplexity(before, after).significant
        assert 1.96 * base.std().item() / math.sqrt(32) > 2 * 0.03  # one model's own interval: far wider
    assert 2 <= flagged["null"] <= 24  # 10 expected at exactly 5%; 12-18 measured over seeds 0-4
    assert flagged["real"] >= 160  # 177 measured


def test_the_paired_comparison_of_two_tiny_models(tiny):
    blocks = random_blocks(32)
    a = heldout_perplexity(tiny, blocks=blocks)
    b = heldout_perplexity(tiny_llama(seed=1), blocks=blocks)
    change = compare_perplexity(a, b)
    assert change.ratio == pytest.approx(b.ppl / a.ppl, rel=1e-9)
    assert change.low < change.ratio < change.high
    same = compare_perplexity(a, heldout_perplexity(copy.deepcopy(tiny), blocks=blocks))  # the same weights
    assert not same.significant and abs(same.percent) < 1e-3
    assert str(same).endswith("within the noise (the interval contains 0%)")
    assert f"{a.ppl:.2f} -> {b.ppl:.2f}" in str(change)


def test_results_on_different_blocks_do_not_compare(tiny):
    a = heldout_perplexity(tiny, blocks=random_blocks(8, seed=0))
    b = heldout_perplexity(tiny, blocks=random_blocks(8, seed=1))
    with pytest.raises(ValueError, match=f"different blocks.*{a.blocks_digest}.*{b.blocks_digest}"):
        compare_perplexity(a, b)


def test_str_reads_as_the_workbook_prints_it(tiny):
    r = heldout_perplexity(tiny, blocks=random_blocks(8))
    text = str(r)
    assert text.startswith(f"{r.ppl:.2f} (95% CI ")
    assert text.endswith(", 8 blocks x 16 tokens, given blocks)")
    low, high = text.split("CI ")[1].split(",")[0].split("-")
    assert float(low) == pytest.approx(r.low, rel=5e-3) and float(high) == pytest.approx(r.high, rel=5e-3)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda m: heldout_perplexity(m), "either a tokenizer"),
        (lambda m: heldout_perplexity(m, char_tokenizer(), blocks=random_blocks(4)), "either a tokenizer"),
        (lambda m: heldout_perplexity(m, blocks=random_blocks(1)), r"\(1, 16\)"),
        (lambda m: heldout_perplexity(m, blocks=random_blocks(4), confidence=95), "confidence"),
        (lambda m: heldout_perplexity(m, blocks=random_blocks(4), resamples=10), "resamples"),
        (lambda m: HeldOut(corpus="wiki"), "wiki"),
        (lambda m: HeldOut(n_blocks=0), "n_blocks"),
        (lambda m: HeldOut(n_blocks=10**6).blocks(char_tokenizer()), "at most"),
    ],
)
def test_bad_inputs_name_the_value(tiny, call, named):
    with pytest.raises(ValueError, match=named):
        call(tiny)


def test_the_heldout_set_spans_the_whole_validation_split():
    tokenizer = char_tokenizer()
    _, val_docs = split_documents(HELDOUT.corpus, seed=HELDOUT.split_seed)
    every = tokenize_blocks(tokenizer, val_docs, HELDOUT.seq_len)  # (N_all, T)
    blocks = HELDOUT.blocks(tokenizer)
    assert blocks.shape == (HELDOUT.n_blocks, HELDOUT.seq_len)
    assert torch.equal(HELDOUT.blocks(tokenizer), blocks)  # the same set every time
    assert torch.equal(blocks[0], every[0]) and torch.equal(blocks[-1], every[-1])
    assert len({tuple(b.tolist()) for b in blocks}) == len(blocks)  # no block twice
    # every validation work contributes: its first and last block bracket at least one picked block
    starts = [0]
    for doc in val_docs:
        starts.append(starts[-1] + len(tokenizer(doc.text)["input_ids"]) + 1)  # + 1: the EOS between works
    picks = [next(i for i, row in enumerate(every) if torch.equal(row, b)) for b in blocks]
    for first, end in zip(starts, starts[1:]):
        assert any(first <= p * HELDOUT.seq_len < end for p in picks)
    assert HeldOut(n_blocks=None).blocks(tokenizer).shape == every.shape


# --- style: archaic forms --------------------------------------------------------------------------


def modern_english() -> str:
    """Modern English prose that no one wrote for this test: the project README and stdlib docstrings."""
    docs = [inspect.getdoc(m) for m in (json, logging, textwrap, argparse, unittest)]
    return "\n".join([(ROOT / "README.md").read_text(encoding="utf-8"), *docs])


def test_archaic_rate_separates_shakespeare_from_modern_english():
    _, val_docs = split_documents("shakespeare", seed=0)
    modern = modern_english()
    assert len(words(modern)) > 1500  # so that a rate under 0.1% means at most one archaic word
    for doc in val_docs:  # all four held-out works, sonnets included
        lines = [line for line in doc.text.splitlines() if line.strip()][200:400]  # 200 lines past the cast list
        assert archaic_rate("\n".join(lines)) > 0.01, doc.title
    assert archaic_rate(modern) < 0.001
    kjv = load_documents("kjv")[0].text  # another archaic English, none of it in the word list's source
    assert archaic_rate(kjv) > 0.01


def test_archaic_rate_counts_words_and_contractions():
    assert archaic_rate("Thou art here; 'Tis o\u2019er, ne'er THEE.") == pytest.approx(5 / 7)
    assert archaic_rate("The art of the bridge: hence the name.") == 0.0  # modern senses of art and hence
    assert archaic_rate("") == 0.0 and archaic_rate("1, 2, 3!") == 0.0


def test_verse_has_short_lines_and_the_same_words_as_prose_do_not():
    sonnets = next(d for d in load_documents("shakespeare") if d.title == "sonnets").text
    verse = "\n".join(sonnets.splitlines()[100:400])
    prose = textwrap.fill(" ".join(verse.split()), width=400)  # the same words, set as prose
    assert mean_line_words(verse) < 10 < mean_line_words(prose)
    assert archaic_rate(verse) == archaic_rate(prose)
    assert mean_line_words("") == 0.0


@pytest.mark.model
def test_smollm2_heldout_perplexity_is_the_data_perplexity_with_an_interval(smollm2):
    model, tokenizer = smollm2
    small = HeldOut(n_blocks=8, seq_len=64)  # cheap: 512 tokens
    result = heldout_perplexity(model, tokenizer, small)
    assert result.ppl == pytest.approx(perplexity(model, small.blocks(tokenizer)), rel=1e-5)
    assert result.low < result.ppl < result.high
    assert str(result).endswith("8 blocks x 64 tokens, shakespeare held-out)")
