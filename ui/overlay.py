"""Overlays as pure functions: a frame plus the task results computed for it in, an annotated picture out."""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from apps.tasks import load_output
from apps.tasks.output import CaptionOutput, CountingOutput, DetectionOutput, GroundingOutput, VQAOutput
from pipeline.schema import TaskResult

Color = tuple[int, int, int]

# Distinct, saturated colours that read on road scenes; a class keeps its colour across frames and sessions.
PALETTE: tuple[Color, ...] = (
    (255, 59, 48), (52, 199, 89), (0, 122, 255), (255, 149, 0), (175, 82, 222),
    (0, 199, 190), (255, 204, 0), (255, 45, 85), (88, 86, 214), (162, 132, 94),
)
GROUNDING_COLOR: Color = (255, 0, 255)
TEXT_COLOR: Color = (255, 255, 255)
PANEL_COLOR: Color = (24, 24, 27)
ERROR_COLOR: Color = (255, 99, 71)


@dataclass(frozen=True)
class Style:
    """How overlays are drawn. Frames are upscaled so the longer side is at least ``min_side`` pixels."""

    min_side: int = 640
    line: int = 3
    font_size: int = 16
    pad: int = 6


@dataclass(frozen=True)
class Mark:
    """One box to draw: the task it came from, its label, its normalised [x1, y1, x2, y2] box and its colour."""

    task: str
    label: str
    box: tuple[float, float, float, float]
    color: Color


@dataclass(frozen=True)
class Annotations:
    """Everything a frame's results say, ready to draw or list: boxes, count badges and text lines."""

    marks: list[Mark]
    counts: dict[str, int]
    lines: list[tuple[str, Color]]  # (text, colour) under the picture: caption, Q&A, errors


def class_color(name: str) -> Color:
    """A stable colour for a class or label."""
    return PALETTE[zlib.crc32(name.encode("utf-8")) % len(PALETTE)]


def printable(text: str, limit: int = 200) -> str:
    """Model text made safe to draw: control and unassigned characters become '?', long text is cut."""
    cleaned = "".join(ch if unicodedata.category(ch)[0] not in "CZ" or ch == " " else "?" for ch in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def annotations(results: Mapping[str, TaskResult]) -> Annotations:
    """Boxes, counts and text lines of one frame's task results (task -> result)."""
    marks: list[Mark] = []
    counts: dict[str, int] = {}
    lines: list[tuple[str, Color]] = []
    for task in sorted(results):
        result = results[task]
        if not result.ok:
            lines.append((printable(f"{task}: error: {result.error}"), ERROR_COLOR))
        for data in result.outputs:
            output = load_output(data)
            if isinstance(output, DetectionOutput):
                for det in output.detections:
                    label = det.cls if det.score >= 1.0 else f"{det.cls} {det.score:.2f}"
                    marks.append(Mark(task, printable(label, 40), _box(det.box), class_color(det.cls)))
            elif isinstance(output, GroundingOutput):
                if output.box is not None:
                    marks.append(Mark(task, printable(output.item or "?", 60), _box(output.box), GROUNDING_COLOR))
                else:
                    lines.append((printable(f"locate '{output.item}': no box"), ERROR_COLOR))
            elif isinstance(output, CountingOutput):
                counts.update(output.counts)
            elif isinstance(output, CaptionOutput):
                lines.append((printable(f"caption: {output.caption or '(none)'}"), TEXT_COLOR))
            elif isinstance(output, VQAOutput):
                lines.append((printable(f"Q: {output.item}  A: {output.answer or '(none)'}"), TEXT_COLOR))
    return Annotations(marks, counts, lines)


def render(image: np.ndarray, results: Mapping[str, TaskResult], style: Style = Style()) -> np.ndarray:
    """image: [height, width, 3] RGB uint8 -> annotated [H', width', 3] RGB uint8 (upscaled, text panel below)."""
    notes = annotations(results)
    picture = upscale(image, style.min_side)
    font = ImageFont.load_default(size=style.font_size)
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas)
    for mark in notes.marks:
        draw_mark(draw, mark, canvas.size, style, font)
    draw_badges(draw, notes.counts, style, font)
    if notes.lines:
        canvas = add_panel(canvas, notes.lines, style, font)
    return np.asarray(canvas)


def upscale(image: np.ndarray, min_side: int) -> np.ndarray:
    """image: [h, w, 3] -> [h * k, w * k, 3] with the smallest integer k that brings max(h, w) to ``min_side``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [h, w, 3], got {image.dtype} {image.shape}")
    k = max(1, -(-min_side // max(image.shape[:2])))
    return image if k == 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def box_pixels(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Normalised [x1, y1, x2, y2] -> inclusive pixel corners on a (width, height) picture."""
    width, height = size
    x1, y1, x2, y2 = box
    left, top = round(x1 * width), round(y1 * height)
    right, bottom = max(left, round(x2 * width) - 1), max(top, round(y2 * height) - 1)
    return min(left, width - 1), min(top, height - 1), min(right, width - 1), min(bottom, height - 1)


def draw_mark(draw: ImageDraw.ImageDraw, mark: Mark, size: tuple[int, int], style: Style,
              font: ImageFont.FreeTypeFont) -> None:
    """The box outline (drawn inwards from its edges) with its label on a filled tab above it (or inside)."""
    left, top, right, bottom = box_pixels(mark.box, size)
    draw.rectangle((left, top, right, bottom), outline=mark.color, width=style.line)
    text_w = int(font.getlength(mark.label)) + 2 * style.pad
    text_h = style.font_size + style.pad
    tab_top = top - text_h if top - text_h >= 0 else top + style.line
    draw.rectangle((left, tab_top, left + text_w, tab_top + text_h), fill=mark.color)
    draw.text((left + style.pad, tab_top + style.pad // 2), mark.label, fill=_ink(mark.color), font=font)


def draw_badges(draw: ImageDraw.ImageDraw, counts: Mapping[str, int], style: Style,
                font: ImageFont.FreeTypeFont) -> None:
    """One filled chip per counted class ('car 3'), left to right along the top edge."""
    x = style.pad
    for cls in sorted(counts):
        text = printable(f"{cls} {counts[cls]}", 40)
        width = int(font.getlength(text)) + 2 * style.pad
        color = class_color(cls)
        draw.rounded_rectangle((x, style.pad, x + width, style.pad + style.font_size + style.pad), radius=6,
                               fill=color)
        draw.text((x + style.pad, style.pad + style.pad // 2), text, fill=_ink(color), font=font)
        x += width + style.pad


def add_panel(canvas: Image.Image, lines: list[tuple[str, Color]], style: Style,
              font: ImageFont.FreeTypeFont) -> Image.Image:
    """The picture with a dark panel below it holding ``lines``, each wrapped to the picture's width."""
    wrapped = [(part, color) for text, color in lines for part in wrap(text, font, canvas.width - 2 * style.pad)]
    line_h = style.font_size + style.pad
    out = Image.new("RGB", (canvas.width, canvas.height + style.pad + line_h * len(wrapped)), PANEL_COLOR)
    out.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(out)
    y = canvas.height + style.pad
    for text, color in wrapped:
        draw.text((style.pad, y), text, fill=color, font=font)
        y += line_h
    return out


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a single overlong word is split by characters."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while font.getlength(current) > width and len(current) > 1:
            cut = max(1, next((i for i in range(len(current), 0, -1) if font.getlength(current[:i]) <= width), 1))
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    return lines or [""]


def _box(box: list[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
    return x1, y1, x2, y2


def _ink(background: Color) -> Color:
    """Black or white text, whichever reads better on ``background``."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)
