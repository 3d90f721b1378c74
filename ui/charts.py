"""Chart data as pure functions: task results, summaries and engine ticks in, tidy DataFrames out."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

import pandas as pd

from pipeline.metrics import percentile
from pipeline.schema import EngineTick, MetricsSummary, TaskResult

# Latency stages of a task result, in pipeline order: (column label, Latency field).
STAGES = (("queue", "queue_ms"), ("vision", "vision_ms"), ("prefill", "prefill_ms"), ("decode", "decode_ms"),
          ("engine", "engine_ms"), ("worker", "worker_ms"), ("frame→result", "frame_to_result_ms"))
QUANTILES = (50, 95, 99)


def task_table(summary: MetricsSummary) -> pd.DataFrame:
    """Per task: requests, results, errors, frame-to-result p50/p95/p99, accuracy and dropped frames."""
    return pd.DataFrame.from_records([{
        "task": name, "requests": s.requests, "results": s.results, "errors": s.errors,
        "p50 ms": _round(s.p50_ms), "p95 ms": _round(s.p95_ms), "p99 ms": _round(s.p99_ms),
        "accuracy": _round(s.accuracy, 1), "dropped": s.dropped,
    } for name, s in sorted(summary.tasks.items())], columns=["task", "requests", "results", "errors", "p50 ms",
                                                               "p95 ms", "p99 ms", "accuracy", "dropped"])


def stage_percentiles(results: Iterable[TaskResult]) -> pd.DataFrame:
    """Per task and stage: p50, p95 and p99 in milliseconds over the given results (nearest rank)."""
    by_task: dict[str, list[TaskResult]] = defaultdict(list)
    for r in results:
        by_task[r.task].append(r)
    rows = []
    for task, rows_of_task in sorted(by_task.items()):
        for stage, attr in STAGES:
            values = [getattr(r.latency, attr) for r in rows_of_task]
            rows.append({"task": task, "stage": stage,
                         **{f"p{q}": _round(percentile(values, q)) for q in QUANTILES}})
    return pd.DataFrame.from_records(rows, columns=["task", "stage", "p50", "p95", "p99"])


def throughput(results: Iterable[TaskResult], bucket_s: float = 10.0) -> pd.DataFrame:
    """Results per second of each task, in ``bucket_s`` buckets of the time they were stored (index: time)."""
    counts: dict[tuple[float, str], int] = defaultdict(int)
    for r in results:
        counts[(r.created_at // bucket_s * bucket_s, r.task)] += 1
    if not counts:
        return pd.DataFrame()
    frame = pd.Series(counts).unstack(fill_value=0).sort_index() / bucket_s
    frame.index = pd.to_datetime(frame.index, unit="s")
    frame.index.name = "time"
    return frame


def accuracy_over_time(results: Iterable[TaskResult], window: int = 10) -> pd.DataFrame:
    """Per task, the mean live accuracy of its last ``window`` scored results, at each result's time."""
    series = {}
    by_task: dict[str, list[TaskResult]] = defaultdict(list)
    for r in results:
        if r.accuracy is not None:
            by_task[r.task].append(r)
    for task, rows in sorted(by_task.items()):
        rows.sort(key=lambda r: r.created_at)
        values = pd.Series([r.accuracy for r in rows], index=pd.to_datetime([r.created_at for r in rows], unit="s"))
        series[task] = values.rolling(window, min_periods=1).mean()
    frame = pd.DataFrame(series)
    frame.index.name = "time"
    return frame


def adapter_requests(summary: MetricsSummary) -> pd.DataFrame:
    """Requests per adapter (rows) and task (columns)."""
    counts = {task: dict(stats.by_adapter) for task, stats in summary.tasks.items() if stats.by_adapter}
    frame = pd.DataFrame(counts).fillna(0).astype(int)
    frame.index.name = "adapter"
    return frame.sort_index()


def dropped_table(by_reason: Mapping[str, Mapping[str, int]]) -> pd.DataFrame:
    """Frames skipped per task (rows) and reason (columns)."""
    frame = pd.DataFrame({task: dict(reasons) for task, reasons in by_reason.items()}).T.fillna(0).astype(int)
    frame.index.name = "task"
    return frame.sort_index()


def engine_timeline(ticks: Iterable[EngineTick]) -> pd.DataFrame:
    """One row per tick: time, replica, mode, merged adapter, batch, queue, GPU memory and pool size."""
    return pd.DataFrame.from_records([{
        "time": pd.to_datetime(t.ts, unit="s"), "engine": t.engine_id, "mode": t.mode or "unknown",
        "merged adapter": t.merged_adapter or "none", "batch size": t.batch_size, "waiting": t.waiting,
        "inflight": t.inflight, "served": t.served, "GPU memory (MiB)": t.gpu_memory_mb,
        "resident adapters": len(t.adapters_resident) if t.adapters_resident is not None else None,
    } for t in ticks], columns=["time", "engine", "mode", "merged adapter", "batch size", "waiting", "inflight",
                                "served", "GPU memory (MiB)", "resident adapters"])


def mode_segments(ticks: Iterable[EngineTick]) -> pd.DataFrame:
    """Runs of consecutive ticks of one replica with the same mode and merged adapter: start, end, ticks."""
    segments: list[dict] = []
    last: dict[str, dict] = {}
    for t in ticks:
        state = (t.mode or "unknown", t.merged_adapter or "none")
        current = last.get(t.engine_id)
        if current is not None and (current["mode"], current["merged adapter"]) == state:
            current["end"] = pd.to_datetime(t.ts, unit="s")
            current["ticks"] += 1
            continue
        current = {"engine": t.engine_id, "mode": state[0], "merged adapter": state[1],
                   "start": pd.to_datetime(t.ts, unit="s"), "end": pd.to_datetime(t.ts, unit="s"), "ticks": 1}
        segments.append(current)
        last[t.engine_id] = current
    return pd.DataFrame.from_records(segments, columns=["engine", "mode", "merged adapter", "start", "end", "ticks"])


def residency(ticks: Iterable[EngineTick]) -> pd.DataFrame:
    """(time, engine, adapter) for every adapter resident at every tick that reports the pool."""
    rows = [{"time": pd.to_datetime(t.ts, unit="s"), "engine": t.engine_id, "adapter": name}
            for t in ticks if t.adapters_resident is not None for name in t.adapters_resident]
    return pd.DataFrame.from_records(rows, columns=["time", "engine", "adapter"])


def _round(value: float | None, digits: int = 0) -> float | None:
    return None if value is None else round(value, digits)
