"""The five task modules: requests, target texts that round-trip through the parsers, heads and metrics."""

from __future__ import annotations

import pytest

from apps.datasets.schema import QA, FrameTruth, ObjectTruth, RefExpr
from apps.datasets.splits import iter_truths
from apps.tasks import TASKS, get_task, load_output
from apps.tasks.captioning import mentioned
from apps.tasks.metrics.boxes import GRID, normalise
from apps.tasks.output import CaptionOutput, CountingOutput, Detection, DetectionOutput, GroundingOutput, VQAOutput
from engine.request import EngineRequest, EngineResult, ImageRef

IMAGE = ImageRef(id="cam:1", jpeg=b"\xff\xd8")
HALF_CELL = 0.5 / GRID + 1e-9


@pytest.fixture(scope="module")
def truths() -> list[FrameTruth]:
    return list(iter_truths("test", 250, seed=2))


def _answer(task, truths, text_of) -> tuple[list, list]:
    """Run every request of every frame through a fake model that answers text_of(truth, item)."""
    outputs, targets = [], []
    for truth in truths:
        for request in task.requests(IMAGE, None, truth):
            result = EngineResult(request_id=request.request_id, text=text_of(truth, request.meta["item"]))
            outputs.append(task.parse(result, request))
            targets.append(truth)
    return outputs, targets


def test_registry_names_and_metadata():
    assert list(TASKS) == ["detection", "captioning", "vqa", "counting", "grounding"]
    assert get_task("vqa") is TASKS["vqa"]
    with pytest.raises(ValueError, match="known tasks"):
        get_task("segmentation")
    for name, task in TASKS.items():
        assert task.name == name and task.default_adapter == name
        assert task.primary_metric == task.metrics[0] and set(task.metric_labels) == set(task.metrics)
    assert TASKS["detection"].head == "detection-head" and TASKS["counting"].head == "counting-head"
    assert TASKS["grounding"].head == "grounding-head" and TASKS["vqa"].head is None


def test_requests_carry_adapter_prompt_image_and_item(truths):
    truth = next(t for t in truths if len(t.vqa) >= 3 and t.refs)
    (det,) = TASKS["detection"].requests(IMAGE, None, truth)
    assert (det.adapter, det.prompt, det.images, det.head) == ("detection", "detect objects", [IMAGE], None)
    assert det.sampling.max_tokens == TASKS["detection"].max_tokens and det.meta == {"task": "detection", "item": None}
    (head,) = TASKS["counting"].requests(IMAGE, {"use_head": True, "adapter": "fused-1"})
    assert (head.head, head.sampling.max_tokens, head.adapter) == ("counting-head", 0, "fused-1")
    (base,) = TASKS["captioning"].requests(IMAGE, {"adapter": None, "max_tokens": 5})
    assert base.adapter is None and base.sampling.max_tokens == 5
    asked = TASKS["vqa"].requests(IMAGE, None, truth)
    assert [r.meta["item"] for r in asked] == [qa.question for qa in truth.vqa]
    assert asked[0].prompt == f"question: {truth.vqa[0].question}"
    custom = TASKS["vqa"].requests(IMAGE, {"questions": ["is it raining?"]}, truth)
    assert [r.prompt for r in custom] == ["question: is it raining?"]
    located = TASKS["grounding"].requests(IMAGE, {"expressions": ["the red car", "the bus"]})
    assert [r.prompt for r in located] == ["locate: the red car", "locate: the bus"]
    assert TASKS["vqa"].requests(IMAGE, None, None) == [] and TASKS["grounding"].requests(IMAGE) == []


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("detection", {"fps": 2}, "unknown detection parameter"),
        ("vqa", {"use_head": True}, "unknown vqa parameter"),
        ("vqa", {"questions": "what?"}, "questions must be"),
        ("grounding", {"expressions": ["", "x"]}, "expressions must be"),
        ("counting", {"max_tokens": 0}, "max_tokens"),
        ("counting", {"max_tokens": True}, "max_tokens"),
        ("counting", {"use_head": "yes"}, "use_head"),
        ("captioning", {"adapter": ""}, "adapter"),
    ],
)
def test_bad_params_are_rejected_with_a_clear_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        TASKS[name].requests(IMAGE, params)


def test_detection_round_trip_recovers_classes_and_boxes(truths):
    task = TASKS["detection"]
    for truth in truths:
        out = task.parse_text(task.target_text(truth))
        assert not out.parse_error
        assert sorted(d.cls for d in out.detections) == sorted(o.cls for o in truth.objects)
        unused = list(out.detections)
        for obj in truth.objects:
            # Rounding to the grid moves a side by at most half a cell (one cell for the minimum-size rule).
            box = normalise(obj.box, truth.width, truth.height)
            near = lambda d: d.cls == obj.cls and d.box == pytest.approx(box, abs=HALF_CELL + 1 / GRID)  # noqa: B023
            unused.remove(next(d for d in unused if near(d)))
    assert task.target_text(FrameTruth(frame=0, width=10, height=10)) == "none"


