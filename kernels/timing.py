"""GPU timing for tuning and benchmarks: CUDA-graph replay with the L2 flushed before each replay.

``graph_time_us(fn)`` captures ``fn`` (one or more launches) in a CUDA graph, then for each repetition flushes the
L2 (a 256 MiB write), records a start event, replays the graph and records an end event; it returns the median in
microseconds. The flush is long enough that the host has queued the events and the replay before the GPU reaches
them, so the time is the graph's device time, launch gaps between its kernels included.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

FLUSH_BYTES = 256 << 20


class Timer:
    """Reusable graph timer on the current CUDA device (owns the flush buffer)."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.flush_buffer = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)

    def flush(self) -> None:
        self.flush_buffer.fill_(0)

    def graph_time_us(self, fn: Callable[[], None], reps: int = 25, warmup: int = 2, flush: bool = True) -> float:
        """Median device time of one replay of ``fn``'s launches, in microseconds."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # compiles, autotunes allocator pools, loads modules outside the capture
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (an engine's adapter loaders) may pin host memory meanwhile
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            fn()
        return self.replay_time_us(graph.replay, reps, flush)

    def replay_time_us(self, launch: Callable[[], None], reps: int = 25, flush: bool = True) -> float:
        """Median device time of ``launch`` (eager launches or a graph replay), in microseconds."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        launch()
        for start, end in zip(starts, ends, strict=True):
            if flush:
                self.flush()
            start.record()
            launch()
            end.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True))


def copy_bandwidth(timer: Timer, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 1 << 30, (nbytes // 4,), dtype=torch.int32, device=timer.device)
    dst = torch.empty_like(src)
    us = timer.replay_time_us(lambda: dst.copy_(src), reps=10, flush=False)
    return 2 * nbytes / (us * 1e-6)


def matmul_rate(timer: Timer, n: int = 8192) -> float:
    """bf16 matrix product rate in FLOP/s on random data."""
    a = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    us = timer.replay_time_us(lambda: torch.mm(a, b), reps=10, flush=False)
    return 2 * n**3 / (us * 1e-6)
