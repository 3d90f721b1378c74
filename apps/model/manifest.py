"""The adapter manifest (models/adapters/manifest.json): which adapter and head serve each task, and how well."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FILE = "manifest.json"


class AdapterEntry(BaseModel):
    """One generated adapter."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(description="Tasks this adapter serves, in the order they were packed into it.")
    rank: int = Field(ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(gt=0, description="LoRA alpha (scaling alpha / rank).")
    vision: bool = Field(False, description="Whether the adapter also adapts the vision tower and merger.")
    size_bytes: int = Field(ge=0, description="Bytes on disk of the adapter folder, heads included.")
    train_seconds: float = Field(0.0, description="Wall time its training took.")
    heads: dict[str, str] = Field(default_factory=dict, description="Task -> head name saved with the adapter.")


class TaskEntry(BaseModel):
    """How one task is served and the accuracy measured on held-out data."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = Field(description="Adapter serving the task.")
    head: str | None = Field(None, description="Task head to request (zero decoded tokens); None: decode text.")
    metric: str = Field(description="Primary metric of the task.")
    target: float = Field(description="Accuracy target on the primary metric (0-100).")
    accuracy: float = Field(description="Primary metric measured on held-out frames, on the served path.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Every metric of the task, primary first.")
    met: bool = Field(description="accuracy >= target.")


class Manifest(BaseModel):
    """What `valora adapters generate` produced; the pipeline maps tasks to adapters and heads through it."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base checkpoint the adapters were trained on.")
    split: str = Field("val", description="Split the accuracies were measured on.")
    frames: int = Field(0, description="Frames of that split.")
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)
    tasks: dict[str, TaskEntry] = Field(default_factory=dict)
    trials: list[dict[str, Any]] = Field(default_factory=list, description="Every candidate the search trained.")

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder)
        path = path if path.suffix == ".json" else path / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no adapter manifest at {path}")
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path} is not a valid adapter manifest: {exc}") from None

    def adapter_for(self, task: str) -> tuple[str, str | None]:
        """(adapter, head or None) serving a task; ValueError if the manifest has no entry for it."""
        if task not in self.tasks:
            raise ValueError(f"the adapter manifest serves no task {task!r} (it serves {sorted(self.tasks)})")
        entry = self.tasks[task]
        return entry.adapter, entry.head


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
