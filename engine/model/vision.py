"""VisionTower: transformers' Qwen2.5-VL vision encoder and merger, with the checkpoint's image processor."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.model.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionLoRA:
    """One adapter's updates to vision-tower linears: module path -> (A [r, in], B [out, r], scale)."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


@dataclass(frozen=True)
class Picture:
    """A preprocessed picture: patches ready for the encoder and its (t, h, w) patch grid."""

    pixel_values: torch.Tensor  # [patches, channels * temporal_patch * patch * patch] on CPU
    grid: tuple[int, int, int]
    num_tokens: int  # merged tokens it becomes in the language model (merge x merge patches each)


class VisionTower:
    """Encodes pictures into language-model embeddings; counts how many it has encoded (cache tests use it)."""

    def __init__(self, spec: ModelSpec, image_processor, device: torch.device, dtype: torch.dtype) -> None:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        if spec.model_type != "qwen2_5_vl":
            raise ValueError(f"vision tower of model_type {spec.model_type!r} is not supported (qwen2_5_vl only)")
        config = Qwen2_5_VLVisionConfig(**spec.raw["vision_config"])
        config._attn_implementation = "sdpa"
        with torch.device(device):
            self.module = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, dtype=dtype).eval()
        self.processor = image_processor
        self.merge = config.spatial_merge_size
        self.device, self.dtype = device, dtype
        self.images_encoded = 0

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(f"vision weights do not fit the tower: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def preprocess(self, image: np.ndarray) -> Picture:
        """RGB [height, width, 3] -> patches and grid, resized the way the checkpoint's processor says."""
        out = self.processor(images=[image], return_tensors="pt")
        t, h, w = (int(v) for v in out["image_grid_thw"][0].tolist())
        return Picture(out["pixel_values"], (t, h, w), t * h * w // (self.merge * self.merge))

    @torch.no_grad()
    def encode(self, pictures: list[Picture], lora: VisionLoRA | None = None) -> list[torch.Tensor]:
        """Pictures -> one [tokens, lm_hidden] embedding per picture, in one encoder call."""
        pixels = torch.cat([p.pixel_values for p in pictures]).to(self.device, self.dtype)
        grids = torch.tensor([p.grid for p in pictures], device=self.device)
        with self._lora_hooks(lora):
            out = self.module(pixels, grid_thw=grids)
        merged = out.pooler_output if hasattr(out, "pooler_output") else out  # [sum tokens, lm_hidden]
        self.images_encoded += len(pictures)
        return list(merged.split([p.num_tokens for p in pictures]))

    @contextlib.contextmanager
    def _lora_hooks(self, lora: VisionLoRA | None) -> Iterator[None]:
        """Adds ``scale · (x Aᵀ) Bᵀ`` to each adapted vision linear for the duration of one encode."""
        handles = []
        if lora is not None:
            for path, (a, b, scale) in lora.modules.items():
                module = self.module.get_submodule(path)

                def hook(_mod, args, y, a=a, b=b, scale=scale):
                    return y + scale * ((args[0] @ a.t()) @ b.t())

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
