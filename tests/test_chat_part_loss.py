"""lorakit.instruct's loss per part of a conversation: the answer tokens (what the mask keeps) and the
prompt tokens (what it leaves out), per example, pooled, and with a bootstrap interval over examples;
and, on a tiny model, the claim notebook 07 asserts: training without the mask lowers the prompt-token
loss (the model learns to write the questions) far more than training with it."""

from __future__ import annotations

import pytest
import torch
from chat_tokenizers import tiny_chat_tokenizer

from lorakit.chat import IGNORE_INDEX, Example, tokenize_examples
from lorakit.instruct import example_losses, heldout_loss, part_labels, part_loss, train_instruct


def conversations(n: int) -> list[Example]:
    out = []
    for i in range(n):
        question = f"Which of {i % 7} and {(3 * i) % 11}?" + " More." * (i % 3)  # lengths differ: padding
        out.append(
            Example(
                (
                    {"role": "system", "content": "Answer with a number."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": str(i % 7)},
                )
            )
        )
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer("chatml")


def tiny(tokenizer, seed: int = 0):
    from tiny_models import tiny_llama

    return tiny_llama(seed, vocab_size=len(tokenizer), max_position_embeddings=128)


def test_part_labels_split_every_predicted_token_between_answer_and_prompt():
    ids, labels = [5, 6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert part_labels(ids, labels, "answer") == labels
    assert part_labels(ids, labels, "prompt") == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, 9]
    with pytest.raises(ValueError, match="part='question'"):
        part_labels(ids, labels, "question")


def test_example_losses_add_up_to_the_whole_conversations_loss_whatever_the_padding(tokenizer):
    model = tiny(tokenizer)
    data = tokenize_examples(tokenizer, conversations(9))
    answer, n_answer = example_losses(model, data, tokenizer.eos_token_id, "answer", batch_size=4)
    prompt, n_prompt = example_losses(model, data, tokenizer.eos_token_id, "prompt", batch_size=4)
    for i, ids in enumerate(data.input_ids):  # each alone, no padding: every token after the first
        logits = model(torch.tensor([ids])).logits[0, :-1]  # (T-1, V)
        whole = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        assert answer[i] + prompt[i] == pytest.approx(whole, rel=1e-5)
        assert n_answer[i] + n_prompt[i] == len(ids) - 1
        assert n_answer[i] == sum(label != IGNORE_INDEX for label in data.labels[i])
    assert heldout_loss(model, data, tokenizer.eos_token_id) == pytest.approx((answer.sum() / n_answer.sum()).item())


def test_part_loss_interval_holds_the_pooled_loss_and_is_reproducible(tokenizer):
    model = tiny(tokenizer)
    data = tokenize_examples(tokenizer, conversations(30))
    result = part_loss(model, data, tokenizer.eos_token_id, "prompt", resamples=500)
    assert result.low < result.loss < result.high
    assert result.n_examples == 30 and result.n_tokens == sum(result.counts)
    assert result.loss == pytest.approx(sum(result.sums) / result.n_tokens)
    again = part_loss(model, data, tokenizer.eos_token_id, "prompt", resamples=500)
    assert (again.low, again.high) == (result.low, result.high)
    assert "nats per prompt token" in str(result)
    with pytest.raises(ValueError, match="at least 2 examples"):
        part_loss(model, tokenize_examples(tokenizer, conversations(1)), tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="resamples"):
        part_loss(model, data, tokenizer.eos_token_id, resamples=10)


def test_only_the_unmasked_run_learns_to_write_the_prompts(tokenizer):
    """Notebook 07's claim, on a tiny model: same start, same batches; only the mask differs."""
    train = tokenize_examples(tokenizer, conversations(40))
    test = tokenize_examples(tokenizer, conversations(60)[40:])
    pad = tokenizer.eos_token_id
    before = part_loss(tiny(tokenizer), test, pad, "prompt", resamples=500)
    after = {}
    for mask in (True, False):
        model = tiny(tokenizer)
        train_instruct(model, train, pad, steps=30, lr=3e-3, batch_size=8, warmup_steps=0, mask=mask, progress=False)
        after[mask] = part_loss(model, test, pad, "prompt", resamples=500)
    assert after[False].high < before.low  # without the mask it learned the prompts
    assert after[False].high < after[True].low  # with the mask, far less
