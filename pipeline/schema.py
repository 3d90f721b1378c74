"""Every pipeline model that crosses a process boundary: stream specs, frames, task results, health, summaries."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from apps.datasets.schema import FrameTruth

SourceKind = Literal["rtsp", "http", "file", "device"]
StreamState = Literal["connecting", "running", "reconnecting", "stalled", "error", "finished", "stopped"]

# Scheme -> source kind; anything else is refused.
ALLOWED_SCHEMES: dict[str, SourceKind] = {
    "rtsp": "rtsp", "rtsps": "rtsp", "http": "http", "https": "http", "device": "device", "file": "file",
}
_DEVICE_RE = re.compile(r"^/dev/video\d+$")
_STREAM_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
LIVE_KINDS = ("rtsp", "http", "device")
DEFAULT_LIVE_MAX_AGE_S = 5.0


class TaskSpec(BaseModel):
    """One task enabled on a stream: how often it looks at frames and what it is asked."""

    model_config = ConfigDict(extra="forbid")

    fps: float | None = Field(
        None, gt=0, le=60, title="Task fps", description="Frames per second this task samples; None follows the stream."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, title="Parameters", description="Task parameters, e.g. {'question': ...} for vqa."
    )


def check_url(url: str, media_dir: Path | None) -> tuple[str, SourceKind]:
    """Normalise a source URL and name its kind; ValueError says why a URL is refused.

    Bare paths become ``file://`` URLs and bare ``/dev/videoN`` become ``device://`` URLs. Files must lie
    under ``media_dir`` (when given); the check uses resolved paths, so ``..`` and symlinks cannot escape.
    """
    url = url.strip()
    if not url:
        raise ValueError("url is empty")
    if _DEVICE_RE.match(url):
        url = "device://" + url
    elif "://" not in url:
        url = "file://" + str(Path(url).expanduser().resolve())
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise ValueError(f"url scheme {scheme!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_SCHEMES))})")
    kind = ALLOWED_SCHEMES[scheme]
    if kind == "device" and not _DEVICE_RE.match(rest):
        raise ValueError(f"device url must name /dev/videoN, got {url!r}")
    if kind in ("rtsp", "http") and not rest.split("/", 1)[0]:
        raise ValueError(f"{scheme} url has no host: {url!r}")
    if kind == "file":
        path = Path(rest).resolve()
        if media_dir is not None:
            root = Path(media_dir).resolve()
            if not path.is_relative_to(root):
                raise ValueError(f"file {path} is outside the allowed media directory {root}")
        url = "file://" + str(path)
    return f"{scheme}://{rest}" if kind != "file" else url, kind


class StreamSpec(BaseModel):
    """A registered camera or clip: where it is, how fast to sample it, and which tasks run on it.

    Validate with ``StreamSpec.model_validate(data, context={"media_dir": dir})`` where the file-location rule
    applies (registration, and the ingestor before it opens a file).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(title="Stream id", description="Lower-case letters, digits, '-' and '_'; at most 64 characters.")
    url: str = Field(
        title="URL", description="rtsp(s)://, http(s):// (HLS or progressive), /dev/videoN, or a file under media_dir."
    )
    kind: SourceKind | None = Field(None, title="Kind", description="Source kind; derived from the URL.")
    fps: float = Field(5.0, ge=0.1, le=60, title="Publish fps", description="Frames per second published to Redis.")
    tasks: dict[str, TaskSpec] = Field(
        default_factory=dict, title="Tasks", description="Enabled tasks by name, with their fps and parameters."
    )
    accuracy_target: float | None = Field(
        None, ge=0, le=100, title="Accuracy target", description="Accuracy (0-100) the tasks should reach."
    )
    latency_slo_ms: float = Field(
        2000.0, gt=0, le=600_000, title="Latency SLO", description="Frame-to-result latency target in milliseconds."
    )
    loop: bool = Field(False, title="Loop", description="Files only: start again at the end.")
    max_frame_age_s: float | None = Field(
        None, gt=0, title="Max frame age",
        description="Frames older than this when a worker reads them are skipped and counted (latest-wins). "
        f"None keeps every frame of a file; live sources default to {DEFAULT_LIVE_MAX_AGE_S:g} s.",
    )
    enabled: bool = Field(True, title="Enabled", description="Disabled streams are kept but not ingested.")

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _STREAM_ID_RE.match(value):
            raise ValueError(f"stream id {value!r} must match {_STREAM_ID_RE.pattern}")
        return value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, TaskSpec]) -> dict[str, TaskSpec]:
        if not tasks:
            return tasks
        known = known_task_names()
        unknown = sorted(set(tasks) - set(known))
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)} (known: {', '.join(known)})")
        from apps.tasks import get_task

        for name, task in tasks.items():
            get_task(name).check_params(task.params)
        return tasks

    @model_validator(mode="after")
    def _url_and_kind(self, info: ValidationInfo) -> StreamSpec:
        media_dir = (info.context or {}).get("media_dir")
        url, kind = check_url(self.url, Path(media_dir) if media_dir is not None else None)
        if self.kind is not None and self.kind != kind:
            raise ValueError(f"kind {self.kind!r} does not match url {url!r} ({kind})")
        self.url, self.kind = url, kind
        if self.loop and kind != "file":
            raise ValueError("loop applies to file sources only")
        if self.max_frame_age_s is None and kind in LIVE_KINDS:
            self.max_frame_age_s = DEFAULT_LIVE_MAX_AGE_S
        for name, task in self.tasks.items():
            if task.fps is not None and task.fps > self.fps:
                raise ValueError(f"task {name!r} fps {task.fps:g} exceeds the stream's fps {self.fps:g}")
        return self

    @property
    def live(self) -> bool:
        return self.kind in LIVE_KINDS

    def task_fps(self, task: str) -> float:
        spec = self.tasks[task]
        return spec.fps if spec.fps is not None else self.fps


