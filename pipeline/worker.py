"""Task workers: one consumer group per task on every frames stream; frames in, scored TaskResults out."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apps.datasets.schema import FrameTruth
from apps.model.manifest import Manifest
from apps.tasks import get_task
from apps.tasks.base import Task
from engine.request import EngineRequest, EngineResult, ImageRef
from pipeline.config import WorkerConfig
from pipeline.engine_client import EngineClient
from pipeline.frames import Sampler
from pipeline.metrics import METRICS
from pipeline.registry import StreamRegistry
from pipeline.schema import FrameEntry, Latency, StreamSpec, TaskResult
from pipeline.transport import REDIS_DOWN, Delivery, Keys, Transport

logger = logging.getLogger(__name__)

SPEC_REFRESH_S = 2.0


@dataclass
class _Job:
    """A frame on its way through the engine."""

    delivery: Delivery
    frame: FrameEntry
    truth: FrameTruth | None
    requests: list[EngineRequest]
    futures: list
    read_at: float
    results: list[EngineResult] = field(default_factory=list)


class TaskWorker:
    """Runs one task over every enabled stream that asks for it; XACKs a frame only with its stored result."""

    def __init__(self, task: str | Task, transport: Transport, registry: StreamRegistry, client: EngineClient,
                 cfg: WorkerConfig, worker_id: str | None = None, defaults: dict[str, Any] | None = None) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.defaults = dict(defaults or {})  # task params from the adapter manifest; a StreamSpec's params win
        self.group = Keys.task_group(self.task.name)
        self.transport = transport
        self.registry = registry
        self.client = client
        self.cfg = cfg
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.specs: dict[str, StreamSpec] = {}
        self.sampler = Sampler()
        self.processed = 0
        self._specs_at = 0.0
        self._janitor_at = time.monotonic()
        self._rotation = 0

    def run(self, stop_event: threading.Event) -> None:
        """Consume until ``stop_event`` is set; rides out Redis restarts."""
        logger.info("worker %s: task %s started", self.worker_id, self.task.name)
        while not stop_event.is_set():
            try:
                self.step()
            except REDIS_DOWN as exc:
                logger.warning("worker %s/%s: Redis unavailable (%s); waiting", self.worker_id, self.task.name, exc)
                self.transport.wait_until_up(stop_event)
                self._specs_at = 0.0

    def step(self) -> int:
        """One read-process cycle; returns the number of results stored."""
        self._refresh_specs()
        keys = [Keys.frames(s) for s in self.specs]
        if not keys:
            time.sleep(self.cfg.block_ms / 1000)
            return 0
        stored = self._janitor(keys)
        # At most batch_size frames in flight: XREADGROUP's COUNT is per stream, so read a rotating subset of
        # the streams, sharing the batch between them (every stream gets its turn).
        start = self._rotation % len(keys)
        chosen = (keys[start:] + keys[:start])[: self.cfg.batch_size]
        self._rotation += len(chosen)
        deliveries = self.transport.read_group(self.group, self.worker_id, chosen,
                                               count=max(1, self.cfg.batch_size // len(chosen)),
                                               block_ms=self.cfg.block_ms)
        return stored + self._process(deliveries, sample=True)

    def prepare(self) -> None:
        """Read the registry now and create this task's groups on the streams that enable it."""
        self._specs_at = 0.0
        self._refresh_specs()

    def _refresh_specs(self) -> None:
        if time.monotonic() - self._specs_at < SPEC_REFRESH_S:
            return
        specs = {s.id: s for s in self.registry.specs() if s.enabled and self.task.name in s.tasks}
        for stream_id in specs.keys() - self.specs.keys():
            self.transport.ensure_group(Keys.frames(stream_id), self.group)
        self.specs = specs
        self._specs_at = time.monotonic()

    def _janitor(self, keys: list[str]) -> int:
        """Take over frames pending too long (a worker died mid-request); dead-letter ones that keep failing."""
        if time.monotonic() - self._janitor_at < self.cfg.janitor_interval_s:
            return 0
        self._janitor_at = time.monotonic()
        stored = 0
        for key in keys:
            claimed = self.transport.claim_stale(key, self.group, self.worker_id, self.cfg.claim_idle_ms)
            retry = []
            for delivery in claimed:
                if delivery.fields is None:
                    self.transport.ack(key, self.group, delivery.entry_id)
                    self.transport.count_dropped(_stream_of(key), self.task.name, "trimmed")
                elif delivery.deliveries > self.cfg.max_deliveries:
                    self.transport.dead_letter(delivery, self.group, f"{self.task.name}: no result after "
                                               f"{delivery.deliveries - 1} deliveries")
                else:
                    retry.append(delivery)
            if retry:
                logger.info("worker %s/%s: reclaimed %d pending frames of %s", self.worker_id, self.task.name,
                            len(retry), key)
                stored += self._process(retry, sample=False)
        return stored

    def _process(self, deliveries: list[Delivery], sample: bool) -> int:
        jobs = [job for d in deliveries if (job := self._start(d, sample)) is not None]
        stored = 0
        for job in jobs:
            if self._await(job):
                stored += self._store(job)
        return stored

    def _start(self, delivery: Delivery, sample: bool) -> _Job | None:
        """Decide what to do with a frame; submit its engine requests when it is to be processed."""
        frame = self.transport.decode_frame(delivery.fields)
        spec = self.specs.get(frame.stream)
        if spec is None or self.task.name not in spec.tasks:
            self.transport.ack(delivery.key, self.group, delivery.entry_id)
            return None
        if sample and not self.sampler.take(frame.stream, frame.pts, spec.task_fps(self.task.name)):
            self.transport.ack(delivery.key, self.group, delivery.entry_id)
            return None
        if spec.max_frame_age_s is not None and time.time() - frame.ts > spec.max_frame_age_s:
            return self._drop(delivery, frame, "stale")
        image = ImageRef(id=frame.image_id, jpeg=frame.jpeg, key=frame.key)
        if self.client.inline_images and image.jpeg is None:
            image.jpeg = self.transport.frame_jpeg(frame)
            image.key = None
            if image.jpeg is None:
                return self._drop(delivery, frame, "expired")
        truth = frame.truth
        read_at = time.time()
        try:
            requests = self.task.requests(image, {**self.defaults, **spec.tasks[self.task.name].params}, truth)
        except ValueError as exc:
            self._store(_Job(delivery, frame, truth, [], [], read_at), error=f"bad {self.task.name} params: {exc}")
            return None
        for req in requests:
            req.deadline = frame.ts + spec.latency_slo_ms / 1000.0
            req.meta.update(stream=frame.stream, seq=frame.seq)
        futures = [self.client.submit(req) for req in requests]
        return _Job(delivery, frame, truth, requests, futures, read_at)

    def _drop(self, delivery: Delivery, frame: FrameEntry, reason: str) -> None:
        self.transport.ack(delivery.key, self.group, delivery.entry_id)
        self.transport.count_dropped(frame.stream, self.task.name, reason)
        METRICS.dropped.labels(frame.stream, self.task.name, reason).inc()
        return None

    def _await(self, job: _Job) -> bool:
        deadline = job.read_at + self.cfg.request_timeout_s
        try:
            job.results = [f.result(timeout=max(0.0, deadline - time.time())) for f in job.futures]
            return True
        except FutureTimeout:
            logger.warning("worker %s/%s: no engine result for %s seq %d within %.0f s; left pending for retry",
                           self.worker_id, self.task.name, job.frame.stream, job.frame.seq, self.cfg.request_timeout_s)
            for req in job.requests:
                forget = getattr(self.client, "forget", None)
                if forget is not None:
                    forget(req.request_id)
            return False

    def _store(self, job: _Job, error: str | None = None) -> int:
        outputs = [self.task.parse(res, req) for req, res in zip(job.requests, job.results, strict=True)]
        scores = []
        if job.truth is not None:
            for out in outputs:
                metrics = self.task.score_frame(out, job.truth)
                if metrics:
                    scores.append(next(iter(metrics.values())))
        errors = [r.error for r in job.results if r.error] + ([error] if error else [])
        now = time.time()
        latency = Latency(
            frame_to_result_ms=(now - job.frame.ts) * 1000.0, worker_ms=(now - job.read_at) * 1000.0,
            engine_ms=max((r.timings.e2e_ms for r in job.results), default=0.0),
            queue_ms=max((r.timings.queue_ms for r in job.results), default=0.0),
            vision_ms=sum(r.timings.vision_ms for r in job.results),
            prefill_ms=sum(r.timings.prefill_ms for r in job.results),
            decode_ms=sum(r.timings.decode_ms for r in job.results),
        )
        result = TaskResult(
            stream=job.frame.stream, seq=job.frame.seq, task=self.task.name, pts=job.frame.pts, frame_ts=job.frame.ts,
            frame_key=job.frame.key, width=job.frame.width, height=job.frame.height,
            outputs=[o.model_dump(mode="json") for o in outputs], ok=not errors,
            error="; ".join(errors) if errors else None,
            accuracy=sum(scores) / len(scores) if scores else None,
            adapters=[r.adapter for r in job.requests], modes=sorted({r.mode for r in job.results}),
            engine_ids=sorted({r.engine_id for r in job.results if r.engine_id}), requests=len(job.requests),
            latency=latency, worker_id=self.worker_id,
        )
        stored = self.transport.store_result(result, job.delivery, self.group, self.cfg.results_maxlen)
        if stored:
            self.processed += 1
            METRICS.observe(result)
        else:
            logger.info("worker %s/%s: result for %s seq %d already stored; acknowledged the duplicate",
                        self.worker_id, self.task.name, job.frame.stream, job.frame.seq)
        return int(stored)


