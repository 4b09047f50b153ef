"""Instruction data: conversations read from a file, rendered by the tokenizer's own chat template, and a
loss mask that counts the assistant's turns only.

- **Reading** (:func:`read_examples`): JSONL with ``{"messages": [{"role": ..., "content": ...}, ...]}``
  (an optional system turn first, then user and assistant turns, several of them) or
  ``{"prompt": ..., "completion": ...}``; CSV with a prompt and a completion column. The file is read
  as a stream, one line (row) at a time. Every problem is a :class:`DataError` naming the file, the
  line and what is wrong, raised before any training starts.
- **The template** (:func:`tokenize_conversation`): the tokenizer's ``apply_chat_template`` renders
  the conversation, exactly as the model will see it when it chats.
- **The loss mask**: ``labels`` are ``-100`` (ignored by the cross-entropy) everywhere but on the
  assistant's turns. An assistant turn counts from the token after the template's generation prompt
  (``<|im_start|>assistant\\n`` in ChatML) to the end of the turn, **its end-of-turn token
  included**: it is the token that teaches the model to stop. This is what TRL's ``SFTTrainer`` does
  with ``completion_only_loss`` (the completion begins where the tokenized prompt and the tokenized
  prompt + completion part, trl ``common_prefix_length``); tests/test_chat_trl.py checks it token for token.
- **Batches** (:func:`pad_batch`, :func:`length_grouped_batches`): padded on the right with an
  attention mask; padding is ignored by position, never by token id, so a tokenizer whose pad token
  is its EOS token keeps every EOS in the loss.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # labels with this value are left out of the loss (torch.nn.functional.cross_entropy's default)
FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
TOO_LONG = ("drop", "truncate")


class DataError(ValueError):
    """A problem with a data file: ``file:line: what is wrong``."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path, self.line, self.problem = str(path), line, message
        where = f"{Path(path).name}:{line}" if line is not None else Path(path).name
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Example:
    """One conversation and where it came from."""

    messages: tuple[dict, ...]  # {"role": ..., "content": ...}, the last one the assistant's
    line: int = 0  # the line (JSONL) or row (CSV, the header is line 1) it was read from

    @property
    def answer(self) -> str:
        """The last assistant turn's content: the reference answer of a prompt."""
        return self.messages[-1]["content"]

    @property
    def prompt(self) -> list[dict]:
        """Every turn before the last answer (what the model sees when it answers)."""
        return list(self.messages[:-1])


