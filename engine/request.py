"""The EngineRequest / EngineResult contract shared by workers, the engine service and the in-process engine."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "eos", "length", "head", "error"]


class SamplingParams(BaseModel):
    """How the next token is chosen and when generation ends."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(32, ge=0, le=8192, description="Most new tokens to generate.")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: list[str] = Field(default_factory=list, description="Generation ends when one of these appears.")
    seed: int | None = Field(None, description="Seed for sampled decoding; None draws one.")


class ImageRef(BaseModel):
    """One picture of a request: inline JPEG bytes, or a Redis key the engine service resolves."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id of the picture (stream:seq); keys the vision-encoding cache.")
    jpeg: bytes | None = Field(None, description="Encoded picture, when carried inline.")
    key: str | None = Field(None, description="Redis key holding the encoded picture, when not inline.")


class EngineRequest(BaseModel):
    """One LoRA-tagged generation (or task-head) request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique request id.")
    adapter: str | None = Field(None, description="Adapter name; None runs the base model.")
    prompt: str = Field(description="User text; the engine wraps it in the model's chat template.")
    images: list[ImageRef] = Field(default_factory=list, description="Pictures, in prompt order.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    head: str | None = Field(None, description="Registered task head; its output replaces decoding.")
    deadline: float | None = Field(None, description="Unix time by which the result is useful (SLO).")
    priority: int = Field(0, description="Higher runs first among requests of equal urgency.")
    reply_to: str | None = Field(None, description="Reply stream for requests sent through Redis.")
    created_at: float = Field(default_factory=time.time, description="Unix time the caller made it.")
    meta: dict[str, Any] = Field(default_factory=dict, description="Caller data echoed in the result.")


class Timings(BaseModel):
    """Where a request's time went, in milliseconds."""

    queue_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    e2e_ms: float = 0.0


class EngineResult(BaseModel):
    """The answer to one EngineRequest: text or head output, or an error that failed only this request."""

    request_id: str
    text: str = ""
    head_output: dict[str, Any] | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    token_ids: list[int] = Field(default_factory=list, description="Generated token ids (stop token excluded).")
    finish_reason: FinishReason = "stop"
    error: str | None = None
    mode: str = Field("unmerged", description="Inference mode of the iterations that served it.")
    adapter: str | None = None
    engine_id: str = ""
    timings: Timings = Field(default_factory=Timings)
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None
