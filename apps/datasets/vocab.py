"""The closed vocabulary of the synthetic traffic domain: classes, colours, number words and their phrasing."""

from __future__ import annotations

# Order matters: captions, counting answers and class indices of the task heads follow it.
CLASSES: tuple[str, ...] = ("car", "bus", "truck", "bicycle", "person")
PLURALS: dict[str, str] = {"car": "cars", "bus": "buses", "truck": "trucks", "bicycle": "bicycles", "person": "people"}
VEHICLES: tuple[str, ...] = ("car", "bus", "truck", "bicycle")

# Saturated, well-separated RGB values; the road and sidewalks use none of these hues.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "blue": (35, 80, 225),
    "green": (30, 160, 60),
    "yellow": (245, 205, 30),
    "white": (245, 245, 245),
    "black": (22, 22, 22),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Every answer the synthetic questions can have (a closed set, e.g. for a VQA classifier head).
VQA_ANSWERS: tuple[str, ...] = ("yes", "no", *(str(n) for n in range(9)), *COLOR_NAMES, *CLASSES, "nothing")


def plural(cls: str) -> str:
    """Plural noun of a class name ("person" -> "people"); unknown names get an "s"."""
    return PLURALS.get(cls, cls + "s")


def noun_phrase(cls: str, color: str, count: int = 1) -> str:
    """Quantified phrase in the fixed caption style: "a red car", "two people in blue"."""
    quantity = "a" if count == 1 else NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)
    noun = cls if count == 1 else plural(cls)
    if cls == "person":
        return f"{quantity} {noun} in {color}"
    return f"{quantity} {color} {noun}"


def object_name(cls: str, color: str) -> str:
    """Definite name of one object: "the red car", "the person in blue"."""
    return f"the {cls} in {color}" if cls == "person" else f"the {color} {cls}"
