"""Task heads: the assignment solver against brute force, head shapes and losses, save/load, and zero decode
tokens through the hf engine."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from apps.model.assignment import assignment
from apps.model.heads import BoxHead, CountingHead, box_cxcywh, box_xyxy, generalized_iou, load_heads, save_head
from apps.tasks import get_task


def brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 6), (6, 6)])
def test_assignment_is_optimal_and_one_to_one(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.normal(size=shape).round(2) * rng.choice([1, 10])
        pairs = assignment(cost.tolist())
        rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
        assert len(pairs) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(brute_force(cost))


def test_assignment_edge_cases():
    assert assignment([]) == []
    assert assignment([[1.0, 0.0], [0.0, 1.0]]) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="rectangular"):
        assignment([[1.0, 2.0], [3.0]])


def test_box_conversions_and_giou():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(box_xyxy(box_cxcywh(xyxy)), xyxy)
    giou = generalized_iou(xyxy, xyxy)
    assert torch.allclose(torch.diagonal(giou), torch.ones(2))
    far = generalized_iou(torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 1.0, 1.0]]))
    assert -1.0 < far.item() < 0.0


def test_counting_head_shapes_decode_and_loss():
    head = CountingHead(32, max_count=4)
    out = head(torch.randn(3, 1, 32))
    assert out.shape == (3, 5, 5)
    answer = head.decode(out[0])
    assert set(answer["counts"]) == {"car", "bus", "truck", "bicycle", "person"}
    parsed = get_task("counting").parse_head(answer)
    assert not parsed.parse_error
    target = head.target({"counts": {"car": 2, "person": 9}})
    assert target.tolist() == [2, 0, 0, 0, 4]  # clamped to max_count
    loss = head.loss(out, [target] * 3)
    assert loss.item() > 0 and torch.isfinite(loss)


def _perfect_box_output(head: BoxHead, labels: list[int], boxes: list[list[float]]) -> torch.Tensor:
    """Raw head output that predicts exactly these objects in the first queries and no-object elsewhere."""
    n_cls = len(head.classes)
    out = torch.zeros(head.queries, n_cls + 5)
    out[:, n_cls] = 20.0  # no-object
    out[:, n_cls + 1 :] = torch.tensor([0.5, 0.5, 0.2, 0.2])
    for q, (label, box) in enumerate(zip(labels, boxes, strict=True)):
        out[q, n_cls] = 0.0
        out[q, label] = 20.0
        out[q, n_cls + 1 :] = box_cxcywh(torch.tensor(box))
    return out


def test_box_head_shapes_decode_and_matching_loss():
    head = BoxHead(32, rows=2, cols=3, tail=3)
    assert head.positions == 9 and head.queries == 6
    assert torch.allclose(torch.sigmoid(head.anchors[4]), torch.tensor([0.5, 0.75]))  # row 1, column 1
    out = head(torch.randn(2, 9, 32))
    assert out.shape == (2, 6, 10) and (out[..., 6:] >= 0).all() and (out[..., 6:] <= 1).all()
    truth = {"detections": [{"cls": "bus", "box": [0.1, 0.2, 0.4, 0.5], "score": 1.0},
                            {"cls": "person", "box": [0.6, 0.1, 0.7, 0.4], "score": 1.0}]}
    labels, boxes = head.target(truth)
    assert labels.tolist() == [1, 4] and boxes.shape == (2, 4)
    perfect = _perfect_box_output(head, [4, 1], [[0.6, 0.1, 0.7, 0.4], [0.1, 0.2, 0.4, 0.5]])  # queries swapped
    swapped = _perfect_box_output(head, [1, 4], [[0.6, 0.1, 0.7, 0.4], [0.1, 0.2, 0.4, 0.5]])  # wrong classes
    good = head.loss(perfect[None], [(labels, boxes)]).item()
    bad = head.loss(swapped[None], [(labels, boxes)]).item()
    assert good < 0.01 < bad  # matching finds the right queries whatever their order
    decoded = head.decode(perfect)
    assert [d["cls"] for d in decoded["detections"]] == ["person", "bus"]
    task = get_task("detection")
    from apps.datasets.schema import FrameTruth, ObjectTruth

    frame = FrameTruth(frame=0, width=100, height=100, objects=[
        ObjectTruth(track_id=1, cls="bus", color="red", box=[10, 20, 40, 50]),
        ObjectTruth(track_id=2, cls="person", color="red", box=[60, 10, 70, 40])])
    parsed = task.parse_head(decoded)
    assert not parsed.parse_error and task.evaluate([parsed], [frame])["map50"] == pytest.approx(100.0)
    empty = head.loss(out, [(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))] * 2)
    assert torch.isfinite(empty)


def test_heads_save_and_load(tmp_path):
    heads = {"counting-head": CountingHead(16, adapter="a"), "detection-head": BoxHead(16, 2, 2, 2, adapter="a")}
    for name, head in heads.items():
        save_head(tmp_path / "a", name, head)
    loaded = load_heads(tmp_path)
    assert set(loaded) == set(heads)
    hidden = torch.randn(6, 16)
    for name, head in heads.items():
        assert loaded[name].adapter == "a" and loaded[name].positions == head.positions
        assert torch.allclose(loaded[name](hidden[-head.positions :]), head(hidden[-head.positions :]), atol=1e-2)
    save_head(tmp_path / "b", "counting-head", CountingHead(16, adapter="b"))
    with pytest.raises(ValueError, match="two adapters"):
        load_heads(tmp_path)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A random tiny base with one adapter ("tiny": counting, detection) trained a few steps with its heads."""
    from apps.model import tiny
    from apps.model.frames import FrameSet
    from apps.model.recipes import AdapterRecipe
    from apps.model.train import train_adapter

    root = tmp_path_factory.mktemp("heads")
    tiny.small_base(root / "base", frames=50)
    recipe = AdapterRecipe(tasks=("counting", "detection"), rank=4, steps=3, batch_size=4)
    train_adapter(root / "base", recipe, FrameSet("train", 8), root / "adapters" / "tiny", "tiny")
    return root


