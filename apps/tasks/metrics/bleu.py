"""Corpus BLEU-4 (Papineni et al. 2002): clipped n-gram precisions, geometric mean, brevity penalty."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], n: int = 4
) -> float:
    """BLEU in [0, 1] of tokenised candidates, each against its list of tokenised references.

    Counts are pooled over the corpus before the precisions are taken; the effective reference length of a
    segment is the reference length closest to the candidate's (the shorter on a tie). No smoothing: a corpus
    without any matching n-gram of some order scores 0."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    matched, total = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
        for k in range(1, n + 1):
            counts = ngrams(cand, k)
            best: Counter[tuple[str, ...]] = Counter()
            for ref in refs:
                best |= ngrams(ref, k)
            matched[k - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[k - 1] += max(len(cand) - k + 1, 0)
    if cand_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / n
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)
