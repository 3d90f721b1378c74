"""Chart data against hand-computed values: stage percentiles, throughput, accuracy, adapters, engine timeline."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.schema import EngineHealth, EngineTick, Latency, MetricsSummary, TaskResult, TaskStats
from ui import charts


def result(task: str, created_at: float, ms: float, accuracy: float | None = None) -> TaskResult:
    lat = Latency(frame_to_result_ms=ms, worker_ms=ms - 1, engine_ms=ms - 2, queue_ms=1.0, vision_ms=2.0,
                  prefill_ms=3.0, decode_ms=ms - 8)
    return TaskResult(stream="cam", seq=0, task=task, pts=0.0, frame_ts=created_at - ms / 1000, width=8, height=8,
                      accuracy=accuracy, latency=lat, created_at=created_at)


def nearest_rank(values: list[float], q: float) -> float:
    """The textbook nearest-rank percentile: the ceil(q/100 * n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def test_stage_percentiles_per_task_and_stage():
    ms = [float(v) for v in (50, 10, 40, 30, 20, 100, 60, 90, 70, 80)]
    results = [result("vqa", 1000.0 + i, v) for i, v in enumerate(ms)] + [result("counting", 1000.0, 15.0)]
    table = charts.stage_percentiles(results)
    assert list(table.columns) == ["task", "stage", "p50", "p95", "p99"]
    assert len(table) == 2 * len(charts.STAGES)
    row = table[(table.task == "vqa") & (table.stage == "frame→result")].iloc[0]
    assert (row.p50, row.p95, row.p99) == (nearest_rank(ms, 50), nearest_rank(ms, 95), nearest_rank(ms, 99))
    assert (row.p50, row.p95, row.p99) == (50.0, 100.0, 100.0)
    decode = table[(table.task == "vqa") & (table.stage == "decode")].iloc[0]
    assert decode.p50 == nearest_rank([v - 8 for v in ms], 50)
    single = table[(table.task == "counting") & (table.stage == "queue")].iloc[0]
    assert (single.p50, single.p95, single.p99) == (1.0, 1.0, 1.0)


def test_throughput_buckets_results_per_second():
    results = [result("vqa", 1000.0 + t, 10) for t in (0, 1, 2, 3, 12, 13)] + [result("counting", 1005.0, 10)]
    rate = charts.throughput(results, bucket_s=10.0)
    assert list(rate.columns) == ["counting", "vqa"]
    assert rate.index.tolist() == list(pd.to_datetime([1000.0, 1010.0], unit="s"))
    assert rate["vqa"].tolist() == [0.4, 0.2] and rate["counting"].tolist() == [0.1, 0.0]
    assert charts.throughput([]).empty


def test_accuracy_over_time_is_a_rolling_mean_of_scored_results():
    scores = [100.0, 0.0, 50.0, None, 100.0]
    results = [result("grounding", 1000.0 + i, 10, acc) for i, acc in enumerate(scores)]
    acc = charts.accuracy_over_time(results, window=2)
    assert acc["grounding"].tolist() == [100.0, 50.0, 25.0, 75.0]
    assert acc.index.tolist() == list(pd.to_datetime([1000.0, 1001.0, 1002.0, 1004.0], unit="s"))


def test_task_table_and_adapter_requests_come_from_the_summary():
    summary = MetricsSummary(tasks={
        "vqa": TaskStats(task="vqa", requests=12, results=4, p50_ms=101.4, p95_ms=180.6, p99_ms=199.0, accuracy=75.04,
                         by_adapter={"vqa": 12}, dropped=3),
        "detection": TaskStats(task="detection", requests=4, results=4, by_adapter={"det8": 3, "base": 1}),
    })
    table = charts.task_table(summary)
    assert table.task.tolist() == ["detection", "vqa"]
    vqa = table.iloc[1]
    assert (vqa["p50 ms"], vqa["p95 ms"], vqa["p99 ms"], vqa.accuracy, vqa.dropped) == (101, 181, 199, 75.0, 3)
    adapters = charts.adapter_requests(summary)
    assert adapters.to_dict() == {"vqa": {"base": 0, "det8": 0, "vqa": 12},
                                  "detection": {"base": 1, "det8": 3, "vqa": 0}}


def test_dropped_table_by_task_and_reason():
    table = charts.dropped_table({"vqa": {"stale": 4}, "counting": {"stale": 1, "expired": 2}})
    assert table.to_dict(orient="index") == {"counting": {"stale": 1, "expired": 2}, "vqa": {"stale": 4, "expired": 0}}


def tick(ts: float, mode: str | None, merged: str | None, resident: list[str] | None, engine: str = "e1",
         batch: int | None = None) -> EngineTick:
    return EngineTick(engine_id=engine, ts=ts, mode=mode, merged_adapter=merged, adapters_resident=resident,
                      batch_size=batch)


def test_mode_segments_join_runs_of_the_same_state_per_replica():
    ticks = [tick(1, "merged", "vqa", []), tick(2, "merged", "vqa", []), tick(2.5, "unmerged", None, [], "e2"),
             tick(3, "mixture", "vqa", []), tick(4, "merged", "vqa", []), tick(5, "merged", "vqa", [])]
    seg = charts.mode_segments(ticks)
    assert seg[["engine", "mode", "merged adapter", "ticks"]].values.tolist() == [
        ["e1", "merged", "vqa", 2], ["e2", "unmerged", "none", 1], ["e1", "mixture", "vqa", 1],
        ["e1", "merged", "vqa", 2]]
    assert seg.iloc[0].end == pd.to_datetime(2, unit="s")


def test_residency_and_timeline_render_missing_fields_as_gaps():
    ticks = [tick(1, None, None, None), tick(2, "unmerged", None, ["a", "b"], batch=3), tick(3, "merged", "a", ["a"])]
    res = charts.residency(ticks)
    assert res[["adapter"]].values.ravel().tolist() == ["a", "b", "a"]
    timeline = charts.engine_timeline(ticks)
    assert timeline["mode"].tolist() == ["unknown", "unmerged", "merged"]
    assert timeline["resident adapters"].tolist()[1:] == [2, 1] and pd.isna(timeline["resident adapters"][0])
    assert pd.isna(timeline["batch size"][0]) and timeline["batch size"][1] == 3


@pytest.mark.parametrize(("detail", "expected"), [
    ({"mode": "unmerged", "adapters_loaded": ["vqa"], "queued": 2}, ("unmerged", None, None, 2, ["vqa"], None)),
    ({"mode": "mixture", "merged_adapter": "det", "running": 7, "waiting": 1, "adapters_resident": ["det", "vqa"],
      "gpu_memory_mb": 5120.0}, ("mixture", "det", 7, 1, ["det", "vqa"], 5120.0)),
    ({}, (None, None, None, None, None, None)),
])
def test_engine_tick_from_health(detail, expected):
    health = EngineHealth(engine_id="e", ready=True, backend="x", inflight=3, served=9, detail=detail)
    t = EngineTick.from_health(health)
    assert (t.mode, t.merged_adapter, t.batch_size, t.waiting, t.adapters_resident, t.gpu_memory_mb) == expected
    assert (t.engine_id, t.inflight, t.served, t.ts) == ("e", 3, 9, health.updated_at)
