"""`valora demo`: Redis, the engine service, five task workers and an ingestor over a synthetic clip, then a report."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import CommandError
from pipeline.config import Settings
from pipeline.schema import FrameEntry, StreamSpec, TaskResult

logger = logging.getLogger(__name__)

TASKS = ["detection", "captioning", "vqa", "counting", "grounding"]
CLIP_SEED = 7
CLIP_FPS = 10.0
UI_START_TIMEOUT_S = 60.0


class DemoError(CommandError):
    """The demo could not finish; the message is the one line the operator sees."""


@dataclass(frozen=True)
class DemoOptions:
    video: str | None = None
    seconds: float = 8.0
    fps: float = 2.0
    report: str | None = None
    timeout_s: float = 600.0
    ui: bool = False


class Demo:
    """Startup is a list of init_* / start_* steps; stop() undoes them in reverse, whatever happened."""

    def __init__(self, settings: Settings, options: DemoOptions) -> None:
        self.settings = settings
        self.options = options
        self.stop_event = threading.Event()
        self.stream_id = f"demo-{os.getpid()}"
        self._cleanup: list = []

    def run(self) -> int:
        try:
            self.check_options()
            self.init_redis()
            self.init_transport()
            self.init_clip()
            self.init_stream()
            self.start_engine()
            self.start_workers()
            self.start_ingest()
            started = time.monotonic()
            if self.options.ui:
                self.start_ui()
            self.wait_until_processed()
            report = self.report(time.monotonic() - started)
            print(format_table(report), flush=True)
            if self.options.report:
                Path(self.options.report).write_text(json.dumps(report, indent=2))
            if self.options.ui:
                print("the demo keeps running for the dashboard; Ctrl-C stops it", flush=True)
                self.stop_event.wait()
            return 0
        finally:
            self.stop()

    def check_options(self) -> None:
        """Refuse bad arguments before anything starts."""
        if self.options.video and not Path(self.options.video).is_file():
            raise FileNotFoundError(f"video not found: {self.options.video}")
        if self.options.seconds <= 0:
            raise ValueError(f"--seconds must be positive, got {self.options.seconds:g}")
        if not 0.1 <= self.options.fps <= 60:
            raise ValueError(f"--fps must be within 0.1..60, got {self.options.fps:g}")

    def init_clip(self) -> None:
        from apps.datasets.synth import write_clip

        if self.options.video:
            self.video = Path(self.options.video).resolve()
            return
        out = (self.settings.redis.state_dir / "media" / f"demo-{self.options.seconds:g}s").resolve()
        self.video = out / f"traffic-{CLIP_SEED}.mp4"
        if not (self.video.is_file() and self.video.with_suffix(".jsonl").is_file()):
            logger.info("writing a %g s synthetic clip to %s", self.options.seconds, out)
            self.video, _ = write_clip(out, self.options.seconds, CLIP_SEED, fps=CLIP_FPS)

    def init_redis(self) -> None:
        from pipeline.redis_server import RedisServer

        if self.settings.redis.url:
            self.redis_url = self.settings.redis.url
            return
        server = RedisServer(self.settings.redis.state_dir / "redis", persist=False).start()
        self._cleanup.append(server.stop)
        self.redis_url = server.url

    def init_transport(self) -> None:
        from pipeline.transport import Transport

        self.transport = Transport.connect(self.redis_url, self.settings.redis.connect_timeout_s)
        self._cleanup.append(self.transport.close)

    def init_stream(self) -> None:
        from pipeline.registry import StreamRegistry

        self.ingest_cfg = self.settings.ingest.model_copy(update={"media_dir": self.video.parent})
        self.registry = StreamRegistry(self.transport, self.video.parent)
        self.spec: StreamSpec = self.registry.add({
            "id": self.stream_id, "url": str(self.video), "fps": self.options.fps,
            "tasks": {name: {} for name in TASKS},
        })
        self._cleanup.append(lambda: self.transport.delete_stream(self.stream_id))

    def start_engine(self) -> None:
        from pipeline.engine_service import EngineService, build_engine, wait_for_engines

        engine = build_engine(self.settings.engine)
        self._cleanup.append(engine.close)
        engine_id = self.settings.engine.engine_id or f"demo-engine-{os.getpid()}"
        service = EngineService(self.transport, engine, self.settings.service, engine_id)
        self.engine_thread = self._thread("engine-service", service.run)
        wait_for_engines(self.transport, 1, timeout_s=60, stop_event=self.stop_event)

    def start_workers(self) -> None:
        from pipeline.engine_client import ServiceClient
        from pipeline.metrics import SummaryPublisher
        from pipeline.worker import WorkerPool, manifest_defaults

        client = ServiceClient(self.transport, self.settings.service.requests_maxlen)
        self._cleanup.append(client.close)
        pool = WorkerPool(TASKS, self.transport, self.registry, client, self.settings.worker,
                          worker_id=f"demo-worker-{os.getpid()}",
                          defaults=manifest_defaults(self.settings.engine.adapters)).start()
        self._cleanup.append(pool.stop)
        summary = SummaryPublisher(self.transport, lambda: [spec.id for spec in self.registry.specs()],
                                   self.settings.worker.summary_interval_s)
        self._cleanup.append(summary.stop)
        summary.start()
        self.summary = summary
        # The groups must exist before the first frame so that every frame reaches every task.
        for worker in pool.workers:
            worker.prepare()

    def start_ingest(self) -> None:
        from pipeline.ingest import IngestManager, Ingestor

        if not self.options.ui:
            self.ingestor = Ingestor(self.spec, self.transport, self.registry, self.ingest_cfg).start()
            self._cleanup.append(self.ingestor.stop)
            return
        # With the dashboard, streams registered there are ingested too: follow the whole registry.
        self.ingest_manager = IngestManager(self.transport, self.registry, self.ingest_cfg)
        self.ingest_manager.sync()
        self.ingestor = self.ingest_manager.ingestors[self.stream_id]
        self._thread("ingest-manager", lambda stop: self.ingest_manager.run(stop, poll_s=1.0))

    def start_ui(self) -> None:
        """The dashboard (`valora ui`) on this demo's Redis and media directory, as a child stopped with the demo.

        Without a configured ui.password_hash, `valora ui` makes a one-time password and prints it.
        """
        port = self.settings.ui.port
        env = dict(os.environ, REDIS_URL=self.redis_url, VALORA_INGEST__MEDIA_DIR=str(self.video.parent),
                   VALORA_UI__PORT=str(port))
        env.pop("VALORA_REDIS__URL", None)
        command = [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)]
        if not self.settings.ui.password_hash:
            command.append("--one-time-password")
        proc = subprocess.Popen(command, env=env)
        self._cleanup.append(lambda: _end(proc))
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while not _answers(url + "/_stcore/health"):
            if proc.poll() is not None:
                raise DemoError(f"the dashboard did not start (`valora ui` exited with {proc.returncode})")
            if time.monotonic() > deadline or self.stop_event.wait(0.5):
                raise DemoError(f"the dashboard did not answer on {url} within {UI_START_TIMEOUT_S:.0f} s")
        print(f"dashboard is up on {url} (Ctrl-C stops the demo)", flush=True)

    def wait_until_processed(self) -> None:
        """Until the clip is ingested and every task group has taken and acknowledged every frame."""
        from pipeline.transport import Keys

        deadline = time.monotonic() + self.options.timeout_s
        key = Keys.frames(self.stream_id)
        while time.monotonic() < deadline:
            if self.stop_event.is_set():
                raise DemoError("stopped before the clip was processed")
            if not self.engine_thread.is_alive():
                raise DemoError("the engine service stopped unexpectedly (see the log above)")
            health = self.ingestor.health
            if health.state == "error":
                raise DemoError(f"cannot ingest {self.video}: {health.last_error}")
            if self.ingestor.finished and all(self.transport.group_drained(key, Keys.task_group(t)) for t in TASKS):
                return
            time.sleep(0.2)
        raise DemoError(f"the clip was not processed within {self.options.timeout_s:.0f} s (--timeout)")

    def report(self, wall_s: float) -> dict[str, Any]:
        from pipeline.metrics import summarise

        results = self.transport.all_results(self.stream_id)
        summary = summarise(results, self.transport.dropped(self.stream_id))
        frames = [frame for _, frame in self.transport.frames_range(self.stream_id, "-", count=100_000)]
        tasks: dict[str, Any] = {}
        for name in TASKS:
            stats = summary.tasks.get(name)
            tasks[name] = {
                "requests": stats.requests if stats else 0, "results": stats.results if stats else 0,
                "errors": stats.errors if stats else 0,
                "p50_ms": _round(stats.p50_ms if stats else None), "p95_ms": _round(stats.p95_ms if stats else None),
                "accuracy": _round(corpus_score(name, results, frames)), "metric": primary_metric(name),
                "live_accuracy": _round(stats.accuracy if stats else None),
                "first_error": first_error(results, name),
            }
        return {"video": str(self.video), "frames": self.ingestor.health.frames_published, "fps": self.options.fps,
                "backend": self.settings.engine.backend, "model": self.settings.engine.model,
                "wall_s": round(wall_s, 2), "tasks": tasks}

    def stop(self) -> None:
        self.stop_event.set()
        while self._cleanup:
            step = self._cleanup.pop()
            try:
                step()
            except Exception:  # one failing cleanup must not skip the others (e.g. Redis already gone)
                logger.debug("cleanup step failed", exc_info=True)

    def _thread(self, name: str, target) -> threading.Thread:
        thread = threading.Thread(target=target, args=(self.stop_event,), name=name, daemon=True)
        thread.start()
        self._cleanup.append(lambda: thread.join(30))
        return thread


def corpus_score(task_name: str, results: list[TaskResult], frames: list[FrameEntry]) -> float | None:
    """The task's primary metric over the whole clip (as `valora eval` scores it), from the stored outputs and the
    ground truth the frames carried; None when no result has truth to score against."""
    from apps.tasks import get_task
    from apps.tasks.output import load_output

    truth_of = {frame.seq: frame.truth for frame in frames if frame.truth is not None}
    outputs, truths = [], []
    for result in results:
        if result.task == task_name and result.seq in truth_of:
            for data in result.outputs:
                outputs.append(load_output(data))
                truths.append(truth_of[result.seq])
    if not outputs:
        return None
    return next(iter(get_task(task_name).evaluate(outputs, truths).values()))


def _answers(url: str) -> bool:
    """Whether an HTTP GET of ``url`` succeeds (the dashboard's health endpoint)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _end(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def primary_metric(task: str) -> str:
    from apps.tasks import get_task

    return get_task(task).primary_metric


def first_error(results: list[TaskResult], task: str) -> str | None:
    return next((r.error for r in results if r.task == task and r.error), None)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"VaLoRA demo: {report['frames']} frames of {report['video']} at {report['fps']:g} fps per task, "
             f"{report['backend']} engine, {report['wall_s']:.1f} s",
             f"{'task':<12} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'accuracy':>9}  metric"]
    for name, row in report["tasks"].items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.1f}"
        p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.0f}"
        p95 = "-" if row["p95_ms"] is None else f"{row['p95_ms']:.0f}"
        lines.append(f"{name:<12} {row['requests']:>8} {row['errors']:>6} {p50:>9} {p95:>9} {acc:>9}  {row['metric']}")
    return "\n".join(lines)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
