"""Grounding: the box of the object an expression refers to, 'x1 y1 x2 y2' on the 0-100 grid; Acc@0.5 IoU."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from apps.datasets.schema import FrameTruth
from apps.tasks.base import RAW_LIMIT, Task, clean_text
from apps.tasks.detection import valid_box
from apps.tasks.metrics.boxes import GRID, format_grid, from_grid, iou, normalise, to_grid
from apps.tasks.output import GroundingOutput, TaskOutput
from apps.tasks.vqa import check_strings

_BOX = re.compile(r"(?<![0-9])([0-9]{1,3}) +([0-9]{1,3}) +([0-9]{1,3}) +([0-9]{1,3})(?![0-9])")
IOU_THRESHOLD = 0.5


def _grid_box(match: re.Match[str]) -> list[float] | None:
    cells = [int(g) for g in match.groups()]
    if not all(0 <= c <= GRID for c in cells) or cells[2] <= cells[0] or cells[3] <= cells[1]:
        return None
    return from_grid(cells)


class GroundingTask(Task):
    name = "grounding"
    default_adapter = "grounding"
    head = "grounding-head"
    metrics = ("acc50",)
    metric_labels = {"acc50": "Acc@0.5 IoU"}
    prompt_template = "locate: {item}"
    max_tokens = 16
    output_type = GroundingOutput
    extra_params = {"expressions": "referring expressions to locate (default: the frame's ground-truth ones)"}

    def check_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        params = super().check_params(params)
        if "expressions" in params:
            check_strings(self.name, "expressions", params["expressions"])
        return params

    def items(self, truth: FrameTruth | None, params: Mapping[str, Any] | None = None) -> list[str | None]:
        if params and params.get("expressions"):
            return [e.strip() for e in params["expressions"]]
        return [ref.expr for ref in truth.refs] if truth is not None else []

    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        ref = truth.ref_for(item) if item is not None else None
        if ref is None:
            raise ValueError(f"frame {truth.frame} has no referring expression {item!r}")
        return format_grid(to_grid(ref.box, truth.width, truth.height))

    def head_target(self, truth: FrameTruth, item: str) -> dict[str, Any]:
        """What a perfect grounding head returns for this frame and expression."""
        ref = truth.ref_for(item)
        if ref is None:
            raise ValueError(f"frame {truth.frame} has no referring expression {item!r}")
        return {"box": normalise(ref.box, truth.width, truth.height), "score": 1.0}

    def parse_head(self, head_output: Mapping[str, Any]) -> GroundingOutput:
        """Head format: {"box": [x1, y1, x2, y2] in [0, 1], "score": float}; a malformed box is a parse error."""
        box = valid_box(head_output.get("box")) if isinstance(head_output, Mapping) else None
        return GroundingOutput(box=box, parse_error=box is None, source="head")

    def parse_text(self, text: str, item: str | None = None) -> GroundingOutput:
        """Exactly four grid integers; otherwise the first four-integer run is used and parse_error is set."""
        text = clean_text(text)
        body = " ".join(text.strip().split())
        exact = _BOX.fullmatch(body)
        if exact is not None and (box := _grid_box(exact)) is not None:
            return GroundingOutput(raw=text[:RAW_LIMIT], box=box)
        first = _BOX.search(body)
        box = _grid_box(first) if first is not None else None
        return GroundingOutput(raw=text[:RAW_LIMIT], box=box, parse_error=True)

    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float] | None:
        """100 when the box overlaps the referred object's at IoU >= 0.5; None if the frame lacks the expression."""
        self._pairs([output], [truth])
        ref = truth.ref_for(output.item) if output.item is not None else None
        if ref is None:
            return None
        target = normalise(ref.box, truth.width, truth.height)
        hit = output.box is not None and iou(output.box, target) >= IOU_THRESHOLD
        return {"acc50": 100.0 * hit}

    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """Acc@0.5 over the outputs whose expression the frame knows; 0 when none can be scored."""
        scores = [s["acc50"] for out, t in self._pairs(outputs, truths) if (s := self.score_frame(out, t))]
        return {"acc50": sum(scores) / len(scores) if scores else 0.0}
