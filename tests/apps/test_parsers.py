"""Parser fuzzing: random, malformed, truncated, unicode and huge model outputs never make a parser raise."""

from __future__ import annotations

import json
import math
import random

import pytest

from apps.datasets.splits import iter_truths
from apps.tasks import TASKS, load_output
from engine.request import EngineResult

FORMAT_WORDS = ["car", "bus", "truck", "bicycle", "person", "none", "traffic light", "yes", "no", "red", "the"]
NUMBERS = ["0", "7", "42", "100", "101", "-3", "1.5", "99999999999999999999999", "1e309", "nan", "inf", "007", "٣"]
PUNCT = [";", ",", " ", "  ", "\n", ":", ".", "-", "[", "]", "{", "}", '"', "'", "\t", "\x00"]
UNICODE = ["é", "日本", "🚗", "\u202e", "\u0301", "\ufeff", "İ", "ß", "\ud800", "\udfff", "Ω", "\u2028"]


def _soup(rng: random.Random) -> str:
    """Text made of the format's own pieces in random order: the hardest near-misses for a parser."""
    pools = [FORMAT_WORDS, NUMBERS, PUNCT, UNICODE]
    weights = [4, 4, 4, 1]
    return "".join(rng.choice(rng.choices(pools, weights)[0]) for _ in range(rng.randint(0, 40)))


def _random_text(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 30)))
    if kind == 1:
        return "".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(0, 60)))
    return _soup(rng)


def _check(task, out) -> None:
    assert isinstance(out, task.output_type)
    assert isinstance(out.parse_error, bool) and len(out.raw) <= 2000
    assert load_output(out.model_dump_json()) == out  # serialisable, whatever came in
    boxes = [d.box for d in getattr(out, "detections", [])] + ([out.box] if getattr(out, "box", None) else [])
    for box in boxes:
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in box) and box[2] > box[0] and box[3] > box[1]
    for count in getattr(out, "counts", {}).values():
        assert isinstance(count, int) and 0 <= count <= 999


@pytest.mark.parametrize("name", list(TASKS))
def test_random_and_malformed_text_never_raises(name):
    task = TASKS[name]
    rng = random.Random(name)
    for _ in range(1500):
        _check(task, task.parse_text(_random_text(rng), "is there a car?"))


@pytest.mark.parametrize("name", list(TASKS))
def test_every_truncation_of_a_valid_answer_parses(name):
    task = TASKS[name]
    for truth in iter_truths("val", 40, seed=9):
        for item in task.items(truth):
            target = task.target_text(truth, item)
            for cut in range(len(target) + 1):
                out = task.parse_text(target[:cut], item)
                _check(task, out)
            assert not task.parse_text(target, item).parse_error


@pytest.mark.parametrize("name", list(TASKS))
def test_huge_and_degenerate_inputs(name):
    task = TASKS[name]
    cases = [
        "",
        " ",
        "\n\n",
        "none",
        "car " + "9" * 5000,
        "car 1 2 3 4; " * 20000,
        "1 " * 100000,
        ";" * 100000,
        "car 10 10 5 5",
        "car 10 10 10 20",
        "car -1 0 10 10",
        "car 0 0 101 50",
        "car 2, car 3, bus 1",
        "car nan, bus inf",
        "🚗 12 40 35 60",
        "\ud800 \udfff",
        "x" * 1_000_000,
    ]
    for text in cases:
        _check(task, task.parse_text(text))
    for bad in (None, 12, b"bytes", ["car 1"]):
        out = task.parse_text(bad)  # type: ignore[arg-type]
        _check(task, out)
        assert out.parse_error


def test_limits_and_non_ascii_digits():
    detection = TASKS["detection"]
    flood = detection.parse_text("; ".join(f"car {i % 50} 0 {i % 50 + 1} 10" for i in range(300)))
    assert flood.parse_error and len(flood.detections) == 100
    head = detection.parse_head(
        {"detections": [{"cls": "car", "box": [0, 0, 0.5, 0.5], "score": i / 300} for i in range(300)]}
    )
    assert head.parse_error and len(head.detections) == 100 and min(d.score for d in head.detections) == 200 / 300
    arabic = detection.parse_text("car ١ ٢ ٣ ٤")
    assert arabic.parse_error and arabic.detections == []
    assert TASKS["grounding"].parse_text("١٠ 10 20 30").parse_error


def _random_json(rng: random.Random, depth: int = 0):
    leaves = [None, True, False, 0, -1, 1.5, float("nan"), float("inf"), -float("inf"), 10**30, "car", "", "🚗", []]
    if depth > 3 or rng.random() < 0.4:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["detections", "counts", "cls", "box", "score", "car", "person", "bus", "truck", "bicycle", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


@pytest.mark.parametrize("name", list(TASKS))
def test_malformed_head_outputs_never_raise(name):
    task = TASKS[name]
    rng = random.Random(f"head-{name}")
    structured = [
        {"detections": [{"cls": "car", "box": [0.1, 0.1, 0.2, 0.2], "score": rng.choice([0.5, "high", None])}]},
        {"detections": [{"cls": "car", "box": [0.3, 0.1, 0.2, 0.2], "score": 0.9}]},
        {"detections": [{"cls": "car", "box": [0.1, 0.1, float("nan"), 0.2]}]},
        {"detections": [{"cls": 3, "box": [0.1, 0.1, 0.2, 0.2]}, "junk"]},
        {"counts": {"car": -2, "bus": 10**9, "truck": float("nan"), "bicycle": "3", "person": True}},
        {"counts": ["car", 1]},
        {"box": [0.1, 0.2, 0.3, "x"], "score": 0.5},
        {"box": [0.1, 0.2, 0.3, 0.4, 0.5]},
        {"box": {"x1": 0.1}},
        {"box": None, "score": 0.0},
        {"box": [0.5, 0.5, 0.4, 0.6], "score": 0.9},
    ]
    for _ in range(800):
        structured.append(_random_json(rng))
    for head_output in structured:
        result = EngineResult(request_id="r", head_output=head_output if isinstance(head_output, dict) else {"x": 1})
        _check(task, task.parse(result))
        _check(task, task.parse_head(head_output))  # type: ignore[arg-type]


def test_parse_tolerates_odd_result_meta():
    task = TASKS["vqa"]
    for meta in ({}, {"item": None}, {"item": 5}, {"item": "\ud800?"}, {"item": ["a"]}):
        out = task.parse(EngineResult(request_id="r", text="yes", meta=meta))
        _check(task, out)
        json.loads(out.model_dump_json())
