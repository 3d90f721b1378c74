"""DashboardClient on the real test Redis: results grouped by the frame they were computed for, that frame's
picture (never another run's), summaries, dropped frames and the engine timeline."""

from __future__ import annotations

import time

from pipeline.dashboard_client import DashboardClient
from pipeline.frames import decode_jpeg
from pipeline.schema import EngineHealth, EngineTick, MetricsSummary, StreamHealth, TaskStats

from .conftest import frame_picture, perfect_outputs, publish, result_for, store


def client_for(transport, media_dir) -> DashboardClient:
    return DashboardClient(transport, media_dir)


def test_processed_frames_group_results_by_frame(transport, media_dir):
    client = client_for(transport, media_dir)
    client.registry.add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"counting": {}, "captioning": {}}})
    image, truth = frame_picture()
    frames = [publish(transport, "cam", seq, image, truth) for seq in range(3)]
    store(transport, result_for(frames[0], "counting", perfect_outputs("counting", truth)))
    store(transport, result_for(frames[1], "captioning", perfect_outputs("captioning", truth)))
    store(transport, result_for(frames[1], "counting", perfect_outputs("counting", truth)))
    processed = client.processed_frames("cam")
    assert [(f.seq, f.tasks) for f in processed] == [(1, ["captioning", "counting"]), (0, ["counting"])]
    assert all(r.seq == f.seq and r.frame_ts == f.frame_ts for f in processed for r in f.results.values())


def test_frame_entry_is_the_picture_the_results_were_computed_for(transport, media_dir):
    client = client_for(transport, media_dir)
    first, truth = frame_picture(5)
    second, _ = frame_picture(11)
    old = publish(transport, "cam", 0, first, truth)
    time.sleep(0.01)
    new = publish(transport, "cam", 0, second, truth, ttl_s=0)  # a replay: seq 0 again, another picture, inline
    store(transport, result_for(old, "counting", perfect_outputs("counting", truth)))
    store(transport, result_for(new, "counting", perfect_outputs("counting", truth)))
    by_ts = {f.frame_ts: f for f in client.processed_frames("cam")}
    assert set(by_ts) == {old.ts, new.ts}
    for published, picture in ((old, first), (new, second)):
        entry = client.frame_entry(by_ts[published.ts])
        assert entry is not None and entry.seq == 0 and entry.ts == published.ts
        # JPEG round trip: the decoded picture is close to the one published, and far from the other one.
        decoded = decode_jpeg(entry.jpeg).astype(int)
        other = second if picture is first else first
        assert abs(decoded - picture).mean() < 3 < abs(decoded - other).mean()


def test_frame_entry_is_none_once_the_picture_is_gone(transport, media_dir):
    client = client_for(transport, media_dir)
    image, truth = frame_picture()
    frame = publish(transport, "cam", 0, image, truth)
    store(transport, result_for(frame, "counting", perfect_outputs("counting", truth)))
    processed = client.processed_frames("cam")[0]
    transport.client.delete(frame.key)  # the JPEG key expired
    assert client.frame_entry(processed) is None
    assert client.latest_frame("cam") is None


def test_stream_rows_summary_and_dropped(transport, media_dir):
    client = client_for(transport, media_dir)
    client.registry.add({"id": "cam", "url": "rtsp://cam.local/1"})
    transport.health_put(StreamHealth(stream="cam", state="running", fps_in=25.0, fps_out=5.0, reconnects=2))
    transport.count_dropped("cam", "vqa", "stale", 3)
    transport.count_dropped("cam", "counting", "expired")
    rows = client.stream_rows()
    assert [(r.id, r.health.state, r.health.reconnects, r.dropped) for r in rows] == [
        ("cam", "running", 2, {"vqa:stale": 3, "counting:expired": 1})]
    assert client.dropped_by_reason(["cam"]) == {"vqa": {"stale": 3}, "counting": {"expired": 1}}
    # No published summary: it is computed from the (empty) results; a published one is returned as stored.
    assert client.summary(["cam"]).tasks["vqa"].dropped == 3
    stored = MetricsSummary(tasks={"vqa": TaskStats(task="vqa", requests=7)}, streams=["cam"])
    transport.summary_put(stored)
    assert client.summary(["cam"]) == stored


def test_engine_ticks_round_trip_oldest_first(transport, media_dir):
    client = client_for(transport, media_dir)
    for i, mode in enumerate(["merged", "mixture", "unmerged"]):
        health = EngineHealth(engine_id="e1", ready=True, backend="valora", served=i, updated_at=1000.0 + i,
                              detail={"mode": mode, "merged_adapter": "vqa", "running": i + 1,
                                      "adapters_resident": ["vqa", "det"]})
        transport.engine_health_put(health, ttl_s=10)
        transport.engine_tick_add(EngineTick.from_health(health, gpu_memory_mb=512.0))
    ticks = client.engine_ticks()
    assert [(t.mode, t.batch_size, t.served, t.gpu_memory_mb) for t in ticks] == [
        ("merged", 1, 0, 512.0), ("mixture", 2, 1, 512.0), ("unmerged", 3, 2, 512.0)]
    assert [e.engine_id for e in client.engines()] == ["e1"]
    assert [t.served for t in client.engine_ticks(count=2)] == [1, 2]
