"""bench/traces.py, which the policy simulations and bench/serving.py replay: determinism and its distributions."""

from __future__ import annotations

import numpy as np
import pytest

from bench.traces import TASKS, TraceConfig, generate, popularity, summary


def test_same_seed_same_trace_and_another_seed_differs():
    cfg = TraceConfig(rate=50, duration_s=20, skew=0.7, seed=3)
    assert generate(cfg) == generate(cfg)
    assert generate(cfg) != generate(TraceConfig(rate=50, duration_s=20, skew=0.7, seed=4))


@pytest.mark.parametrize("skew", [0.1, 0.5, 0.9])
def test_hottest_adapter_gets_the_skew_share(skew):
    trace = generate(TraceConfig(rate=200, duration_s=50, skew=skew, seed=1))
    share = summary(trace)["hottest_share"]
    assert abs(share - max(skew, 1 / 32)) < 0.02 + (0.02 if skew < 0.2 else 0), share


def test_zipf_popularity_decays_by_rank():
    shares = popularity(TraceConfig(rate=1, duration_s=1, zipf=1.2))
    assert np.isclose(shares.sum(), 1) and np.all(np.diff(shares) < 0)
    assert np.isclose(shares[0] / shares[1], 2 ** 1.2)


def test_rates_and_burstiness():
    poisson = generate(TraceConfig(rate=100, duration_s=100, seed=2))
    bursty = generate(TraceConfig(rate=100, duration_s=100, arrival="gamma", burstiness=3.0, seed=2))
    for trace in (poisson, bursty):
        assert abs(len(trace) / 100 - 100) < 10
    cv = lambda t: np.std(np.diff([r.arrival for r in t])) / np.mean(np.diff([r.arrival for r in t]))  # noqa: E731
    assert abs(cv(poisson) - 1.0) < 0.1 and abs(cv(bursty) - 3.0) < 0.6


def test_task_mix_and_lengths():
    trace = generate(TraceConfig(rate=200, duration_s=30, seed=5))
    for task, spec in TASKS.items():
        rows = [r for r in trace if r.task == task]
        assert rows, task
        assert all(r.head == spec.head and r.frames == spec.frames for r in rows)
        assert all(spec.prompt_tokens[0] <= r.prompt_tokens <= spec.prompt_tokens[1] for r in rows)
        if not spec.head:
            outs = [r.output_tokens for r in rows]
            assert max(outs) <= spec.output_max and abs(np.mean(outs) - spec.output_mean) < 0.25 * spec.output_mean
    assert abs(np.mean([r.head for r in trace]) - 0.3) < 0.05, "detection + counting are 30% of the default mix"
    with pytest.raises(ValueError, match="skew"):
        generate(TraceConfig(rate=1, duration_s=1, skew=1.0))