def check_messages(messages, path, line: int) -> tuple[dict, ...]:
    """Validate one conversation; returns it as a tuple of plain ``{"role", "content"}`` dicts."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, f'"messages" must be a non-empty list of turns, got {type(messages).__name__}')
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(path, line, f'turn {i} must be an object with "role" and "content", got {turn!r:.80}')
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(path, line, f"turn {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, line, f"turn {i} ({role}) has content of type {type(content).__name__}; use a string")
        if not content.strip():
            raise DataError(path, line, f"turn {i} ({role}) has empty content")
        if role == "system" and i != 0:
            raise DataError(path, line, f"turn {i} is a system turn; only the first turn may be one")
        turns.append({"role": role, "content": content})
    if not any(t["role"] == "assistant" for t in turns):
        raise DataError(path, line, "the conversation has no assistant turn: there is nothing to learn")
    return tuple(turns)


def _from_record(record, path, line: int) -> Example:
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return Example(check_messages(record["messages"], path, line), line)
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise DataError(
            path,
            line,
            f'missing key {missing[0]!r}: each line needs "messages", or "prompt" and "completion" '
            f"(found {', '.join(map(repr, record)) or 'no keys'})",
        )
    turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    return Example(check_messages(turns, path, line), line)


def read_examples(
    path: str | Path, prompt_column: str = "prompt", completion_column: str = "completion"
) -> Iterator[Example]:
    """Yield the file's examples one at a time (a stream: the file is never read whole).

    The format comes from the suffix: ``.jsonl`` (one JSON object per line; blank lines skipped) or
    ``.csv`` (a header row naming ``prompt_column`` and ``completion_column``). Raises
    :class:`DataError` at the first bad line.
    """
    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(path, None, f"unknown format {path.suffix or '(no suffix)'!r}; use {' or '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(path, None, "no such file")
    with open(path, encoding="utf-8", newline="" if kind == "csv" else None) as f:
        if kind == "jsonl":
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
                yield _from_record(record, path, line_no)
            return
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for name in (prompt_column, completion_column):
            if name not in columns:
                found = ", ".join(columns) or "none"
                raise DataError(path, 1, f"missing column {name!r} in the header (found {found})")
        for record in reader:
            line_no = reader.line_num
            record = {"prompt": record[prompt_column], "completion": record[completion_column]}
            yield _from_record(record, path, line_no)


def load_examples(path: str | Path, limit: int | None = None, **columns) -> list[Example]:
    """Every example of the file (or the first ``limit``), read as a stream; an empty file is an error."""
    examples = []
    for example in read_examples(path, **columns):
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(path, None, "no valid example: the file holds no conversation")
    return examples


def split_examples(examples: list, test_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """A deterministic ``(train, test)`` split: same examples and seed, same split; at least one of each."""
    if len(examples) < 2:
        raise ValueError(f"split_examples: {len(examples)} example cannot be split in two; give at least 2")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"split_examples: test_fraction must lie between 0 and 1 (exclusive), got {test_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = min(len(examples) - 1, max(1, round(test_fraction * len(examples))))
    test = set(order[:n_test])
    return [e for i, e in enumerate(examples) if i not in test], [e for i, e in enumerate(examples) if i in test]


# --- the template and the loss mask -----------------------------------------------------------


def _template_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (trl.trainer.sft_trainer's function of the same name)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def assistant_spans(tokenizer, messages) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and, per assistant turn, the ``[start, end)`` span that counts in the loss.

    For assistant turn ``i``: the conversation up to it, rendered with the generation prompt, is the
    context; the same turns plus turn ``i`` is the context and the answer. The answer is what the
    second adds to the first (its content, the end-of-turn token, and what the template writes after it).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template (an Instruct model has one)")
    ids = _template_ids(tokenizer, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        context = _template_ids(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template_ids(tokenizer, messages[: i + 1])
        if through != ids[: len(through)]:
            raise ValueError(
                "the chat template renders the first turns differently when later turns follow (a template that "
                f"rewrites history); lorakit cannot mark assistant turn {i} in it"
            )
        spans.append((common_prefix_length(context, through), len(through)))
    return ids, spans


def tokenize_conversation(tokenizer, messages) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation: labels equal the ids on assistant turns, -100 elsewhere."""
    ids, spans = assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


@dataclass
class Tokenized:
    """Tokenized examples and what happened to the long ones."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    examples: list[Example]  # the examples kept, in the same order
    too_long: int = 0  # examples over max_len (dropped or truncated, per ``too_long``)
    max_len: int | None = None
    policy: str = "drop"

    def report(self) -> str:
        kept = len(self.input_ids)
        if self.max_len is None:
            return f"{kept} examples (no length limit)"
        if not self.too_long:
            return f"{kept} examples, none over {self.max_len} tokens"
        done = "dropped" if self.policy == "drop" else "truncated (their answers' ends are lost)"
        return f"{kept} examples; {self.too_long} over {self.max_len} tokens were {done}"


def tokenize_examples(tokenizer, examples, max_len: int | None = None, too_long: str = "drop") -> Tokenized:
    """Tokenize and mask every example; those over ``max_len`` tokens are dropped or truncated (counted)."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r} is not valid; choose one of {', '.join(TOO_LONG)}")
    out = Tokenized([], [], [], max_len=max_len, policy=too_long)
    for example in examples:
        ids, labels = tokenize_conversation(tokenizer, example.messages)
        if max_len is not None and len(ids) > max_len:
            out.too_long += 1
            if too_long == "drop":
                continue
            ids, labels = ids[:max_len], labels[:max_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                continue  # nothing left to learn: the answer began past max_len
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.examples.append(example)
    if not out.input_ids:
        raise ValueError(f"no example is left: all {out.too_long} are over max_len={max_len} tokens; raise max_len")
    return out


def pad_batch(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right to the longest sequence: ``input_ids``, ``attention_mask``, ``labels``, each ``(B, T)``.

    Padded positions get attention 0 and label -100 by position, so a pad token equal to EOS never
    takes an EOS out of the loss.
    """
    T = max(len(x) for x in input_ids)
    batch = torch.full((len(input_ids), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(input_ids), T), dtype=torch.long)
    target = torch.full((len(input_ids), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(zip(input_ids, labels)):
        batch[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        target[row, : len(lab)] = torch.tensor(lab)
    return {"input_ids": batch, "attention_mask": mask, "labels": target}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0, group: int = 8) -> list[list[int]]:
    """Indices of one epoch's batches, seeded: shuffle, then sort by length inside windows of ``group``
    batches, so a batch holds examples of similar length (little padding) and batch order stays random."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (masked by position, so it is safe)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
