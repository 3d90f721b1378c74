"""Synthetic frames held in memory for adapter training and evaluation, with their vision features cached."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from apps.datasets.schema import FrameTruth
from apps.datasets.splits import SynthDataset

logger = logging.getLogger(__name__)


class FrameSet:
    """n stills of a split (pixels, truths), drawn once; the base model's image features computed once.

    With a frozen vision tower (adapters on the language model only) the features of a frame never change, so
    training and evaluation reuse them instead of running the vision tower again.
    """

    def __init__(self, split: str, n: int, seed: int = 0, size: int = 224) -> None:
        start = time.time()
        data = SynthDataset(split, n, seed=seed, size=size)
        samples = [data[i] for i in range(n)]
        self.split, self.seed = split, seed
        self.images: list[np.ndarray] = [s.image for s in samples]  # each [height, width, 3] uint8
        self.truths: list[FrameTruth] = [s.truth for s in samples]
        self.features: list[torch.Tensor] | None = None  # each [image tokens, hidden]
        self.grids: torch.Tensor | None = None  # [n, 3]
        logger.info("drew %s %s frames in %.1f s", n, split, time.time() - start)

    def __len__(self) -> int:
        return len(self.truths)

    @torch.no_grad()
    def encode(self, model, encoder, batch_size: int = 32) -> None:
        """Run the (frozen) vision tower once over every frame; model: Qwen2_5_VLForConditionalGeneration."""
        if self.features is not None:
            return
        start = time.time()
        features, grids = [], []
        for i in range(0, len(self), batch_size):
            pixel_values, grid = encoder.pixels(self.images[i : i + batch_size])
            out = model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid, return_dict=True)
            features.extend(f.detach().clone() for f in out.pooler_output)
            grids.append(grid)
        self.features, self.grids = features, torch.cat(grids)
        logger.info("encoded %s frames with the vision tower in %.1f s", len(self), time.time() - start)
