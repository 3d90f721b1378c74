"""The five vision tasks by name."""

from __future__ import annotations

from apps.tasks.base import Task
from apps.tasks.captioning import CaptioningTask
from apps.tasks.counting import CountingTask
from apps.tasks.detection import DetectionTask
from apps.tasks.grounding import GroundingTask
from apps.tasks.vqa import VQATask

TASK_TYPES: dict[str, type[Task]] = {
    cls.name: cls for cls in (DetectionTask, CaptioningTask, VQATask, CountingTask, GroundingTask)
}
# Ready instances over the synthetic traffic classes; build a task type with other classes for user data.
TASKS: dict[str, Task] = {name: cls() for name, cls in TASK_TYPES.items()}


def get_task(name: str) -> Task:
    """The task registered under this name; ValueError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
