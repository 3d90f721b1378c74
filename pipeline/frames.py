"""Turning decoded pictures into published frames: resize, JPEG, and ground truth scaled to match."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The (width, height) that keeps the aspect ratio with the longer side at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_jpeg(image: np.ndarray, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """image: [height, width, 3] RGB uint8 -> (JPEG bytes, width, height) after fitting into ``max_side``."""
    height, width = image.shape[:2]
    new_w, new_h = fit_size(width, height, max_side)
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding failed for a {width}x{height} frame")
    return buf.tobytes(), new_w, new_h


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> [height, width, 3] RGB uint8."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("bytes are not a decodable JPEG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def scale_truth(truth: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """A frame's ground truth with every box scaled from the source size to (width, height)."""
    sx, sy = width / truth["width"], height / truth["height"]
    if sx == 1.0 and sy == 1.0:
        return truth

    def box(b: list[float]) -> list[float]:
        return [min(b[0] * sx, width), min(b[1] * sy, height), min(b[2] * sx, width), min(b[3] * sy, height)]

    out = dict(truth, width=width, height=height)
    out["objects"] = [dict(o, box=box(o["box"])) for o in truth.get("objects", [])]
    out["refs"] = [dict(r, box=box(r["box"])) for r in truth.get("refs", [])]
    return out


class TruthSidecar:
    """The JSONL ground truth next to a synthetic clip (``clip.mp4`` -> ``clip.jsonl``), by frame index."""

    def __init__(self, by_frame: dict[int, dict[str, Any]]) -> None:
        self.by_frame = by_frame

    @classmethod
    def for_video(cls, video: Path) -> TruthSidecar | None:
        path = video.with_suffix(".jsonl")
        if not path.is_file():
            return None
        by_frame: dict[int, dict[str, Any]] = {}
        with path.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    by_frame[int(row["frame"])] = row
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}:{n}: not a ground-truth line: {exc}") from None
        logger.info("ground truth for %d frames from %s", len(by_frame), path)
        return cls(by_frame)

    def get(self, index: int) -> dict[str, Any] | None:
        return self.by_frame.get(index)


class Sampler:
    """Per-key fps sampling on media time: frames are taken on a 1/fps grid, so the mean rate is fps exactly.

    A frame is taken when its pts reaches the next grid point; a clock that jumps back (a looped file, a
    restarted camera) or far ahead restarts the grid at that frame.
    """

    def __init__(self) -> None:
        self.due: dict[str, float] = {}

    def take(self, key: str, pts: float, fps: float) -> bool:
        interval = 1.0 / fps
        due = self.due.get(key)
        if due is None or pts < due - interval or pts - due >= interval:
            self.due[key] = pts + interval
            return True
        if pts >= due - 1e-6:
            self.due[key] = due + interval
            return True
        return False
