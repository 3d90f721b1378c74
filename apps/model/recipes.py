"""Training recipes as typed configs; light to import, so that CLI help can show their defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainConfig:
    """What one pretraining run does; stored in its state so that a resumed run cannot silently change it."""

    preset: str = "demo"
    vocab_size: int = 1024
    steps: int = 900
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.05
    image_size: int = 224  # frames are drawn at this size; the processor resizes them like the engine does
    seed: int = 0
    log_every: int = 20
    save_every: int = 100
