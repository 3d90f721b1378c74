"""Tile configs of the ATMM and merge kernels, and the per-device table that picks them by batch shape.

Lookup order (``TileTable.lookup``): the exact profiled shape, else the nearest profiled shape (distance in log2
space over segments, tokens, in-dim, out-dim and max rank), else ``heuristic_config``. Tables live in
``kernels/configs/<device>.json`` where ``<device>`` is ``device_slug(torch.cuda.get_device_name())``, written by
``valora kernels tune``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from kernels.intmath import cdiv, next_power_of_2

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
TABLE_VERSION = 1


@dataclass(frozen=True)
class ShrinkConfig:
    """Tiles of the shrink kernel: tmp[rows, r] = x[rows] @ A[:r].T."""

    block_m: int  # token rows per program
    block_r: int  # rank columns per program
    block_k: int  # in-dim chunk per loop step
    split_k: int  # programs sharing one row block's K range (partials summed by the expand)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class ExpandConfig:
    """Tiles of the expand kernel: y[rows, n] += tmp[rows, :r] @ B[n, :r].T."""

    block_m: int  # token rows per program
    block_n: int  # output columns per program
    block_r: int  # rank chunk per loop step (only when terms x rank is too wide to keep in registers)
    num_warps: int
    num_stages: int
    group_n: int = 1  # output blocks per program, streamed in a pipelined loop (amortises the row-block setup)


@dataclass(frozen=True)
class AtmmConfig:
    """One launch pair's tiles."""

    shrink: ShrinkConfig
    expand: ExpandConfig


@dataclass(frozen=True)
class MergeConfig:
    """Tiles of the delta-merge kernel: W[m, n] += sum_j s_j * B_j[m, :r] @ A_j[:r, n] (all terms' ranks at once)."""

    block_m: int  # weight rows per program
    block_n: int  # weight columns per tile
    num_warps: int
    num_stages: int
    group_n: int = 8  # column tiles per program, streamed in a pipelined loop


DISTANCE_WEIGHTS = (1.0, 1.0, 2.0, 2.0, 1.5)  # segments, tokens, in-dim, out-dim, max rank


@dataclass(frozen=True)
class ShapeKey:
    """What the best tiles depend on: the batch shape of one ATMM call."""

    segments: int
    tokens: int  # rows that carry an adapter (T_lora)
    in_dim: int
    out_dim: int  # total over slices
    max_rank: int

    def distance(self, other: ShapeKey) -> float:
        """Log2 distance; the dims weigh more than the batch shape because they fix the grid's other axis."""
        pairs = zip(DISTANCE_WEIGHTS, astuple_dist(self), astuple_dist(other), strict=True)
        return sum(w * abs(math.log2(max(a, 1)) - math.log2(max(b, 1))) for w, a, b in pairs)


# The Punica-SGMV-style policy: one tile config for every shape (the "punica" backend and the bench baseline).
FIXED_CONFIG = AtmmConfig(
    shrink=ShrinkConfig(block_m=32, block_r=16, block_k=64, split_k=1, num_warps=4, num_stages=2),
    expand=ExpandConfig(block_m=32, block_n=64, block_r=16, num_warps=4, num_stages=2, group_n=1),
)
FIXED_MERGE_CONFIG = MergeConfig(block_m=64, block_n=128, num_warps=4, num_stages=3, group_n=8)


def _pow2_at_least(value: int, floor: int, cap: int) -> int:
    return max(floor, min(cap, next_power_of_2(value)))


