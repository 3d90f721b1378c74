"""Prompt token ids: the model's chat template around the user text, with image pads expanded per picture."""

from __future__ import annotations

from collections.abc import Sequence


class PromptTooLongError(ValueError):
    """The prompt (text plus image tokens) does not fit the model's context."""


class PromptBuilder:
    """Turns (text, image grids) into token ids the way the Qwen2-VL processor does."""

    def __init__(self, tokenizer, merge_size: int, image_token: str = "<|image_pad|>") -> None:
        self.tokenizer = tokenizer
        self.merge_len = merge_size * merge_size
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def build(self, text: str, image_grids: Sequence[Sequence[int]], max_len: int | None = None) -> list[int]:
        """Token ids of one user turn plus the assistant prefix; grids are (t, h, w) patch counts per picture."""
        content = [{"type": "image"} for _ in image_grids] + [{"type": "text", "text": text}]
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        # Expand each picture's single pad into one pad per merged patch, in order.
        pieces = rendered.split(self.image_token)
        if len(pieces) - 1 != len(image_grids):
            raise ValueError(f"chat template rendered {len(pieces) - 1} image slots for {len(image_grids)} images")
        out = pieces[0]
        for grid, rest in zip(image_grids, pieces[1:], strict=True):
            t, h, w = (int(v) for v in grid)
            out += self.image_token * (t * h * w // self.merge_len) + rest
        ids = self.tokenizer(out, add_special_tokens=False)["input_ids"]
        if max_len is not None and len(ids) > max_len:
            raise PromptTooLongError(f"prompt is {len(ids)} tokens with images; the context holds {max_len}")
        return ids
