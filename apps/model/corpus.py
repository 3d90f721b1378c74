"""The tokenizer's training text: scene descriptions, the domain's captions, questions, counts, boxes and numbers."""

from __future__ import annotations

from collections.abc import Iterator

from apps.datasets.splits import iter_truths
from apps.datasets.vocab import CLASSES, COLOR_NAMES, NUMBER_WORDS, plural
from apps.model.describe import DESCRIBE_PROMPTS, describe

CORPUS_FRAMES = 3000


def _frame_text(truth) -> Iterator[str]:
    yield describe(truth)
    yield truth.caption
    for qa in truth.vqa:
        yield f"{qa.question} {qa.answer}"
    for ref in truth.refs:
        yield ref.expr
    yield ", ".join(f"{cls} {n}" for cls, n in truth.counts.items())
    w, h = truth.width, truth.height
    yield "; ".join(
        f"{o.cls} " + " ".join(str(round(v * 100 / s)) for v, s in zip(o.box, (w, h, w, h), strict=True))
        for o in truth.objects
    )


def tokenizer_corpus(frames: int = CORPUS_FRAMES) -> Iterator[str]:
    """Text the tokenizer learns its merges from; deterministic."""
    yield from DESCRIBE_PROMPTS
    yield " ".join(CLASSES) + " " + " ".join(plural(c) for c in CLASSES) + " " + " ".join(COLOR_NAMES)
    yield " ".join(NUMBER_WORDS)
    for start in range(0, 1001, 50):
        yield " ".join(str(v) for v in range(start, start + 50))
        yield " ".join(f"0.{v:02d}" for v in range(100))
    for truth in iter_truths("train", frames, seed=1):
        yield from _frame_text(truth)
