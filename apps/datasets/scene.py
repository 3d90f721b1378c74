"""The moving world of a synthetic street: lanes, agents that enter, cross and leave, and their visible boxes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from apps.datasets.schema import ObjectTruth
from apps.datasets.vocab import COLOR_NAMES

# Reference frame height the sizes and speeds below are tuned for; everything scales with height / 224.
REFERENCE_HEIGHT = 224.0
# Height in reference pixels and width/height aspect of each class (side view).
SHAPES: dict[str, tuple[float, float]] = {
    "car": (21.0, 2.2),
    "bus": (30.0, 2.9),
    "truck": (28.0, 2.5),
    "bicycle": (18.0, 1.65),
    "person": (29.0, 0.42),
}
ROAD_CLASSES = ("car", "bus", "truck", "bicycle")
ROAD_WEIGHTS = np.array([0.45, 0.15, 0.2, 0.2])
# An object counts as visible (and enters the ground truth) once this share of its width is inside the frame.
MIN_VISIBLE = 0.4


@dataclass(frozen=True)
class Lane:
    """A horizontal path: every agent on it shares its ground line, scale, direction and speed."""

    kind: str  # "road" or "sidewalk"
    ground: float  # y of the wheels or feet, in pixels
    scale: float  # size multiplier (nearer lanes are bigger)
    direction: int  # +1 moves right, -1 moves left
    speed: float  # pixels per second
    rate: float  # expected spawns per second while there is room


@dataclass
class Agent:
    """One vehicle or person; x is the left edge of its unclipped box."""

    track_id: int
    cls: str
    color: str
    lane: int
    x: float
    w: float
    h: float
    direction: int
    phase: float = 0.0  # walking cycle, in radians

    def box(self, ground: float) -> tuple[float, float, float, float]:
        return self.x, ground - self.h, self.x + self.w, ground


@dataclass(frozen=True)
class Layout:
    """Where the bands of the street lie, in fractions of the frame height."""

    building: float = 0.10
    top_walk: tuple[float, float, float] = (0.10, 0.28, 0.25)  # top, bottom, feet line
    road: tuple[float, float] = (0.28, 0.89)
    lane_grounds: tuple[float, ...] = (0.42, 0.57, 0.72, 0.87)
    lane_scales: tuple[float, ...] = (0.9, 1.0, 1.1, 1.2)
    bottom_walk: tuple[float, float, float] = (0.89, 1.0, 0.985)
    walk_scales: tuple[float, float] = (0.9, 1.15)


@dataclass
class Scene:
    """A street whose traffic evolves by `step(dt)`; deterministic given the generator it is built with."""

    rng: np.random.Generator
    width: int
    height: int
    max_objects: int = 8
    layout: Layout = field(default_factory=Layout)
    lanes: list[Lane] = field(init=False)
    agents: list[Agent] = field(init=False, default_factory=list)
    next_id: int = field(init=False, default=1)

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32:
            raise ValueError(f"frame {self.width}x{self.height} is too small; use at least 32x32")
        if not 0 <= self.max_objects <= 32:
            raise ValueError(f"max_objects must be within 0..32, got {self.max_objects}")
        self.lanes = self._make_lanes()

    @property
    def unit(self) -> float:
        """Pixels per reference pixel."""
        return self.height / REFERENCE_HEIGHT

    def _make_lanes(self) -> list[Lane]:
        rng, unit, lay = self.rng, self.unit, self.layout
        density = float(rng.uniform(0.05, 1.0))
        flip = 1 if rng.random() < 0.5 else -1
        lanes = []
        for i, (ground, scale) in enumerate(zip(lay.lane_grounds, lay.lane_scales, strict=True)):
            direction = -flip if i < len(lay.lane_grounds) // 2 else flip
            speed = float(rng.uniform(25.0, 55.0)) * unit
            lanes.append(Lane("road", ground * self.height, scale, direction, speed, 0.22 * density))
        for (_, _, feet), scale in zip((lay.top_walk, lay.bottom_walk), lay.walk_scales, strict=True):
            direction = 1 if rng.random() < 0.5 else -1
            speed = float(rng.uniform(9.0, 16.0)) * unit
            lanes.append(Lane("sidewalk", feet * self.height, scale, direction, speed, 0.12 * density))
        return lanes

    def warm_up(self, seconds: float, dt: float = 0.2) -> None:
        """Run the traffic without rendering so the first frame already shows a street in motion."""
        for _ in range(int(round(seconds / dt))):
            self.step(dt)

    def step(self, dt: float) -> None:
        """Move every agent by dt seconds, drop the ones that left, and maybe spawn new ones."""
        for agent in self.agents:
            lane = self.lanes[agent.lane]
            agent.x += lane.direction * lane.speed * dt
            agent.phase += lane.speed * dt / max(agent.h, 1.0) * 2.5
        self.agents = [a for a in self.agents if a.x + a.w > 0 and a.x < self.width]
        for index, lane in enumerate(self.lanes):
            if self.rng.random() < lane.rate * dt:
                self._spawn(index, lane)

    def _spawn(self, index: int, lane: Lane) -> None:
        if len(self.agents) >= self.max_objects:
            return
        if lane.kind == "road":
            cls = str(self.rng.choice(ROAD_CLASSES, p=ROAD_WEIGHTS))
        else:
            cls = "person"
        ref_h, aspect = SHAPES[cls]
        h = ref_h * lane.scale * self.unit * float(self.rng.uniform(0.94, 1.06))
        w = h * aspect * float(self.rng.uniform(0.95, 1.05))
        gap = float(self.rng.uniform(6.0, 30.0)) * self.unit
        # Agents of a lane share one speed, so a lane never overtakes: it is enough to keep the entry clear.
        x = -w if lane.direction > 0 else float(self.width)
        for other in self.agents:
            if other.lane == index and other.x - gap < x + w and x - gap < other.x + other.w:
                return
        color = str(self.rng.choice(COLOR_NAMES))
        phase = float(self.rng.uniform(0, 2 * np.pi))
        self.agents.append(Agent(self.next_id, cls, color, index, x, w, h, lane.direction, phase))
        self.next_id += 1

    def drawn(self) -> list[tuple[Agent, tuple[float, float, float, float]]]:
        """Agents in painting order (far lanes first) with their unclipped boxes."""
        order = sorted(self.agents, key=lambda a: (self.lanes[a.lane].ground, a.track_id))
        return [(a, a.box(self.lanes[a.lane].ground)) for a in order]

    def visible_objects(self) -> list[ObjectTruth]:
        """Ground-truth objects: agents with enough of their width inside the frame, boxes clipped, by track id."""
        objects = []
        for agent, (x1, y1, x2, y2) in self.drawn():
            cx1, cy1 = max(x1, 0.0), max(y1, 0.0)
            cx2, cy2 = min(x2, float(self.width)), min(y2, float(self.height))
            if cx2 - cx1 < MIN_VISIBLE * agent.w or cy2 <= cy1:
                continue
            box = [round(v, 2) for v in (cx1, cy1, cx2, cy2)]
            objects.append(ObjectTruth(track_id=agent.track_id, cls=agent.cls, color=agent.color, box=box))
        return sorted(objects, key=lambda o: o.track_id)
