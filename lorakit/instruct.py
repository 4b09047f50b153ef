"""Instruction tuning: train on masked conversations, and measure the result two ways.

- :func:`train_instruct`: the training step of :mod:`lorakit.train` (AdamW, warmup + cosine, gradient
  clipping, a non-finite loss stops it) on padded, length-grouped batches of conversations whose
  labels are -100 outside the assistant's turns (:mod:`lorakit.chat`). ``mask=False`` trains on every
  token instead, to measure what the mask is worth.
- :func:`heldout_loss`: the mean loss per answer token on held-out conversations (nats).
- :func:`part_loss`: the same on the answer or on the *prompt* tokens, with a bootstrap interval over
  examples. The prompt-token loss measures what a fine-tune without the mask learns besides the
  answers: to write the questions.
- :func:`answer_accuracy`: exact match of the greedy answer against the reference, with a 95% Wilson
  interval. Greedy decoding writes the reference and stops exactly when, fed the reference, the model's
  most likely next token is the reference's next token at every position up to and including the
  end-of-turn token. So one teacher-forced forward pass per batch gives the greedy exact match of
  every question without generating (ties between two top logits aside).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lorakit.chat import IGNORE_INDEX, Example, Tokenized, length_grouped_batches, pad_batch
from lorakit.evaluation import RESAMPLES, _check_bootstrap, _interval, _resampled_means
from lorakit.train import _non_finite, make_optimizer, warmup_cosine

CONFIDENCE = 0.95


@dataclass
class InstructResult:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss per counted token, per optimizer step
    seconds: float = 0.0
    tokens: int = 0  # tokens the model read (padding excluded)
    diverged: dict | None = None
    interrupted: bool = False


def unmasked(labels: list[list[int]], input_ids: list[list[int]]) -> list[list[int]]:
    """Labels that count every token (no loss mask): what a plain language-model fine-tune uses."""
    return [list(ids) for ids in input_ids]


def train_instruct(
    model: torch.nn.Module,
    data: Tokenized,
    pad_id: int,
    steps: int = 60,
    lr: float = 2e-4,
    batch_size: int = 8,
    warmup_steps: int = 6,
    max_grad_norm: float | None = 1.0,
    optimizer: str = "adamw",
    mask: bool = True,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[InstructResult], None] | None = None,
) -> InstructResult:
    """Train ``model``'s trainable parameters on ``data``: ``steps`` optimizer steps of ``batch_size`` examples.

    Epochs of length-grouped batches (:func:`lorakit.chat.length_grouped_batches`, seeded by epoch)
    follow each other until ``steps`` are done. The loss of a step is the mean over the tokens whose
    label counts (transformers' causal-LM loss). The model is left in eval mode.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_instruct: steps and batch_size must be at least 1, got {steps} and {batch_size}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter of the model requires grad: nothing to train (did you call add_lora?)")
    labels = data.labels if mask else unmasked(data.labels, data.input_ids)
    lengths = [len(x) for x in data.input_ids]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    opt = make_optimizer(optimizer, trainable, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, min(warmup_steps, steps), steps))
    result = InstructResult()
    plan: list[list[int]] = []
    epoch = 0
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=steps, desc="training", disable=not progress)
    try:
        while result.step < steps:
            if not plan:
                plan = length_grouped_batches(lengths, batch_size, seed=seed * 100_003 + epoch)
                epoch += 1
            rows = plan.pop(0)
            batch = pad_batch([data.input_ids[i] for i in rows], [labels[i] for i in rows], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}  # each (B, T)
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss  # mean over the counted targets of the batch
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
            problem = _non_finite(loss.item(), grad_norm, opt.param_groups[0]["lr"], result.step)
            if problem:
                result.diverged = {"step": result.step + 1, "reason": problem, "last_good_step": None}
                break
            opt.step()
            scheduler.step()
            result.step += 1
            result.losses.append(loss.item())
            result.tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if on_step:
                on_step(result)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        model.eval()
    return result


PARTS = ("answer", "prompt")


def part_labels(input_ids: list[int], labels: list[int], part: str = "answer") -> list[int]:
    """The labels that score ``part`` of one tokenized conversation.

    ``"answer"``: the labels themselves (the assistant's turns, their end-of-turn tokens included).
    ``"prompt"``: the complement, every token the mask leaves out (the system turn, the questions, the
    template's markup), the first token excepted, since nothing predicts it.
    """
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not valid; choose one of {', '.join(PARTS)}")
    if part == "answer":
        return list(labels)
    rest = zip(input_ids[1:], labels[1:])
    return [IGNORE_INDEX] + [tok if lab == IGNORE_INDEX else IGNORE_INDEX for tok, lab in rest]


@torch.no_grad()
def example_losses(
    model: torch.nn.Module, data: Tokenized, pad_id: int, part: str = "answer", batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of ``data``: the summed next-token loss (nats) over the tokens of ``part``
    (:func:`part_labels`) and how many there are, two ``(N,)`` tensors (float64, int64) in ``data``'s order."""
    device = next(model.parameters()).device
    labels = [part_labels(ids, lab, part) for ids, lab in zip(data.input_ids, data.labels)]
    sums = torch.zeros(len(labels), dtype=torch.float64)
    counts = torch.zeros(len(labels), dtype=torch.int64)
    order = sorted(range(len(data.input_ids)), key=lambda i: len(data.input_ids[i]))  # little padding
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = pad_batch([data.input_ids[i] for i in rows], [labels[i] for i in rows], pad_id)
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits  # (B, T, V)
        targets = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t + 1
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, T-1), 0 where the target does not count
        sums[rows] = nll.sum(dim=1).double().cpu()
        counts[rows] = (targets != IGNORE_INDEX).sum(dim=1).cpu()
    model.train(was_training)
    return sums, counts


