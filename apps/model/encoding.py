"""Training examples as model inputs: prompts rendered exactly as the engine renders them, answers as labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.prompt import PromptBuilder

IGNORE = -100  # label of positions that carry no loss (prompt, image, padding)


@dataclass(frozen=True)
class Example:
    """One conversation turn about one picture: the text answer to learn and/or the head's target."""

    task: str
    prompt: str
    image: np.ndarray | None  # [height, width, 3] uint8 RGB
    target: str | None = None  # answer text; None for a head-only example
    head_target: Any = None  # what the task's head should output (see apps.model.heads)


@dataclass
class Batch:
    """Right-padded token ids with labels; pixel rows of every picture, in example order."""

    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    labels: torch.Tensor  # [batch, seq], IGNORE outside answers
    prompt_lens: torch.Tensor  # [batch], tokens of each prompt (the head reads the positions before this)
    pixel_values: torch.Tensor | None  # [patches, channels * temporal * patch * patch]
    image_grid_thw: torch.Tensor | None  # [images, 3]
    examples: list[Example]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            inputs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return inputs


class Encoder:
    """Turns examples into batches with the checkpoint's tokenizer, image processor and the engine's prompt format."""

    def __init__(self, tokenizer, image_processor, merge_size: int = 2) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompts = PromptBuilder(tokenizer, merge_size)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id

    def pixels(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [patches, dim], image_grid_thw [images, 3]) exactly as the engine computes them."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def tokens(self, prompt: str, grid: Sequence[int] | None, target: str | None) -> tuple[list[int], list[int], int]:
        """(ids, labels, prompt length): the rendered prompt, then the answer and <|im_end|> when there is one."""
        ids = self.prompts.build(prompt, [grid] if grid is not None else [])
        n_prompt = len(ids)
        labels = [IGNORE] * n_prompt
        if target is not None:
            answer = self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.eos_id]
            ids = ids + answer
            labels = labels + answer
        return ids, labels, n_prompt

    def batch(self, examples: Sequence[Example], pixels: tuple[torch.Tensor, torch.Tensor] | None = None) -> Batch:
        """Encode and right-pad examples; ``pixels`` reuses precomputed processor output for their images."""
        images = [ex.image for ex in examples if ex.image is not None]
        if images and len(images) != len(examples):
            raise ValueError("a batch mixes examples with and without pictures")
        pixel_values = grids = None
        if images:
            pixel_values, grids = pixels if pixels is not None else self.pixels(images)
        rows = [self.tokens(ex.prompt, grids[i].tolist() if grids is not None else None, ex.target)
                for i, ex in enumerate(examples)]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        prompt_lens = torch.tensor([n for _, _, n in rows])
        return Batch(input_ids, mask, labels, prompt_lens, pixel_values, grids, list(examples))


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer positions; logits: [batch, seq, vocab], labels: [batch, seq]."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    gold = labels[:, 1:].reshape(-1)
    if not (gold != IGNORE).any():
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(pred.float(), gold, ignore_index=IGNORE)


def prompt_states(hidden: torch.Tensor, prompt_lens: torch.Tensor, positions: int) -> torch.Tensor:
    """The last ``positions`` prompt states of each row; hidden: [batch, seq, dim] -> [batch, positions, dim]."""
    offsets = torch.arange(positions, device=hidden.device)  # offsets: [positions]
    index = (prompt_lens.to(hidden.device)[:, None] - positions + offsets[None, :])  # index: [batch, positions]
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
