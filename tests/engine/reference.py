"""transformers + peft references for the engine tests: prefill logits and greedy generation, one request at a time."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.prompt import PromptBuilder


def jpeg(seed: int, size: tuple[int, int] = (112, 112)) -> bytes:
    """A random RGB picture as JPEG bytes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@functools.lru_cache(maxsize=8)
def hf_model(base: Path, adapter: Path | None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=dtype).to(device).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


@functools.lru_cache(maxsize=2)
def processors(base: Path):
    from transformers import AutoImageProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(base), AutoImageProcessor.from_pretrained(base)


def hf_inputs(base: Path, prompt: str, images: list[bytes], device: str = "cpu", dtype=torch.float32):
    """(prompt ids, model kwargs) the way the hf backend builds them, with 3-D M-RoPE for image tokens."""
    from engine.images import decode_image

    tokenizer, image_processor = processors(base)
    kwargs: dict = {}
    grids: list = []
    if images:
        processed = image_processor(images=[decode_image(b) for b in images], return_tensors="pt")
        kwargs["pixel_values"] = processed["pixel_values"].to(device, dtype)
        kwargs["image_grid_thw"] = processed["image_grid_thw"].to(device)
        grids = processed["image_grid_thw"].tolist()
    ids = PromptBuilder(tokenizer, 2).build(prompt, grids)
    input_ids = torch.tensor([ids], device=device)
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    kwargs["mm_token_type_ids"] = (input_ids == image_token).int()
    kwargs["attention_mask"] = torch.ones_like(input_ids)
    return input_ids, kwargs


@torch.no_grad()
def hf_logits(root: Path, adapter: str | None, prompt: str, images: list[bytes], device: str = "cpu",
              dtype=torch.float32) -> torch.Tensor:
    """Prefill logits [prompt_len, vocab] from transformers + peft."""
    model = hf_model(root / "base", root / "adapters" / adapter if adapter else None, dtype, device)
    input_ids, kwargs = hf_inputs(root / "base", prompt, images, device, dtype)
    return model(input_ids=input_ids, **kwargs).logits[0].float()


@torch.no_grad()
def hf_greedy(root: Path, adapter: str | None, prompt: str, images: list[bytes], max_new_tokens: int) -> list[int]:
    """Greedy output ids (stop token excluded) from transformers + peft ``generate``."""
    model = hf_model(root / "base", root / "adapters" / adapter if adapter else None)
    input_ids, kwargs = hf_inputs(root / "base", prompt, images)
    eos = processors(root / "base")[0].convert_tokens_to_ids("<|im_end|>")
    out = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                         pad_token_id=0, **kwargs)
    new = out[0, input_ids.shape[1]:].tolist()
    return new[: new.index(eos)] if eos in new else new
