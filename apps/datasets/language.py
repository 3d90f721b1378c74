"""Text about a frame in the fixed synthetic style: its caption, closed-set questions and referring expressions."""

from __future__ import annotations

from collections import Counter

import numpy as np

from apps.datasets.schema import QA, ObjectTruth, RefExpr
from apps.datasets.vocab import CLASSES, COLOR_NAMES, noun_phrase, object_name, plural

# Two objects whose centres are closer than this share of the frame width are not told apart by "left"/"leftmost".
POSITION_MARGIN = 0.06
MAX_QUESTIONS = 4
MAX_REFS = 3


def counts(objects: list[ObjectTruth], classes: tuple[str, ...] = CLASSES) -> dict[str, int]:
    """Objects per class, every class present with zero included."""
    tally = Counter(o.cls for o in objects)
    return {cls: tally.get(cls, 0) for cls in classes}


def caption(objects: list[ObjectTruth]) -> str:
    """One sentence: groups of (colour, class) in class then palette order, e.g. 'two red cars and a person in
    blue on the street'. An empty frame is 'nothing on the street': every caption has four words or more, so
    it has 4-grams and an exact copy can reach the full CIDEr-D score."""
    if not objects:
        return "nothing on the street"
    groups = Counter((o.cls, o.color) for o in objects)
    order = sorted(groups, key=lambda key: (CLASSES.index(key[0]), COLOR_NAMES.index(key[1])))
    phrases = [noun_phrase(cls, color, groups[(cls, color)]) for cls, color in order]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on the street"


def _unique_names(objects: list[ObjectTruth]) -> dict[str, ObjectTruth]:
    """Objects whose (class, colour) is unique in the frame, keyed by their definite name."""
    tally = Counter((o.cls, o.color) for o in objects)
    return {object_name(o.cls, o.color): o for o in objects if tally[(o.cls, o.color)] == 1}


def _extreme(objects: list[ObjectTruth], cls: str, side: str, margin: float) -> ObjectTruth | None:
    """The leftmost/rightmost object of a class when it is clearly so (by margin) and the class has two or more."""
    same = sorted((o for o in objects if o.cls == cls), key=lambda o: o.center_x, reverse=side == "rightmost")
    if len(same) < 2 or abs(same[1].center_x - same[0].center_x) < margin:
        return None
    return same[0]


def left_of(objects: list[ObjectTruth], target: ObjectTruth, margin: float) -> str | None:
    """Class of the nearest object left of the target, 'nothing' if there is none; None if that is ambiguous."""
    others = [o for o in objects if o.track_id != target.track_id]
    if any(target.center_x - margin < o.center_x <= target.center_x for o in others):
        return None
    left = sorted((o for o in others if o.center_x <= target.center_x - margin), key=lambda o: -o.center_x)
    if not left:
        return "nothing"
    near = {o.cls for o in left if o.center_x > left[0].center_x - margin}
    return left[0].cls if len(near) == 1 else None


def questions(objects: list[ObjectTruth], width: int, rng: np.random.Generator) -> list[QA]:
    """Up to four closed-set questions, at most one of each kind: presence, how many, colour, left of."""
    tally = counts(objects)
    margin = POSITION_MARGIN * width
    present = [c for c in CLASSES if tally[c] > 0]
    absent = [c for c in CLASSES if tally[c] == 0]
    out: list[QA] = []

    pool = present if present and (not absent or rng.random() < 0.5) else absent
    cls = str(rng.choice(pool))
    out.append(QA(question=f"is there a {cls}?", answer="yes" if tally[cls] else "no"))

    pool = present if present and rng.random() < 0.75 else list(CLASSES)
    cls = str(rng.choice(pool))
    out.append(QA(question=f"how many {plural(cls)} are there?", answer=str(tally[cls])))

    single = [c for c in present if tally[c] == 1]
    if single:
        cls = str(rng.choice(single))
        color = next(o.color for o in objects if o.cls == cls)
        out.append(QA(question=f"what color is the {cls}?", answer=color))

    named = _unique_names(objects)
    answerable = [(name, ans) for name, obj in named.items() if (ans := left_of(objects, obj, margin)) is not None]
    if answerable:
        name, answer = answerable[int(rng.integers(len(answerable)))]
        out.append(QA(question=f"what is left of {name}?", answer=answer))
    return out[:MAX_QUESTIONS]


def expressions_for(objects: list[ObjectTruth], target: ObjectTruth, width: int) -> list[str]:
    """Every expression of the grammar that picks out exactly this object."""
    margin = POSITION_MARGIN * width
    exprs = [name for name, obj in _unique_names(objects).items() if obj.track_id == target.track_id]
    same_class = [o for o in objects if o.cls == target.cls]
    if len(same_class) == 1:
        exprs.append(f"the {target.cls}")
    for side in ("leftmost", "rightmost"):
        chosen = _extreme(objects, target.cls, side, margin)
        if chosen is not None and chosen.track_id == target.track_id:
            exprs.append(f"the {side} {target.cls}")
    return exprs


def referring(objects: list[ObjectTruth], width: int, rng: np.random.Generator) -> list[RefExpr]:
    """Up to three expressions, each about a different object and unambiguous in this frame."""
    refs: list[RefExpr] = []
    for index in rng.permutation(len(objects)):
        target = objects[int(index)]
        options = expressions_for(objects, target, width)
        if options:
            expr = options[int(rng.integers(len(options)))]
            refs.append(RefExpr(expr=expr, track_id=target.track_id, box=list(target.box)))
        if len(refs) == MAX_REFS:
            break
    return refs
