"""Train / val / test splits of synthetic stills, disjoint by construction of their seeds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from apps.datasets.sample import Sample
from apps.datasets.schema import FrameTruth
from apps.datasets.synth import DEFAULT_SIZE, parse_size, still

# The split id is part of every sample's seed entropy, so no two splits can share a scene.
SPLITS: dict[str, int] = {"train": 1, "val": 2, "test": 3}


def split_id(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS[split]


class SynthDataset(Sequence[Sample]):
    """n random-access stills of one split; sample i is the same on every call (its truth on every machine)."""

    def __init__(self, split: str, n: int, seed: int = 0, size: int | str | Sequence[int] = DEFAULT_SIZE) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split, self.n, self.seed = split, n, seed
        self.size = parse_size(size)
        self._split_id = split_id(split)

    def __len__(self) -> int:
        return self.n

    def _entropy(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < self.n:
            raise IndexError(f"sample {index} out of range for {self.n} samples")
        return self._split_id, self.seed, index

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        image, truth = still(self._entropy(index), self.size)
        return Sample(truth=truth.model_copy(update={"frame": index}), image=image)

    def truth(self, index: int) -> FrameTruth:
        """Ground truth only, without drawing the picture (about 50x cheaper)."""
        _, truth = still(self._entropy(index), self.size, pixels=False)
        return truth.model_copy(update={"frame": index})


def iter_samples(
    split: str, n: int, seed: int = 0, size: int | str | Sequence[int] = DEFAULT_SIZE
) -> Iterator[tuple[np.ndarray, FrameTruth]]:
    """Yield n (rgb [height, width, 3] uint8, truth) stills of a split; frame numbers are the sample indices."""
    dataset = SynthDataset(split, n, seed, size)
    for index in range(n):
        sample = dataset[index]
        yield sample.image, sample.truth


def iter_truths(
    split: str, n: int, seed: int = 0, size: int | str | Sequence[int] = DEFAULT_SIZE
) -> Iterator[FrameTruth]:
    """The truths of iter_samples(split, n, seed, size) without rendering."""
    dataset = SynthDataset(split, n, seed, size)
    for index in range(n):
        yield dataset.truth(index)
