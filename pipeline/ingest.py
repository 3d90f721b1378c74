"""Ingestors: decode a stream, sample it at the stream's fps, publish JPEG frames; reconnect, watch, report health."""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections import deque
from pathlib import Path

from pydantic import ValidationError

from apps.datasets.schema import FrameTruth
from pipeline.config import IngestConfig
from pipeline.frames import Sampler, TruthSidecar, encode_jpeg, scale_truth
from pipeline.registry import StreamRegistry, describe_validation
from pipeline.schema import FrameEntry, StreamHealth, StreamSpec, StreamState
from pipeline.sources import DecodedFrame, Decoder, SourceError, SourceOptions, local_path, open_source
from pipeline.transport import REDIS_DOWN, Transport

logger = logging.getLogger(__name__)

_EOF = object()
# Consecutive failed opens after which a file source is given up (a live source retries forever).
FILE_OPEN_ATTEMPTS = 3


class _Reader(threading.Thread):
    """Owns one decoder: opens it and pushes frames (or the error that ended it) into a bounded queue.

    Live sources are latest-wins: when the queue is full the oldest frame is dropped, so the decoder never
    blocks on a slow publisher. A reader that was abandoned (stop or watchdog) exits at its next frame or
    when its own read timeout fires, and closes its decoder itself.
    """

    def __init__(self, spec: StreamSpec, cfg: IngestConfig) -> None:
        super().__init__(name=f"reader-{spec.id}", daemon=True)
        self.spec = spec
        self.cfg = cfg
        self.frames: queue.Queue = queue.Queue(maxsize=8)
        self.abandoned = threading.Event()
        self.decoder: str | None = None

    def run(self) -> None:
        options = SourceOptions(self.cfg.open_timeout_s, self.cfg.stall_timeout_s, self.cfg.rtsp_transport)
        decoder: Decoder | None = None
        try:
            decoder = open_source(self.spec.url, self.spec.kind, options, self.cfg.decoders)
            self.decoder = decoder.name
            for frame in decoder.frames():
                if self.abandoned.is_set():
                    return
                self._put(frame)
            self._put(_EOF)
        except SourceError as exc:
            self._put(exc)
        except Exception as exc:  # a decoder bug must surface as this stream's error, not kill the ingestor
            logger.exception("decoder for %s failed", self.spec.id)
            self._put(SourceError(f"decoder failed: {exc}"))
        finally:
            if decoder is not None:
                decoder.close()

    def _put(self, item) -> None:
        while not self.abandoned.is_set():
            if self.spec.live and isinstance(item, DecodedFrame):
                if self.frames.full():
                    with contextlib.suppress(queue.Empty):
                        self.frames.get_nowait()
                try:
                    self.frames.put_nowait(item)
                    return
                except queue.Full:
                    continue
            try:
                self.frames.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


