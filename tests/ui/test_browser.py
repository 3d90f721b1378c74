"""The dashboard in a real browser on the real demo pipeline: `valora demo --ui` on a synthetic clip, Debian's
chromium driven headless by Playwright. Sign in (with the one-time password the demo prints), register a file
stream, see its live frame with a detection box drawn where the model put it, see the metrics charts and the engine
timeline. Screenshots go to test-artifacts/ui/ (and the Live one to docs/live.png when VALORA_DOCS_SCREENSHOTS=1).

Where the boxes come from: the tiny checkpoint has random weights, so the `detection` adapter the engine serves here
is fine-tuned by the fixture on the clip's own first frame (tests/ui/adapter_training.py). Every box on the page is
still what the engine generated for the frame, parsed by the detection task, stored by a worker and drawn by the
dashboard; it matches the truth only because the adapter memorised that frame.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps.datasets.synth import write_clip
from apps.tasks import load_output
from pipeline.redis_server import free_port
from pipeline.transport import Transport
from tests.conftest import wait_for
from ui.overlay import class_color

from .adapter_training import train_detection_adapter
from .conftest import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts" / "ui"
DOCS_SHOT = REPO / "docs" / "live.png"
# Random adapters for the tasks other than detection (as in the pipeline tests' engine fixture).
OTHER_ADAPTERS = {"captioning": "ad4", "vqa": "ad16", "counting": "ad8", "grounding": "ad4"}
CLIP_SEED = 2  # its first frame shows a car and a person
STREAM = "gate-cam"


@pytest.fixture(scope="module")
def scene(tiny_checkpoint, tmp_path_factory):
    """A 1 s clip (10 fps, 224x224: at 1 fps one frame is published) and an adapter folder for the five tasks."""
    root = tmp_path_factory.mktemp("browser")
    video, _ = write_clip(root / "media", 1.0, CLIP_SEED, fps=10.0)
    adapters = root / "adapters"
    adapters.mkdir()
    for task, source in OTHER_ADAPTERS.items():
        (adapters / task).symlink_to(tiny_checkpoint / "adapters" / source, target_is_directory=True)
    train_detection_adapter(tiny_checkpoint / "base", video, [0], adapters / "detection")
    return video, adapters


@pytest.fixture
def demo(scene, tiny_checkpoint, redis_url, tmp_path):
    """`valora demo --ui` on the clip, on the test Redis, with no password hash configured (so `valora ui` makes a
    one-time password and prints it); yields (dashboard URL, password) and stops the demo at the end."""
    video, adapters = scene
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALORA_")}
    env.update({"REDIS_URL": redis_url, "PYTHONPATH": str(REPO), "VALORA_ENGINE__BACKEND": "hf",
                "VALORA_ENGINE__MODEL": str(tiny_checkpoint / "base"), "VALORA_ENGINE__ADAPTERS": str(adapters),
                "VALORA_ENGINE__DEVICE": "cpu", "VALORA_ENGINE__MAX_MODEL_LEN": "128",
                "VALORA_REDIS__STATE_DIR": str(tmp_path / "state"), "VALORA_UI__PORT": str(port),
                "VALORA_WORKER__SUMMARY_INTERVAL_S": "1"})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / "demo.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", "--ui", "--video", str(video),
                                 "--fps", "1"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: f"dashboard is up on {url}" in log_path.read_text(errors="replace") or proc.poll() is not None,
                 180, "the demo to start the dashboard")
        log = log_path.read_text(errors="replace")
        assert proc.poll() is None, log[-4000:]
        yield url, re.search(rf"dashboard on {url} \(one-time password: ([\w-]+)\)", log).group(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def browser_page(tmp_path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-test-deps` (Debian's chromium package)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def open_page(page, title: str) -> None:
    page.get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()


def test_operator_signs_in_registers_a_stream_and_sees_boxes_and_charts(demo, browser_page, redis_url, scene):
    page, (video, _), (url, password) = browser_page, scene, demo
    page.goto(url)
    page.get_by_role("heading", name="VaLoRA operator console").wait_for()
    page.get_by_label("Password", exact=True).fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Wrong password.").wait_for()
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Streams", exact=True).wait_for()
    shot(page, "1-streams")

    # Register the clip as a file stream, detection only, at 1 fps.
    form = page.locator('[data-testid="stForm"]').filter(has_text="Register stream")
    form.get_by_label("Stream id", exact=True).fill(STREAM)
    form.get_by_label("URL", exact=True).fill(str(video))
    form.get_by_label("Publish fps", exact=True).fill("1")
    for task in ("captioning", "vqa", "counting", "grounding"):
        form.get_by_text(task, exact=True).click()
    form.get_by_role("button", name="Register stream").click()
    page.get_by_text(f"Registered {STREAM} (file: file://{video}).").wait_for()
    transport = Transport.connect(redis_url)
    try:
        spec = wait_for(lambda: next((s for s in _specs(transport) if s.id == STREAM), None), 10, "the registry")
        assert (spec.kind, spec.fps, list(spec.tasks)) == ("file", 1.0, ["detection"])
        shot(page, "2-registered")

        # The Live page shows the stream's processed frame with the model's boxes drawn on it.
        open_page(page, "Live")
        page.get_by_label("Stream", exact=True).click()
        page.get_by_role("option", name=STREAM).click()
        caption = page.get_by_text(re.compile(rf"^{STREAM} · frame 0 · .* · [1-9]\d* boxes"))
        caption.wait_for(timeout=240_000)
        result = next(r for _, r in transport.results(STREAM) if r.task == "detection")
    finally:
        transport.close()
    detections = load_output(result.outputs[0]).detections
    assert detections and f"· {len(detections)} boxes ·" in caption.inner_text()
    image = page.locator('[data-testid="stImage"] img').first
    src = image.get_attribute("src")
    picture = np.asarray(Image.open(io.BytesIO(page.request.get(url + src if src.startswith("/") else src).body()))
                         .convert("RGB"))
    Image.fromarray(picture).save(ARTIFACTS / "3-live-frame.png")
    k = picture.shape[1] // result.width  # the dashboard zooms frames by an integer factor
    for det in detections:
        left, top = round(det.box[0] * result.width * k), round(det.box[1] * result.height * k)
        bottom = round(det.box[3] * result.height * k) - 1
        assert (picture[(top + bottom) // 2, left] == class_color(det.cls)).all(), det
    live = shot(page, "3-live")
    if os.environ.get("VALORA_DOCS_SCREENSHOTS") == "1":
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        page.locator('[data-testid="stMain"]').screenshot(path=str(DOCS_SHOT))
    assert live.stat().st_size > 0

    # The Metrics page draws its charts from the results the pipeline stored.
    page.set_viewport_size({"width": 1280, "height": 3000})  # Streamlit scrolls inside its main block
    open_page(page, "Metrics")
    charts = page.locator('[data-testid="stVegaLiteChart"]')
    wait_for(lambda: charts.count() >= 5, 60, "the metrics charts")
    for i in range(charts.count()):
        charts.nth(i).locator("canvas, svg").first.wait_for()
    shot(page, "4-metrics")

    # The Engine page shows the demo's replica and its timeline (the hf backend: unmerged, adapters loaded, no CUDA).
    open_page(page, "Engine")
    page.get_by_text("Orchestration mode and merged adapter").wait_for()
    page.get_by_text(re.compile(r"^Resident now: .*detection")).wait_for()
    page.get_by_text("Not reported: this engine runs without CUDA.").wait_for()
    engine_charts = page.locator('[data-testid="stVegaLiteChart"]')
    wait_for(lambda: engine_charts.count() == 3, 30, "the mode, batch and residency charts")
    shot(page, "5-engine")

def _specs(transport: Transport):
    from pipeline.registry import StreamRegistry

    return StreamRegistry(transport, None).specs()

