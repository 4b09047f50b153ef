"""One evaluation protocol for the whole workbook: held-out perplexity with a bootstrap confidence
interval, a paired comparison of two models on the same blocks, and a measurable style property.

- **The held-out set** (:data:`HELDOUT`): the validation works of ``split_documents("shakespeare",
  seed=0)`` (four whole works that training never sees), tokenized and cut into blocks of 128
  tokens as training text is, and 32 of those blocks taken at evenly spaced positions, so that all
  four works count, not just the cast list at the start of the first one.
- **Perplexity** (:func:`heldout_perplexity`): exp of the mean next-token loss over all the blocks,
  which equals :func:`lorakit.data.perplexity` on the same blocks.
- **Its interval**: a percentile bootstrap over blocks (Efron & Tibshirani 1993, *An Introduction
  to the Bootstrap*, ch. 13). Each block's mean loss is computed once; the blocks are then
  resampled with replacement, and the spread of the resampled means says how much the figure
  depends on which text happened to be held out. It does not cover training randomness (another
  seed, another run), and blocks of one work are alike, so read it as a lower bound on the noise.
- **Comparing two models** (:func:`compare_perplexity`): a paired bootstrap (Koehn 2004,
  "Statistical Significance Tests for Machine Translation Evaluation", EMNLP): both models' losses
  are resampled with the same block indices, so the variation between blocks, which both models
  share, cancels out of the ratio of their perplexities. A difference is "outside the noise" when
  the interval of the ratio excludes 1. "Outside the noise" is not "large": a small change that
  every block shares is outside the noise too.

With 32 blocks the percentile interval is a little too narrow (it ignores that the spread is
itself estimated from 32 values): in simulation, 6-9% of paired comparisons with no true
difference are flagged, against the nominal 5% (tests/test_evaluation.py).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lorakit.data import CORPORA, lm_batches, split_documents, tokenize_blocks

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 1% between seeds


@dataclass(frozen=True)
class HeldOut:
    """Which text every perplexity in the workbook is measured on: ``n_blocks`` blocks of ``seq_len``
    tokens at evenly spaced positions in the validation split of ``corpus`` (``n_blocks=None``: all)."""

    corpus: str = "shakespeare"
    n_blocks: int | None = 32
    seq_len: int = 128
    split_seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"HeldOut: unknown corpus {self.corpus!r}; choose one of {', '.join(CORPORA)}")
        if self.n_blocks is not None and self.n_blocks < 1:
            raise ValueError(f"HeldOut: n_blocks must be at least 1 (2 for an interval) or None, got {self.n_blocks}")
        if self.seq_len < 2:
            raise ValueError(
                f"HeldOut: seq_len must be at least 2 (one input and one target token), got {self.seq_len}"
            )

    def blocks(self, tokenizer) -> torch.Tensor:
        """The held-out token ids, ``(n_blocks, seq_len)``: the same for every model with this tokenizer."""
        _, val_docs = split_documents(self.corpus, val_fraction=self.val_fraction, seed=self.split_seed)
        every = tokenize_blocks(tokenizer, val_docs, self.seq_len)  # (N_all, T): the whole validation split
        if self.n_blocks is None:
            return every
        if self.n_blocks > len(every):
            raise ValueError(
                f"HeldOut: n_blocks={self.n_blocks} is more than the {len(every)} blocks of {self.seq_len} tokens "
                f"in the {self.corpus} validation split; pass at most {len(every)}, or None for all"
            )
        # evenly spaced, first and last block included; the step is >= 1 block, so no block repeats
        picks = torch.linspace(0, len(every) - 1, self.n_blocks).round().long()  # one block: the first
        return every[picks]  # (n_blocks, T)

    def __str__(self) -> str:
        return f"{self.corpus} held-out"


HELDOUT = HeldOut()


@dataclass(frozen=True)
class Perplexity:
    """A held-out perplexity with its bootstrap interval, and the per-block losses it came from."""

    ppl: float
    low: float
    high: float
    confidence: float
    n_blocks: int
    seq_len: int
    heldout: str  # which text: "shakespeare held-out", or "given blocks"
    block_losses: tuple[float, ...] = field(repr=False)  # mean next-token loss of each block, in nats
    blocks_digest: str  # fingerprint of the token ids: two results compare only on the same blocks
    resamples: int
    seed: int

    @property
    def loss(self) -> float:
        """Mean next-token loss over all targets, in nats (``log(ppl)``)."""
        return math.log(self.ppl)

    @property
    def n_tokens(self) -> int:
        """Tokens in the held-out blocks (each block scores ``seq_len - 1`` of them as targets)."""
        return self.n_blocks * self.seq_len

    def __str__(self) -> str:
        return (
            f"{self.ppl:.2f} ({self.confidence:.0%} CI {_fmt(self.low)}-{_fmt(self.high)}, "
            f"{self.n_blocks} blocks x {self.seq_len} tokens, {self.heldout})"
        )


@dataclass(frozen=True)
class PerplexityChange:
    """``after`` against ``before`` on the same blocks: the ratio of perplexities and its paired interval."""

    before: float  # perplexity
    after: float
    ratio: float  # after / before = exp(mean over blocks of the loss difference)
    low: float
    high: float
    confidence: float
    n_blocks: int

    @property
    def percent(self) -> float:
        return 100.0 * (self.ratio - 1.0)

    @property
    def significant(self) -> bool:
        """True when the interval of the ratio excludes 1: the change is larger than the block-to-block noise."""
        return not self.low <= 1.0 <= self.high

    def __str__(self) -> str:
        verdict = "outside the noise" if self.significant else "within the noise (the interval contains 0%)"
        return (
            f"{self.before:.2f} -> {self.after:.2f}: {self.percent:+.1f}% ({self.confidence:.0%} CI "
            f"{100 * (self.low - 1):+.1f}% to {100 * (self.high - 1):+.1f}%, paired bootstrap over "
            f"{self.n_blocks} blocks): {verdict}"
        )


@torch.no_grad()
def block_losses(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The mean next-token loss of each of the ``(N, T)`` blocks, in nats: ``(N,)`` float64 on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    try:
        for batch in lm_batches(blocks, batch_size=batch_size, shuffle=False, drop_last=False):
            input_ids = batch["input_ids"].to(device)  # (B, T)
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits  # (B, T, V)
            # Position t predicts token t + 1. Shift the targets, not the logits, so the (B, T, V) logits
            # are not copied; the last position has no target (-100 is ignored), as in transformers'
            # ForCausalLMLoss, which also computes the loss in float32.
            targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B * T,)
            losses.append(nll.view(input_ids.shape)[:, :-1].double().mean(dim=1).cpu())  # (B,)
    finally:
        model.train(was_training)
    return torch.cat(losses)  # (N,)


def heldout_perplexity(
    model,
    tokenizer=None,
    heldout: HeldOut = HELDOUT,
    *,
    blocks: torch.Tensor | None = None,
    batch_size: int = 8,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Perplexity:
    """Perplexity of ``model`` on the workbook's held-out set, with a bootstrap confidence interval.

    Pass the ``tokenizer`` (the blocks are ``heldout.blocks(tokenizer)``), or ``blocks`` of token
    ids, ``(N, T)``, instead (a model without a tokenizer, or another set on purpose). The interval
    is a percentile bootstrap over blocks, seeded by ``seed``: the same inputs give the same figures.
    """
    if (tokenizer is None) == (blocks is None):
        raise ValueError(
            "heldout_perplexity: pass either a tokenizer (for the held-out set) or blocks of token ids, not both"
        )
    if blocks is None:
        blocks, label = heldout.blocks(tokenizer), str(heldout)
    else:
        label = "given blocks"
    if blocks.dim() != 2 or len(blocks) < 2 or blocks.shape[1] < 2:
        raise ValueError(f"heldout_perplexity: blocks must be (N, T) with N >= 2 and T >= 2, got {tuple(blocks.shape)}")
    _check_bootstrap(confidence, resamples)
    losses = block_losses(model, blocks, batch_size)  # (N,)
    return perplexity_from_losses(losses, blocks, label, confidence=confidence, resamples=resamples, seed=seed)


def perplexity_from_losses(
    losses: torch.Tensor,
    blocks: torch.Tensor,
    label: str = "given blocks",
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Perplexity:
    """A :class:`Perplexity` from per-block mean losses ``(N,)`` already computed on ``blocks`` ``(N, T)``
    (for a caller that gets the losses from a pass it makes anyway): the point estimate and its interval."""
    low, high = _interval(_resampled_means(losses, resamples, seed), confidence)
    return Perplexity(
        ppl=math.exp(losses.mean().item()),
        low=math.exp(low),
        high=math.exp(high),
        confidence=confidence,
        n_blocks=len(blocks),
        seq_len=blocks.shape[1],
        heldout=label,
        block_losses=tuple(losses.tolist()),
        blocks_digest=hashlib.sha256(blocks.cpu().numpy().tobytes()).hexdigest()[:12],
        resamples=resamples,
        seed=seed,
    )


def compare_perplexity(
    before: Perplexity,
    after: Perplexity,
    confidence: float | None = None,
    resamples: int | None = None,
    seed: int | None = None,
) -> PerplexityChange:
    """``after``'s perplexity against ``before``'s, by a paired bootstrap over their common blocks.

    The ratio ``after.ppl / before.ppl`` is ``exp`` of the mean per-block loss difference; its
    interval comes from resampling the blocks with the same indices for both models (Koehn 2004).
    ``confidence``, ``resamples`` and ``seed`` default to ``before``'s.
    """
    if before.blocks_digest != after.blocks_digest:
        raise ValueError(
            f"compare_perplexity: the two results were measured on different blocks ({before.n_blocks} x "
            f"{before.seq_len} of {before.heldout}, digest {before.blocks_digest}, against {after.n_blocks} x "
            f"{after.seq_len} of {after.heldout}, digest {after.blocks_digest}); measure both on the same held-out set"
        )
    confidence = before.confidence if confidence is None else confidence
    resamples = before.resamples if resamples is None else resamples
    _check_bootstrap(confidence, resamples)
    diff = torch.tensor(after.block_losses, dtype=torch.float64) - torch.tensor(
        before.block_losses, dtype=torch.float64
    )
    low, high = _interval(_resampled_means(diff, resamples, before.seed if seed is None else seed), confidence)
    return PerplexityChange(
        before=before.ppl,
        after=after.ppl,
        ratio=math.exp(diff.mean().item()),
        low=math.exp(low),
        high=math.exp(high),
        confidence=confidence,
        n_blocks=before.n_blocks,
    )


def _resampled_means(values: torch.Tensor, resamples: int, seed: int) -> torch.Tensor:
    """Means of ``resamples`` bootstrap resamples of ``values`` (N,), drawn with replacement: ``(R,)``."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(values), (resamples, len(values)), generator=generator)  # (R, N)
    return values[picks].mean(dim=1)  # (R,)


