"""Typed task outputs: what a parser makes of one engine result; they cross process boundaries in TaskResults."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class TaskOutput(BaseModel):
    """Common fields: which item was asked, the raw text kept for debugging, and whether parsing failed."""

    model_config = ConfigDict(extra="forbid")

    task: str
    item: str | None = Field(None, description="The question or expression this output answers, if any.")
    raw: str = Field("", description="The model's text as returned (truncated to 2,000 characters).")
    parse_error: bool = Field(False, description="The text (or head output) did not follow the task's format.")
    source: Literal["text", "head"] = Field("text", description="Decoded text or a task head.")


class Detection(BaseModel):
    """One detected object; box normalised to the frame, [x1, y1, x2, y2] in [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    cls: str
    box: list[float]
    score: float = 1.0


class DetectionOutput(TaskOutput):
    task: Literal["detection"] = "detection"
    detections: list[Detection] = Field(default_factory=list)


class CountingOutput(TaskOutput):
    task: Literal["counting"] = "counting"
    counts: dict[str, int] = Field(default_factory=dict, description="Count per class; a missing class is unknown.")


class CaptionOutput(TaskOutput):
    task: Literal["captioning"] = "captioning"
    caption: str = ""


class VQAOutput(TaskOutput):
    task: Literal["vqa"] = "vqa"
    answer: str = ""


class GroundingOutput(TaskOutput):
    task: Literal["grounding"] = "grounding"
    box: list[float] | None = Field(None, description="Normalised [x1, y1, x2, y2] of the referred object.")


AnyOutput = Annotated[
    DetectionOutput | CountingOutput | CaptionOutput | VQAOutput | GroundingOutput, Field(discriminator="task")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyOutput)


def load_output(data: dict[str, Any] | str | bytes) -> TaskOutput:
    """The typed output from its dict or JSON form (as stored in a results stream)."""
    if isinstance(data, str | bytes):
        return _ADAPTER.validate_json(data)
    return _ADAPTER.validate_python(data)
