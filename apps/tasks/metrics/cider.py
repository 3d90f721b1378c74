"""CIDEr-D (Vedantam et al. 2015) as computed by the coco-caption reference code.

Per n (1..4): TF-IDF vectors of n-gram counts, with document frequencies taken over the reference sets
(one document per image); the candidate's weights are clipped to the reference's; cosine similarity; times a
Gaussian penalty exp(-(l_c - l_r)^2 / (2 sigma^2)) on the length difference (sigma 6). The mean over n and
over references, times 10, is the image's score; the corpus score is the mean over images. Like the reference
code, length is the number of bigrams (words - 1)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

Vector = list[dict[tuple[str, ...], float]]


def _counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """A CIDEr-D scorer whose document frequencies come from a corpus of reference sets."""

    def __init__(self, reference_sets: Iterable[Sequence[Sequence[str]]], n: int = 4, sigma: float = 6.0) -> None:
        self.n, self.sigma = n, sigma
        self.doc_freq: Counter[tuple[str, ...]] = Counter()
        documents = 0
        for refs in reference_sets:
            documents += 1
            self.doc_freq.update({g for ref in refs for g in _counts(ref, n)})
        if documents == 0:
            raise ValueError("CIDEr-D needs at least one reference set for its document frequencies")
        self.log_documents = math.log(documents)

    def _vector(self, tokens: Sequence[str]) -> tuple[Vector, list[float], int]:
        vec: Vector = [{} for _ in range(self.n)]
        for gram, tf in _counts(tokens, self.n).items():
            vec[len(gram) - 1][gram] = tf * (self.log_documents - math.log(max(1.0, self.doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, max(len(tokens) - 1, 0)

    def score(self, candidate: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """CIDEr-D of one candidate against its references, in [0, 10]."""
        if not references:
            raise ValueError("CIDEr-D needs at least one reference per candidate")
        vec, norms, length = self._vector(candidate)
        total = 0.0
        for ref in references:
            rvec, rnorms, rlength = self._vector(ref)
            penalty = math.exp(-((length - rlength) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norms[k] and rnorms[k]:
                    dot /= norms[k] * rnorms[k]
                total += dot * penalty
        return 10.0 * total / (self.n * len(references))


def cider_d(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """Corpus CIDEr-D in [0, 10], document frequencies over these references (the coco-caption convention)."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D of an empty corpus is undefined")
    scorer = CiderD(references)
    return sum(scorer.score(c, r) for c, r in zip(candidates, references, strict=True)) / len(candidates)