def known_task_names() -> list[str]:
    """Names of the tasks the apps package provides."""
    from apps.tasks import TASKS

    return sorted(TASKS)


class StreamRecord(BaseModel):
    """A registry entry as the CLI, API and dashboard see it: the spec and its last error."""

    spec: StreamSpec
    error: str | None = None
    error_at: float | None = None


class FrameEntry(BaseModel):
    """One published frame. The JPEG rides inline or in a key with a TTL (``key``); truth only for synthetic clips."""

    model_config = ConfigDict(extra="forbid")

    stream: str
    seq: int = Field(description="Sequence number of published frames, from 0 at ingest start.")
    ts: float = Field(description="Unix time the frame was decoded (capture time for live sources).")
    pts: float = Field(description="Media time in seconds; drives per-task fps sampling.")
    source_frame: int = Field(description="Index of the frame in its source (the truth sidecar's `frame`).")
    width: int
    height: int
    jpeg: bytes | None = Field(None, description="Encoded frame, when carried inline.")
    key: str | None = Field(None, description="Key holding the encoded frame, when not inline.")
    truth: FrameTruth | None = Field(None, description="Ground truth, boxes scaled to this frame's size.")

    @property
    def image_id(self) -> str:
        return f"{self.stream}:{self.seq}"


class Latency(BaseModel):
    """Where a task result's time went, in milliseconds."""

    frame_to_result_ms: float = Field(0.0, description="Frame decode to result stored.")
    worker_ms: float = Field(0.0, description="Worker read to result stored.")
    engine_ms: float = Field(0.0, description="Engine end to end of the slowest of the task's requests.")
    queue_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


class TaskResult(BaseModel):
    """One task's answer for one frame, as stored in ``valora:results:{stream}``."""

    stream: str
    seq: int
    task: str
    pts: float
    frame_ts: float
    frame_key: str | None = Field(None, description="Key of the frame's JPEG while it lives (for overlays).")
    width: int
    height: int
    outputs: list[dict[str, Any]] = Field(
        default_factory=list, description="The task's parsed outputs, one per request (question, expression...)."
    )
    ok: bool = True
    error: str | None = None
    accuracy: float | None = Field(
        None, description="Live score (0-100, the task's primary metric) against the frame's ground truth."
    )
    adapters: list[str | None] = Field(default_factory=list)
    modes: list[str] = Field(default_factory=list)
    engine_ids: list[str] = Field(default_factory=list)
    requests: int = 0
    latency: Latency = Field(default_factory=Latency)
    worker_id: str = ""
    created_at: float = Field(default_factory=time.time)


