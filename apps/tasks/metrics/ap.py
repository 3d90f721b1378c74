"""COCO-style average precision (the pycocotools algorithm, bounding boxes, one area range, 100 detections)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from apps.tasks.metrics.boxes import iou

IOU_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100

# (class, box, score) and (class, box): boxes in one unit per image, e.g. normalised [x1, y1, x2, y2].
Det = tuple[str, Sequence[float], float]
Gt = tuple[str, Sequence[float]]


def _match(dets: list[Det], gts: list[Gt], threshold: float) -> list[bool]:
    """Greedy matching in score order: each detection takes the unmatched ground truth of highest IoU >= t."""
    taken = [False] * len(gts)
    hits = []
    for _, dbox, _ in dets:
        best, chosen = min(threshold, 1 - 1e-10), -1
        for g, (_, gbox) in enumerate(gts):
            if taken[g]:
                continue
            overlap = iou(dbox, gbox)
            if overlap < best:
                continue
            best, chosen = overlap, g
        if chosen >= 0:
            taken[chosen] = True
        hits.append(chosen >= 0)
    return hits


def _interpolated_ap(scores: np.ndarray, hits: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP of one class at one threshold, from all its detections over the images."""
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    # Precision envelope: the best precision at this recall or any higher one.
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    where = np.searchsorted(recall, RECALL_POINTS, side="left")
    sampled = [precision[i] if i < len(precision) else 0.0 for i in where]
    return float(np.mean(sampled))


def ap_table(
    detections: Sequence[Sequence[Det]], truths: Sequence[Sequence[Gt]], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict[str, dict[float, float]]:
    """AP in [0, 1] per class with ground truth, per IoU threshold; detections[i] and truths[i] are one image."""
    if len(detections) != len(truths):
        raise ValueError(f"{len(detections)} detection lists for {len(truths)} images")
    classes = sorted({cls for gts in truths for cls, _ in gts})
    table: dict[str, dict[float, float]] = {}
    for cls in classes:
        n_gt = sum(1 for gts in truths for c, _ in gts if c == cls)
        per_threshold: dict[float, list] = {t: [] for t in thresholds}
        scores: list[float] = []
        for dets, gts in zip(detections, truths, strict=True):
            mine = [d for d in dets if d[0] == cls]
            order = np.argsort([-d[2] for d in mine], kind="mergesort")
            mine = [mine[i] for i in order][:MAX_DETS]
            gts_c = [g for g in gts if g[0] == cls]
            scores += [d[2] for d in mine]
            for t in thresholds:
                per_threshold[t] += _match(mine, gts_c, t)
        table[cls] = {
            t: _interpolated_ap(np.array(scores, dtype=float), np.array(per_threshold[t], dtype=bool), n_gt)
            for t in thresholds
        }
    return table


def mean_ap(
    detections: Sequence[Sequence[Det]], truths: Sequence[Sequence[Gt]], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> float:
    """AP averaged over classes with ground truth and the given thresholds, on 0-100.

    With no ground truth at all the score is 100 when nothing was detected and 0 otherwise."""
    table = ap_table(detections, truths, thresholds)
    if not table:
        return 0.0 if any(len(d) for d in detections) else 100.0
    return 100.0 * float(np.mean([table[c][t] for c in table for t in thresholds]))
