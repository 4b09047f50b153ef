"""``finetune(data=...)``: instruction tuning on the learner's own file (JSONL or CSV, :mod:`lorakit.chat`).

The file is read and checked whole, as a stream, before any model is loaded: a malformed line is a
:class:`lorakit.chat.DataError` naming the file and the line. Then a deterministic share of the
examples (``test_fraction``) is held out; the model trains on the rest with the loss on the
assistant's turns only (:func:`lorakit.instruct.train_instruct`), and the held-out loss per answer
token and the greedy exact-match accuracy of the held-out answers are measured before and after.
Examples longer than ``seq_len`` tokens are dropped, and counted in ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.chat import DataError, load_examples, pad_id_of, split_examples, tokenize_examples


def check_data(path: str | Path) -> int:
    """Read the whole file as a stream; every line must be a valid example. Returns how many there are."""
    examples = load_examples(path)
    if len(examples) < 2:
        raise DataError(path, None, f"{len(examples)} example is too few: one is held out, so give at least 2")
    return len(examples)


def data_splits(config) -> tuple[list, list]:
    """``(train, test)`` examples of ``config.data``, split with ``config.seed``."""
    return split_examples(load_examples(config.data), config.test_fraction, seed=config.seed)


def run_on_data(config, model, tokenizer, progress: bool = True, on_step=None) -> tuple[object, dict]:
    """Train ``model`` on ``config.data`` and measure it; returns ``(InstructResult, metrics)``."""
    from lorakit.instruct import answer_accuracy, heldout_loss, train_instruct

    train_examples, test_examples = data_splits(config)
    train_data = tokenize_examples(tokenizer, train_examples, max_len=config.seq_len)
    test_data = tokenize_examples(tokenizer, test_examples, max_len=config.seq_len)
    pad = pad_id_of(tokenizer)
    loss_before = heldout_loss(model, test_data, pad)
    acc_before = answer_accuracy(model, tokenizer, test_data.examples)
    torch.manual_seed(config.seed)
    result = train_instruct(
        model,
        train_data,
        pad,
        steps=config.steps,
        lr=config.learning_rate,
        batch_size=config.batch_size,
        warmup_steps=min(config.warmup_steps, config.steps),
        optimizer=config.optimizer,
        seed=config.seed,
        progress=progress,
        on_step=on_step,
    )
    finished = not result.interrupted and not result.diverged
    loss_after = heldout_loss(model, test_data, pad) if finished else None
    acc_after = answer_accuracy(model, tokenizer, test_data.examples) if finished else None
    metrics = {
        "data": Path(config.data).name,
        "examples": {
            "train": len(train_data.input_ids),
            "test": len(test_data.input_ids),
            "too_long_dropped": train_data.too_long + test_data.too_long,
            "max_len": config.seq_len,
        },
        "heldout_loss_before": round(loss_before, 4),  # nats per answer token, held-out examples pooled
        "heldout_loss_after": round(loss_after, 4) if loss_after is not None else None,
        "accuracy_before": round(acc_before.value, 4),  # greedy exact match of the held-out answers
        "accuracy_before_ci": [round(acc_before.low, 4), round(acc_before.high, 4)],
        "accuracy_after": round(acc_after.value, 4) if acc_after else None,
        "accuracy_after_ci": [round(acc_after.low, 4), round(acc_after.high, 4)] if acc_after else None,
    }
    return result, metrics
