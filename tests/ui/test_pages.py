"""Every page under Streamlit's AppTest, against the real test Redis: sign-in, Streams, Live, Metrics, Engine."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from apps.tasks import TASKS, get_task
from pipeline.registry import StreamRegistry
from pipeline.schema import EngineHealth, EngineTick, Latency, MetricsSummary, StreamHealth, TaskStats
from ui.auth import NO_PASSWORD, hash_password

from .conftest import APP, PASSWORD, frame_picture, perfect_outputs, publish, result_for, sign_in, store


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def charts(at: AppTest) -> list:
    return [el for el in at.get("arrow_vega_lite_chart")] + [el for el in at.get("vega_lite_chart")]


def table(at: AppTest, index: int):
    return at.dataframe[index].value


# -- sign-in ---------------------------------------------------------------------------------------------------------


def test_sign_in_rejects_a_wrong_password_and_accepts_the_right_one(ui_env):
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert titles(at) == ["VaLoRA operator console"]
    sign_in(at, "not the password")
    assert texts(at.error) == ["Wrong password."]
    assert titles(at) == ["VaLoRA operator console"]
    # A page cannot be reached by switching to it before signing in: only the sign-in page is registered.
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("views/live.py")
    sign_in(at, PASSWORD)
    assert not at.exception and titles(at) == ["Streams"]


def test_without_a_configured_password_nothing_is_served(ui_env, monkeypatch):
    monkeypatch.delenv("VALORA_UI__PASSWORD_HASH")
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert texts(at.error) == [NO_PASSWORD]
    assert len(at.text_input) == 0 and titles(at) == ["VaLoRA operator console"]


def test_a_new_password_signs_sessions_out(app, monkeypatch):
    monkeypatch.setenv("VALORA_UI__PASSWORD_HASH", hash_password("rotated", n=2**10))
    app.run()
    assert titles(app) == ["VaLoRA operator console"]
    sign_in(app, PASSWORD)
    assert texts(app.error) == ["Wrong password."]
    sign_in(app, "rotated")
    assert titles(app) == ["Streams"]


def test_sign_out(app):
    app.sidebar.button[0].click().run()
    assert titles(app) == ["VaLoRA operator console"]


# -- Streams ---------------------------------------------------------------------------------------------------------


def fill_register(at: AppTest, stream_id: str, url: str, fps: float = 2.0, tasks: tuple[str, ...] = ("detection",)):
    at.text_input(key="register-id").input(stream_id)
    at.text_input(key="register-url").input(url)
    at.number_input(key="register-fps").set_value(fps)
    for name in TASKS:
        box = at.checkbox(key=f"register-task-{name}")
        box.check() if name in tasks else box.uncheck()
    return next(b for b in at.button if b.label == "Register stream").click().run()


def test_registering_a_file_stream_puts_it_in_the_registry(app, transport, media_dir):
    clip = media_dir / "clip.mp4"
    clip.write_bytes(b"")
    fill_register(app, "gate", str(clip), fps=2.0, tasks=("detection", "vqa"))
    assert not app.exception and texts(app.error) == []
    assert texts(app.success) == [f"Registered gate (file: file://{clip.resolve()})."]
    spec = StreamRegistry(transport, media_dir).get("gate")
    assert (spec.kind, spec.url, spec.fps, sorted(spec.tasks)) == ("file", f"file://{clip.resolve()}", 2.0,
                                                                    ["detection", "vqa"])
    rows = table(app, 0)
    assert rows["stream"].tolist() == ["gate"] and rows["state"].tolist() == ["not ingested"]
    assert app.text_input(key="register-id").value == ""  # the form is ready for the next stream


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://camera.local/stream", "url scheme 'ftp' is not allowed"),
    ("/etc/passwd", "is outside the allowed media directory"),
    ("rtsp://", "rtsp url has no host"),
    ("/dev/video-front", "is outside the allowed media directory"),
])
def test_a_bad_url_shows_the_validation_error(app, transport, media_dir, url, message):
    fill_register(app, "cam", url)
    assert len(app.error) == 1 and message in app.error[0].value
    assert app.error[0].value.startswith("invalid stream spec: ")
    assert StreamRegistry(transport, media_dir).specs() == []


def test_a_bad_id_and_a_duplicate_are_refused(app, transport, media_dir):
    fill_register(app, "Bad Id", "rtsp://cam.local/1")
    assert "stream id 'Bad Id' must match" in app.error[0].value
    fill_register(app, "cam", "rtsp://cam.local/1")
    assert texts(app.error) == []
    fill_register(app, "cam", "rtsp://cam.local/2")
    assert texts(app.error) == ["stream 'cam' already exists (use update)"]
    assert StreamRegistry(transport, media_dir).get("cam").url == "rtsp://cam.local/1"


def test_health_is_listed_per_stream(app, transport, media_dir):
    StreamRegistry(transport, media_dir).add({"id": "cam", "url": "rtsp://cam.local/1"})
    transport.health_put(StreamHealth(stream="cam", state="reconnecting", fps_in=24.5, fps_out=4.9, reconnects=3,
                                      last_frame_at=time.time() - 7, last_error="connection refused"))
    app.run()
    row = table(app, 0).iloc[0]
    assert (row.state, row["fps in"], row["fps out"], row.reconnects, row["last error"]) == (
        "reconnecting", 24.5, 4.9, 3, "connection refused")
    assert 6.5 <= row["last frame age (s)"] <= 60


def test_edit_and_remove_a_stream(app, transport, media_dir):
    registry = StreamRegistry(transport, media_dir)
    registry.add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"vqa": {"params": {"questions": ["q?"]}}}})
    app.run()
    app.text_input(key="edit-cam-url").input("rtsps://cam.local/2")
    app.number_input(key="edit-cam-fps").set_value(3.0)
    app.checkbox(key="edit-cam-task-counting").check()
    next(b for b in app.button if b.label == "Save changes").click().run()
    assert texts(app.success) == ["Updated cam."]
    spec = registry.get("cam")
    assert (spec.url, spec.fps, sorted(spec.tasks)) == ("rtsps://cam.local/2", 3.0, ["counting", "vqa"])
    assert spec.tasks["vqa"].params == {"questions": ["q?"]}  # kept through the edit

    app.text_input(key="edit-cam-url").input("gopher://x")
    next(b for b in app.button if b.label == "Save changes").click().run()
    assert "url scheme 'gopher' is not allowed" in app.error[0].value
    assert registry.get("cam").url == "rtsps://cam.local/2"

    remove = next(b for b in app.button if b.label == "Remove stream")
    assert remove.disabled
    app.checkbox(key="remove-confirm").check().run()
    next(b for b in app.button if b.label == "Remove stream").click().run()
    assert texts(app.success) == ["Removed cam."] and registry.specs() == []


# -- Live ------------------------------------------------------------------------------------------------------------


def write_processed_frames(transport, media_dir):
    """Frame 0 answered by counting only, frame 1 by all five tasks with ground-truth answers; frame 2 unanswered."""
    registry = StreamRegistry(transport, media_dir)
    registry.add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {t: {} for t in TASKS}})
    image, truth = frame_picture(5)
    frames = [publish(transport, "cam", seq, image, truth) for seq in range(3)]
    store(transport, result_for(frames[0], "counting", perfect_outputs("counting", truth)))
    detection = get_task("detection")
    head = detection.parse_head(detection.head_target(truth)).model_dump(mode="json")
    store(transport, result_for(frames[1], "detection", [head], accuracy=100.0))
    for task in ("grounding", "counting", "captioning", "vqa"):
        store(transport, result_for(frames[1], task, perfect_outputs(task, truth), accuracy=100.0))
    return truth


def test_live_page_shows_the_newest_processed_frame_with_its_overlays(app, transport, media_dir):
    truth = write_processed_frames(transport, media_dir)
    app.switch_page("views/live.py").run()
    assert not app.exception, app.exception
    assert titles(app) == ["Live"] and app.selectbox(key="live-stream").value == "cam"
    assert len(app.image) == 1
    caption = app.image[0].captions[0]
    boxes = len(truth.objects) + len(truth.refs)
    assert caption.startswith("cam · frame 1 · 0.5 s into the source") and f"· {boxes} boxes ·" in caption
    answers = table(app, 0)
    by_task = answers.groupby("task")["answer"].apply(list).to_dict()
    assert by_task["captioning"] == [truth.caption]
    assert by_task["vqa"] == [qa.answer for qa in truth.vqa]
    assert answers[answers.task == "vqa"]["asked"].tolist() == [qa.question for qa in truth.vqa]
    assert answers[answers.task == "grounding"]["asked"].tolist() == [r.expr for r in truth.refs]
    assert len(by_task["detection"][0].split("; ")) == len(truth.objects)
    badges = " ".join(m.value for m in app.markdown)
    for cls, n in truth.counts.items():
        assert f":blue-badge[{cls} {n}]" in badges
    per_task = table(app, 1)
    assert sorted(per_task.task) == ["captioning", "counting", "detection", "grounding", "vqa"]
    assert (per_task.accuracy == 100.0).all()


def test_live_page_can_show_an_older_frame(app, transport, media_dir):
    write_processed_frames(transport, media_dir)
    app.switch_page("views/live.py").run()
    app.toggle(key="live-cam-follow").set_value(False).run()
    frame_box = app.selectbox(key="live-cam-frame")
    older = next(o for o in frame_box.options if o.startswith("frame 0"))
    frame_box.select(older).run()
    assert app.image[0].captions[0].startswith("cam · frame 0 ·") and "· 0 boxes ·" in app.image[0].captions[0]
    assert table(app, 0)["task"].tolist() == ["counting"]


def test_live_page_sets_tasks_and_questions_for_the_workers(app, transport, media_dir):
    registry = StreamRegistry(transport, media_dir)
    registry.add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"detection": {"fps": 1}}})
    app.switch_page("views/live.py").run()
    app.checkbox(key="live-cam-task-vqa").check()
    app.checkbox(key="live-cam-task-grounding").check()
    app.text_area(key="live-cam-questions").input("how many cars are there?\n\nis there a bus?")
    app.text_area(key="live-cam-expressions").input("the red car")
    next(b for b in app.button if b.label == "Apply").click().run()
    assert not app.exception and texts(app.error) == []
    spec = registry.get("cam")
    assert sorted(spec.tasks) == ["detection", "grounding", "vqa"] and spec.tasks["detection"].fps == 1.0
    assert get_task("vqa").items(None, spec.tasks["vqa"].params) == ["how many cars are there?", "is there a bus?"]
    assert get_task("grounding").items(None, spec.tasks["grounding"].params) == ["the red car"]
    assert app.text_area(key="live-cam-questions").value == "how many cars are there?\nis there a bus?"


def test_live_page_before_any_result(app, transport, media_dir):
    StreamRegistry(transport, media_dir).add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"counting": {}}})
    app.switch_page("views/live.py").run()
    assert texts(app.info) == ["No frames yet: is the ingestor running (`valora ingest`), and is the stream enabled?"]
    image, _ = frame_picture()
    publish(transport, "cam", 0, image)
    app.run()
    assert texts(app.info) == ["Frames are arriving; waiting for the first task results (are workers running?)."]
    assert app.image[0].captions == ["cam · newest frame 0 (no overlays yet)"]


# -- Metrics ---------------------------------------------------------------------------------------------------------


def test_metrics_page_renders_from_the_published_summary(app, transport, media_dir):
    StreamRegistry(transport, media_dir).add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"vqa": {}}})
    image, truth = frame_picture()
    for seq, (ms, acc) in enumerate([(120.0, 100.0), (240.0, 50.0), (360.0, 0.0)]):
        frame = publish(transport, "cam", seq, image, truth)
        store(transport, result_for(frame, "vqa", perfect_outputs("vqa", truth), accuracy=acc,
                                    latency=Latency(frame_to_result_ms=ms, engine_ms=ms / 2, decode_ms=ms / 4)))
    transport.count_dropped("cam", "vqa", "stale", 2)
    summary = MetricsSummary(tasks={"vqa": TaskStats(task="vqa", requests=9, results=3, errors=1, p50_ms=240.0,
                                                     p95_ms=360.0, p99_ms=361.0, accuracy=50.0, dropped=2,
                                                     by_adapter={"vqa-lora": 9})}, streams=["cam"], window_results=3)
    transport.summary_put(summary)
    app.switch_page("views/metrics.py").run()
    assert not app.exception, app.exception
    assert [m.value for m in app.metric] == ["3", "9", "1", "2"]
    tasks = table(app, 0).iloc[0]
    assert (tasks.task, tasks["p50 ms"], tasks["p95 ms"], tasks["p99 ms"], tasks.accuracy) == (
        "vqa", 240, 360, 361, 50.0)
    stages = table(app, 1)
    f2r = stages[(stages.task == "vqa") & (stages.stage == "frame→result")].iloc[0]
    assert (f2r.p50, f2r.p95, f2r.p99) == (240.0, 360.0, 360.0)
    # Latency per task and stage, throughput, dropped frames, accuracy over time, requests per adapter.
    assert len(charts(app)) == 6


def test_metrics_page_without_data(app):
    app.switch_page("views/metrics.py").run()
    assert texts(app.info) == ["No stream is registered and no metrics were published yet: add a stream on the "
                               "Streams page."]


# -- Engine ----------------------------------------------------------------------------------------------------------


def test_engine_page_renders_the_published_timeline(app, transport):
    for i, (mode, merged) in enumerate([("merged", "vqa"), ("merged", "vqa"), ("mixture", "vqa"), ("unmerged", None)]):
        health = EngineHealth(engine_id="gpu0", ready=True, backend="valora", served=10 * i, updated_at=1000.0 + i,
                              detail={"mode": mode, "merged_adapter": merged, "running": 4 + i, "waiting": i,
                                      "adapters_resident": ["vqa", "detection"][: 1 + i % 2], "policy": "valora"})
        transport.engine_tick_add(EngineTick.from_health(health, gpu_memory_mb=2048.0 + i))
    transport.engine_health_put(health.model_copy(update={"updated_at": time.time()}), ttl_s=30)
    app.switch_page("views/engine.py").run()
    assert not app.exception, app.exception
    replica = table(app, 0).iloc[0]
    assert (replica.engine, replica["mode"], replica["merged adapter"], replica.policy) == (
        "gpu0", "unmerged", None, "valora")
    changes = table(app, 1)
    assert changes[["mode", "merged adapter", "ticks"]].values.tolist() == [
        ["merged", "vqa", 2], ["mixture", "vqa", 1], ["unmerged", "none", 1]]
    assert len(charts(app)) == 4  # mode, batch, residency, GPU memory
    assert "Resident now: vqa, detection" in texts(app.caption)


def test_engine_page_without_an_orchestrator_renders_gracefully(app, transport):
    health = EngineHealth(engine_id="cpu", ready=True, backend="hf", inflight=1,
                          detail={"mode": None, "adapters_loaded": [], "queued": 0})
    transport.engine_health_put(health, ttl_s=30)
    transport.engine_tick_add(EngineTick.from_health(health))
    app.switch_page("views/engine.py").run()
    assert not app.exception, app.exception
    assert texts(app.info) == [
        "This engine reports no orchestration mode (the `hf` backend has no orchestrator); the chart fills in "
        "once the engine does.",
        "No adapter has been loaded yet.",
        "Not reported: this engine runs without CUDA."]
    assert len(charts(app)) == 1  # batch size and queue


def test_engine_page_without_engines(app):
    app.switch_page("views/engine.py").run()
    assert texts(app.info) == ["No engine replica is reporting: is `valora engine serve` (or `valora demo`) running?"]
