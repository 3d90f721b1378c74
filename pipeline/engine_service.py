"""`valora engine serve`: one engine replica consuming valora:engine:requests through a shared consumer group."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from apps.model.heads import load_heads
from engine.base import EngineBackend, create_engine, error_result
from engine.config import EngineConfig
from engine.request import EngineRequest, EngineResult, ImageRef
from pipeline.config import ServiceConfig
from pipeline.metrics import METRICS
from pipeline.schema import EngineHealth, EngineTick
from pipeline.transport import REDIS_DOWN, Delivery, Keys, Transport

logger = logging.getLogger(__name__)


@dataclass
class _Inflight:
    delivery: Delivery
    reply_to: str


class EngineService:
    """Feeds requests from Redis into an engine and replies on each caller's stream.

    Invariants: a request is acknowledged only together with its reply (one Lua step), so a replica that dies
    leaves its accepted requests pending; on start it serves its own pending entries first, and its janitor
    takes over entries other replicas left pending longer than ``claim_idle_ms``. Replies are deduplicated by
    request id, so a request taken over from a slow (not dead) replica is still answered once.
    """

    def __init__(self, transport: Transport, engine: EngineBackend, cfg: ServiceConfig,
                 engine_id: str | None = None) -> None:
        self.transport = transport
        self.engine = engine
        self.cfg = cfg
        self.engine_id = engine_id or engine.config.engine_id or f"{socket.gethostname()}:{os.getpid()}"
        self.max_inflight = engine.config.max_num_seqs
        self.inflight: dict[str, _Inflight] = {}
        self.unsent: list[tuple[EngineResult, _Inflight]] = []
        self.served = 0
        self.errors = 0
        self._last_health = 0.0
        self._last_janitor = 0.0

    def run(self, stop_event: threading.Event) -> None:
        """Serve until ``stop_event`` is set; rides out Redis restarts."""
        self._init_group()
        self._recover_own()
        logger.info("engine service %s ready (%s backend)", self.engine_id, self.engine.config.backend)
        while not stop_event.is_set():
            try:
                self._iteration()
            except REDIS_DOWN as exc:
                logger.warning("engine service %s: Redis unavailable (%s); waiting", self.engine_id, exc)
                self.transport.wait_until_up(stop_event)
        self._publish_health(ready=False)

    def _iteration(self) -> None:
        self._flush_unsent()
        self._janitor()
        free = self.max_inflight - len(self.inflight)
        if free > 0:
            busy = self.engine.has_unfinished()
            for delivery in self.transport.read_group(Keys.ENGINE_GROUP, self.engine_id, [Keys.ENGINE_REQUESTS],
                                                      count=free, block_ms=1 if busy else 200):
                self._admit(delivery)
        if self.engine.has_unfinished():
            for result in self._step():
                self._finish(result)
        self._publish_health()

    def _step(self) -> list[EngineResult]:
        try:
            return self.engine.step()
        except REDIS_DOWN:
            raise
        except Exception as exc:  # an engine bug fails the requests in flight, not the replica
            logger.exception("engine service %s: engine step failed", self.engine_id)
            return [error_result(EngineRequest(request_id=rid, prompt=""), f"engine failure: {exc}", self.engine_id)
                    for rid in self.inflight]

    def _init_group(self) -> None:
        self.transport.ensure_group(Keys.ENGINE_REQUESTS, Keys.ENGINE_GROUP)
        self._publish_health(force=True)

    def _recover_own(self) -> None:
        """Serve the requests this consumer name had accepted before a crash."""
        own = self.transport.read_group(Keys.ENGINE_GROUP, self.engine_id, [Keys.ENGINE_REQUESTS],
                                        count=10_000, block_ms=0, own_pending=True)
        if own:
            logger.info("engine service %s: resuming %d requests accepted before a restart", self.engine_id, len(own))
        for delivery in own:
            self._admit(delivery)

    def _janitor(self) -> None:
        now = time.monotonic()
        if now - self._last_janitor < min(5.0, self.cfg.claim_idle_ms / 2000):
            return
        self._last_janitor = now
        for delivery in self.transport.claim_stale(Keys.ENGINE_REQUESTS, Keys.ENGINE_GROUP, self.engine_id,
                                                   self.cfg.claim_idle_ms):
            logger.info("engine service %s: took over request %s (delivery %d)", self.engine_id,
                        delivery.entry_id, delivery.deliveries)
            self._admit(delivery)

    def _admit(self, delivery: Delivery) -> None:
        if delivery.fields is None:
            self.transport.ack(delivery.key, Keys.ENGINE_GROUP, delivery.entry_id)
            return
        try:
            request = self.transport.decode_request(delivery.fields)
        except ValueError as exc:
            self.transport.dead_letter(delivery, Keys.ENGINE_GROUP, f"undecodable request: {exc}")
            return
        if request.request_id in self.inflight:
            return
        slot = _Inflight(delivery, request.reply_to or "")
        if not request.reply_to:
            self.transport.dead_letter(delivery, Keys.ENGINE_GROUP, "request has no reply_to stream")
            return
        if delivery.deliveries > self.cfg.max_deliveries:
            self._send(error_result(request, f"request was delivered {delivery.deliveries} times without an answer "
                                             "(the engines serving it crashed)", self.engine_id), slot)
            return
        request, missing = self._resolve_images(request)
        self.inflight[request.request_id] = slot
        if missing:
            self._finish(error_result(request, missing, self.engine_id))
        else:
            self.engine.add_request(request)

    def _resolve_images(self, request: EngineRequest) -> tuple[EngineRequest, str | None]:
        images = []
        for img in request.images:
            if img.jpeg is None and img.key:
                data = self.transport.blob(img.key)
                if data is None:
                    return request, f"image {img.id} expired before the engine read it (key {img.key})"
                img = ImageRef(id=img.id, jpeg=data)
            images.append(img)
        return request.model_copy(update={"images": images}), None

    def _finish(self, result: EngineResult) -> None:
        slot = self.inflight.pop(result.request_id, None)
        if slot is None:
            return
        result.engine_id = result.engine_id or self.engine_id
        self._send(result, slot)

    def _send(self, result: EngineResult, slot: _Inflight) -> None:
        try:
            sent = self.transport.reply(result, slot.reply_to, slot.delivery, self.cfg.reply_ttl_s)
        except REDIS_DOWN:
            self.unsent.append((result, slot))
            raise
        self.served += 1
        self.errors += int(not result.ok)
        if not sent:
            logger.info("request %s was already answered elsewhere; dropped the duplicate", result.request_id)

    def _flush_unsent(self) -> None:
        while self.unsent:
            result, slot = self.unsent.pop(0)
            self._send(result, slot)

    def _publish_health(self, ready: bool = True, force: bool = False) -> None:
        now = time.monotonic()
        if not force and ready and now - self._last_health < 1.0:
            return
        self._last_health = now
        detail = self.engine.health()
        health = EngineHealth(engine_id=self.engine_id, ready=ready, backend=self.engine.config.backend,
                              inflight=len(self.inflight), served=self.served, errors=self.errors,
                              mode=detail.get("mode"), merged_adapter=detail.get("merged_adapter"),
                              mode_switches=detail.get("mode_switches", 0),
                              switch_ms_total=detail.get("switch_ms_total", 0.0), detail=detail)
        METRICS.observe_engine(health)
        try:
            self.transport.engine_health_put(health, self.cfg.health_ttl_s)
            self.transport.engine_tick_add(EngineTick.from_health(health, gpu_memory_mb()))
        except REDIS_DOWN:
            if ready:
                raise


def gpu_memory_mb() -> float | None:
    """GPU memory this process has allocated, or None where CUDA was never initialised (CPU engines)."""
    import torch

    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def wait_for_engines(transport: Transport, count: int, timeout_s: float, stop_event: threading.Event | None = None
                     ) -> list[EngineHealth]:
    """Block until ``count`` ready engine replicas report health; TimeoutError after ``timeout_s``."""
    stop_event = stop_event or threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop_event.is_set():
        ready = [h for h in transport.engine_health_all() if h.ready]
        if len(ready) >= count:
            return ready
        stop_event.wait(0.2)
    raise TimeoutError(f"no ready engine service within {timeout_s:.0f} s (is `valora engine serve` running?)")


def build_engine(cfg: EngineConfig) -> EngineBackend:
    """The configured engine backend with the task heads saved beside its adapters; a missing model directory
    surfaces as FileNotFoundError naming it."""
    if not cfg.model.startswith("dummy:") and not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"no model at {cfg.model} (set --model / VALORA_ENGINE__MODEL)")
    if not Path(cfg.adapters).is_dir():
        raise FileNotFoundError(f"no adapter directory at {cfg.adapters} (set --adapters / VALORA_ENGINE__ADAPTERS)")
    return create_engine(cfg, heads=load_heads(cfg.adapters))