class StreamHealth(BaseModel):
    """The ingestor's view of one stream, refreshed about once a second."""

    stream: str
    state: StreamState = "connecting"
    fps_in: float = Field(0.0, description="Frames decoded per second.")
    fps_out: float = Field(0.0, description="Frames published per second.")
    last_frame_at: float | None = Field(None, description="Unix time of the last published frame.")
    frames_published: int = 0
    reconnects: int = 0
    last_error: str | None = None
    updated_at: float = Field(default_factory=time.time)

    @property
    def age_s(self) -> float | None:
        """Seconds since the last published frame."""
        return None if self.last_frame_at is None else max(0.0, time.time() - self.last_frame_at)


class EngineHealth(BaseModel):
    """One engine replica's readiness and load, kept in a key with a TTL."""

    engine_id: str
    ready: bool
    backend: str = ""
    inflight: int = 0
    served: int = 0
    errors: int = 0
    mode: str | None = Field(None, description="Inference mode of the latest iteration: merged, unmerged, mixture.")
    merged_adapter: str | None = Field(None, description="Adapter folded into the base weights now, if any.")
    mode_switches: int = Field(0, description="Weight switches (merge, unmerge, adapter change) since start-up.")
    switch_ms_total: float = Field(0.0, description="Milliseconds spent switching weights since start-up.")
    detail: dict[str, Any] = Field(default_factory=dict, description="The backend's own health() report.")
    updated_at: float = Field(default_factory=time.time)


class TaskStats(BaseModel):
    """Summary of one task's recent results."""

    task: str
    requests: int = 0
    results: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    accuracy: float | None = None
    dropped: int = 0
    by_adapter: dict[str, int] = Field(default_factory=dict)
    by_stage_p50_ms: dict[str, float] = Field(default_factory=dict)


class MetricsSummary(BaseModel):
    """The compact summary the dashboard reads: per-task stats over the recent results of every stream."""

    tasks: dict[str, TaskStats] = Field(default_factory=dict)
    streams: list[str] = Field(default_factory=list)
    window_results: int = 0
    updated_at: float = Field(default_factory=time.time)


class EngineTick(BaseModel):
    """One engine replica's state at one health refresh; a capped stream of these is the Engine page's timeline.

    Fields the backend does not report stay None (the `hf` backend has no orchestrator, pool or merged adapter).
    """

    engine_id: str
    ts: float = Field(default_factory=time.time)
    backend: str = ""
    mode: str | None = Field(None, description="Inference mode of the latest iteration: merged, unmerged, mixture.")
    merged_adapter: str | None = Field(None, description="Adapter folded into the base weights, if any.")
    batch_size: int | None = Field(None, description="Sequences in the running batch.")
    waiting: int | None = Field(None, description="Sequences queued behind the running batch.")
    inflight: int = Field(0, description="Requests the service has handed to the engine and not yet answered.")
    served: int = 0
    adapters_resident: list[str] | None = Field(None, description="Adapters in the device pool (or loaded).")
    gpu_memory_mb: float | None = Field(None, description="GPU memory allocated by the engine process.")

    @classmethod
    def from_health(cls, health: EngineHealth, gpu_memory_mb: float | None = None) -> EngineTick:
        detail = health.detail
        resident = detail.get("adapters_resident", detail.get("adapters_loaded"))
        return cls(engine_id=health.engine_id, ts=health.updated_at, backend=health.backend,
                   mode=detail.get("mode"), merged_adapter=detail.get("merged_adapter"),
                   batch_size=detail.get("running"), waiting=detail.get("waiting", detail.get("queued")),
                   inflight=health.inflight, served=health.served,
                   adapters_resident=list(resident) if resident is not None else None,
                   gpu_memory_mb=detail.get("gpu_memory_mb", gpu_memory_mb))
