"""Draws the street and its agents with OpenCV: one distinct side-view silhouette per class."""

from __future__ import annotations

import math

import cv2
import numpy as np

from apps.datasets.scene import Agent, Scene
from apps.datasets.vocab import COLORS

_SHIFT = 3  # sub-pixel bits for OpenCV drawing, so slow motion stays smooth
_ONE = 1 << _SHIFT
# Boxes put pixel i over [i, i + 1); OpenCV puts pixel i's centre at i.
_CENTER = 0.5
TIRE = (30, 30, 32)
HUB = (150, 150, 155)
GLASS = (150, 190, 215)
SKIN = (225, 180, 140)
TROUSERS = (55, 60, 80)
CHASSIS = (60, 60, 64)


def _fixed(v: float) -> int:
    return round((v - _CENTER) * _ONE)


def _pts(points: list[tuple[float, float]]) -> np.ndarray:
    return np.array([[_fixed(x), _fixed(y)] for x, y in points], dtype=np.int32)


def _poly(img: np.ndarray, points: list[tuple[float, float]], color: tuple[int, int, int]) -> None:
    cv2.fillPoly(img, [_pts(points)], color, lineType=cv2.LINE_AA, shift=_SHIFT)


def _rect(img: np.ndarray, x1: float, y1: float, x2: float, y2: float, color: tuple[int, int, int]) -> None:
    _poly(img, [(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color)


def _disc(img: np.ndarray, x: float, y: float, r: float, color: tuple[int, int, int], thickness: int = -1) -> None:
    center = (_fixed(x), _fixed(y))
    cv2.circle(img, center, max(1, round(r * _ONE)), color, thickness, lineType=cv2.LINE_AA, shift=_SHIFT)


def _line(img: np.ndarray, a: tuple[float, float], b: tuple[float, float], color, thickness: float) -> None:
    pa, pb = (_fixed(a[0]), _fixed(a[1])), (_fixed(b[0]), _fixed(b[1]))
    cv2.line(img, pa, pb, color, max(1, round(thickness)), lineType=cv2.LINE_AA, shift=_SHIFT)


class _Frame:
    """Maps unit coordinates of an agent's box (u along travel, v downward) to pixels, mirrored for leftward."""

    def __init__(self, box: tuple[float, float, float, float], direction: int) -> None:
        self.x1, self.y1, self.x2, self.y2 = box
        self.w, self.h = self.x2 - self.x1, self.y2 - self.y1
        self.direction = direction

    def p(self, u: float, v: float) -> tuple[float, float]:
        u = u if self.direction > 0 else 1.0 - u
        return self.x1 + u * self.w, self.y1 + v * self.h

    def poly(self, img: np.ndarray, uv: list[tuple[float, float]], color) -> None:
        _poly(img, [self.p(u, v) for u, v in uv], color)

    def wheel(self, img: np.ndarray, u: float, r_frac: float) -> None:
        x, _ = self.p(u, 0)
        r = r_frac * self.h
        _disc(img, x, self.y2 - r, r, TIRE)
        _disc(img, x, self.y2 - r, r * 0.45, HUB)


def _car(img: np.ndarray, f: _Frame, color) -> None:
    f.poly(img, [(0.0, 0.45), (0.02, 0.82), (0.98, 0.82), (1.0, 0.5), (0.82, 0.42), (0.0, 0.42)], color)
    f.poly(img, [(0.2, 0.45), (0.32, 0.0), (0.68, 0.0), (0.8, 0.45)], color)
    f.poly(img, [(0.27, 0.42), (0.36, 0.1), (0.48, 0.1), (0.48, 0.42)], GLASS)
    f.poly(img, [(0.53, 0.42), (0.53, 0.1), (0.65, 0.1), (0.74, 0.42)], GLASS)
    f.wheel(img, 0.2, 0.24)
    f.wheel(img, 0.8, 0.24)


def _bus(img: np.ndarray, f: _Frame, color) -> None:
    f.poly(img, [(0.0, 0.0), (0.97, 0.0), (1.0, 0.08), (1.0, 0.86), (0.0, 0.86)], color)
    for k in range(5):
        u0 = 0.05 + k * 0.17
        f.poly(img, [(u0, 0.12), (u0 + 0.13, 0.12), (u0 + 0.13, 0.45), (u0, 0.45)], GLASS)
    f.poly(img, [(0.9, 0.12), (0.99, 0.12), (0.99, 0.72), (0.9, 0.72)], GLASS)
    f.wheel(img, 0.17, 0.2)
    f.wheel(img, 0.8, 0.2)


def _truck(img: np.ndarray, f: _Frame, color) -> None:
    f.poly(img, [(0.0, 0.0), (0.66, 0.0), (0.66, 0.8), (0.0, 0.8)], color)
    f.poly(img, [(0.0, 0.8), (1.0, 0.8), (1.0, 0.88), (0.0, 0.88)], CHASSIS)
    f.poly(img, [(0.69, 0.3), (0.9, 0.3), (1.0, 0.5), (1.0, 0.84), (0.69, 0.84)], color)
    f.poly(img, [(0.76, 0.36), (0.89, 0.36), (0.96, 0.52), (0.76, 0.52)], GLASS)
    for u in (0.13, 0.33, 0.84):
        f.wheel(img, u, 0.19)


def _bicycle(img: np.ndarray, f: _Frame, color) -> None:
    r = 0.33 * f.h
    thick = max(2.0, 0.11 * f.h)
    cy = f.y2 - r
    rear, front, crank = (f.p(0.2, 0)[0], cy), (f.p(0.8, 0)[0], cy), (f.p(0.47, 0)[0], cy)
    seat, head = f.p(0.4, 0.12), f.p(0.72, 0.12)
    for x, _ in (rear, front):
        _disc(img, x, cy, r - thick / 2, TIRE, thickness=max(1, round(thick * 0.8)))
    for a, b in ((rear, crank), (crank, seat), (seat, head), (head, front), (rear, seat), (crank, head)):
        _line(img, a, b, color, thick)
    _line(img, f.p(0.33, 0.04), f.p(0.47, 0.04), CHASSIS, thick)
    _line(img, f.p(0.7, 0.0), f.p(0.8, 0.02), CHASSIS, thick)


def _person(img: np.ndarray, f: _Frame, color, phase: float) -> None:
    swing = 0.28 * math.sin(phase)
    limb = max(2.0, 0.32 * f.w)
    hip = (f.x1 + f.w / 2, f.y1 + 0.6 * f.h)
    for s in (swing, -swing):
        _line(img, hip, (hip[0] + s * f.w * 1.2, f.y2 - limb / 2), TROUSERS, limb)
    _rect(img, f.x1 + 0.08 * f.w, f.y1 + 0.21 * f.h, f.x2 - 0.08 * f.w, f.y1 + 0.62 * f.h, color)
    shoulder = (f.x1 + f.w / 2, f.y1 + 0.26 * f.h)
    _line(img, shoulder, (shoulder[0] - swing * f.w, f.y1 + 0.52 * f.h), color, limb * 0.8)
    _disc(img, f.x1 + f.w / 2, f.y1 + 0.1 * f.h, 0.1 * f.h, SKIN)


def draw_agent(img: np.ndarray, agent: Agent, box: tuple[float, float, float, float]) -> None:
    """Paint one agent inside its (unclipped) box; OpenCV clips at the frame border."""
    f = _Frame(box, agent.direction)
    color = COLORS[agent.color]
    if agent.cls == "person":
        _person(img, f, color, agent.phase)
    else:
        {"car": _car, "bus": _bus, "truck": _truck, "bicycle": _bicycle}[agent.cls](img, f, color)


def draw_background(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The static street: facades, two sidewalks with kerbs, the road with dashed lane lines."""
    w, h, lay = scene.width, scene.height, scene.layout
    img = np.empty((h, w, 3), dtype=np.uint8)  # img: [height, width, rgb]
    jitter = lambda base: tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(base, rng.integers(-8, 9, 3), strict=True))
    road, walk = jitter((100, 100, 106)), jitter((172, 160, 142))
    img[:] = walk
    x = 0.0
    while x < w:
        block_w = float(rng.uniform(0.15, 0.35)) * w
        _rect(img, x, 0, x + block_w, lay.building * h, jitter((112, 104, 100)))
        for wx in np.arange(x + 3, x + block_w - 5, 9 * scene.unit):
            _rect(img, wx, 0.25 * lay.building * h, wx + 4 * scene.unit, 0.7 * lay.building * h, (70, 75, 85))
        x += block_w
    _rect(img, 0, lay.road[0] * h, w, lay.road[1] * h, road)
    for y in (lay.road[0], lay.road[1]):
        _rect(img, 0, y * h - 1.5 * scene.unit, w, y * h + 1.5 * scene.unit, (140, 135, 128))
    dash, gap = 14 * scene.unit, 10 * scene.unit
    offset = float(rng.uniform(0, dash + gap))
    for a in lay.lane_grounds[:-1]:
        y = a * h + 3 * scene.unit
        for x0 in np.arange(-offset, w, dash + gap):
            _rect(img, x0, y - 0.8 * scene.unit, x0 + dash, y + 0.8 * scene.unit, (196, 196, 190))
    return img


def render(scene: Scene, background: np.ndarray) -> np.ndarray:
    """One RGB frame: the background with every agent painted far-to-near."""
    img = background.copy()
    for agent, box in scene.drawn():
        draw_agent(img, agent, box)
    return img
