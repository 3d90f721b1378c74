"""Synthetic serving traces: arrivals, adapter popularity, a vision-task mix and length distributions, by seed.

    trace = generate(TraceConfig(rate=20, duration_s=60, skew=0.9, seed=1))   # hottest adapter gets 90%
    trace = generate(TraceConfig(rate=20, duration_s=60, zipf=1.1, arrival="gamma", burstiness=3))

Arrivals are Poisson, or bursty (Gamma inter-arrival times with coefficient of variation ``burstiness``).
Popularity: ``skew`` in [0, 1) gives the hottest adapter that share and splits the rest evenly; ``zipf``
gives adapter i a share proportional to 1 / i**zipf. The task mix covers decode-heavy VQA and captioning,
detection and counting answered by task heads (prefill only) and multi-frame video questions; prompt and output
lengths are drawn per task. The same config and seed always give the same trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """How one vision task's requests look."""

    prompt_tokens: tuple[int, int]  # text tokens, uniform in [lo, hi]
    output_mean: float  # generated tokens: a geometric-like (lognormal) draw around this mean; 0 = task head
    output_max: int
    frames: int  # pictures per request (video: several frames)
    slo_s: float  # latency target: the request's deadline is arrival + slo_s

    @property
    def head(self) -> bool:
        return self.output_mean == 0


TASKS: dict[str, TaskSpec] = {
    "vqa": TaskSpec(prompt_tokens=(12, 40), output_mean=24, output_max=96, frames=1, slo_s=5.0),
    "captioning": TaskSpec(prompt_tokens=(8, 16), output_mean=48, output_max=128, frames=1, slo_s=8.0),
    "detection": TaskSpec(prompt_tokens=(8, 16), output_mean=0, output_max=0, frames=1, slo_s=2.0),
    "counting": TaskSpec(prompt_tokens=(8, 24), output_mean=0, output_max=0, frames=1, slo_s=2.0),
    "video": TaskSpec(prompt_tokens=(16, 48), output_mean=32, output_max=96, frames=4, slo_s=10.0),
}
DEFAULT_MIX = {"vqa": 0.35, "captioning": 0.2, "detection": 0.15, "counting": 0.15, "video": 0.15}


@dataclass(frozen=True)
class TraceConfig:
    rate: float  # mean requests per second
    duration_s: float
    num_adapters: int = 32
    skew: float | None = 0.5  # share of the hottest adapter (ignored when zipf is set)
    zipf: float | None = None
    arrival: str = "poisson"  # or "gamma"
    burstiness: float = 2.0  # Gamma: coefficient of variation of inter-arrival times (1 = Poisson)
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    output_scale: float = 1.0  # multiplies every task's output lengths (short CPU runs)
    seed: int = 0


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace; ``arrival`` in seconds from the trace's start."""

    index: int
    arrival: float
    adapter: str
    task: str
    prompt_tokens: int  # text tokens (pictures add their own)
    frames: int
    output_tokens: int  # 0: answered by the task's head after prefill
    slo_s: float

    @property
    def head(self) -> bool:
        return self.output_tokens == 0


def adapter_names(count: int) -> list[str]:
    return [f"lora{i:02d}" for i in range(count)]


def popularity(cfg: TraceConfig) -> np.ndarray:
    """[num_adapters] request shares, hottest first."""
    n = cfg.num_adapters
    if cfg.zipf is not None:
        weights = 1.0 / np.arange(1, n + 1) ** cfg.zipf
        return weights / weights.sum()
    if cfg.skew is None or not 0.0 <= cfg.skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) (or set zipf), got {cfg.skew}")
    if n == 1:
        return np.ones(1)
    hot = max(cfg.skew, 1.0 / n)  # below 1/n the "hottest" adapter is just uniform
    return np.array([hot] + [(1.0 - hot) / (n - 1)] * (n - 1))


def arrivals(cfg: TraceConfig, rng: np.random.Generator) -> np.ndarray:
    """Sorted arrival times in [0, duration_s)."""
    if cfg.rate <= 0:
        raise ValueError(f"rate must be positive, got {cfg.rate}")
    expected = int(cfg.rate * cfg.duration_s * 1.5) + 16
    if cfg.arrival == "poisson":
        gaps = rng.exponential(1.0 / cfg.rate, expected)
    elif cfg.arrival == "gamma":
        shape = 1.0 / cfg.burstiness ** 2
        gaps = rng.gamma(shape, 1.0 / (cfg.rate * shape), expected)
    else:
        raise ValueError(f"arrival must be 'poisson' or 'gamma', got {cfg.arrival!r}")
    times = np.cumsum(gaps)
    while times[-1] < cfg.duration_s:  # rare: a long tail of gaps
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / cfg.rate, expected))])
    return times[times < cfg.duration_s]


def output_length(spec: TaskSpec, scale: float, rng: np.random.Generator) -> int:
    if spec.head:
        return 0
    mean = spec.output_mean * scale
    sigma = 0.6  # lognormal spread: most answers near the mean, a tail of long ones
    value = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma)
    return int(min(max(round(value), 1), max(1, round(spec.output_max * scale))))


def generate(cfg: TraceConfig) -> list[TraceRequest]:
    rng = np.random.default_rng(cfg.seed)
    names = adapter_names(cfg.num_adapters)
    shares = popularity(cfg)
    tasks = sorted(cfg.mix)
    mix = np.array([cfg.mix[t] for t in tasks], dtype=float)
    if (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"task mix needs non-negative weights with a positive sum, got {cfg.mix}")
    mix /= mix.sum()
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(TASKS)}")
    out = []
    for i, t in enumerate(arrivals(cfg, rng)):
        task = tasks[rng.choice(len(tasks), p=mix)]
        spec = TASKS[task]
        lo, hi = spec.prompt_tokens
        out.append(TraceRequest(
            index=i, arrival=float(t), adapter=names[rng.choice(len(names), p=shares)], task=task,
            prompt_tokens=int(rng.integers(lo, hi + 1)), frames=spec.frames,
            output_tokens=output_length(spec, cfg.output_scale, rng), slo_s=spec.slo_s,
        ))
    return out


def summary(trace: list[TraceRequest]) -> dict[str, float]:
    """A few numbers that describe a trace (for tables and sanity checks)."""
    if not trace:
        return {"requests": 0}
    adapters = np.unique([r.adapter for r in trace], return_counts=True)[1]
    return {"requests": len(trace), "duration_s": trace[-1].arrival,
            "hottest_share": float(adapters.max() / len(trace)), "adapters_used": int(len(adapters)),
            "head_share": float(np.mean([r.head for r in trace])),
            "mean_output_tokens": float(np.mean([r.output_tokens for r in trace]))}
