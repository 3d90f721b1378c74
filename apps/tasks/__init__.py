"""The five vision tasks: prompts, target texts, parsers, heads and metrics; look them up with get_task."""

from apps.tasks.base import Task
from apps.tasks.output import TaskOutput, load_output
from apps.tasks.registry import TASK_TYPES, TASKS, get_task

__all__ = ["TASKS", "TASK_TYPES", "Task", "TaskOutput", "get_task", "load_output"]
