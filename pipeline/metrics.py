"""Metrics: Prometheus counters and histograms, queue lag from XINFO, and the compact summary the dashboard reads."""

from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from pipeline.schema import EngineHealth, MetricsSummary, TaskResult, TaskStats
from pipeline.transport import REDIS_DOWN, Keys, Transport

logger = logging.getLogger(__name__)

STAGES = ("frame_to_result", "engine", "queue", "vision", "prefill", "decode")
MODES = ("unmerged", "merged", "mixture")
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class PipelineMetrics:
    """The Prometheus series of this process (one set per process, in the default registry)."""

    def __init__(self) -> None:
        self.requests = Counter("valora_task_requests", "Engine requests made by task workers", ["task", "status"])
        self.results = Counter("valora_task_results", "Task results stored", ["stream", "task"])
        self.latency = Histogram("valora_latency_seconds", "Latency per task and stage", ["task", "stage"],
                                 buckets=_BUCKETS)
        self.accuracy = Gauge("valora_task_accuracy", "Last live accuracy against ground truth", ["stream", "task"])
        self.dropped = Counter("valora_frames_dropped", "Frames skipped by workers", ["stream", "task", "reason"])
        self.published = Gauge("valora_frames_published", "Frames published by the ingestor", ["stream"])
        self.reconnects = Gauge("valora_stream_reconnects", "Reconnects of a stream's source", ["stream"])
        self.pending = Gauge("valora_queue_pending", "Entries delivered but not acknowledged", ["stream", "group"])
        self.lag = Gauge("valora_queue_lag_seconds", "Age of the newest frame minus the last delivered",
                         ["stream", "group"])
        self.engine_mode = Gauge("valora_engine_mode", "1 for the engine's current inference mode, else 0",
                                 ["engine", "mode"])
        self.merged_adapter = Gauge("valora_engine_merged_adapter", "1 for the adapter merged into the engine's "
                                    "base weights (series removed when it is unmerged)", ["engine", "adapter"])
        self.mode_switches = Counter("valora_engine_mode_switches", "Weight switches of the engine", ["engine"])
        self.switch_seconds = Counter("valora_engine_switch_seconds", "Seconds the engine spent switching weights",
                                      ["engine"])
        self.decisions = Counter("valora_engine_mode_decisions", "Mode decisions of the engine's policy, by mode "
                                 "(+held: some request sat that iteration out)", ["engine", "decision"])
        self._engines: dict[str, tuple[str | None, int, float]] = {}  # engine -> (merged, switches, switch ms)
        self._decided: dict[tuple[str, str], int] = {}  # (engine, decision) -> count last seen

    def observe(self, result: TaskResult) -> None:
        status = "ok" if result.ok else "error"
        self.requests.labels(result.task, status).inc(result.requests)
        self.results.labels(result.stream, result.task).inc()
        lat = result.latency
        for stage, ms in zip(STAGES, (lat.frame_to_result_ms, lat.engine_ms, lat.queue_ms, lat.vision_ms,
                                      lat.prefill_ms, lat.decode_ms), strict=True):
            self.latency.labels(result.task, stage).observe(ms / 1000.0)
        if result.accuracy is not None:
            self.accuracy.labels(result.stream, result.task).set(result.accuracy)

    def observe_engine(self, health: EngineHealth) -> None:
        """Mode, merged adapter and switch counters from an engine replica's health (the orchestrator's state)."""
        engine = health.engine_id
        merged, switches, switch_ms = self._engines.get(engine, (None, 0, 0.0))
        if health.mode is not None:
            for mode in MODES:
                self.engine_mode.labels(engine, mode).set(1.0 if mode == health.mode else 0.0)
        if merged is not None and merged != health.merged_adapter:
            self.merged_adapter.remove(engine, merged)
        if health.merged_adapter is not None:
            self.merged_adapter.labels(engine, health.merged_adapter).set(1.0)
        if health.mode_switches >= switches:  # a restarted replica starts from zero again
            self.mode_switches.labels(engine).inc(health.mode_switches - switches)
            self.switch_seconds.labels(engine).inc(max(health.switch_ms_total - switch_ms, 0.0) / 1000.0)
        self._engines[engine] = (health.merged_adapter, health.mode_switches, health.switch_ms_total)
        for decision, count in (health.detail.get("decisions") or {}).items():
            seen = self._decided.get((engine, decision), 0)
            self.decisions.labels(engine, decision).inc(count - seen if count >= seen else count)  # < seen: restarted
            self._decided[engine, decision] = count

    def refresh_streams(self, transport: Transport, streams: list[str]) -> None:
        """Queue lag and pending counts from XINFO, and ingest counters from the health hashes."""
        for stream in streams:
            for info in transport.group_info(Keys.frames(stream)):
                self.pending.labels(stream, info.group).set(info.pending)
                self.lag.labels(stream, info.group).set(info.lag_ms / 1000.0)
            health = transport.health_get(stream)
            if health is not None:
                self.published.labels(stream).set(health.frames_published)
                self.reconnects.labels(stream).set(health.reconnects)
        for info in transport.group_info(Keys.ENGINE_REQUESTS):
            self.pending.labels("engine-requests", info.group).set(info.pending)
            self.lag.labels("engine-requests", info.group).set(info.lag_ms / 1000.0)


