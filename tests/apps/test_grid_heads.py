"""Grid heads: the one-stage detector and the referring-expression locator (shapes, assignment, decoding,
losses, a tiny batch learned by heart, and answers the task parsers flag rather than raise on)."""

from __future__ import annotations

import pytest
import torch

from apps.datasets.schema import FrameTruth, ObjectTruth
from apps.model.grid_heads import GridBoxHead, GroundingHead, box_cxcywh, box_xyxy, nms, paired_giou
from apps.tasks import get_task

TRUTH = {"detections": [{"cls": "bus", "box": [0.1, 0.2, 0.4, 0.5], "score": 1.0},
                        {"cls": "person", "box": [0.6, 0.1, 0.7, 0.4], "score": 1.0}]}
FRAME = FrameTruth(frame=0, width=100, height=100, objects=[
    ObjectTruth(track_id=1, cls="bus", color="red", box=[10, 20, 40, 50]),
    ObjectTruth(track_id=2, cls="person", color="red", box=[60, 10, 70, 40])])


def test_geometry():
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(box_xyxy(box_cxcywh(xyxy)), xyxy)
    assert torch.allclose(paired_giou(xyxy, xyxy), torch.ones(2))
    far = paired_giou(torch.tensor([[0.0, 0.0, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 1.0, 1.0]]))
    assert -1.0 < far.item() < 0.0
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9]])
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.1]), 0.5) == [1, 2]


def test_grid_box_head_shapes_assignment_and_decoding():
    head = GridBoxHead(32, rows=2, cols=3, tail=3)
    assert head.positions == 9 and head.cells == 6
    out = head(torch.randn(2, 9, 32))
    assert out.shape == (2, 6, 9) and (out[..., 7:] > 0).all() and (out[..., 7:] < 1).all()
    assert (out[..., 5:7] - head.centres).abs().max() <= 0.5  # 1.5 cells of 1/3 x 1/2 at most
    assert head(torch.randn(9, 32)).shape == (6, 9)  # one request, as the engine passes it
    labels, boxes = head.target(TRUTH)
    assert labels.tolist() == [1, 4] and boxes.shape == (2, 4)
    cls, true = head.assign(labels, boxes)
    # bus centre (0.25, 0.35): row 0, column 0; person centre (0.65, 0.25): row 0, column 1.
    assert cls.tolist() == [1, 4, -1, -1, -1, -1] and torch.allclose(true[1], boxes[1])
    perfect = torch.full((6, 9), -20.0)
    perfect[:, 5:] = torch.tensor([0.5, 0.5, 0.1, 0.1])
    for cell, label, box in ((0, 1, boxes[0]), (1, 4, boxes[1])):
        perfect[cell, label] = 20.0
        perfect[cell, 5:] = box_cxcywh(box)
    decoded = head.decode(perfect)
    assert [d["cls"] for d in decoded["detections"]] == ["bus", "person"]
    task = get_task("detection")
    parsed = task.parse_head(decoded)
    assert not parsed.parse_error and task.evaluate([parsed], [FRAME])["map50"] == pytest.approx(100.0)
    good = head.loss(perfect[None], [(labels, boxes)]).item()
    bad = head.loss(perfect.roll(1, 0)[None], [(labels, boxes)]).item()
    assert good < 0.01 < bad
    empty = head.loss(out, [(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))] * 2)
    assert torch.isfinite(empty) and empty.item() > 0


def _fit(head, inputs: torch.Tensor, targets: list, steps: int = 300) -> None:
    """Adam on the head's own loss over one fixed batch."""
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = head.loss(head(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_grid_box_head_learns_a_tiny_batch():
    torch.manual_seed(0)
    head = GridBoxHead(16, rows=2, cols=3, tail=1, inner=64)
    hidden = torch.randn(2, 7, 16)
    targets = [head.target(TRUTH), head.target({"detections": [{"cls": "car", "box": [0.5, 0.6, 0.9, 0.9]}]})]
    _fit(head, hidden, targets)
    task = get_task("detection")
    head.eval()
    parsed = task.parse_head(head.answer(hidden[0]))
    assert not parsed.parse_error and task.evaluate([parsed], [FRAME])["map50"] == pytest.approx(100.0)


def _window(head: GroundingHead, tail: int, batch: int = 1) -> torch.Tensor:
    """Hidden states of the head's window for a prompt whose tail is ``tail`` tokens, <|vision_start|> = anchor."""
    window = torch.randn(batch, head.positions, head.anchor.shape[0])
    window[:, head.positions - tail - head.cells - 1] = head.anchor
    return window


def test_grounding_head_finds_the_picture_and_decodes_a_box():
    head = GroundingHead(32, rows=2, cols=3, tail=6, slack=2)
    assert head.positions == 13
    head.calibrate(torch.randn(32) * 3)
    for tail in (4, 5, 6):
        window = _window(head, tail, batch=3)
        start, found = head.locate(window)
        assert start.tolist() == [6 - tail] * 3 and found.all()
        out = head(window)
        assert out.shape == (3, 6, 6) and (out[..., 5] == 1).all()
        # Picture states follow <|vision_start|>: shifting the window moves them and nothing else.
        cells = window[:, 7 - tail : 13 - tail]
        assert torch.allclose(out[..., :5], head.score(cells, window[:, -1]), atol=1e-5)
    answer = head.answer(_window(head, 5)[0])
    parsed = get_task("grounding").parse_head(answer)
    assert not parsed.parse_error and len(parsed.box) == 4 and 0 < answer["score"] <= 1


def test_grounding_head_too_long_expression_is_a_parse_error_not_a_crash():
    head = GroundingHead(32, rows=2, cols=3, tail=6, slack=2)
    head.calibrate(torch.randn(32) * 3)
    answer = head.answer(torch.randn(head.positions, 32))  # <|vision_start|> lies before the window
    assert answer["box"] is None
    parsed = get_task("grounding").parse_head(answer)
    assert parsed.parse_error and parsed.box is None


def test_grounding_head_learns_a_tiny_batch():
    torch.manual_seed(0)
    head = GroundingHead(16, rows=2, cols=3, tail=4, slack=1, inner=32)
    head.calibrate(torch.randn(16) * 3)
    window = _window(head, 4, batch=4)
    window[:, -1] = torch.randn(4, 16)  # four expressions about one picture
    window[:, :-1] = window[0, :-1]
    boxes = [[0.1, 0.1, 0.3, 0.4], [0.4, 0.6, 0.6, 0.9], [0.7, 0.1, 0.9, 0.3], [0.0, 0.5, 0.2, 0.9]]
    targets = [head.target({"box": b}) for b in boxes]
    _fit(head, window, targets)
    head.eval()
    for row, box in enumerate(boxes):
        got = head.answer(window[row])["box"]
        assert paired_giou(torch.tensor([got]), torch.tensor([box])).item() > 0.8
