"""Notebook 07's checkers reject plausible wrong answers, naming the case, and accept lorakit's own."""

from __future__ import annotations

import pytest
import torch

from lorakit.chat import IGNORE_INDEX, common_prefix_length, pad_batch
from lorakit.exercises import check, check_answer_labels, check_pad_batch


def right_labels(context, full):
    start = common_prefix_length(context, full)
    return [IGNORE_INDEX] * start + full[start:]


def labels_from_context_length(context, full):  # assumes the context is always a prefix
    return [IGNORE_INDEX] * len(context) + full[len(context) :]


def labels_without_eos(context, full):  # the end-of-turn token masked too
    labels = right_labels(context, full)
    return labels[:-1] + [IGNORE_INDEX]


def labels_everywhere(context, full):
    return list(full)


@pytest.mark.parametrize(
    "wrong, message",
    [
        (labels_from_context_length, "a context whose last token merges.*first differ"),
        (labels_without_eos, "one answer: the last token's label is -100.*learns to stop"),
        (labels_everywhere, "one answer: every token counts"),
    ],
)
def test_check_answer_labels_rejects_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_answer_labels(wrong)


def pad_by_token_id(input_ids, labels, pad_id):  # the classic bug: padding found by token id
    batch = pad_batch(input_ids, labels, pad_id)
    batch["labels"][batch["input_ids"] == pad_id] = IGNORE_INDEX
    return batch


def pad_on_the_left(input_ids, labels, pad_id):
    T = max(len(x) for x in input_ids)
    flipped = pad_batch([x[::-1] for x in input_ids], [x[::-1] for x in labels], pad_id)
    return {k: v.flip(1) if v.shape[1] == T else v for k, v in flipped.items()}


def pad_without_mask(input_ids, labels, pad_id):
    batch = pad_batch(input_ids, labels, pad_id)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


@pytest.mark.parametrize(
    "wrong, message",
    [
        (pad_by_token_id, "two examples, pad_id = EOS: your labels ignore an EOS token"),
        (pad_on_the_left, "two examples, pad_id = EOS: input_ids expected"),
        (pad_without_mask, "two examples, pad_id = EOS: attention_mask expected"),
    ],
)
def test_check_pad_batch_rejects_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        check_pad_batch(wrong)


def test_the_right_answers_pass_and_a_stub_is_not_solved_yet(capsys):
    assert check_answer_labels(right_labels).startswith("correct")
    assert check_pad_batch(pad_batch).startswith("correct")

    def stub(*args):
        raise NotImplementedError()

    check(check_pad_batch, stub)
    assert "not solved yet" in capsys.readouterr().out
