"""Kernel launches that a start-up can turn into compiles, so that many variants compile at once.

Triton compiles a kernel variant in the thread that first launches it, one after another: a 7B's precompile walk
(kernels/precompile.py) spent ~80 s compiling 144 variants on an H200 host with an empty cache. ``compile_ahead(run)``
calls ``run`` twice. In the first pass every launch made through ``launch`` becomes a ``warmup`` (compile, launch
nothing) whose compile Triton's ``AsyncCompileMode`` hands to a thread pool; Triton's compiler passes release the
GIL, so they overlap (144 variants in ~17 s with 8 threads, bench/RESULTS.md, Kernels, fifteenth session). The
second pass is the walk as it always ran: each launch now finds its variant compiled. Where the first pass cannot
run (Triton without ``AsyncCompileMode``, the interpreter, one worker) or fails, only the second runs.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TypeVar

import triton

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_WORKERS = 8  # compile threads by default (at most one per CPU core)

_ahead: ContextVar[bool] = ContextVar("valora_compile_ahead", default=False)


def launch(kernel, grid: tuple[int, ...]) -> Callable:
    """``kernel[grid]``; inside ``compile_ahead``'s first pass, ``kernel.warmup`` at that grid instead."""
    if _ahead.get():
        return functools.partial(kernel.warmup, grid=grid)
    return kernel[grid]


def compiling_ahead() -> bool:
    """True inside ``compile_ahead``'s first pass, where launches through ``launch`` only compile."""
    return _ahead.get()


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def can_compile_ahead(workers: int) -> bool:
    """Whether ``compile_ahead`` will run its parallel first pass with this many workers."""
    return (workers > 1 and hasattr(triton, "AsyncCompileMode")
            and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


def compile_ahead(run: Callable[[], T], workers: int | None = None) -> T:
    """Semantics: run() with its launches' variants compiled first, in ``workers`` threads; returns the second
    run()'s result. ``run`` must be safe to call twice; in the first pass it sees ``compiling_ahead()`` true and
    should not record anything as launched. workers: None = one per CPU core, up to MAX_WORKERS."""
    workers = default_workers() if workers is None else workers
    if can_compile_ahead(workers):
        token = _ahead.set(True)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool, \
                    triton.AsyncCompileMode(pool):
                run()
        except Exception:  # the second pass compiles what is left in this thread, and raises where it must
            logger.warning("parallel kernel compile failed; compiling one variant at a time", exc_info=True)
        finally:
            _ahead.reset(token)
    return run()