def test_counting_captioning_vqa_grounding_round_trip(truths):
    for name in ("counting", "captioning", "vqa", "grounding"):
        task = TASKS[name]
        outputs, targets = _answer(task, truths, task.target_text)
        assert outputs and not any(o.parse_error for o in outputs), name
        for out, truth in zip(outputs, targets, strict=True):
            if name == "counting":
                assert out.counts == truth.counts
            elif name == "captioning":
                assert out.caption == truth.caption
            elif name == "vqa":
                assert out.answer == truth.answer_to(out.item)
            else:
                ref = truth.ref_for(out.item)
                assert out.box == pytest.approx(normalise(ref.box, truth.width, truth.height), abs=HALF_CELL + 1 / GRID)


def test_perfect_predictions_score_100_and_empty_ones_0(truths):
    busy = [t for t in truths if t.objects]
    for name, task in TASKS.items():
        outputs, targets = _answer(task, busy, task.target_text)
        scores = task.evaluate(outputs, targets)
        assert list(scores) == list(task.metrics)
        assert scores[task.primary_metric] == pytest.approx(100.0), (name, scores)
        empty = [task.output_type(item=o.item) for o in outputs]
        zero = task.evaluate(empty, targets)
        if name == "counting":
            assert zero["accuracy"] == 0.0 and zero["mae"] > 0
        else:
            assert all(v == 0.0 for v in zero.values()), (name, zero)
    caption = TASKS["captioning"].evaluate(*_answer(TASKS["captioning"], busy, TASKS["captioning"].target_text))
    assert caption == pytest.approx({"cider_d": 100.0, "bleu4": 100.0, "object_recall": 100.0})


def test_grid_text_costs_some_map_at_strict_iou_but_exact_head_boxes_score_100(truths):
    detection = TASKS["detection"]
    text, targets = _answer(detection, truths, detection.target_text)
    strict = detection.evaluate(text, targets)["map50_95"]
    assert 80.0 < strict < 100.0  # quantisation to the 0-100 grid costs at IoU 0.9-0.95
    heads = [detection.parse_head(detection.head_target(t)) for t in truths]
    assert detection.evaluate(heads, truths) == pytest.approx({"map50": 100.0, "map50_95": 100.0})
    counting = TASKS["counting"]
    heads = [counting.parse_head(counting.head_target(t)) for t in truths]
    assert not any(h.parse_error for h in heads) and counting.evaluate(heads, truths) == {"accuracy": 100.0, "mae": 0.0}


def test_exact_grounding_head_boxes_score_100_and_bad_boxes_are_parse_errors(truths):
    grounding = TASKS["grounding"]
    pairs = [(t, ref.expr) for t in truths for ref in t.refs]
    heads = [grounding.parse(EngineResult(request_id="r", head_output=grounding.head_target(t, e),
                                          meta={"item": e})) for t, e in pairs]
    assert pairs and not any(h.parse_error for h in heads) and all(h.source == "head" for h in heads)
    assert grounding.evaluate(heads, [t for t, _ in pairs]) == {"acc50": 100.0}
    with pytest.raises(ValueError, match="no referring expression"):
        grounding.head_target(truths[0], "the purple horse")
    assert grounding.parse_head({"box": [0.5, 0.5, 0.4, 0.6]}).parse_error
    assert grounding.parse_head({"box": None, "score": 0.0}).parse_error


def _frame(objects: list[tuple[str, str, list[float]]], **extra) -> FrameTruth:
    objs = [ObjectTruth(track_id=i, cls=c, color=col, box=b) for i, (c, col, b) in enumerate(objects, 1)]
    counts = {c: sum(o.cls == c for o in objs) for c in ("car", "bus", "truck", "bicycle", "person")}
    return FrameTruth(frame=0, width=200, height=100, objects=objs, counts=counts, **extra)


def test_counting_metrics_by_hand():
    task = TASKS["counting"]
    truth = _frame([("car", "red", [0, 0, 10, 10]), ("car", "red", [20, 0, 30, 10]), ("bus", "blue", [40, 0, 90, 30])])
    out = task.parse_text("car 3, bus 1, truck 0, bicycle 0, person 2")
    # Per class: car 3 vs 2 (wrong, 1), bus right, truck right, bicycle right, person 2 vs 0 (wrong, 2).
    assert task.evaluate([out], [truth]) == pytest.approx({"accuracy": 60.0, "mae": 0.6})
    partial = task.parse_text("car 2, bus 1")
    assert partial.parse_error and partial.counts == {"car": 2, "bus": 1}
    # Missing classes are wrong even where the truth is 0; for the MAE they count as 0.
    assert task.evaluate([partial], [truth]) == pytest.approx({"accuracy": 40.0, "mae": 0.0})


