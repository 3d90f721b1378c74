"""Task workers: fps sampling and live accuracy against the clip's truth, crash recovery, dead letters, stale frames."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from apps.tasks import get_task
from engine.base import create_engine
from pipeline.config import ServiceConfig
from pipeline.engine_client import LocalClient, ServiceClient
from pipeline.engine_service import EngineService
from pipeline.frames import decode_jpeg, encode_jpeg
from pipeline.ingest import Ingestor
from pipeline.registry import StreamRegistry
from pipeline.results import ResultsReader
from pipeline.schema import FrameEntry
from pipeline.transport import Keys
from pipeline.worker import TaskWorker, WorkerPool

from .conftest import engine_env, wait_for

FAST = {"max_tokens": 4}


def ingest(transport, registry, spec, cfg) -> None:
    ingestor = Ingestor(spec, transport, registry, cfg).start()
    wait_for(lambda: ingestor.finished, 30, "the clip to be ingested")
    assert ingestor.health.state == "finished"


def test_workers_sample_score_and_ack(transport, clip, ingest_cfg, worker_cfg, engine_config):
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "cam", "url": str(clip), "fps": 5,
                         "tasks": {"counting": {"fps": 1, "params": FAST}, "vqa": {"fps": 2, "params": FAST}}})
    ingest(transport, registry, spec, ingest_cfg)
    client = LocalClient(create_engine(engine_config))
    pool = WorkerPool(["counting", "vqa"], transport, registry, client, worker_cfg, worker_id="w").start()
    try:
        key = Keys.frames("cam")
        wait_for(lambda: all(transport.group_drained(key, Keys.task_group(t)) for t in ("counting", "vqa")), 120,
                 "both tasks to finish the clip")
    finally:
        pool.stop()
        client.close()
    results = transport.all_results("cam")
    frames = {f.seq: f for f in (transport.decode_frame(x) for _, x in transport.client.xrange(key))}
    by_task = {t: sorted((r for r in results if r.task == t), key=lambda r: r.seq) for t in ("counting", "vqa")}
    # 15 frames at 5 fps (pts 0, 0.2, ...): counting samples 1 fps, vqa 2 fps on a 0.5 s grid.
    assert [r.pts for r in by_task["counting"]] == pytest.approx([0.0, 1.0, 2.0])
    assert [r.pts for r in by_task["vqa"]] == pytest.approx([0.0, 0.6, 1.0, 1.6, 2.0, 2.6])
    for task_name, rows in by_task.items():
        task = get_task(task_name)
        for r in rows:
            truth = frames[r.seq].truth
            assert r.ok and r.requests == len(task.items(truth, FAST)) == len(r.outputs)
            assert r.latency.frame_to_result_ms >= r.latency.engine_ms > 0
            # The live score is the task's own metric of the stored outputs against the frame's truth.
            scores = [next(iter(s.values())) for o in r.outputs
                      if (s := task.score_frame(task.output_type.model_validate(o), truth))]
            assert r.accuracy == pytest.approx(sum(scores) / len(scores))
    assert pending(transport, key, Keys.task_group("vqa")) == 0

    # What the dashboard reads back: the newest frame with all its results, and its JPEG for overlays.
    reader = ResultsReader(transport)
    assert set(reader.latest_by_task("cam")) == {"counting", "vqa"}
    seq, on_frame = reader.latest_frame_results("cam")
    assert seq == max(r.seq for r in results) and {r.seq for r in on_frame} == {seq}
    assert decode_jpeg(reader.frame_jpeg(on_frame[0])).shape == (frames[seq].height, frames[seq].width, 3)
    last_id, tailed = reader.tail("cam", "0-0", count=1000)
    assert len(tailed) == len(results) and reader.tail("cam", last_id) == (last_id, [])


def test_killed_worker_frames_processed_exactly_once(transport, clip, ingest_cfg, worker_cfg, engine_config, procs,
                                                     redis_url, threads):
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "cam", "url": str(clip), "fps": 1, "tasks": {"counting": {"params": FAST}}})
    ingest(transport, registry, spec, ingest_cfg)
    key, group = Keys.frames("cam"), Keys.task_group("counting")

    # No engine is running: the worker takes the frames, sends their requests and waits. Then it is killed.
    env = engine_env(engine_config, redis_url, VALORA_INGEST__MEDIA_DIR=str(clip.parent))
    doomed = procs.valora(["worker", "--task", "counting", "--batch-size", "8"], env, name="doomed-worker")
    wait_for(lambda: pending(transport, key, group) == 3, 60, "the worker to take all 3 frames")
    wait_for(lambda: transport.client.xlen(Keys.ENGINE_REQUESTS) == 3, 30, "the worker's engine requests")
    os.killpg(doomed.pid, signal.SIGKILL)
    doomed.wait()
    assert transport.results_length("cam") == 0

    threads.run(EngineService(transport, create_engine(engine_config), ServiceConfig(), "engine").run)
    client = ServiceClient(transport)
    try:
        worker = TaskWorker("counting", transport, registry, client, worker_cfg, worker_id="rescuer")
        threads.run(worker.run)
        wait_for(lambda: transport.group_drained(key, group), 60, "the rescuer to process the reclaimed frames")
        time.sleep(2 * worker_cfg.janitor_interval_s + worker_cfg.claim_idle_ms / 1000)
    finally:
        threads.stop()
        client.close()
    results = transport.all_results("cam")
    assert sorted(r.seq for r in results) == [0, 1, 2]
    assert all(r.ok and r.worker_id == "rescuer" for r in results)


def test_dead_letter_after_max_deliveries(transport, clip, worker_cfg):
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "cam", "url": str(clip), "tasks": {"counting": {}}})
    client = ServiceClient(transport)
    worker = TaskWorker("counting", transport, registry, client, worker_cfg.model_copy(update={"max_deliveries": 2}),
                        worker_id="janitor")
    worker.prepare()
    key, group = Keys.frames("cam"), Keys.task_group("counting")
    transport.publish_frame(frame(spec.id, 0, time.time()), 100, ttl_s=60)
    # Two consumers took the frame and died without a result.
    assert len(transport.read_group(group, "ghost-1", [key], count=1, block_ms=10)) == 1
    assert len(transport.claim_stale(key, group, "ghost-2", min_idle_ms=0)) == 1
    time.sleep(worker_cfg.claim_idle_ms / 1000 + 0.1)
    worker._janitor_at = 0.0
    try:
        assert worker.step() == 0
    finally:
        client.close()
    (letter,) = transport.dead_letters()
    assert letter["source"] == key and letter["group"] == group and letter["deliveries"] == "3"
    assert "no result after 2 deliveries" in letter["reason"]
    assert pending(transport, key, group) == 0 and transport.results_length("cam") == 0
    assert transport.client.xlen(Keys.ENGINE_REQUESTS) == 0


def test_stale_live_frames_are_skipped_and_counted(transport, clip, worker_cfg):
    registry = StreamRegistry(transport, clip.parent)
    spec = registry.add({"id": "gate", "url": "rtsp://cam.local/1", "max_frame_age_s": 1.0,
                         "tasks": {"counting": {}}})
    client = ServiceClient(transport)
    worker = TaskWorker("counting", transport, registry, client, worker_cfg, worker_id="w")
    worker.prepare()
    for seq in range(3):
        transport.publish_frame(frame(spec.id, seq, time.time() - 30, pts=float(seq)), 100, ttl_s=60)
    try:
        worker.step()
    finally:
        client.close()
    assert transport.dropped("gate") == {"counting:stale": 3}
    assert transport.client.xlen(Keys.ENGINE_REQUESTS) == 0 and transport.results_length("gate") == 0
    assert transport.group_drained(Keys.frames("gate"), Keys.task_group("counting"))


def pending(transport, key: str, group: str) -> int:
    return next((g.pending for g in transport.group_info(key) if g.group == group), 0)


def frame(stream: str, seq: int, ts: float, pts: float = 0.0) -> FrameEntry:
    data, width, height = encode_jpeg(np.zeros((32, 32, 3), np.uint8), 64, 80)
    return FrameEntry(stream=stream, seq=seq, ts=ts, pts=pts, source_frame=seq, width=width, height=height, jpeg=data)

