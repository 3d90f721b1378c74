"""The Task interface: prompts, engine requests, target texts, never-raising parsers and metrics of one task."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from apps.datasets.schema import FrameTruth
from apps.datasets.vocab import CLASSES
from apps.tasks.output import TaskOutput
from engine.request import EngineRequest, EngineResult, ImageRef, SamplingParams

logger = logging.getLogger(__name__)

RAW_LIMIT = 2000  # characters of model text kept in an output


def clean_text(text: object) -> str:
    """Model text made safe to parse and to serialise: non-strings become '', lone surrogates become '?'."""
    if not isinstance(text, str):
        return ""
    return text.encode("utf-8", "replace").decode("utf-8")


class Task(ABC):
    """One vision task. Subclasses set the class attributes and implement the text format and metrics."""

    name: ClassVar[str]
    default_adapter: ClassVar[str]
    head: ClassVar[str | None] = None
    metrics: ClassVar[tuple[str, ...]]  # primary first
    metric_labels: ClassVar[dict[str, str]]
    prompt_template: ClassVar[str]
    max_tokens: ClassVar[int]
    output_type: ClassVar[type[TaskOutput]]
    extra_params: ClassVar[dict[str, str]] = {}  # task-specific request params -> what they mean

    def __init__(self, classes: Sequence[str] = CLASSES) -> None:
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct and non-empty, got {list(classes)}")
        self.classes = tuple(classes)
        # Parsers lower-case model text; this maps what they read back to the user's spelling of a class.
        self.class_by_lower = {cls.lower(): cls for cls in self.classes}

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def params_help(self) -> dict[str, str]:
        """Request parameters this task accepts, with their meaning."""
        params = {
            "adapter": f"adapter name (default {self.default_adapter!r}); null runs the base model",
            "max_tokens": f"most tokens to decode (default {self.max_tokens})",
        }
        if self.head:
            params["use_head"] = f"answer with the {self.head!r} task head in one forward pass (default false)"
        return params | self.extra_params

    def check_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Validated request parameters; ValueError names any unknown key or bad value."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.params_help()))
        if unknown:
            raise ValueError(f"unknown {self.name} parameter(s) {unknown}; known: {sorted(self.params_help())}")
        adapter = params.get("adapter", self.default_adapter)
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise ValueError(f"{self.name} adapter must be a non-empty string or null, got {adapter!r}")
        max_tokens = params.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 8192:
            raise ValueError(f"{self.name} max_tokens must be an integer within 1..8192, got {max_tokens!r}")
        if not isinstance(params.get("use_head", False), bool):
            raise ValueError(f"{self.name} use_head must be true or false, got {params['use_head']!r}")
        return params

    def items(self, truth: FrameTruth | None, params: Mapping[str, Any] | None = None) -> list[str | None]:
        """What one frame asks about: [None] for whole-frame tasks, questions or expressions otherwise."""
        return [None]

    def prompt(self, item: str | None = None) -> str:
        return self.prompt_template.format(item=item)

    def requests(
        self, image: ImageRef, params: Mapping[str, Any] | None = None, truth: FrameTruth | None = None
    ) -> list[EngineRequest]:
        """Engine requests for one frame; meta carries the task name and the item each request asks about."""
        params = self.check_params(params)
        adapter = params.get("adapter", self.default_adapter)
        use_head = bool(params.get("use_head", False)) and self.head is not None
        sampling = SamplingParams(max_tokens=0 if use_head else params.get("max_tokens", self.max_tokens))
        return [
            EngineRequest(
                adapter=adapter,
                prompt=self.prompt(item),
                images=[image],
                sampling=sampling,
                head=self.head if use_head else None,
                meta={"task": self.name, "item": item},
            )
            for item in self.items(truth, params)
        ]

    def training_pairs(self, truth: FrameTruth) -> list[tuple[str, str]]:
        """(prompt, target text) pairs an adapter for this task is trained on, one per item of the frame."""
        return [(self.prompt(item), self.target_text(truth, item)) for item in self.items(truth)]

    def parse(self, result: EngineResult, request: EngineRequest | None = None) -> TaskOutput:
        """The typed output of an engine result; never raises. Failed requests give an empty parse-error output."""
        meta = request.meta if request is not None else result.meta
        item = clean_text(meta.get("item")) if isinstance(meta.get("item"), str) else None
        if result.error is not None:
            return self.output_type(item=item, parse_error=True)
        try:
            if result.head_output is not None:
                output = self.parse_head(result.head_output)
            else:
                output = self.parse_text(result.text, item)
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError):
            logger.warning("%s parser failed on %r", self.name, result.text[:200], exc_info=True)
            return self.output_type(item=item, raw=result.text[:RAW_LIMIT], parse_error=True)
        output.item = item
        return output

    @abstractmethod
    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        """The exact text an adapter is trained to emit for this frame (and item)."""

    @abstractmethod
    def parse_text(self, text: str, item: str | None = None) -> TaskOutput:
        """Parse model text; malformed text gives parse_error=True and whatever could be recovered."""

    def parse_head(self, head_output: Mapping[str, Any]) -> TaskOutput:
        """Parse a task head's output; tasks without a head flag it as a parse error."""
        return self.output_type(parse_error=True, source="head")

    @abstractmethod
    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float] | None:
        """Metrics of one output against its frame, primary first; None if the frame cannot score it."""

    @abstractmethod
    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """Corpus metrics, primary first, on 0-100 (MAE in objects); outputs[i] answers truths[i]."""

    def _pairs(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> list[tuple[Any, FrameTruth]]:
        if len(outputs) != len(truths):
            raise ValueError(f"{len(outputs)} {self.name} outputs for {len(truths)} truths")
        for output in outputs:
            if not isinstance(output, self.output_type):
                raise ValueError(f"{self.name} cannot score a {type(output).__name__}")
        return list(zip(outputs, truths, strict=True))
