"""An independent reading of the synthetic grammar (referring expressions, questions) used to check the generator."""

from __future__ import annotations

import re

from apps.datasets.schema import ObjectTruth

# "Clearly leftmost" in the generator's documentation: centres at least this share of the width apart.
MARGIN_FRACTION = 0.06
SINGULAR = {"cars": "car", "buses": "bus", "trucks": "truck", "bicycles": "bicycle", "people": "person"}


def _cx(o: ObjectTruth) -> float:
    return (o.box[0] + o.box[2]) / 2


def resolve(expr: str, objects: list[ObjectTruth], width: int) -> list[ObjectTruth]:
    """Every object the expression can mean; a well-formed unambiguous expression yields exactly one."""
    margin = MARGIN_FRACTION * width
    if m := re.fullmatch(r"the (leftmost|rightmost) (\w+)", expr):
        same = [o for o in objects if o.cls == m.group(2)]
        if len(same) < 2:
            return []
        sign = 1 if m.group(1) == "leftmost" else -1
        best = min(sign * _cx(o) for o in same)
        return [o for o in same if sign * _cx(o) < best + margin]
    if m := re.fullmatch(r"the person in (\w+)", expr):
        return [o for o in objects if o.cls == "person" and o.color == m.group(1)]
    if m := re.fullmatch(r"the (\w+) (\w+)", expr):
        return [o for o in objects if o.color == m.group(1) and o.cls == m.group(2)]
    if m := re.fullmatch(r"the (\w+)", expr):
        return [o for o in objects if o.cls == m.group(1)]
    raise ValueError(f"expression outside the grammar: {expr!r}")


def answer(question: str, objects: list[ObjectTruth], width: int) -> str:
    """The answer to a generated question, computed from the objects alone."""
    if m := re.fullmatch(r"is there a (\w+)\?", question):
        return "yes" if any(o.cls == m.group(1) for o in objects) else "no"
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o.cls == SINGULAR[m.group(1)] for o in objects))
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (only,) = [o for o in objects if o.cls == m.group(1)]
        return only.color
    if m := re.fullmatch(r"what is left of (.+)\?", question):
        (target,) = resolve(m.group(1), objects, width)
        left = [o for o in objects if o.track_id != target.track_id and _cx(o) < _cx(target)]
        return max(left, key=_cx).cls if left else "nothing"
    raise ValueError(f"question outside the grammar: {question!r}")