def test_heads_decode_zero_tokens_through_the_hf_engine(trained_tiny):
    """The engine's head path answers after one prefill, exactly as the batched evaluator does."""
    from peft import PeftModel

    from apps.model.encoding import Encoder
    from apps.model.evaluate import Evaluator, task_items
    from apps.model.frames import FrameSet
    from apps.model.train import load_base
    from engine.base import create_engine
    from engine.config import EngineConfig
    from engine.request import ImageRef

    root = trained_tiny
    heads = load_heads(root / "adapters")
    box = heads["detection-head"]
    assert set(heads) == {"counting-head", "detection-head"} and (box.rows, box.cols) == (4, 4)  # 112 px: 4 x 4
    engine = create_engine(EngineConfig(backend="hf", model=str(root / "base"), adapters=str(root / "adapters"),
                                        device="cpu"), heads=heads)
    model, tokenizer, processor = load_base(root / "base")
    model = PeftModel.from_pretrained(model, root / "adapters" / "tiny", adapter_name="tiny").eval()
    evaluator = Evaluator(model, Encoder(tokenizer, processor))
    frames = FrameSet("val", 2)
    for task_name in ("counting", "detection"):
        task = get_task(task_name)
        requests = [task.requests(ImageRef(id=f"f{i}", jpeg=_jpeg(frames.images[i])),
                                  {"adapter": "tiny", "use_head": True})[0] for i in range(2)]
        results = engine.generate(requests)
        for res in results:
            assert res.ok, res.error
            assert res.output_tokens == 0 and res.finish_reason == "head" and res.text == ""
            assert not task.parse(res).parse_error
        direct = evaluator.heads(task_items(task, frames), frames, heads[task.head])
        if task_name == "counting":
            assert [r.head_output for r in results] == direct
        else:
            for res, ans in zip(results, direct, strict=True):
                # An untrained head scores its queries almost alike, so compare them in box order.
                got, want = (sorted(r["detections"], key=lambda d: d["box"]) for r in (res.head_output, ans))
                assert [d["cls"] for d in got] == [d["cls"] for d in want]
                assert np.allclose([d["box"] for d in got], [d["box"] for d in want], atol=1e-3)
                assert np.allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-3)