METRICS = PipelineMetrics()


def start_exporter(port: int) -> None:
    """Serve /metrics on ``port`` (0 leaves the exporter off)."""
    if port:
        start_http_server(port)
        logger.info("prometheus exporter on port %d", port)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered) / 100.0 - 1e-9)))
    return ordered[rank - 1]


def summarise(results: list[TaskResult], dropped: dict[str, int] | None = None) -> MetricsSummary:
    """Per-task stats over ``results``; ``dropped`` maps '<task>:<reason>' to skipped frames."""
    by_task: dict[str, list[TaskResult]] = defaultdict(list)
    for r in results:
        by_task[r.task].append(r)
    tasks: dict[str, TaskStats] = {}
    for task, rows in sorted(by_task.items()):
        lat = [r.latency.frame_to_result_ms for r in rows]
        acc = [r.accuracy for r in rows if r.accuracy is not None]
        adapters: dict[str, int] = defaultdict(int)
        for r in rows:
            for a in r.adapters:
                adapters[a or "base"] += 1
        stages = {stage: percentile([getattr(r.latency, f"{stage}_ms") for r in rows], 50) or 0.0
                  for stage in ("engine", "queue", "vision", "prefill", "decode")}
        tasks[task] = TaskStats(
            task=task, requests=sum(r.requests for r in rows), results=len(rows), errors=sum(not r.ok for r in rows),
            p50_ms=percentile(lat, 50), p95_ms=percentile(lat, 95), p99_ms=percentile(lat, 99),
            accuracy=sum(acc) / len(acc) if acc else None, by_adapter=dict(adapters), by_stage_p50_ms=stages,
        )
    for key, n in (dropped or {}).items():
        task = key.split(":", 1)[0]
        tasks.setdefault(task, TaskStats(task=task)).dropped += n
    return MetricsSummary(tasks=tasks, streams=sorted({r.stream for r in results}), window_results=len(results))


class MetricsReader:
    """What the dashboard reads: the stored summary, recent results and dropped-frame counts of each stream."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def summary(self) -> MetricsSummary | None:
        return self.transport.summary_get()

    def recent_results(self, stream: str, count: int = 100) -> list[TaskResult]:
        return [r for _, r in self.transport.results(stream, count=count)]

    def dropped(self, stream: str) -> dict[str, int]:
        return self.transport.dropped(stream)

    def compute(self, streams: list[str], window: int = 500) -> MetricsSummary:
        results: list[TaskResult] = []
        dropped: dict[str, int] = defaultdict(int)
        for stream in streams:
            results += self.recent_results(stream, window)
            for key, n in self.dropped(stream).items():
                dropped[key] += n
        return summarise(results, dropped)


class SummaryPublisher:
    """Refreshes the Redis summary and the queue gauges every ``interval_s`` in a background thread."""

    def __init__(self, transport: Transport, streams_fn, interval_s: float) -> None:
        self.reader = MetricsReader(transport)
        self.transport = transport
        self.streams_fn = streams_fn
        self.interval_s = interval_s
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="metrics-summary", daemon=True)

    def start(self) -> SummaryPublisher:
        self.thread.start()
        return self

    def publish_once(self) -> MetricsSummary:
        streams = self.streams_fn()
        summary = self.reader.compute(streams)
        self.transport.summary_put(summary, ttl_s=max(60, int(self.interval_s * 10)))
        METRICS.refresh_streams(self.transport, streams)
        return summary

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.publish_once()
            except REDIS_DOWN as exc:
                logger.debug("summary not refreshed: %s", exc)

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
