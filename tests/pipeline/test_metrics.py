"""Metrics: the summary's statistics against numpy, the Redis summary round trip, and the Prometheus exporter."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from pipeline.frames import Sampler
from pipeline.metrics import METRICS, MetricsReader, SummaryPublisher, percentile, start_exporter, summarise
from pipeline.redis_server import free_port
from pipeline.schema import Latency, TaskResult
from pipeline.transport import Delivery, Keys


def result(task: str, ms: float, acc: float | None, seq: int, stream: str = "cam", ok: bool = True) -> TaskResult:
    return TaskResult(stream=stream, seq=seq, task=task, pts=float(seq), frame_ts=0.0, width=8, height=8, ok=ok,
                      accuracy=acc, adapters=[task, task], requests=2,
                      latency=Latency(frame_to_result_ms=ms, engine_ms=ms / 2))


def test_percentile_matches_numpy_nearest_rank():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        values = rng.uniform(0, 1000, n).tolist()
        for q in (50, 95, 99):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q, method="inverted_cdf"))
    assert percentile([], 50) is None


def test_summarise_per_task():
    rows = [result("vqa", ms, acc, i) for i, (ms, acc) in enumerate([(100, 100.0), (300, 0.0), (200, None)])]
    rows.append(result("counting", 50, 50.0, 0, ok=False))
    summary = summarise(rows, {"vqa:stale": 4, "counting:stale": 1, "vqa:expired": 1})
    vqa, counting = summary.tasks["vqa"], summary.tasks["counting"]
    assert (vqa.results, vqa.requests, vqa.errors, vqa.p50_ms, vqa.p99_ms) == (3, 6, 0, 200, 300)
    assert vqa.accuracy == 50.0 and vqa.dropped == 5 and vqa.by_adapter == {"vqa": 6}
    assert vqa.by_stage_p50_ms["engine"] == 100
    assert counting.errors == 1 and counting.dropped == 1


def test_summary_published_and_read_back(transport):
    for i in range(3):
        delivery = Delivery(Keys.frames("cam"), f"{i + 1}-0", {})
        transport.store_result(result("vqa", 100.0 * (i + 1), 100.0, i), delivery, "task:vqa", 100)
    transport.count_dropped("cam", "vqa", "stale", 2)
    published = SummaryPublisher(transport, lambda: ["cam"], 60).publish_once()
    read = MetricsReader(transport).summary()
    assert read == published and read.tasks["vqa"].results == 3 and read.tasks["vqa"].dropped == 2
    assert [r.seq for r in MetricsReader(transport).recent_results("cam")] == [2, 1, 0]


def test_store_result_is_idempotent(transport):
    delivery = Delivery(Keys.frames("cam"), "5-0", {})
    assert transport.store_result(result("vqa", 1, None, 0), delivery, "task:vqa", 100)
    assert not transport.store_result(result("vqa", 1, None, 0), delivery, "task:vqa", 100)
    assert transport.results_length("cam") == 1


def test_prometheus_exporter():
    port = free_port()
    start_exporter(port)
    METRICS.observe(result("grounding", 250.0, 75.0, 0))
    METRICS.dropped.labels("cam", "grounding", "stale").inc()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'valora_latency_seconds_bucket{le="0.25",stage="frame_to_result",task="grounding"}' in text
    assert 'valora_task_requests_total{status="ok",task="grounding"}' in text
    assert 'valora_frames_dropped_total{reason="stale",stream="cam",task="grounding"} 1.0' in text
    assert 'valora_task_accuracy{stream="cam",task="grounding"} 75.0' in text


def test_sampler_grid():
    sampler = Sampler()
    pts = [i * 0.2 for i in range(16)]
    assert [p for p in pts if sampler.take("a", p, 2.0)] == pytest.approx([0.0, 0.6, 1.0, 1.6, 2.0, 2.6, 3.0])
    assert sampler.take("a", 0.0, 2.0)  # a clock that went back restarts the grid
    assert not sampler.take("a", 0.2, 2.0)
    assert sampler.take("a", 100.0, 2.0)  # so does a jump far ahead
