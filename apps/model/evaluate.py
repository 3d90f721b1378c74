"""Scoring the base model and adapters on the tasks: batched greedy decoding or heads, parsed by the task modules."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from apps.model.encoding import Encoder, Example, prompt_states
from apps.model.frames import FrameSet
from apps.tasks import Task, TaskOutput
from engine.heads import TaskHead
from engine.request import EngineResult

logger = logging.getLogger(__name__)


@dataclass
class Score:
    """One task scored on one path: every metric of the task (primary first) and the cost."""

    task: str
    adapter: str | None
    path: str  # "text" or "head"
    metrics: dict[str, float]
    items: int
    seconds: float

    @property
    def primary(self) -> float:
        return next(iter(self.metrics.values()))


def task_items(task: Task, frames: FrameSet) -> list[Example]:
    """What the task asks of every frame, as the pipeline asks it (one example per request)."""
    out = []
    for index, truth in enumerate(frames.truths):
        for item in task.items(truth):
            out.append(Example(task.name, task.prompt(item), None, frame=index, item=item))
    return out


def _adapter_scope(model, adapter: str | None):
    """Context in which ``model`` runs ``adapter`` (None: the base model with every adapter disabled)."""
    if not hasattr(model, "peft_config"):
        if adapter is not None:
            raise ValueError(f"adapter {adapter!r} asked of a model without adapters")
        return contextlib.nullcontext()
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


class Evaluator:
    """Runs requests in batches with exactly the engine's prompt format, then the task's parser and metrics."""

    def __init__(self, model, encoder: Encoder, batch_size: int = 16) -> None:
        self.model, self.encoder, self.batch_size = model, encoder, batch_size

    @torch.no_grad()
    def generate(self, examples: list[Example], frames: FrameSet, max_tokens: int) -> list[str]:
        """Greedy answers (EOS-trimmed text) to examples; left padding, as batched decoding needs."""
        tok = self.encoder.tokenizer
        texts = []
        for i in range(0, len(examples), self.batch_size):
            chunk = examples[i : i + self.batch_size]
            batch = self.encoder.batch(chunk, frames, left_pad=True)
            out = self.model.generate(**batch.model_inputs(), max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=self.encoder.eos_id, pad_token_id=self.encoder.pad_id)
            for row in out[:, batch.input_ids.shape[1] :].tolist():
                if self.encoder.eos_id in row:
                    row = row[: row.index(self.encoder.eos_id)]
                texts.append(tok.decode(row, skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def heads(self, examples: list[Example], frames: FrameSet, head: TaskHead) -> list[dict]:
        """Head answers from one prefill per example (no decoding)."""
        answers = []
        for i in range(0, len(examples), self.batch_size):
            batch = self.encoder.batch(examples[i : i + self.batch_size], frames)
            out = self.model(**batch.model_inputs(), output_hidden_states=True)
            states = prompt_states(out.hidden_states[-1], batch.prompt_lens, head.positions)
            answers.extend(head.answer(s) for s in states)
        return answers

    def score(self, task: Task, frames: FrameSet, adapter: str | None, head: TaskHead | None = None) -> Score:
        """Score one task with ``adapter`` (None: base) on the head path when a head is given, else text."""
        start = time.time()
        examples = task_items(task, frames)
        with _adapter_scope(self.model, adapter):
            if head is not None:
                results = [EngineResult(request_id="eval", head_output=a) for a in self.heads(examples, frames, head)]
            else:
                texts = self.generate(examples, frames, task.max_tokens)
                results = [EngineResult(request_id="eval", text=t) for t in texts]
        outputs: list[TaskOutput] = []
        for ex, res in zip(examples, results, strict=True):
            res.meta = {"task": task.name, "item": ex.item}
            outputs.append(task.parse(res))
        truths = [frames.truths[ex.frame] for ex in examples]
        metrics = task.evaluate(outputs, truths)
        score = Score(task.name, adapter, "head" if head is not None else "text", metrics, len(examples),
                      time.time() - start)
        logger.info("%s on %s (%s path, %s items): %s in %.1f s", adapter or "base", task.name, score.path,
                    score.items, {k: round(v, 2) for k, v in metrics.items()}, score.seconds)
        return score
