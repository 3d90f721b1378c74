"""Text normalisation shared by the caption and VQA metrics."""

from __future__ import annotations

import re

from apps.datasets.vocab import NUMBER_WORDS

_WORD = re.compile(r"[a-z0-9]+")
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {word: str(i) for i, word in enumerate(NUMBER_WORDS)}


def tokenize(text: str) -> list[str]:
    """Lower-case alphanumeric words; punctuation and other symbols separate words and are dropped."""
    return _WORD.findall(text.lower())


def normalise_answer(text: str) -> str:
    """Canonical short answer: lower case, no punctuation or articles, number words as digits."""
    return " ".join(_NUMBERS.get(w, w) for w in tokenize(text) if w not in _ARTICLES)
