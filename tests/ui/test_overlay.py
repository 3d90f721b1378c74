"""Overlays against ground truth: drawn box pixels lie where the truth boxes are, and nowhere else changes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageFont

from apps.tasks import get_task
from pipeline.schema import TaskResult
from ui import overlay
from ui.overlay import GROUNDING_COLOR, Style, annotations, class_color, render

from .conftest import frame_picture, perfect_outputs

STYLE = Style(min_side=480, line=3, font_size=14, pad=4)


def result(task: str, outputs: list[dict], **fields) -> TaskResult:
    return TaskResult(stream="cam", seq=0, task=task, pts=0.0, frame_ts=0.0, width=224, height=160, outputs=outputs,
                      **fields)


def head_detections(truth) -> list[dict]:
    """Detections with the exact truth boxes (what a perfect detection head returns), through the task's parser."""
    task = get_task("detection")
    return [task.parse_head(task.head_target(truth)).model_dump(mode="json")]


def test_upscale_is_an_integer_zoom():
    image, _ = frame_picture()  # 224 x 160
    big = overlay.upscale(image, 480)  # k = ceil(480 / 224) = 3
    assert big.shape == (480, 672, 3)
    assert np.array_equal(big[::3, ::3], image)
    with pytest.raises(ValueError, match="RGB uint8"):
        overlay.upscale(image.astype(np.float32), 480)


@pytest.mark.parametrize("seed", [5, 11])
def test_each_detection_box_is_drawn_on_its_truth_box(seed):
    image, truth = frame_picture(seed)
    assert truth.objects, "the scene has objects"
    k = 3
    base = overlay.upscale(image, STYLE.min_side)
    detections = head_detections(truth)[0]["detections"]
    for obj, det in zip(truth.objects, detections, strict=True):
        one = [{"task": "detection", "detections": [det], "source": "head"}]
        out = render(image, {"detection": result("detection", one)}, STYLE)
        assert out.shape == base.shape  # no text lines, so no panel
        color = np.array(class_color(obj.cls))
        # Truth box in upscaled pixels: edges at x1*k .. x2*k - 1 (same rounding as a pixel grid).
        left, top = round(obj.box[0] * k), round(obj.box[1] * k)
        right, bottom = max(left, round(obj.box[2] * k) - 1), max(top, round(obj.box[3] * k) - 1)
        right, bottom = min(right, base.shape[1] - 1), min(bottom, base.shape[0] - 1)
        mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
        assert (out[mid_y, left] == color).all(), (obj, "left edge")
        assert (out[mid_y, right] == color).all(), (obj, "right edge")
        assert (out[bottom, mid_x] == color).all(), (obj, "bottom edge")
        # Outside the box (and away from its label tab above it) the frame is untouched.
        if left - 1 >= 0:
            assert (out[mid_y, left - 1] == base[mid_y, left - 1]).all()
        if bottom + 1 < base.shape[0]:
            assert (out[bottom + 1, mid_x] == base[bottom + 1, mid_x]).all()
        # Inside, past the outline and below any label tab, too.
        if bottom - top > 4 * STYLE.line + 2 * (STYLE.font_size + STYLE.pad):
            assert (out[bottom - STYLE.line - 1, mid_x] == base[bottom - STYLE.line - 1, mid_x]).all()


def test_only_box_outlines_labels_and_badges_change_pixels():
    image, truth = frame_picture(5)
    base = overlay.upscale(image, STYLE.min_side)
    out = render(image, {"detection": result("detection", head_detections(truth))}, STYLE)
    changed = (out != base).any(axis=2)
    k = 3
    allowed = np.zeros_like(changed)
    tab = STYLE.font_size + STYLE.pad
    for obj in truth.objects:
        x1, y1, x2, y2 = (round(v * k) for v in obj.box)
        allowed[max(0, y1 - tab - 1):y2 + 1, max(0, x1 - 1):x2 + 1] = True
        label_w = int(ImageFont.load_default(size=STYLE.font_size).getlength(obj.cls)) + 2 * STYLE.pad
        allowed[max(0, y1 - tab - 1):y1 + STYLE.line + tab + 1, x1:x1 + label_w + 2] = True
    assert changed.any()
    assert not (changed & ~allowed).any(), "pixels changed outside every box and label"


def test_grounding_counts_caption_and_vqa_on_one_frame():
    image, truth = frame_picture(5)
    ref = truth.refs[0]
    grounding = get_task("grounding")
    located = grounding.parse_text("", ref.expr).model_copy(
        update={"box": [ref.box[0] / truth.width, ref.box[1] / truth.height, ref.box[2] / truth.width,
                        ref.box[3] / truth.height], "parse_error": False, "item": ref.expr})
    results = {
        "grounding": result("grounding", [located.model_dump(mode="json")]),
        "counting": result("counting", perfect_outputs("counting", truth)),
        "captioning": result("captioning", perfect_outputs("captioning", truth)),
        "vqa": result("vqa", perfect_outputs("vqa", truth)),
    }
    notes = annotations(results)
    assert [(m.task, m.label, m.color) for m in notes.marks] == [("grounding", ref.expr, GROUNDING_COLOR)]
    assert notes.counts == {cls: n for cls, n in truth.counts.items()}
    texts = [text for text, _ in notes.lines]
    assert texts[0] == f"caption: {truth.caption}"
    assert texts[1:] == [f"Q: {qa.question}  A: {qa.answer}" for qa in truth.vqa]

    out = render(image, results, STYLE)
    base = overlay.upscale(image, STYLE.min_side)
    assert out.shape[0] > base.shape[0] and out.shape[1] == base.shape[1]  # the text panel below the frame
    k = 3
    left, bottom = round(ref.box[0] * k), round(ref.box[3] * k) - 1
    mid_y = (round(ref.box[1] * k) + bottom) // 2
    assert (out[mid_y, left] == GROUNDING_COLOR).all()
    # Count badges: one chip per counted class, in the class colour, along the top-left edge.
    badge_row = out[STYLE.pad + 2, :, :]
    for cls in truth.counts:
        assert (badge_row == np.array(class_color(cls))).all(axis=1).any(), cls
    # The panel holds text: light pixels on the dark background.
    panel = out[base.shape[0]:]
    assert (panel.max(axis=2) > 200).sum() > 100


def test_errors_and_missing_boxes_become_red_lines():
    failed = result("detection", [{"task": "detection", "parse_error": True}], ok=False, error="engine timed out")
    lost = result("grounding", [{"task": "grounding", "item": "the red car", "box": None, "parse_error": True}])
    notes = annotations({"detection": failed, "grounding": lost})
    assert notes.marks == []
    assert notes.lines == [("detection: error: engine timed out", overlay.ERROR_COLOR),
                           ("locate 'the red car': no box", overlay.ERROR_COLOR)]


def test_model_text_is_made_drawable():
    assert overlay.printable("a\x00b\x1fc\u200bd e") == "a?b?c?d e"
    assert overlay.printable("x" * 500, limit=10) == "x" * 9 + "…"


def test_wrap_fits_the_width():
    font = ImageFont.load_default(size=14)
    text = "the quick brown fox jumps over the lazy dog " * 5 + "supercalifragilisticexpialidocious" * 3
    lines = overlay.wrap(text, font, 150)
    assert all(font.getlength(line) <= 150 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")
