"""Captioning: one sentence in the synthetic style; CIDEr-D, BLEU-4 and recall of the ground-truth objects."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

from apps.datasets.schema import FrameTruth
from apps.datasets.vocab import COLOR_NAMES, NUMBER_WORDS, PLURALS
from apps.tasks.base import RAW_LIMIT, Task, clean_text
from apps.tasks.metrics.bleu import corpus_bleu
from apps.tasks.metrics.cider import CiderD, cider_d
from apps.tasks.metrics.text import tokenize
from apps.tasks.output import CaptionOutput, TaskOutput

# Frames whose reference captions give the document frequencies of the per-frame (live) CIDEr-D.
IDF_CORPUS_FRAMES = 500
_QUANTITY = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBER_WORDS)}}
_NOUNS = {**{cls: cls for cls in PLURALS}, **{p: cls for cls, p in PLURALS.items()}}


def mentioned(caption: str) -> Counter[str]:
    """Objects a caption mentions per class: 'two red cars and a person' -> car 2, person 1. The quantity is the
    number word or digit before the noun (colour words may sit between); a bare plural means two."""
    words = tokenize(caption)
    found: Counter[str] = Counter()
    for i, word in enumerate(words):
        cls = _NOUNS.get(word)
        if cls is None:
            continue
        j = i - 1
        while j >= 0 and words[j] in COLOR_NAMES:
            j -= 1
        before = words[j] if j >= 0 else ""
        quantity = _QUANTITY.get(before, int(before) if before.isdigit() and len(before) < 4 else None)
        found[cls] += quantity if quantity is not None else (1 if word == cls else 2)
    return found


@functools.cache
def _synthetic_idf() -> CiderD:
    from apps.datasets.splits import iter_truths

    return CiderD([[tokenize(t.caption)] for t in iter_truths("val", IDF_CORPUS_FRAMES)])


class CaptioningTask(Task):
    name = "captioning"
    default_adapter = "captioning"
    metrics = ("cider_d", "bleu4", "object_recall")
    metric_labels = {"cider_d": "CIDEr-D (x10)", "bleu4": "BLEU-4", "object_recall": "object recall"}
    prompt_template = "describe the scene"
    max_tokens = 64
    output_type = CaptionOutput

    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        return truth.caption

    def parse_text(self, text: str, item: str | None = None) -> CaptionOutput:
        """The first line, whitespace collapsed; empty text is a parse error."""
        text = clean_text(text)
        lines = text.strip().splitlines()
        caption = " ".join(lines[0].split())[:RAW_LIMIT] if lines else ""
        return CaptionOutput(raw=text[:RAW_LIMIT], caption=caption, parse_error=not caption)

    @staticmethod
    def _recall(pairs: Sequence[tuple[CaptionOutput, FrameTruth]]) -> float:
        hit = total = 0
        for out, truth in pairs:
            said = mentioned(out.caption)
            true = Counter(o.cls for o in truth.objects)
            hit += sum(min(said[c], n) for c, n in true.items())
            total += sum(true.values())
        if total == 0:
            return 100.0
        return 100.0 * hit / total

    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """CIDEr-D x 10 (document frequencies over these references; an exact match of a single reference
        scores 100), corpus BLEU-4 x 100, and the share of ground-truth objects the captions mention."""
        pairs = self._pairs(outputs, truths)
        if not pairs:
            return {metric: 0.0 for metric in self.metrics}
        candidates = [tokenize(out.caption) for out, _ in pairs]
        references = [[tokenize(truth.caption)] for _, truth in pairs]
        return {
            "cider_d": min(100.0, 10.0 * cider_d(candidates, references)),  # cosine <= 1 up to rounding
            "bleu4": 100.0 * corpus_bleu(candidates, references),
            "object_recall": self._recall(pairs),
        }

    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float]:
        """Per-frame scores; CIDEr-D takes its document frequencies from synthetic validation captions."""
        (pair,) = self._pairs([output], [truth])
        candidate, references = tokenize(output.caption), [tokenize(truth.caption)]
        return {
            "cider_d": min(100.0, 10.0 * _synthetic_idf().score(candidate, references)),
            "bleu4": 100.0 * corpus_bleu([candidate], [references]),
            "object_recall": self._recall([pair]),
        }
