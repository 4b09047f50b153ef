"""Corpora: deterministic document splits, full blocks, causal-LM batches, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.data import CORPORA, lm_batches, load_documents, perplexity, split_documents, tokenize_blocks


@pytest.mark.parametrize("name", CORPORA)
def test_split_is_deterministic_and_disjoint(name):
    train, val = split_documents(name, val_fraction=0.1, seed=0)
    again_train, again_val = split_documents(name, val_fraction=0.1, seed=0)
    assert [d.title for d in train] == [d.title for d in again_train]
    assert [d.title for d in val] == [d.title for d in again_val]
    assert not {d.title for d in train} & {d.title for d in val}
    assert len(train) + len(val) == len(load_documents(name))
    other_train, other_val = split_documents(name, val_fraction=0.1, seed=1)
    assert [d.title for d in other_val] != [d.title for d in val]


def test_shakespeare_is_shakespeare_in_one_edition():
    titles = [d.title for d in load_documents("shakespeare")]
    assert "hamlet" in titles and "sonnets" in titles
    assert not any(t.endswith("_f") for t in titles)  # First Folio duplicates left out
    assert len(titles) == len(set(titles))
    assert not any("paradise" in t or "comus" in t for t in titles)  # no Milton


def test_kjv_documents_are_books():
    docs = load_documents("kjv")
    assert len(docs) == 66
    genesis = next(d for d in docs if d.title == "Genesis")
    assert genesis.text.startswith("In the beginning God created the heaven and the earth.")


def test_blocks_batches_and_perplexity(smollm2):
    model, tokenizer = smollm2
    _, val = split_documents("shakespeare")
    blocks = tokenize_blocks(tokenizer, val, seq_len=64, max_blocks=6)
    assert blocks.shape == (6, 64) and blocks.dtype == torch.long
    batches = list(lm_batches(blocks, batch_size=4, shuffle=True, seed=0))
    assert len(batches) == 1  # the last partial batch is dropped
    assert batches[0]["input_ids"].shape == (4, 64)
    assert torch.equal(batches[0]["labels"], batches[0]["input_ids"])
    again = list(lm_batches(blocks, batch_size=4, shuffle=True, seed=0))
    assert torch.equal(again[0]["input_ids"], batches[0]["input_ids"])
    ppl = perplexity(model, blocks, batch_size=4)
    assert math.isfinite(ppl) and 1.0 < ppl < 1000.0
    # perplexity is exp(mean loss): one batch holding every block gives the same number
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert ppl == pytest.approx(math.exp(loss.item()), rel=1e-4)


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        load_documents("wiki")
    with pytest.raises(ValueError, match="val_fraction.*1.5"):
        split_documents("shakespeare", val_fraction=1.5)
    with pytest.raises(ValueError, match="fewer than one batch of 8"):
        list(lm_batches(torch.zeros(3, 16, dtype=torch.long), batch_size=8))
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        list(lm_batches(torch.zeros(3, 16, dtype=torch.long), batch_size=0))


@pytest.mark.parametrize("max_blocks", [0, -5, 2.5])
def test_a_cap_below_one_block_names_the_cap_not_the_text(max_blocks):
    """newcomer.md B1: --train-blocks 0 said "the documents hold 49246 tokens, fewer than one block"."""

    class Tokenizer:  # never reached: the cap is checked first
        eos_token_id = 0

        def __call__(self, text, **kwargs):
            raise AssertionError("tokenized despite a bad cap")

    with pytest.raises(ValueError, match=f"max_blocks={max_blocks!r} is not valid; it must be an integer of at least"):
        tokenize_blocks(Tokenizer(), [], seq_len=16, max_blocks=max_blocks)
