"""Synthetic traffic clips and stills, deterministic by seed: pixels plus the ground truth of every frame."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from apps.datasets import language
from apps.datasets.painter import draw_background, render
from apps.datasets.scene import Scene
from apps.datasets.schema import FrameTruth, ObjectTruth

logger = logging.getLogger(__name__)

DEFAULT_SIZE = 224
DEFAULT_FPS = 10.0
CLIP_WARM_UP_S = 20.0
# Entropy tags keep clips, stills and the per-purpose generators of one seed statistically independent.
CLIP_TAG, STILL_TAG = 0xC11, 0x571
SCENE, BACKGROUND, TEXT = 0, 1, 2


def parse_size(size: int | str | Sequence[int]) -> tuple[int, int]:
    """(width, height) from 224, '320x240' or (320, 240); both even and within 32..4096."""
    if isinstance(size, str):
        parts = size.lower().split("x")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"size must be N or WxH, got {size!r}") from None
    elif isinstance(size, int):
        values = [size]
    else:
        values = [int(v) for v in size]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise ValueError(f"size must be N or WxH, got {size!r}")
    width, height = values
    if not (32 <= width <= 4096 and 32 <= height <= 4096) or width % 2 or height % 2:
        raise ValueError(f"frame size must be even and within 32..4096, got {width}x{height}")
    return width, height


def _rng(*entropy: int) -> np.random.Generator:
    if any(e < 0 for e in entropy):
        raise ValueError(f"seeds must be non-negative integers, got {entropy}")
    return np.random.default_rng(np.random.SeedSequence(list(entropy)))


def annotate(frame: int, t: float, width: int, height: int, objects: list[ObjectTruth], rng) -> FrameTruth:
    """The full ground truth of a frame from its visible objects; rng draws which questions and expressions."""
    return FrameTruth(
        frame=frame,
        t=round(t, 4),
        width=width,
        height=height,
        objects=objects,
        counts=language.counts(objects),
        caption=language.caption(objects),
        vqa=language.questions(objects, width, rng),
        refs=language.referring(objects, width, rng),
    )


def clip_frames(
    seconds: float, seed: int, fps: float = DEFAULT_FPS, size: int | str | Sequence[int] = DEFAULT_SIZE
) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Frames of a clip in order: (rgb [height, width, 3] uint8, truth). Arguments are checked before it returns."""
    if not 0 < fps <= 120:
        raise ValueError(f"fps must be within (0, 120], got {fps}")
    if not 0 < seconds <= 3600:
        raise ValueError(f"seconds must be within (0, 3600], got {seconds}")
    width, height = parse_size(size)
    scene = Scene(_rng(CLIP_TAG, seed, SCENE), width, height)
    return _frames(scene, max(1, round(seconds * fps)), seed, fps)


def _frames(scene: Scene, count: int, seed: int, fps: float) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    background = draw_background(scene, _rng(CLIP_TAG, seed, BACKGROUND))
    scene.warm_up(CLIP_WARM_UP_S)
    for index in range(count):
        if index:
            scene.step(1.0 / fps)
        objects = scene.visible_objects()
        text_rng = _rng(CLIP_TAG, seed, TEXT, index)
        yield render(scene, background), annotate(index, index / fps, scene.width, scene.height, objects, text_rng)


def still(entropy: Sequence[int], size: int | str | Sequence[int] = DEFAULT_SIZE, pixels: bool = True):
    """One independent frame for the given entropy: (rgb or None, truth). The truth never depends on `pixels`."""
    width, height = parse_size(size)
    scene = Scene(_rng(STILL_TAG, *entropy, SCENE), width, height)
    scene.warm_up(float(scene.rng.uniform(2.0, 24.0)))
    objects = scene.visible_objects()
    truth = annotate(0, 0.0, width, height, objects, _rng(STILL_TAG, *entropy, TEXT))
    if not pixels:
        return None, truth
    return render(scene, draw_background(scene, _rng(STILL_TAG, *entropy, BACKGROUND))), truth


def sidecar_path(video: Path) -> Path:
    """The JSONL ground truth that belongs to a synthetic clip."""
    return Path(video).with_suffix(".jsonl")


def read_truth(path: Path) -> list[FrameTruth]:
    """Every frame's truth from a JSONL sidecar, in frame order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth sidecar not found: {path}")
    truths = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                truths.append(FrameTruth.model_validate_json(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not a FrameTruth line ({exc.__class__.__name__})") from None
    return truths


def write_clip(
    out_dir: Path,
    seconds: float,
    seed: int,
    fps: float = DEFAULT_FPS,
    size: int | str | Sequence[int] = DEFAULT_SIZE,
) -> tuple[Path, Path]:
    """Write traffic-<seed>.mp4 (H.264, yuv420p) and its traffic-<seed>.jsonl sidecar (one line per frame)."""
    frames = clip_frames(seconds, seed, fps, size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path exists and is not a directory: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    width, height = parse_size(size)
    from apps.datasets.video import VideoWriter  # PyAV only where a clip is written: stills need none

    video = out_dir / f"traffic-{seed}.mp4"
    sidecar = sidecar_path(video)
    with VideoWriter(video, width, height, fps) as writer, sidecar.open("w", encoding="utf-8") as truth_file:
        for rgb, truth in frames:
            writer.write(rgb)
            truth_file.write(truth.model_dump_json() + "\n")
    logger.info("wrote %s frames of synthetic traffic to %s and %s", writer.frames, video, sidecar)
    return video, sidecar
