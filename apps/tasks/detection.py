"""Detection: every object as 'class x1 y1 x2 y2' on the 0-100 grid, left to right; COCO-style mAP."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from apps.datasets.schema import FrameTruth
from apps.tasks.base import RAW_LIMIT, Task, clean_text
from apps.tasks.metrics.ap import mean_ap
from apps.tasks.metrics.boxes import GRID, format_grid, from_grid, normalise, to_grid
from apps.tasks.output import Detection, DetectionOutput, TaskOutput

NONE = "none"
SEPARATOR = "; "
MAX_DETECTIONS = 100  # as COCO's maxDets; anything past it is dropped and flags parse_error
_ITEM = re.compile(r"([a-z][a-z _-]{0,39}?) +([0-9]{1,3}) +([0-9]{1,3}) +([0-9]{1,3}) +([0-9]{1,3})")


def valid_box(box: Any) -> list[float] | None:
    """A finite, ordered, non-empty [0, 1] box from head output, or None."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
        return None
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in values)
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


class DetectionTask(Task):
    name = "detection"
    default_adapter = "detection"
    head = "detection-head"
    metrics = ("map50", "map50_95")
    metric_labels = {"map50": "mAP@0.5", "map50_95": "mAP@[.5:.95]"}
    prompt_template = "detect objects"
    max_tokens = 160
    output_type = DetectionOutput

    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        """'car 12 40 35 60; person 80 10 85 30' sorted by (x1, y1, class), or 'none' for an empty frame."""
        cells = [(to_grid(o.box, truth.width, truth.height), o.cls) for o in truth.objects]
        cells.sort(key=lambda c: (c[0][0], c[0][1], c[1]))
        return SEPARATOR.join(f"{cls} {format_grid(box)}" for box, cls in cells) or NONE

    def parse_text(self, text: str, item: str | None = None) -> DetectionOutput:
        """Items are split on ';'. Bad items (unknown words, numbers off the grid, empty boxes, truncation) are
        dropped and flag parse_error; the good ones are kept, each with score 1.0."""
        text = clean_text(text)
        raw = text[:RAW_LIMIT]
        body = " ".join(text.strip().lower().split())
        if body == NONE:
            return DetectionOutput(raw=raw)
        detections, error = [], not body
        for part in filter(None, (p.strip() for p in body.split(";"))):
            match = _ITEM.fullmatch(part)
            if match is None:
                error = True
                continue
            cls, cells = match.group(1).strip(), [int(g) for g in match.groups()[1:]]
            cls = self.class_by_lower.get(cls, cls)
            if not all(0 <= c <= GRID for c in cells) or cells[2] <= cells[0] or cells[3] <= cells[1]:
                error = True
                continue
            detections.append(Detection(cls=cls, box=from_grid(cells), score=1.0))
        if len(detections) > MAX_DETECTIONS:
            detections, error = detections[:MAX_DETECTIONS], True
        return DetectionOutput(raw=raw, detections=detections, parse_error=error)

    def head_target(self, truth: FrameTruth) -> dict[str, Any]:
        """What a perfect detection head returns for this frame."""
        return {
            "detections": [
                {"cls": o.cls, "box": normalise(o.box, truth.width, truth.height), "score": 1.0} for o in truth.objects
            ]
        }

    def parse_head(self, head_output: Mapping[str, Any]) -> DetectionOutput:
        """Head format: {"detections": [{"cls": str, "box": [x1, y1, x2, y2] in [0, 1], "score": float}, ...]}.
        Malformed entries are dropped and flag parse_error."""
        entries = head_output.get("detections") if isinstance(head_output, Mapping) else None
        if not isinstance(entries, list):
            return DetectionOutput(parse_error=True, source="head")
        detections, error = [], False
        for entry in entries:
            box = valid_box(entry.get("box")) if isinstance(entry, Mapping) else None
            cls = entry.get("cls") if isinstance(entry, Mapping) else None
            score = entry.get("score", 1.0) if isinstance(entry, Mapping) else None
            ok_score = isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score)
            if box is None or not isinstance(cls, str) or not cls or not ok_score:
                error = True
                continue
            detections.append(Detection(cls=cls, box=box, score=float(score)))
        if len(detections) > MAX_DETECTIONS:
            detections.sort(key=lambda d: -d.score)
            detections, error = detections[:MAX_DETECTIONS], True
        return DetectionOutput(detections=detections, parse_error=error, source="head")

    @staticmethod
    def _lists(pairs: Sequence[tuple[DetectionOutput, FrameTruth]]):
        dets = [[(d.cls, d.box, d.score) for d in out.detections] for out, _ in pairs]
        gts = [[(o.cls, normalise(o.box, t.width, t.height)) for o in t.objects] for _, t in pairs]
        return dets, gts

    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """mAP@0.5 and mAP@[.5:.95] (101-point interpolated AP averaged over classes with ground truth)."""
        dets, gts = self._lists(self._pairs(outputs, truths))
        return {"map50": mean_ap(dets, gts, (0.5,)), "map50_95": mean_ap(dets, gts)}

    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float]:
        return self.evaluate([output], [truth])
