"""Visual question answering: short closed-set answers ('yes', '2', 'red', 'car'); normalised exact match."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from apps.datasets.schema import FrameTruth
from apps.tasks.base import RAW_LIMIT, Task, clean_text
from apps.tasks.metrics.text import normalise_answer
from apps.tasks.output import TaskOutput, VQAOutput

MAX_ANSWER = 64  # characters; answers are a word or two


def check_strings(task: str, key: str, value: Any) -> None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{task} {key} must be a non-empty list of non-empty strings, got {value!r}")


class VQATask(Task):
    name = "vqa"
    default_adapter = "vqa"
    metrics = ("exact_match",)
    metric_labels = {"exact_match": "exact match"}
    prompt_template = "question: {item}"
    max_tokens = 8
    output_type = VQAOutput
    extra_params = {"questions": "questions to ask every frame (default: the frame's ground-truth questions)"}

    def check_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        params = super().check_params(params)
        if "questions" in params:
            check_strings(self.name, "questions", params["questions"])
        return params

    def items(self, truth: FrameTruth | None, params: Mapping[str, Any] | None = None) -> list[str | None]:
        if params and params.get("questions"):
            return [q.strip() for q in params["questions"]]
        return [qa.question for qa in truth.vqa] if truth is not None else []

    def target_text(self, truth: FrameTruth, item: str | None = None) -> str:
        answer = truth.answer_to(item) if item is not None else None
        if answer is None:
            raise ValueError(f"frame {truth.frame} has no answer to {item!r}")
        return answer

    def parse_text(self, text: str, item: str | None = None) -> VQAOutput:
        """The first line, trimmed; empty or overlong text is a parse error."""
        text = clean_text(text)
        lines = text.strip().splitlines()
        answer = lines[0].strip() if lines else ""
        error = not answer or len(answer) > MAX_ANSWER
        return VQAOutput(raw=text[:RAW_LIMIT], answer=answer[:MAX_ANSWER], parse_error=error)

    def score_frame(self, output: TaskOutput, truth: FrameTruth) -> dict[str, float] | None:
        """Exact match (normalised) when the frame knows the answer to the output's question, else None."""
        self._pairs([output], [truth])
        answer = truth.answer_to(output.item) if output.item is not None else None
        if answer is None:
            return None
        return {"exact_match": 100.0 * (normalise_answer(output.answer) == normalise_answer(answer))}

    def evaluate(self, outputs: Sequence[TaskOutput], truths: Sequence[FrameTruth]) -> dict[str, float]:
        """Exact match over the outputs whose question the frame answers; 0 when none can be scored."""
        scores = [s["exact_match"] for out, t in self._pairs(outputs, truths) if (s := self.score_frame(out, t))]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0}
