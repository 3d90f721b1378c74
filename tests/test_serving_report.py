"""bench/serving_report.py: repeated runs of a point are averaged, with their range, and compared on the mean."""

from __future__ import annotations

import pytest

from bench.serving_report import comparisons, table


def run(policy: str, avg: float, p95: float, unfinished: int = 0) -> dict:
    return {"load": 0.5, "skew": 0.9, "rate": 10.0, "policy": policy, "avg_ms": avg, "p95_ms": p95,
            "throughput_rps": 9.0, "unfinished": unfinished}


def test_repeats_are_averaged_and_their_range_shown():
    runs = [run("valora", 400, 900), run("slora", 800, 1500), run("valora", 600, 1100, unfinished=1),
            run("slora", 1000, 1700), run("dlora", 1200, 2000)]
    [point] = comparisons(runs)
    assert point["valora_avg_ms"] == pytest.approx(500)
    assert point["reduction_vs_slora"] == pytest.approx(1 - 500 / 900)
    assert point["reduction_vs_dlora"] == pytest.approx(1 - 500 / 1200)
    assert point["best_baseline"] == "slora"
    text = table(runs, ["valora", "slora", "dlora"])
    assert "500 [400-600] / 1000 (9.0)*" in text  # mean, range, mean p95; one repeat left requests unfinished
    assert "1200 / 2000 (9.0)" in text  # a single run shows no range