def _interval(means: torch.Tensor, confidence: float) -> tuple[float, float]:
    """The percentile interval: the (1 - c)/2 and (1 + c)/2 quantiles of the resampled means."""
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=means.dtype)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def _check_bootstrap(confidence: float, resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (0.95 for a 95% interval), got {confidence}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a usable percentile interval, got {resamples}")


def _fmt(x: float) -> str:
    """Three significant digits without an exponent: 85.1, 1.53, 1234."""
    decimals = max(0, 2 - math.floor(math.log10(abs(x)))) if x else 2
    return f"{x:.{decimals}f}"


# --- style: a measurable property of Shakespeare's English -------------------------------------

# Early Modern English forms that modern English has dropped: second-person pronouns and their
# verb forms, contractions, and adverbs. Left out on purpose: forms that are also everyday modern
# words ("art" the noun, "hence", "mine", "marry", "will"), which would count modern text as archaic.
ARCHAIC_FORMS = frozenset(
    {
        "thee",
        "thou",
        "thy",
        "thine",
        "thyself",
        "ye",
        "hath",
        "doth",
        "dost",
        "hast",
        "shalt",
        "wilt",
        "canst",
        "couldst",
        "wouldst",
        "shouldst",
        "didst",
        "hadst",
        "wast",
        "wert",
        "mayst",
        "'tis",
        "'twas",
        "'twere",
        "'twill",
        "o'er",
        "e'er",
        "ne'er",
        "e'en",
        "ere",
        "nay",
        "prithee",
        "methinks",
        "forsooth",
        "hither",
        "thither",
        "whither",
        "whence",
        "wherefore",
        "alack",
        "sirrah",
        "oft",
        "betwixt",
        "perchance",
        "anon",
    }
)
_WORD = re.compile(r"'?[a-z]+(?:'[a-z]+)*")  # words, with inner apostrophes (o'er) and a leading one ('tis)


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``; typographic apostrophes count as ``'``."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def archaic_rate(text: str) -> float:
    """The share of the words of ``text`` that are archaic forms (:data:`ARCHAIC_FORMS`); 0.0 without words.

    Measured on the cached corpus: 2.7% of the words of Shakespeare's works (2.1% to 3.6% per play;
    thee, thou and thy alone 1.4%), 2.3% of the King James Bible's first five books, 0.0% of this
    project's README.
    """
    found = words(text)
    if not found:
        return 0.0
    return sum(w in ARCHAIC_FORMS for w in found) / len(found)


def mean_line_words(text: str) -> float:
    """Mean number of words per non-empty line of ``text``; 0.0 without words.

    Shakespeare's plays average about 6 (short verse lines and speaker names, 5.7 to 6.6 per play);
    prose runs to the wrap width (about 11 in this project's README) or a whole paragraph per line.
    """
    lines = [line for line in text.splitlines() if words(line)]
    return sum(len(words(line)) for line in lines) / len(lines) if lines else 0.0