class WorkerPool:
    """One TaskWorker thread per task, sharing one engine client."""

    def __init__(self, tasks: list[str], transport: Transport, registry: StreamRegistry, client: EngineClient,
                 cfg: WorkerConfig, worker_id: str | None = None,
                 defaults: dict[str, dict[str, Any]] | None = None) -> None:
        worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        defaults = defaults or {}
        self.workers = [TaskWorker(t, transport, registry, client, cfg, worker_id, defaults.get(t)) for t in tasks]
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=w.run, args=(self.stop_event,), name=f"worker-{w.task.name}",
                                         daemon=True) for w in self.workers]

    def start(self) -> WorkerPool:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout_s)


def manifest_defaults(adapters_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per-task params from the adapter manifest: the adapter that serves each task, and its head when it has one.

    Without a manifest the tasks keep their own default adapters (and decode text).
    """
    try:
        manifest = Manifest.load(adapters_dir)
    except FileNotFoundError:
        logger.info("no adapter manifest in %s; tasks use their default adapters", adapters_dir)
        return {}
    return {task: {"adapter": entry.adapter, **({"use_head": True} if entry.head else {})}
            for task, entry in manifest.tasks.items()}


def _stream_of(key: str) -> str:
    return key.removeprefix(Keys.frames(""))
