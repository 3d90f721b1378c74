"""Training examples as model inputs: prompts rendered exactly as the engine renders them, answers as labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from engine.prompt import PromptBuilder

if TYPE_CHECKING:
    from apps.model.frames import FrameSet

IGNORE = -100  # label of positions that carry no loss (prompt, image, padding)


@dataclass(frozen=True)
class Example:
    """One conversation turn about one picture: the text answer to learn and/or the head's target."""

    task: str
    prompt: str
    image: np.ndarray | None  # [height, width, 3] uint8 RGB
    target: str | None = None  # answer text; None for a head-only example
    head_target: Any = None  # the task's head answer for this frame (Task.head_target)
    frame: int | None = None  # index of the picture in a FrameSet (then `image` may be None)
    item: str | None = None  # the question or expression asked, for scoring


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
    image_token_id: int
    image_features: list[torch.Tensor] | None = None  # cached vision output per picture, each [tokens, hidden]

    def model_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.image_grid_thw is None:
            return inputs
        # Image tokens get 3-D M-RoPE positions only when transformers is told which tokens they are, as the
        # engines tell it when serving.
        image_tokens = (self.input_ids == self.image_token_id).int()
        inputs.update(image_grid_thw=self.image_grid_thw, mm_token_type_ids=image_tokens)
        if self.image_features is not None:
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            encoded = BaseModelOutputWithPooling(pooler_output=tuple(self.image_features))
            inputs["mm_encoder_outputs"] = {"image": encoded}
        else:
            inputs["pixel_values"] = self.pixel_values
        return inputs


class Encoder:
    """Turns examples into batches with the checkpoint's tokenizer, image processor and the engine's prompt format."""

    def __init__(self, tokenizer, image_processor, merge_size: int = 2) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompts = PromptBuilder(tokenizer, merge_size)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.vision_start_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
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

    def batch(self, examples: Sequence[Example], frames: FrameSet | None = None, cached: bool = False,
              left_pad: bool = False) -> Batch:
        """Encode and pad examples (right, or left for generation). Pictures come from ``frames`` for examples
        that name a frame; with ``cached`` their vision features are reused instead of pixels (frozen vision)."""
        if frames is not None and any(ex.frame is None for ex in examples):
            raise ValueError("every example of a FrameSet batch must name its frame")
        images = [frames.images[ex.frame] if frames is not None else ex.image for ex in examples]
        if any(img is None for img in images) and any(img is not None for img in images):
            raise ValueError("a batch mixes examples with and without pictures")
        pixel_values = grids = features = None
        if cached:
            if frames is None or frames.features is None:
                raise ValueError("cached features need a FrameSet encoded with the base model")
            features = [frames.features[ex.frame] for ex in examples]
            grids = frames.grids[[ex.frame for ex in examples]]
        elif images and images[0] is not None:
            pixel_values, grids = self.pixels(images)
        rows = [self.tokens(ex.prompt, grids[i].tolist() if grids is not None else None, ex.target)
                for i, ex in enumerate(examples)]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(rows):
            at = slice(width - len(ids), width) if left_pad else slice(0, len(ids))
            input_ids[i, at] = torch.tensor(ids)
            labels[i, at] = torch.tensor(lab)
            mask[i, at] = 1
        # With left padding a prompt ends at the row's end; prompt_lens keeps meaning "index after the prompt".
        prompt_lens = torch.tensor([(width - len(ids) + n) if left_pad else n for ids, _, n in rows])
        return Batch(input_ids, mask, labels, prompt_lens, pixel_values, grids, list(examples),
                     self.prompts.image_token_id, features)


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
