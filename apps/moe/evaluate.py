"""Held-out task metrics of a model (base, or with a MoE-LoRA adapter): batched greedy decoding, task parsers."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from apps.moe.data import Encoder, Example, Frames, eval_examples
from apps.tasks import get_task
from engine.request import EngineResult

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, encoder: Encoder, examples: Sequence[Example], frames: Frames, max_tokens: int,
             batch_size: int = 16) -> list[str]:
    """Greedy answers (EOS-trimmed text) with left padding; ``model`` has transformers' ``generate``."""
    texts = []
    for i in range(0, len(examples), batch_size):
        batch = encoder.batch(examples[i:i + batch_size], frames, left_pad=True)
        batch.pop("labels")
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, eos_token_id=encoder.eos_id,
                             pad_token_id=encoder.pad_id)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            if encoder.eos_id in row:
                row = row[:row.index(encoder.eos_id)]
            texts.append(encoder.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def score(model, encoder: Encoder, frames: Frames, tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """task -> every metric of the task (primary first), on 0-100, over every frame of ``frames``."""
    out: dict[str, dict[str, float]] = {}
    for name in tasks:
        task, start = get_task(name), time.time()
        examples = eval_examples(name, frames)
        texts = generate(model, encoder, examples, frames, task.max_tokens)
        outputs = [task.parse(EngineResult(request_id="eval", text=t, meta={"task": name, "item": ex.item}))
                   for ex, t in zip(examples, texts, strict=True)]
        metrics = task.evaluate(outputs, [frames.truths[ex.frame] for ex in examples])
        out[name] = {k: round(float(v), 2) for k, v in metrics.items()}
        logger.info("%s: %s (%s items, %.1f s)", name, out[name], len(examples), time.time() - start)
    return out
