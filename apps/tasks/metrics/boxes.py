"""Box geometry: IoU, normalisation to the frame, and the 0-100 integer grid boxes are written on."""

from __future__ import annotations

from collections.abc import Sequence

GRID = 100  # boxes in model text are integers on a GRID x GRID lattice over the frame


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (any common unit); 0 for empty boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def normalise(box: Sequence[float], width: int, height: int) -> list[float]:
    """Pixel box -> [0, 1] box."""
    return [box[0] / width, box[1] / height, box[2] / width, box[3] / height]


def to_grid(box: Sequence[float], width: int, height: int) -> list[int]:
    """Pixel box -> integers on the 0..GRID lattice, at least one cell wide and tall."""
    x1, y1, x2, y2 = (round(v / s * GRID) for v, s in zip(box, (width, height, width, height), strict=True))
    x1, y1 = min(max(x1, 0), GRID - 1), min(max(y1, 0), GRID - 1)
    x2, y2 = min(max(x2, x1 + 1), GRID), min(max(y2, y1 + 1), GRID)
    return [x1, y1, x2, y2]


def from_grid(cells: Sequence[int]) -> list[float]:
    """Lattice integers -> [0, 1] box."""
    return [c / GRID for c in cells]


def format_grid(cells: Sequence[int]) -> str:
    return " ".join(str(c) for c in cells)
