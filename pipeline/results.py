"""ResultsReader: what the dashboard and tools read back: results with their frames, health, engines, dead letters."""

from __future__ import annotations

from pipeline.schema import EngineHealth, FrameEntry, StreamHealth, TaskResult
from pipeline.transport import Transport


class ResultsReader:
    """Read-only views over the results streams and status keys; no caller needs Redis itself."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def latest(self, stream: str, count: int = 100) -> list[TaskResult]:
        """The newest results of a stream, newest first."""
        return [r for _, r in self.transport.results(stream, count=count)]

    def latest_by_task(self, stream: str, window: int = 200) -> dict[str, TaskResult]:
        """The newest result of each task among the last ``window`` results."""
        out: dict[str, TaskResult] = {}
        for result in self.latest(stream, window):
            out.setdefault(result.task, result)
        return out

    def latest_frame_results(self, stream: str, window: int = 200) -> tuple[int, list[TaskResult]] | None:
        """The newest frame whose JPEG is still stored, with every result computed on it (for overlays)."""
        by_seq: dict[int, list[TaskResult]] = {}
        for result in self.latest(stream, window):
            by_seq.setdefault(result.seq, []).append(result)
        for seq in sorted(by_seq, reverse=True):
            if self.frame_jpeg(by_seq[seq][0]) is not None:
                return seq, by_seq[seq]
        return None

    def tail(self, stream: str, after: str, count: int = 100) -> tuple[str, list[TaskResult]]:
        """Results appended after entry id ``after`` ('0-0' for all), oldest first, and the id to continue from."""
        rows = self.transport.results(stream, count=count, after=after)
        return (rows[-1][0] if rows else after), [r for _, r in rows]

    def frame_jpeg(self, result: TaskResult) -> bytes | None:
        """The JPEG the result was computed on, while its key lives."""
        return self.transport.blob(result.frame_key) if result.frame_key else None

    def latest_frame(self, stream: str) -> tuple[FrameEntry, bytes | None] | None:
        """The newest published frame and its JPEG (None once expired)."""
        frame = self.transport.latest_frame(stream)
        return None if frame is None else (frame, self.transport.frame_jpeg(frame))

    def health(self, stream: str) -> StreamHealth | None:
        return self.transport.health_get(stream)

    def dropped(self, stream: str) -> dict[str, int]:
        """Frames workers skipped, by '<task>:<reason>'."""
        return self.transport.dropped(stream)

    def engines(self) -> list[EngineHealth]:
        """Every engine replica whose health key is alive."""
        return self.transport.engine_health_all()

    def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        return self.transport.dead_letters(count)