def test_grounding_iou_threshold_by_hand():
    task = TASKS["grounding"]
    ref = RefExpr(expr="the red car", track_id=1, box=[0, 0, 100, 50])
    truth = _frame([("car", "red", [0, 0, 100, 50])], refs=[ref])
    # Target is [0, 0, .5, .5] normalised. A box covering half of it: IoU 0.5 -> hit; a bit less -> miss.
    hit = GroundingOutput(item="the red car", box=[0.0, 0.0, 0.25, 0.5])
    miss = GroundingOutput(item="the red car", box=[0.0, 0.0, 0.24, 0.5])
    assert task.score_frame(hit, truth) == {"acc50": 100.0} and task.score_frame(miss, truth) == {"acc50": 0.0}
    assert task.score_frame(GroundingOutput(item="the bus", box=[0, 0, 1, 1]), truth) is None
    assert task.evaluate([hit, miss, GroundingOutput(item="the bus")], [truth] * 3) == {"acc50": 50.0}


def test_vqa_exact_match_is_normalised():
    task = TASKS["vqa"]
    truth = _frame([], vqa=[QA(question="how many cars are there?", answer="2")])
    q = "how many cars are there?"
    assert task.score_frame(task.parse(EngineResult(request_id="r", text=" Two.\nmore", meta={"item": q})), truth) == {
        "exact_match": 100.0
    }
    assert task.score_frame(VQAOutput(item=q, answer="3"), truth) == {"exact_match": 0.0}
    assert task.score_frame(VQAOutput(item="is it sunny?", answer="yes"), truth) is None


def test_caption_object_recall_by_hand():
    truth = _frame(
        [("car", "red", [0, 0, 10, 10]), ("car", "red", [20, 0, 30, 10]), ("car", "blue", [40, 0, 50, 10])]
        + [("person", "white", [60, 0, 65, 20])]
    )
    assert mentioned("two red cars, a bus and 3 people in white") == {"car": 2, "bus": 1, "person": 3}
    out = CaptionOutput(caption="two red cars and a bus on the street")
    assert TASKS["captioning"].evaluate([out], [truth])["object_recall"] == pytest.approx(50.0)


def test_detection_text_scores_like_the_same_head_boxes():
    task = TASKS["detection"]
    truth = _frame([("car", "red", [0, 0, 100, 50]), ("person", "red", [150, 20, 160, 80])])
    text = task.parse_text("car 0 0 50 50; person 75 20 80 80; bus 10 10 20 20")
    head = task.parse_head({"detections": [{"cls": d.cls, "box": d.box, "score": d.score} for d in text.detections]})
    assert text.detections == head.detections and head.source == "head"
    assert task.evaluate([text], [truth]) == task.evaluate([head], [truth])
    assert task.evaluate([text], [truth]) == pytest.approx({"map50": 100.0, "map50_95": 100.0})


def test_failed_engine_results_and_head_results_are_routed():
    task = TASKS["counting"]
    request = task.requests(IMAGE, {"use_head": True})[0]
    failed = task.parse(EngineResult(request_id=request.request_id, error="oom"), request)
    assert failed.parse_error and failed.counts == {}
    counts = {"car": 1.0, "bus": 0, "truck": 0, "bicycle": 0, "person": 2}
    head = task.parse(EngineResult(request_id="r", head_output={"counts": counts}), request)
    assert not head.parse_error and head.source == "head" and head.counts["person"] == 2
    no_head = TASKS["vqa"].parse(EngineResult(request_id="r", head_output={"answer": "yes"}))
    assert no_head.parse_error and no_head.source == "head"


def test_outputs_survive_a_json_round_trip():
    outputs = [
        DetectionOutput(detections=[Detection(cls="car", box=[0.1, 0.2, 0.3, 0.4], score=0.5)], raw="x"),
        CountingOutput(counts={"car": 1}, parse_error=True),
        CaptionOutput(caption="a car"),
        VQAOutput(item="is there a car?", answer="yes"),
        GroundingOutput(item="the car", box=None, parse_error=True),
    ]
    for out in outputs:
        assert load_output(out.model_dump_json()) == out
        assert load_output(out.model_dump()) == out


def test_evaluate_rejects_mismatched_inputs():
    task = TASKS["detection"]
    with pytest.raises(ValueError, match="outputs for"):
        task.evaluate([DetectionOutput()], [])
    with pytest.raises(ValueError, match="cannot score"):
        task.evaluate([VQAOutput()], [_frame([])])


def test_training_pairs_cover_every_item(truths):
    truth = next(t for t in truths if len(t.vqa) == 4 and len(t.refs) >= 2)
    pairs = TASKS["vqa"].training_pairs(truth)
    assert pairs == [(f"question: {qa.question}", qa.answer) for qa in truth.vqa]
    assert TASKS["detection"].training_pairs(truth) == [("detect objects", TASKS["detection"].target_text(truth))]
    assert len(TASKS["grounding"].training_pairs(truth)) == len(truth.refs)
    with pytest.raises(ValueError, match="no answer"):
        TASKS["vqa"].target_text(truth, "is it raining?")
    assert isinstance(TASKS["vqa"].requests(IMAGE, None, truth)[0], EngineRequest)
