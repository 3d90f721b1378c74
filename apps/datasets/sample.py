"""One dataset sample: a picture (in memory or on disk) with its ground truth."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apps.datasets.schema import FrameTruth


@dataclass(frozen=True)
class Sample:
    """A picture and what is true about it; synthetic samples carry the pixels, user data a path."""

    truth: FrameTruth
    image: np.ndarray | None = None  # image: [height, width, 3] uint8 RGB
    path: Path | None = None

    def rgb(self) -> np.ndarray:
        """The picture as [height, width, 3] uint8 RGB, read from disk when not in memory."""
        if self.image is not None:
            return self.image
        if self.path is None:
            raise ValueError("sample has neither pixels nor a path")
        from PIL import Image

        if not self.path.is_file():
            raise FileNotFoundError(f"image not found: {self.path}")
        with Image.open(self.path) as img:
            return np.asarray(img.convert("RGB"))
