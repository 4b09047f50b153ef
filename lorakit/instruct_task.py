"""A task whose answers a program can check, built offline from the fetched KJV Bible.

**Which book is this verse from?** Each question gives one verse and names the candidate books in
the prompt; the answer is the book's name, nothing else. The verses come from ``lorakit.assets``'
``kjv`` corpus (no download). The split is deterministic: every verse of the chosen books that is
short enough is shuffled with a fixed seed, then dealt into test and train, the same number of test
questions per book, so chance is ``1 / len(books)`` and the test set never changes.

The books differ in what they talk about (Genesis: the patriarchs and their families; Psalms:
prayer to the LORD; Proverbs: wisdom and the fool; Matthew: Jesus and his disciples), so a model can
learn the task from a few hundred examples; what it must learn besides is to answer with the name
alone and stop.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorakit.chat import Example

BOOKS = ("Genesis", "Psalms", "Proverbs", "Matthew")
MAX_WORDS = 24  # verses of at most this many words (short prompts: a CPU trains on them in minutes)
SYSTEM = "Name the book of the Bible the verse is from."


def question(verse: str, books: tuple[str, ...] = BOOKS) -> str:
    """The user turn: the options, then the verse."""
    options = ", ".join(books[:-1]) + f" or {books[-1]}"
    return f"{options}?\n{verse}"


def conversation(verse: str, book: str, books: tuple[str, ...] = BOOKS) -> tuple[dict, ...]:
    """One question as a conversation: the system turn, the question, the answer."""
    return (
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question(verse, books)},
        {"role": "assistant", "content": book},
    )


def book_verses(books: tuple[str, ...] = BOOKS, max_words: int = MAX_WORDS) -> dict[str, list[str]]:
    """Every verse of each book with at most ``max_words`` words, in the Bible's order."""
    from lorakit.assets import require

    verses: dict[str, list[str]] = {b: [] for b in books}
    with open(Path(require("kjv")) / "kjv.jsonl", encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] in verses and len(verse["text"].split()) <= max_words:
                verses[verse["book"]].append(verse["text"])
    missing = [b for b, v in verses.items() if not v]
    if missing:
        raise ValueError(f"the kjv corpus has no verse of {', '.join(missing)}; choose books it holds")
    return verses


def bible_book_task(
    n_test: int = 200, n_train: int = 400, books: tuple[str, ...] = BOOKS, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """``(train, test)`` examples of the task: ``n_test // len(books)`` test questions per book, and up to
    ``n_train`` training ones (as many per book), none shared. The same arguments give the same sets."""
    per_test, per_train = n_test // len(books), n_train // len(books)
    verses = book_verses(books)
    train, test = [], []
    for book in books:
        pool = list(verses[book])
        random.Random(f"{seed}-{book}").shuffle(pool)
        if len(pool) < per_test + per_train:
            raise ValueError(f"{book} has {len(pool)} short verses, fewer than {per_test} + {per_train} asked for")
        for i, verse in enumerate(pool[: per_test + per_train]):
            (test if i < per_test else train).append(Example(conversation(verse, book, books), line=0))
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
