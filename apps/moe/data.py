"""Multi-task training and evaluation data for MoE-LoRA: synthetic stills, every task's (prompt, answer) pairs.

Prompts are rendered exactly as the engine renders them (``engine.prompt.PromptBuilder``: chat template, one
image pad per merged patch). The vision tower is frozen, so each frame's image features are computed once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from apps.model.frames import FrameSet
from apps.tasks import get_task
from engine.prompt import PromptBuilder

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions without loss (prompt, picture, padding)
TASKS = ("detection", "captioning", "vqa", "counting", "grounding")


@dataclass(frozen=True)
class Example:
    """One request about one frame: the prompt, and the answer to learn (None when evaluating)."""

    task: str
    frame: int
    prompt: str
    item: str | None
    target: str | None = None


class Frames(FrameSet):
    """n stills of a split with their truths and pixels; ``encode`` here takes the HF model and its processor."""

    @torch.no_grad()
    def encode(self, hf_model, processor, batch_size: int = 32) -> None:
        """The frozen vision tower over every frame, once."""
        if self.features is not None:
            return
        features, grids = [], []
        for i in range(0, len(self), batch_size):
            out = processor(images=self.images[i:i + batch_size], return_tensors="pt")
            enc = hf_model.model.get_image_features(pixel_values=out["pixel_values"],
                                                   image_grid_thw=out["image_grid_thw"], return_dict=True)
            features.extend(f.detach().clone() for f in enc.pooler_output)
            grids.append(out["image_grid_thw"])
        self.features, self.grids = features, torch.cat(grids)


def training_examples(tasks: Sequence[str], frames: Frames) -> dict[str, list[Example]]:
    """task -> every (prompt, answer) pair of every frame."""
    out: dict[str, list[Example]] = {}
    for name in tasks:
        task = get_task(name)
        out[name] = [Example(name, i, task.prompt(item), item, task.target_text(truth, item))
                     for i, truth in enumerate(frames.truths) for item in task.items(truth)]
    return out


def eval_examples(task_name: str, frames: Frames) -> list[Example]:
    """What the pipeline asks of every frame for one task (one example per request)."""
    task = get_task(task_name)
    return [Example(task_name, i, task.prompt(item), item) for i, truth in enumerate(frames.truths)
            for item in task.items(truth)]


class Encoder:
    """Examples -> padded model inputs with the checkpoint's tokenizer and the engine's prompt format."""

    def __init__(self, tokenizer, merge_size: int = 2) -> None:
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, merge_size)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokens(self, prompt: str, grid: Sequence[int], target: str | None) -> tuple[list[int], list[int]]:
        ids = self.prompts.build(prompt, [grid])
        labels = [IGNORE] * len(ids)
        if target is not None:
            answer = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids, labels = ids + answer, labels + answer
        return ids, labels

    def batch(self, examples: Sequence[Example], frames: Frames, left_pad: bool = False) -> dict:
        """Model kwargs (cached image features) plus 'labels' [batch, seq]."""
        if frames.features is None or frames.grids is None:
            raise ValueError("encode the frames with the base model first")
        grids = frames.grids[[ex.frame for ex in examples]]
        rows = [self.tokens(ex.prompt, grids[i].tolist(), ex.target) for i, ex in enumerate(examples)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            at = slice(width - len(ids), width) if left_pad else slice(0, len(ids))
            input_ids[i, at], labels[i, at], mask[i, at] = torch.tensor(ids), torch.tensor(lab), 1
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        features = tuple(frames.features[ex.frame] for ex in examples)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "image_grid_thw": grids,
                "mm_token_type_ids": (input_ids == self.prompts.image_token_id).int(),
                "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}
