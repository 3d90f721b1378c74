"""Counting: 'car 2, bus 0, truck 1, bicycle 0, person 3' (every class, fixed order); exact match and MAE."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from apps.datasets.schema import FrameTruth
from apps.tasks.base import RAW_LIMIT, Task, clean_text
from apps.tasks.output import CountingOutput, TaskOutput

SEPARATOR = ", "
MAX_COUNT = 999
_ITEM = re.compile(r"([a-z][a-z _-]{0,39}?) +([0-9]{1,3})")


def _count(value: Any) -> int | None:
    """A head's count as an int (floats are rounded), or None when it is not a sane count."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    if not -0.5 < value <= MAX_COUNT + 0.49:
        return None
    return int(round(value))


class CountingTask(Task):
    name = "counting"
    default_adapter = "counting"
    head = "counting-head"
    metrics = ("accuracy", "mae")
    metric_labels = {"accuracy": "exact-match accuracy", "mae": "MAE (objects)"}
    prompt_template = "count objects"
    max_tokens = 32
    output_type = CountingOutput

    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        return SEPARATOR.join(f"{cls} {truth.counts.get(cls, 0)}" for cls in self.classes)

    def parse_text(self, text: str, item: str | None = None) -> CountingOutput:
        """Parts split on ','; a malformed part, an unknown or repeated class, or a missing class flags
        parse_error (the well-formed counts are kept)."""
        text = clean_text(text)
        counts: dict[str, int] = {}
        error = False
        for part in filter(None, (p.strip() for p in " ".join(text.lower().split()).split(","))):
            match = _ITEM.fullmatch(part)
            cls = self.class_by_lower.get(match.group(1).strip()) if match else None
            if cls is None or cls in counts:
                error = True
                continue
            counts[cls] = int(match.group(2))
        error = error or set(counts) != set(self.classes)
        return CountingOutput(raw=text[:RAW_LIMIT], counts=counts, parse_error=error)

    def head_target(self, truth: FrameTruth) -> dict[str, Any]:
        """What a perfect counting head returns for this frame."""
        return {"counts": {cls: truth.counts.get(cls, 0) for cls in self.classes}}

    def parse_head(self, head_output: Mapping[str, Any]) -> CountingOutput:
        """Head format: {"counts": {class: count}}; a flat {class: count} mapping is accepted too."""
        if not isinstance(head_output, Mapping):
            return CountingOutput(parse_error=True, source="head")
        mapping = head_output.get("counts", head_output)
        if not isinstance(mapping, Mapping):
            return CountingOutput(parse_error=True, source="head")
        counts, error = {}, False
        for cls, value in mapping.items():
            count = _count(value)
            if cls not in self.classes or count is None:
                error = True
                continue
            counts[cls] = count
        error = error or set(counts) != set(self.classes)
        return CountingOutput(counts=counts, parse_error=error, source="head")

    def _errors(self, output: CountingOutput, truth: FrameTruth) -> list[tuple[bool, int]]:
        """(exact, absolute error) per class; a class the output lacks is wrong and counts as 0 for the MAE."""
        result = []
        for cls in self.classes:
            true = truth.counts.get(cls, 0)
            predicted = output.counts.get(cls)
            result.append((predicted == true, abs((predicted or 0) - true)))
        return result

    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """Exact-match accuracy over (frame, class) pairs on 0-100, and mean absolute error in objects."""
        cells = [cell for out, truth in self._pairs(outputs, truths) for cell in self._errors(out, truth)]
        if not cells:
            return {"accuracy": 0.0, "mae": 0.0}
        return {
            "accuracy": 100.0 * sum(exact for exact, _ in cells) / len(cells),
            "mae": sum(err for _, err in cells) / len(cells),
        }

    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float]:
        return self.evaluate([output], [truth])
