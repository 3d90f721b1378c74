"""Ground truth of one frame (objects, counts, caption, VQA, referring expressions): crosses process boundaries."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Boxes may touch the frame border; float rounding in loaders gets this much slack before it is an error.
_EDGE_SLACK = 1e-3


class ObjectTruth(BaseModel):
    """One visible object."""

    model_config = ConfigDict(extra="forbid")

    track_id: int = Field(description="Stable id of the object across the frames of one clip.")
    cls: str = Field(description="Class name, e.g. 'car'.")
    color: str = Field("", description="Colour name from the palette; '' where unknown (user data).")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels, clipped to the frame.")

    @field_validator("box")
    @classmethod
    def _box_is_ordered(cls, box: list[float]) -> list[float]:
        if len(box) != 4:
            raise ValueError(f"box needs 4 numbers [x1, y1, x2, y2], got {len(box)}")
        x1, y1, x2, y2 = box
        if not (x2 >= x1 and y2 >= y1):
            raise ValueError(f"box {box} is not ordered as [x1, y1, x2, y2]")
        return [float(v) for v in box]

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


class QA(BaseModel):
    """A closed-set question with its short answer."""

    model_config = ConfigDict(extra="forbid")

    question: str
    answer: str


class RefExpr(BaseModel):
    """A referring expression that picks out exactly one object of the frame."""

    model_config = ConfigDict(extra="forbid")

    expr: str = Field(description="The expression, e.g. 'the blue bus' or 'the leftmost car'.")
    track_id: int = Field(description="Track id of the object it refers to.")
    box: list[float] = Field(description="That object's [x1, y1, x2, y2] in pixels.")


class FrameTruth(BaseModel):
    """Everything known about one frame; one JSONL line of a clip's sidecar."""

    model_config = ConfigDict(extra="forbid")

    frame: int = Field(description="Frame index in the clip (or image id for user data).")
    t: float = Field(0.0, description="Seconds since the start of the clip.")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    objects: list[ObjectTruth] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict, description="Objects per class, every class included.")
    caption: str = ""
    vqa: list[QA] = Field(default_factory=list)
    refs: list[RefExpr] = Field(default_factory=list)

    @model_validator(mode="after")
    def _objects_inside_frame(self) -> FrameTruth:
        for obj in [*self.objects, *self.refs]:
            x1, y1, x2, y2 = obj.box
            if (
                x1 < -_EDGE_SLACK
                or y1 < -_EDGE_SLACK
                or x2 > self.width + _EDGE_SLACK
                or y2 > self.height + _EDGE_SLACK
            ):
                raise ValueError(f"box {obj.box} leaves the {self.width}x{self.height} frame")
        return self

    def answer_to(self, question: str) -> str | None:
        """The ground-truth answer to a question, or None if this frame has none for it."""
        return next((qa.answer for qa in self.vqa if qa.question == question), None)

    def ref_for(self, expr: str) -> RefExpr | None:
        """The referring expression with this text, or None."""
        return next((ref for ref in self.refs if ref.expr == expr), None)
