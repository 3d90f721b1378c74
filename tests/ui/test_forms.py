"""Form fields to spec fields: the same spec as `valora streams add`, and questions stored where workers read them."""

from __future__ import annotations

import pytest

from apps.tasks import get_task
from pipeline.cli import build_parser
from pipeline.registry import StreamRegistry
from pipeline.stream_commands import spec_fields as cli_spec_fields
from ui.forms import items_of, lines, spec_fields, task_map, with_items


def test_lines_drops_blanks():
    assert lines("  how many cars?\n\n is there a bus? \n") == ["how many cars?", "is there a bus?"]
    assert lines(None) == []


def test_form_and_cli_register_the_same_spec(transport, media_dir):
    clip = media_dir / "clip.mp4"
    clip.write_bytes(b"")
    registry = StreamRegistry(transport, media_dir)
    args = build_parser().parse_args(["streams", "add", "cam", str(clip), "--fps", "2", "--task", "detection",
                                      "--task", "vqa", "--loop", "--latency-slo-ms", "1500", "--accuracy-target", "60"])
    via_cli = registry.add(cli_spec_fields(args) | {"id": "cam", "url": args.url})
    registry.remove("cam")
    via_form = registry.add({"id": "cam", **spec_fields(url=f"  {clip} ", fps=2.0, tasks=task_map(["detection", "vqa"]),
                                                        loop=True, latency_slo_ms=1500.0, accuracy_target=60.0,
                                                        max_frame_age_s=None)})
    assert via_form == via_cli


def test_kept_tasks_keep_their_settings(transport, media_dir):
    registry = StreamRegistry(transport, media_dir)
    spec = registry.add({"id": "cam", "url": "rtsp://cam.local/1", "fps": 4,
                         "tasks": {"vqa": {"fps": 2, "params": {"questions": ["is there a bus?"]}}, "counting": {}}})
    tasks = task_map(["vqa", "grounding"], spec.tasks)
    assert tasks == {"vqa": {"fps": 2.0, "params": {"questions": ["is there a bus?"]}}, "grounding": {}}


def test_questions_and_expressions_reach_the_workers_params(transport, media_dir):
    registry = StreamRegistry(transport, media_dir)
    spec = registry.add({"id": "cam", "url": "rtsp://cam.local/1", "tasks": {"vqa": {}, "grounding": {}}})
    tasks = with_items(task_map(spec.tasks, spec.tasks),
                       {"vqa": ["how many cars are there?"], "grounding": ["the red car", "the bus"]})
    spec = registry.update("cam", {"tasks": tasks})
    # What the worker asks is the task's items for these params, whatever the frame's ground truth says.
    assert get_task("vqa").items(None, spec.tasks["vqa"].params) == ["how many cars are there?"]
    assert get_task("grounding").items(None, spec.tasks["grounding"].params) == ["the red car", "the bus"]
    assert items_of(spec.tasks, "vqa") == ["how many cars are there?"]
    # Clearing the text area goes back to the frame's own questions.
    spec = registry.update("cam", {"tasks": with_items(task_map(spec.tasks, spec.tasks), {"vqa": [], "grounding": []})})
    assert spec.tasks["vqa"].params == {} and items_of(spec.tasks, "grounding") == []


def test_items_for_disabled_tasks_are_ignored():
    assert with_items({"counting": {}}, {"vqa": ["x?"]}) == {"counting": {}}


@pytest.mark.parametrize("url", ["ftp://cam.local/x", "file:///etc/passwd", "/dev/sda"])
def test_form_fields_get_the_registry_validation(transport, media_dir, url):
    registry = StreamRegistry(transport, media_dir)
    with pytest.raises(ValueError, match="invalid stream spec"):
        registry.add({"id": "cam", **spec_fields(url=url, fps=1.0, tasks={}, loop=False, latency_slo_ms=2000.0,
                                                 accuracy_target=None, max_frame_age_s=None)})
