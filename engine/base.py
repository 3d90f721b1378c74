"""The engine interface every backend implements, its registry, and `create_engine`."""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from engine.config import EngineConfig
from engine.heads import TaskHead
from engine.request import EngineRequest, EngineResult

TokenCallback = Callable[[str, str], None]  # (request_id, text delta)

BACKENDS: dict[str, type[EngineBackend]] = {}
# Where each backend lives; imported on demand so that one backend's dependencies never load another's.
BACKEND_MODULES = {"hf": "engine.hf_engine", "valora": "engine.engine"}


def register_backend(name: str):
    def deco(cls: type[EngineBackend]) -> type[EngineBackend]:
        BACKENDS[name] = cls
        return cls

    return deco


class EngineBackend(ABC):
    """An in-process engine: add requests, step until results come out."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.heads: dict[str, TaskHead] = {}

    def register_head(self, name: str, head: TaskHead) -> None:
        """Make a task head available to requests that name it."""
        self.heads[name] = head

    @abstractmethod
    def add_request(self, request: EngineRequest, on_token: TokenCallback | None = None) -> None:
        """Queue a request; invalid ones come back from step() as error results, never as exceptions."""

    @abstractmethod
    def step(self) -> list[EngineResult]:
        """Advance by one iteration; return the requests that finished.

        A backend may keep an iteration in flight across calls (the `valora` engine's overlapped decode), so a
        call can return nothing while work is queued: call it while ``has_unfinished()``.
        """

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any queued or running request, or an iteration still in flight, remains."""

    def health(self) -> dict[str, Any]:
        """Readiness and state for the health key and the dashboard."""
        return {"ready": True, "backend": self.config.backend}

    def close(self) -> None:
        """Release devices and threads."""
        self.heads.clear()

    def generate(self, requests: list[EngineRequest]) -> list[EngineResult]:
        """Run requests to completion; results come back in request order."""
        for req in requests:
            self.add_request(req)
        done: dict[str, EngineResult] = {}
        while self.has_unfinished():
            for res in self.step():
                done[res.request_id] = res
        return [done[r.request_id] for r in requests]


def error_result(request: EngineRequest, message: str, engine_id: str = "") -> EngineResult:
    """The result of a request that failed on its own bad input."""
    res = EngineResult(
        request_id=request.request_id, finish_reason="error", error=message, adapter=request.adapter,
        engine_id=engine_id, meta=request.meta,
    )
    res.timings.e2e_ms = max(0.0, (time.time() - request.created_at) * 1000.0)
    return res


def create_engine(config: EngineConfig, heads: dict[str, TaskHead] | None = None) -> EngineBackend:
    """Build the backend that ``config.backend`` names, with the given task heads registered."""
    if config.backend in BACKEND_MODULES:
        try:
            importlib.import_module(BACKEND_MODULES[config.backend])  # registers the backend
        except ModuleNotFoundError as exc:
            if exc.name != BACKEND_MODULES[config.backend]:
                raise
            raise ValueError(f"engine backend {config.backend!r} is not installed in this build") from None
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {config.backend!r}; available: {sorted(BACKENDS)}")
    engine = BACKENDS[config.backend](config)
    for name, head in (heads or {}).items():
        engine.register_head(name, head)
    return engine
