"""Generic scene descriptions the base model is pretrained on: prose about what is where, in no task's format."""

from __future__ import annotations

from apps.datasets.schema import FrameTruth, ObjectTruth

# Prompts of the pretraining conversations; none of them is a task prompt.
DESCRIBE_PROMPTS = (
    "describe the picture.",
    "what does this street scene show?",
    "tell me what you see.",
)

# Ground lines of the street's bands as fractions of the frame height (apps.datasets.scene.Layout), and their names.
BANDS = (
    (0.25, "on the far sidewalk"),
    (0.42, "in the far lane"),
    (0.57, "in the second lane"),
    (0.72, "in the third lane"),
    (0.87, "in the near lane"),
    (0.985, "on the near sidewalk"),
)
# Horizontal position words, left to right, for equal slices of the frame width.
PLACES = (
    "at the left edge", "on the far left", "on the left", "left of the middle", "in the middle",
    "right of the middle", "on the right", "on the far right", "at the right edge",
)


def band_index(obj: ObjectTruth, height: int) -> int:
    """Which band an object stands in, by the ground line nearest its feet or wheels."""
    bottom = obj.box[3] / height
    return min(range(len(BANDS)), key=lambda i: abs(BANDS[i][0] - bottom))


def place(obj: ObjectTruth, width: int) -> str:
    """The position word of an object's centre."""
    slot = int(obj.center_x / width * len(PLACES))
    return PLACES[min(max(slot, 0), len(PLACES) - 1)]


def _phrase(obj: ObjectTruth, width: int) -> str:
    name = f"a person in {obj.color}" if obj.cls == "person" else f"a {obj.color} {obj.cls}"
    cut = obj.box[0] <= 0.5 or obj.box[2] >= width - 0.5
    tail = ", partly out of view" if cut else ""
    return f"{name} {place(obj, width)}{tail}"


def describe(truth: FrameTruth) -> str:
    """Band by band, far to near, and left to right inside a band: every visible object with colour and place."""
    if not truth.objects:
        return "a street scene with nobody on it."
    by_band: dict[int, list[ObjectTruth]] = {}
    for obj in truth.objects:
        by_band.setdefault(band_index(obj, truth.height), []).append(obj)
    sentences = ["a street scene."]
    for index in sorted(by_band):
        phrases = [_phrase(o, truth.width) for o in sorted(by_band[index], key=lambda o: o.center_x)]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        sentences.append(f"{BANDS[index][1]}, {listed}.")
    return " ".join(sentences)
