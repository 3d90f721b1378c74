"""Form fields to StreamSpec fields: the dashboard sends the registry the same fields `valora streams` does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.schema import TaskSpec

# Task parameter holding the operator's own items, per task; an empty list means "the frame's own" (ground truth).
ITEM_PARAMS = {"vqa": "questions", "grounding": "expressions"}


def lines(text: str | None) -> list[str]:
    """The non-empty lines of a text area, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def task_map(chosen: Iterable[str], current: Mapping[str, TaskSpec] | None = None) -> dict[str, dict[str, Any]]:
    """Enabled tasks of a spec: tasks kept keep their fps and parameters, newly chosen ones start empty."""
    current = current or {}
    return {name: current[name].model_dump(exclude_none=True) if name in current else {} for name in chosen}


def with_items(tasks: dict[str, dict[str, Any]], items: Mapping[str, list[str]]) -> dict[str, dict[str, Any]]:
    """``tasks`` with the operator's items (task -> questions or expressions) stored in the task parameters.

    An empty list removes the parameter, so the worker falls back to the frame's own questions or expressions.
    Items for tasks that are not enabled are ignored.
    """
    out = {name: dict(spec) for name, spec in tasks.items()}
    for task, values in items.items():
        if task not in out:
            continue
        key = ITEM_PARAMS[task]
        params = dict(out[task].get("params", {}))
        if values:
            params[key] = list(values)
        else:
            params.pop(key, None)
        out[task]["params"] = params
    return out


def items_of(tasks: Mapping[str, TaskSpec], task: str) -> list[str]:
    """The operator's items stored for a task (empty when it uses the frame's own)."""
    spec = tasks.get(task)
    values = spec.params.get(ITEM_PARAMS[task]) if spec is not None else None
    return list(values) if isinstance(values, list) else []


def spec_fields(*, url: str, fps: float, tasks: dict[str, dict[str, Any]], loop: bool, latency_slo_ms: float,
                accuracy_target: float | None, max_frame_age_s: float | None, enabled: bool = True) -> dict[str, Any]:
    """Spec fields from the stream form; optional numbers left blank keep the spec's defaults."""
    fields: dict[str, Any] = {"url": url.strip(), "fps": fps, "tasks": tasks, "loop": loop,
                              "latency_slo_ms": latency_slo_ms, "enabled": enabled,
                              "accuracy_target": accuracy_target, "max_frame_age_s": max_frame_age_s}
    return fields
