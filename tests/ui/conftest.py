"""Dashboard fixtures: the app under AppTest signed in against the real test Redis, and frames and results written
through the same transport calls the ingestor and the workers make."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from apps.datasets.schema import FrameTruth
from apps.datasets.synth import still
from apps.tasks import get_task
from pipeline.frames import encode_jpeg
from pipeline.schema import FrameEntry, Latency, TaskResult
from pipeline.transport import Keys, Transport
from ui.auth import hash_password

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "ui" / "app.py"
PASSWORD = "correct horse battery staple"
# A cheap scrypt cost for tests (the format carries its parameters, so verification uses these).
PASSWORD_HASH = hash_password(PASSWORD, n=2**10)


@pytest.fixture
def media_dir(tmp_path) -> Path:
    folder = tmp_path / "media"
    folder.mkdir()
    return folder


@pytest.fixture
def ui_env(monkeypatch, redis_url, media_dir):
    """The dashboard's settings, by environment as `valora ui` passes them."""
    monkeypatch.delenv("VALORA_REDIS__URL", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("VALORA_UI__PASSWORD_HASH", PASSWORD_HASH)
    monkeypatch.setenv("VALORA_INGEST__MEDIA_DIR", str(media_dir))
    return redis_url


@pytest.fixture
def transport(redis_url):
    t = Transport.connect(redis_url)
    yield t
    t.close()


def sign_in(at: AppTest, password: str = PASSWORD) -> AppTest:
    at.text_input[0].input(password)
    at.button[0].click().run()
    return at


@pytest.fixture
def app(ui_env):
    """A signed-in dashboard session; ``app.switch_page("views/live.py").run()`` opens a page."""
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    sign_in(at)
    assert not at.exception, at.exception
    assert [t.value for t in at.title] == ["Streams"], "sign-in did not reach the Streams page"
    return at


def frame_picture(seed: int = 5, size: str = "224x160") -> tuple[np.ndarray, FrameTruth]:
    """A synthetic road scene with its ground truth."""
    image, truth = still((seed,), size)
    return image, truth


def publish(transport: Transport, stream: str, seq: int, image: np.ndarray, truth: FrameTruth | None = None,
            ttl_s: int = 60) -> FrameEntry:
    """Publish a frame as the ingestor does (JPEG in its own key when ``ttl_s`` > 0, inline otherwise)."""
    jpeg, width, height = encode_jpeg(image, 640, 90)
    frame = FrameEntry(stream=stream, seq=seq, ts=time.time(), pts=seq * 0.5, source_frame=seq, width=width,
                       height=height, jpeg=jpeg, truth=truth)
    transport.publish_frame(frame, maxlen=100, ttl_s=ttl_s)
    return frame.model_copy(update={"jpeg": None, "key": Keys.frame_blob(stream, seq) if ttl_s > 0 else None})


def perfect_outputs(task: str, truth: FrameTruth, items: list[str] | None = None) -> list[dict]:
    """What a model that answers exactly like the ground truth returns, through the task's own parser."""
    t = get_task(task)
    asked = items if items is not None else t.items(truth)
    return [t.parse_text(t.target_text(truth, item), item).model_copy(update={"item": item}).model_dump(mode="json")
            for item in asked]


def result_for(frame: FrameEntry, task: str, outputs: list[dict], **fields) -> TaskResult:
    latency = fields.pop("latency", Latency(frame_to_result_ms=120.0, worker_ms=100.0, engine_ms=90.0, queue_ms=5.0,
                                            vision_ms=20.0, prefill_ms=30.0, decode_ms=35.0))
    return TaskResult(stream=frame.stream, seq=frame.seq, task=task, pts=frame.pts, frame_ts=frame.ts,
                      frame_key=frame.key, width=frame.width, height=frame.height, outputs=outputs,
                      requests=len(outputs), adapters=[task] * len(outputs), modes=["unmerged"], latency=latency,
                      **fields)


def store(transport: Transport, result: TaskResult) -> None:
    """Store a result the way a worker does: take its frame through the task's group, then store it and XACK."""
    key, group = Keys.frames(result.stream), Keys.task_group(result.task)
    transport.ensure_group(key, group)
    held = transport.read_group(group, "test-worker", [key], count=1000, block_ms=1, own_pending=True)
    held += transport.read_group(group, "test-worker", [key], count=1000, block_ms=1)
    for delivery in held:
        frame = transport.decode_frame(delivery.fields)
        if frame.seq == result.seq and frame.ts == result.frame_ts:
            assert transport.store_result(result, delivery, group, maxlen=1000)
            return
    raise AssertionError(f"frame {result.seq} of {result.stream} is not in the {group} group")