def heuristic_config(key: ShapeKey) -> AtmmConfig:
    """Tiles from the shape alone, for shapes no table covers.

    Decode-like batches (short segments) get 16-row tiles and split-K so that the weight reads, not the few token
    rows, fill the GPU; prefill-like batches get taller tiles that reuse each weight tile across more rows.
    """
    rows_per_seg = max(1, key.tokens // max(key.segments, 1))
    block_m = _pow2_at_least(rows_per_seg, 16, 64)
    block_r = _pow2_at_least(key.max_rank, 16, 64)
    row_blocks = key.segments * max(1, cdiv(rows_per_seg, block_m))
    rank_blocks = max(1, cdiv(key.max_rank, block_r))
    split_k = 1
    while (rows_per_seg <= 32 and row_blocks * rank_blocks * split_k < 264 and split_k < 8
           and key.in_dim // (split_k * 2) >= 256):
        split_k *= 2
    shrink = ShrinkConfig(block_m=block_m, block_r=block_r, block_k=128 if block_m <= 32 else 64,
                          split_k=split_k, num_warps=4, num_stages=3)
    expand = ExpandConfig(block_m=block_m, block_n=128, block_r=32, num_warps=4, num_stages=3,
                          group_n=1 if rows_per_seg <= 16 else 4)
    return AtmmConfig(shrink=shrink, expand=expand)


def heuristic_merge_config(max_rank: int) -> MergeConfig:
    """The merge streams the weights once, so the W read/write dominates: a mid tile, 8 column tiles a program."""
    return MergeConfig(block_m=64 if max_rank <= 64 else 32, block_n=128, num_warps=4, num_stages=3, group_n=8)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia_h200': the file name of a device's table."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def current_device_slug() -> str | None:
    """The slug of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return device_slug(torch.cuda.get_device_name())


class TileTable:
    """Profiled best tiles per shape for one device, with nearest-shape and heuristic fallbacks."""

    def __init__(
        self,
        device: str,
        entries: dict[ShapeKey, AtmmConfig] | None = None,
        merge: dict[int, MergeConfig] | None = None,
        timings_us: dict[ShapeKey, float] | None = None,
        routed: TileTable | None = None,
    ) -> None:
        self.device = device
        self.entries: dict[ShapeKey, AtmmConfig] = dict(entries or {})
        self.merge: dict[int, MergeConfig] = dict(merge or {})  # keyed by max rank
        self.timings_us: dict[ShapeKey, float] = dict(timings_us or {})
        # The routed (LoRA-Switch) operator's own entries, keyed as E experts x (T * k) pairs: the same kernels in
        # routed mode walk every expert of one segment, a different regime from segmented batches of that key.
        self.routed: TileTable | None = routed
        # Every ATMM call looks up its shape; the nearest-shape scan costs ~0.5 ms on 200 entries, so answers are
        # kept (the shapes a server sees repeat). ``add`` clears them.
        self._answers: dict[ShapeKey, tuple[AtmmConfig, str]] = {}

    def add(self, key: ShapeKey, config: AtmmConfig, us: float | None = None) -> None:
        """Record the profiled best ``config`` for ``key`` (and its time)."""
        self.entries[key] = config
        if us is not None:
            self.timings_us[key] = us
        self._answers.clear()

    def lookup(self, key: ShapeKey) -> tuple[AtmmConfig, str]:
        """The config for ``key`` and where it came from: 'exact', 'nearest' or 'heuristic'."""
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = self._lookup(key)
        return answer

    def lookup_many(self, keys: Sequence[ShapeKey]) -> list[AtmmConfig]:
        """``lookup(key)[0]`` for many keys, with one vectorised distance matrix instead of a scan per key.

        Distances within 1e-9 of the best are settled by ``ShapeKey.distance`` in entry order, as ``lookup`` does.
        """
        todo = [k for k in dict.fromkeys(keys) if k not in self._answers]
        if todo and self.entries:
            names = list(self.entries)
            log2 = lambda ks: torch.tensor([astuple_dist(k) for k in ks], dtype=torch.float64).clamp(min=1).log2()  # noqa: E731
            dist = ((log2(todo)[:, None, :] - log2(names)[None, :, :]).abs()
                    * torch.tensor(DISTANCE_WEIGHTS, dtype=torch.float64)).sum(-1)  # [keys, entries]
            near = dist <= dist.min(dim=1, keepdim=True).values + 1e-9
            for key, row in zip(todo, near.tolist(), strict=True):
                if key in self.entries:
                    self._answers[key] = self.entries[key], "exact"
                else:
                    best = min((n for n, hit in zip(names, row, strict=True) if hit), key=key.distance)
                    self._answers[key] = self.entries[best], "nearest"
        return [self.lookup(k)[0] for k in keys]

    def _lookup(self, key: ShapeKey) -> tuple[AtmmConfig, str]:
        if key in self.entries:
            return self.entries[key], "exact"
        if self.entries:
            nearest = min(self.entries, key=key.distance)
            return self.entries[nearest], "nearest"
        return heuristic_config(key), "heuristic"

    def lookup_routed(self, key: ShapeKey) -> tuple[AtmmConfig, str]:
        """The routed operator's config for ``key`` (segments = experts, tokens = rows x top-k): its own entries,
        else what ``lookup`` gives a segmented batch of that shape."""
        return self._routed_or_self().lookup(key)

    def lookup_many_routed(self, keys: Sequence[ShapeKey]) -> list[AtmmConfig]:
        return self._routed_or_self().lookup_many(keys)

    def _routed_or_self(self) -> TileTable:
        return self.routed if self.routed is not None and self.routed.entries else self

    def lookup_merge(self, max_rank: int) -> MergeConfig:
        if not self.merge:
            return heuristic_merge_config(max_rank)
        nearest = min(self.merge, key=lambda r: abs(math.log2(max(r, 1)) - math.log2(max(max_rank, 1))))
        return self.merge[nearest]

    def to_json(self) -> dict:
        out = {"version": TABLE_VERSION, "device": self.device, "entries": self._entries_json(),
               "merge": [{"max_rank": r, **asdict(c)} for r, c in sorted(self.merge.items())]}
        if self.routed is not None and self.routed.entries:
            out["routed"] = self.routed._entries_json()
        return out

    def _entries_json(self) -> list[dict]:
        return [{"key": asdict(k), "shrink": asdict(c.shrink), "expand": asdict(c.expand), "us": self.timings_us.get(k)}
                for k, c in sorted(self.entries.items(), key=lambda kv: astuple_key(kv[0]))]

    @staticmethod
    def _entries_from_json(rows: list[dict]) -> tuple[dict[ShapeKey, AtmmConfig], dict[ShapeKey, float]]:
        entries, timings = {}, {}
        for row in rows:
            key = ShapeKey(**row["key"])
            entries[key] = AtmmConfig(shrink=ShrinkConfig(**row["shrink"]), expand=ExpandConfig(**row["expand"]))
            if row.get("us") is not None:
                timings[key] = float(row["us"])
        return entries, timings

    @classmethod
    def from_json(cls, data: dict) -> TileTable:
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"tile table version {data.get('version')!r} is not {TABLE_VERSION}")
        entries, timings = cls._entries_from_json(data["entries"])
        routed = None
        if data.get("routed"):
            routed_entries, routed_timings = cls._entries_from_json(data["routed"])
            routed = cls(data["device"], routed_entries, timings_us=routed_timings)
        merge = {}
        for row in data.get("merge", []):
            row = dict(row)
            rank = int(row.pop("max_rank"))
            known = {f.name for f in fields(MergeConfig)}
            if set(row) - known:  # written by an older kernel version: its tiles do not apply
                logger.warning("ignoring stale merge tiles for rank %d: %s", rank, row)
                continue
            merge[rank] = MergeConfig(**row)
        return cls(data["device"], entries, merge, timings, routed)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> TileTable:
        return cls.from_json(json.loads(path.read_text()))


def astuple_dist(key: ShapeKey) -> tuple[int, ...]:
    """The coordinates ``ShapeKey.distance`` compares, in ``DISTANCE_WEIGHTS`` order."""
    return (key.segments, key.tokens, key.in_dim, key.out_dim, key.max_rank)


def astuple_key(key: ShapeKey) -> tuple[int, ...]:
    return (key.in_dim, key.out_dim, key.max_rank, key.segments, key.tokens)


def table_path(slug: str) -> Path:
    return CONFIG_DIR / f"{slug}.json"


@functools.cache
def device_table(slug: str | None = None) -> TileTable:
    """The shipped table of a device (the current one by default); empty (heuristic only) if none was profiled."""
    slug = slug or current_device_slug() or "cpu"
    path = table_path(slug)
    if path.is_file():
        logger.info("tile table %s", path)
        return TileTable.load(path)
    logger.info("no tile table for %s: heuristic tiles", slug)
    return TileTable(slug)