def heldout_loss(model: torch.nn.Module, data: Tokenized, pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over every counted label of ``data``, all examples pooled."""
    sums, counts = example_losses(model, data, pad_id, "answer", batch_size)
    return (sums.sum() / counts.sum()).item()


@dataclass(frozen=True)
class TokenLoss:
    """The mean loss per token of one part of the conversations, with a bootstrap interval over examples."""

    loss: float  # nats per token, all examples pooled
    low: float
    high: float
    part: str
    n_examples: int
    n_tokens: int
    confidence: float = CONFIDENCE
    sums: tuple[float, ...] = field(default=(), repr=False)  # per example, nats
    counts: tuple[int, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        return (
            f"{self.loss:.3f} nats per {self.part} token ({self.confidence:.0%} CI {self.low:.3f}-{self.high:.3f}, "
            f"bootstrap over {self.n_examples} examples)"
        )


def part_loss(
    model: torch.nn.Module,
    data: Tokenized,
    pad_id: int,
    part: str = "prompt",
    batch_size: int = 16,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> TokenLoss:
    """The pooled loss per token of ``part`` (``"prompt"`` or ``"answer"``) on ``data``, with a percentile
    bootstrap interval: the examples are resampled with replacement, and each resample's pooled loss is
    its summed loss over its token count (:mod:`lorakit.evaluation`'s bootstrap, Efron & Tibshirani 1993).

    With ``part="prompt"`` it says whether a model learned to write the questions: a fine-tune without
    the loss mask lowers it, one with the mask does not have to.
    """
    _check_bootstrap(confidence, resamples)
    if len(data.input_ids) < 2:
        raise ValueError(f"part_loss: need at least 2 examples for an interval, got {len(data.input_ids)}")
    sums, counts = example_losses(model, data, pad_id, part, batch_size)
    if counts.sum() == 0:
        raise ValueError(f"part_loss: no {part} token in the {len(counts)} examples")
    means = _resampled_means(torch.stack([sums, counts.double()], dim=1), resamples, seed)  # (R, 2)
    low, high = _interval(means[:, 0] / means[:, 1], confidence)
    return TokenLoss(
        loss=(sums.sum() / counts.sum()).item(),
        low=low,
        high=high,
        part=part,
        n_examples=len(counts),
        n_tokens=int(counts.sum()),
        confidence=confidence,
        sums=tuple(sums.tolist()),
        counts=tuple(counts.tolist()),
    )


def wilson_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (Wilson 1927).

    Unlike a bootstrap over 0/1 outcomes, it stays a real interval at 0 or n correct (a bootstrap
    of 200 zeros is [0, 0]), and its coverage is close to nominal for small n.
    """
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval: need 0 <= correct <= n and n >= 1, got {correct} of {n}")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + confidence) / 2, dtype=torch.float64)).item()
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    low: float
    high: float
    confidence: float = CONFIDENCE
    hits: tuple[bool, ...] = field(default=(), repr=False)  # per question, in the given order

    @property
    def value(self) -> float:
        return self.correct / self.n

    def __str__(self) -> str:
        return f"{self.value:.1%} ({self.correct}/{self.n}; {self.confidence:.0%} CI {self.low:.1%}-{self.high:.1%})"


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens greedy generation stops at: the tokenizer's EOS and the model's configured ones."""
    from lorakit.models import _eos_token_ids

    return set(_eos_token_ids(model, tokenizer))


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int = 50,
    confidence: float = CONFIDENCE,
) -> Accuracy:
    """Exact match of the greedy answer to each example's last assistant turn, with a Wilson interval.

    Per question: the context (every turn before the answer, with the generation prompt) and the
    reference answer up to and including its first stop token are fed at once; the question counts
    when every one of the answer's tokens is the model's most likely next token. That is exactly
    when greedy generation (:func:`lorakit.generate`) would write the reference and stop.
    """
    from lorakit.chat import assistant_spans, pad_id_of

    stops = stop_ids(model, tokenizer)
    device = next(model.parameters()).device
    seqs, answers = [], []  # ids, and the [start, end) of the answer tokens to check
    for example in examples:
        if example.messages[-1]["role"] != "assistant":
            raise ValueError(f"answer_accuracy: example of line {example.line} does not end with an assistant turn")
        ids, spans = assistant_spans(tokenizer, example.messages)
        start, end = spans[-1]
        cut = next((i + 1 for i in range(start, end) if ids[i] in stops), end)  # through the first stop token
        seqs.append(ids[:cut])
        answers.append((start, cut))
    hits = []
    pad = pad_id_of(tokenizer)
    was_training = model.training
    model.eval()
    for s in range(0, len(seqs), batch_size):
        rows = list(range(s, min(s + batch_size, len(seqs))))
        batch = pad_batch([seqs[i] for i in rows], [seqs[i] for i in rows], pad)
        logits = model(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).logits  # (B, T, V)
        best = logits.argmax(-1).cpu()  # (B, T): the greedy next token at every position
        for row, i in enumerate(rows):
            start, cut = answers[i]
            predicted = best[row, start - 1 : cut - 1]  # predictions of the answer's tokens
            hits.append(bool(torch.equal(predicted, torch.tensor(seqs[i][start:cut]))))
    model.train(was_training)
    correct = sum(hits)
    low, high = wilson_interval(correct, len(hits), confidence)
    return Accuracy(correct, len(hits), low, high, confidence, tuple(hits))