class _Rate:
    """Events per second over the last few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self.times.append(now)

    def value(self, now: float) -> float:
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        return len(self.times) / self.window_s if self.times else 0.0


class Ingestor:
    """One stream's ingest loop in its own thread: connect, decode, sample, publish; reconnect on failure."""

    def __init__(self, spec: StreamSpec, transport: Transport, registry: StreamRegistry, cfg: IngestConfig) -> None:
        self.spec = spec
        self.transport = transport
        self.registry = registry
        self.cfg = cfg
        self.stop_event = threading.Event()
        self.health = StreamHealth(stream=spec.id)
        self.seq = 0
        self.fps_in, self.fps_out = _Rate(), _Rate()
        self.thread = threading.Thread(target=self.run, name=f"ingest-{spec.id}", daemon=True)
        self._last_health = 0.0

    def start(self) -> Ingestor:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop now, even while connecting; the decoder thread closes its source on its own."""
        self.stop_event.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout_s)

    @property
    def finished(self) -> bool:
        return self.health.state in ("finished", "error", "stopped") and not self.thread.is_alive()

    def run(self) -> None:
        if not self._revalidate():
            return
        truth = TruthSidecar.for_video(Path(local_path(self.spec.url))) if self.spec.kind == "file" else None
        delay, failures = self.cfg.reconnect_min_s, 0
        while not self.stop_event.is_set():
            self._set_state("connecting" if self.health.reconnects == 0 else "reconnecting")
            try:
                ended = self._run_once(truth)
            except SourceError as exc:
                failures += 1
                self._fail(str(exc))
                if self.spec.kind == "file" and failures >= FILE_OPEN_ATTEMPTS:
                    self._set_state("error", force=True)
                    return
                self.health.reconnects += 1
                self.stop_event.wait(delay * (1 + random.uniform(0, 0.25)))
                delay = min(self.cfg.reconnect_max_s, delay * 2)
                continue
            failures, delay = 0, self.cfg.reconnect_min_s
            if ended and not self.spec.loop:
                self._set_state("finished", force=True)
                return
        self._set_state("stopped", force=True)

    def _revalidate(self) -> bool:
        """Check the spec against this ingestor's media directory before opening anything."""
        try:
            StreamSpec.model_validate(self.spec.model_dump(), context={"media_dir": self.cfg.media_dir})
            return True
        except ValidationError as exc:
            self._fail(describe_validation(exc))
            self._set_state("error", force=True)
            return False

    def _run_once(self, truth: TruthSidecar | None) -> bool:
        """Read one connection to its end; True when a file reached its end, False when stopped."""
        reader = _Reader(self.spec, self.cfg)
        reader.start()
        last_item = time.monotonic()
        # The first frame may take the open timeout plus a stall; later frames get the stall timeout.
        patience = self.cfg.open_timeout_s + self.cfg.stall_timeout_s
        sampler = Sampler()
        pace_start: float | None = None
        try:
            while not self.stop_event.is_set():
                try:
                    item = reader.frames.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() - last_item > patience:
                        raise SourceError(f"no frame for {patience:.0f} s: decoder stalled, restarting it") from None
                    self._heartbeat()
                    continue
                if item is _EOF:
                    return True
                if isinstance(item, SourceError):
                    raise item
                last_item, patience = time.monotonic(), self.cfg.stall_timeout_s
                if self.health.state != "running":
                    self._running(reader.decoder)
                now = time.time()
                self.fps_in.tick(now)
                pts = item.pts
                if sampler.take(self.spec.id, pts, self.spec.fps):
                    if self.spec.kind == "file":
                        pace_start = self._pace(pace_start, pts)
                    self._publish(item, pts, truth)
                self._heartbeat()
            return False
        finally:
            reader.abandoned.set()

    def _pace(self, start: float | None, pts: float) -> float:
        """Files play at their own speed, like a camera would; returns the wall time of pts 0."""
        if start is None:
            return time.monotonic() - pts
        self.stop_event.wait(max(0.0, start + pts - time.monotonic()))
        return start

    def _publish(self, frame: DecodedFrame, pts: float, truth: TruthSidecar | None) -> None:
        jpeg, width, height = encode_jpeg(frame.image, self.cfg.max_side, self.cfg.jpeg_quality)
        gt = truth.get(frame.index) if truth is not None else None
        entry = FrameEntry(stream=self.spec.id, seq=self.seq, ts=time.time(), pts=pts, source_frame=frame.index,
                           width=width, height=height, jpeg=jpeg,
                           truth=FrameTruth.model_validate(scale_truth(gt, width, height)) if gt else None)
        try:
            self.transport.publish_frame(entry, self.cfg.stream_maxlen, self.cfg.frame_ttl_s)
        except REDIS_DOWN as exc:
            logger.warning("stream %s: Redis unavailable (%s); frames are dropped until it is back", self.spec.id, exc)
            self.transport.wait_until_up(self.stop_event)
            return
        self.seq += 1
        self.health.frames_published += 1
        self.health.last_frame_at = entry.ts
        self.fps_out.tick(entry.ts)

    def _running(self, decoder: str | None) -> None:
        logger.info("stream %s: receiving frames (%s)", self.spec.id, decoder)
        self.health.last_error = None
        self._set_state("running", force=True)
        self._safe(self.registry.set_error, self.spec.id, None)

    def _fail(self, message: str) -> None:
        logger.warning("stream %s: %s", self.spec.id, message)
        self.health.last_error = message
        self._safe(self.registry.set_error, self.spec.id, message)

    def _set_state(self, state: StreamState, force: bool = False) -> None:
        changed = state != self.health.state
        self.health.state = state
        self._heartbeat(force=force or changed)

    def _heartbeat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_health < 1.0:
            return
        self._last_health = now
        self.health.fps_in = round(self.fps_in.value(now), 2)
        self.health.fps_out = round(self.fps_out.value(now), 2)
        self.health.updated_at = now
        self._safe(self.transport.health_put, self.health)

    def _safe(self, fn, *args) -> None:
        try:
            fn(*args)
        except REDIS_DOWN as exc:
            logger.debug("stream %s: Redis unavailable for bookkeeping: %s", self.spec.id, exc)


class IngestManager:
    """Keeps one Ingestor per enabled registered stream, following additions, changes and removals."""

    def __init__(self, transport: Transport, registry: StreamRegistry, cfg: IngestConfig,
                 only: set[str] | None = None) -> None:
        self.transport = transport
        self.registry = registry
        self.cfg = cfg
        self.only = only
        self.ingestors: dict[str, Ingestor] = {}

    def sync(self) -> None:
        specs = {s.id: s for s in self.registry.specs() if s.enabled and (self.only is None or s.id in self.only)}
        for stream_id in list(self.ingestors):
            if stream_id not in specs or specs[stream_id] != self.ingestors[stream_id].spec:
                self.ingestors.pop(stream_id).stop()
        for stream_id, spec in specs.items():
            if stream_id not in self.ingestors:
                self.ingestors[stream_id] = Ingestor(spec, self.transport, self.registry, self.cfg).start()

    def run(self, stop_event: threading.Event, poll_s: float = 2.0, exit_when_done: bool = False) -> None:
        """Follow the registry until ``stop_event`` (or, with ``exit_when_done``, until every ingestor ended)."""
        try:
            while not stop_event.is_set():
                try:
                    self.sync()
                except REDIS_DOWN as exc:
                    logger.warning("registry unavailable (%s); retrying", exc)
                    self.transport.wait_until_up(stop_event)
                    continue
                if exit_when_done and self.ingestors and all(i.finished for i in self.ingestors.values()):
                    return
                stop_event.wait(poll_s)
        finally:
            self.stop()

    def stop(self) -> None:
        for ingestor in self.ingestors.values():
            ingestor.stop_event.set()
        for ingestor in self.ingestors.values():
            ingestor.stop()
