"""How workers reach an engine: the Redis engine service, or an engine running in this process; both give futures."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future

from engine.base import EngineBackend, error_result
from engine.request import EngineRequest, EngineResult
from pipeline.transport import REDIS_DOWN, Keys, Transport

logger = logging.getLogger(__name__)


class EngineClient(ABC):
    """Submit requests, get futures of their results."""

    # Whether pictures must travel inline (no engine service is there to resolve Redis keys).
    inline_images = False

    @abstractmethod
    def submit(self, request: EngineRequest) -> Future[EngineResult]:
        """Send one request; the future resolves with its result."""

    @abstractmethod
    def close(self) -> None:
        """Stop background threads; unresolved futures are cancelled."""


class ServiceClient(EngineClient):
    """Talks to `valora engine serve` replicas: requests go to valora:engine:requests, replies to our own stream."""

    def __init__(self, transport: Transport, requests_maxlen: int = 100_000, client_id: str | None = None) -> None:
        self.transport = transport
        self.requests_maxlen = requests_maxlen
        self.client_id = client_id or uuid.uuid4().hex[:12]
        self.reply_to = Keys.replies(self.client_id)
        self.pending: dict[str, Future[EngineResult]] = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.last_id = self.transport.replies_last_id(self.client_id)
        self.thread = threading.Thread(target=self._read_replies, name=f"replies-{self.client_id}", daemon=True)
        self.thread.start()

    def submit(self, request: EngineRequest) -> Future[EngineResult]:
        request = request.model_copy(update={"reply_to": self.reply_to})
        future: Future[EngineResult] = Future()
        with self.lock:
            self.pending[request.request_id] = future
        try:
            self.transport.submit_request(request, self.requests_maxlen)
        except BaseException:
            with self.lock:
                self.pending.pop(request.request_id, None)
            raise
        return future

    def forget(self, request_id: str) -> None:
        """Stop waiting for a request (its caller gave up); a late reply is dropped."""
        with self.lock:
            self.pending.pop(request_id, None)

    def _read_replies(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.last_id, results = self.transport.read_replies(self.client_id, self.last_id, block_ms=500)
            except REDIS_DOWN as exc:
                logger.warning("reply stream unavailable (%s); retrying", exc)
                self.transport.wait_until_up(self.stop_event)
                continue
            for result in results:
                with self.lock:
                    future = self.pending.pop(result.request_id, None)
                if future is not None:
                    future.set_result(result)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(5)
        with self.lock:
            for future in self.pending.values():
                future.cancel()
            self.pending.clear()
        try:
            self.transport.delete_replies(self.client_id)
        except REDIS_DOWN:
            logger.debug("could not delete reply stream %s", self.reply_to)


class LocalClient(EngineClient):
    """An engine stepped by a thread of this process (tests, benchmarks, single-process demos)."""

    inline_images = True

    def __init__(self, engine: EngineBackend) -> None:
        self.engine = engine
        self.inbox: queue.Queue[tuple[EngineRequest, Future[EngineResult]]] = queue.Queue()
        self.pending: dict[str, Future[EngineResult]] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="local-engine", daemon=True)
        self.thread.start()

    def submit(self, request: EngineRequest) -> Future[EngineResult]:
        future: Future[EngineResult] = Future()
        self.inbox.put((request, future))
        return future

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self._admit(block=not self.engine.has_unfinished())
            if not self.engine.has_unfinished():
                continue
            try:
                results = self.engine.step()
            except Exception as exc:  # an engine bug fails the requests in flight, not the process
                logger.exception("engine step failed")
                for request_id, future in self.pending.items():
                    future.set_result(error_result(EngineRequest(request_id=request_id, prompt=""), str(exc)))
                self.pending.clear()
                continue
            for result in results:
                future = self.pending.pop(result.request_id, None)
                if future is not None:
                    future.set_result(result)

    def _admit(self, block: bool) -> None:
        while True:
            try:
                request, future = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            self.pending[request.request_id] = future
            self.engine.add_request(request)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        for future in self.pending.values():
            future.cancel()
