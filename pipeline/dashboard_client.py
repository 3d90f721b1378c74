"""DashboardClient: what the operator console reads from Redis, typed; stream changes go through StreamRegistry."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.metrics import MetricsReader
from pipeline.registry import StreamRegistry
from pipeline.results import ResultsReader
from pipeline.schema import EngineHealth, EngineTick, FrameEntry, MetricsSummary, StreamHealth, StreamRecord, TaskResult
from pipeline.transport import Transport

logger = logging.getLogger(__name__)

# A frame's entry id is its publish time on the Redis host and its `ts` the decode time on the ingest host; the
# search for a frame starts this much before `ts` so that modest clock skew between the two still finds it.
CLOCK_SKEW_MS = 5_000
FRAME_SEARCH_PAGE = 32
FRAME_SEARCH_PAGES = 16


@dataclass(frozen=True)
class StreamRow:
    """One registered stream as the Streams page lists it."""

    record: StreamRecord
    health: StreamHealth | None
    dropped: dict[str, int]

    @property
    def id(self) -> str:
        return self.record.spec.id


@dataclass
class ProcessedFrame:
    """One frame that tasks answered: the results computed for exactly this frame (same seq and decode time)."""

    stream: str
    seq: int
    frame_ts: float
    pts: float
    width: int
    height: int
    results: dict[str, TaskResult] = field(default_factory=dict)  # task -> its result for this frame

    @property
    def tasks(self) -> list[str]:
        return sorted(self.results)


class DashboardClient:
    """Read access for the dashboard: streams with health, processed frames, metrics and the engine timeline."""

    def __init__(self, transport: Transport, media_dir: Path) -> None:
        self.transport = transport
        self.registry = StreamRegistry(transport, media_dir)
        self.reader = MetricsReader(transport)
        self.results = ResultsReader(transport)

    def stream_rows(self) -> list[StreamRow]:
        return [StreamRow(record, self.results.health(record.spec.id), self.results.dropped(record.spec.id))
                for record in self.registry.records()]

    def stream_ids(self) -> list[str]:
        return [spec.id for spec in self.registry.specs()]

    def processed_frames(self, stream_id: str, window: int = 200) -> list[ProcessedFrame]:
        """Frames with results among the newest ``window`` results of a stream, newest frame first."""
        frames: dict[tuple[int, float], ProcessedFrame] = {}
        for result in self.results.latest(stream_id, window):  # newest first
            key = (result.seq, result.frame_ts)
            frame = frames.get(key)
            if frame is None:
                frame = frames[key] = ProcessedFrame(result.stream, result.seq, result.frame_ts, result.pts,
                                                     result.width, result.height)
            frame.results.setdefault(result.task, result)  # keep the newest result per task
        return sorted(frames.values(), key=lambda f: (f.frame_ts, f.seq), reverse=True)

    def frame_entry(self, frame: ProcessedFrame) -> FrameEntry | None:
        """The published frame the results were computed for, with its JPEG; None once it has been trimmed.

        The match is on (seq, decode time), so a replayed file (seq counting from 0 again) never pairs results
        with another run's picture.
        """
        start = str(max(0, int(frame.frame_ts * 1000) - CLOCK_SKEW_MS))
        for _ in range(FRAME_SEARCH_PAGES):
            page = self.transport.frames_range(frame.stream, start, FRAME_SEARCH_PAGE)
            for _, entry in page:
                if entry.seq == frame.seq and entry.ts == frame.frame_ts:
                    entry.jpeg = self.transport.frame_jpeg(entry)
                    return entry if entry.jpeg is not None else None
            if len(page) < FRAME_SEARCH_PAGE or page[-1][1].ts > frame.frame_ts + CLOCK_SKEW_MS / 1000:
                return None
            start = "(" + page[-1][0]
        return None

    def latest_frame(self, stream_id: str) -> FrameEntry | None:
        """The newest published frame with its JPEG (processed or not); None when there is none or it expired."""
        latest = self.results.latest_frame(stream_id)
        if latest is None or latest[1] is None:
            return None
        entry, jpeg = latest
        return entry.model_copy(update={"jpeg": jpeg})

    def recent_results(self, stream_ids: list[str], per_stream: int = 500) -> list[TaskResult]:
        """The newest results of each stream, oldest first."""
        results: list[TaskResult] = []
        for stream_id in stream_ids:
            results += self.reader.recent_results(stream_id, per_stream)
        return sorted(results, key=lambda r: r.created_at)

    def summary(self, stream_ids: list[str]) -> MetricsSummary:
        """The summary the workers publish; computed here from the results when none is stored (no worker yet)."""
        stored = self.reader.summary()
        return stored if stored is not None else self.reader.compute(stream_ids)

    def dropped_by_reason(self, stream_ids: list[str]) -> dict[str, dict[str, int]]:
        """task -> reason -> frames skipped, over the given streams."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for stream_id in stream_ids:
            for key, n in self.results.dropped(stream_id).items():
                task, _, reason = key.partition(":")
                out[task][reason or "unknown"] += n
        return {task: dict(reasons) for task, reasons in out.items()}

    def engines(self) -> list[EngineHealth]:
        return self.results.engines()

    def engine_ticks(self, count: int = 600) -> list[EngineTick]:
        return self.transport.engine_ticks(count)
