"""Training recipes as typed configs; light to import, so that CLI help can show their defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainConfig:
    """What one pretraining run does; stored in its state so that a resumed run cannot silently change it."""

    preset: str = "demo"
    vocab_size: int = 1024
    steps: int = 650
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.05
    image_size: int = 224  # frames are drawn at this size; the processor resizes them like the engine does
    seed: int = 0
    log_every: int = 10
    save_every: int = 50


@dataclass(frozen=True)
class AdapterRecipe:
    """How one adapter is trained: which tasks it serves, its LoRA shape and the optimisation."""

    tasks: tuple[str, ...]
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    vision: bool = False  # LoRA on the vision tower and merger too (then image features cannot be cached)
    heads: bool = True  # train the tasks' heads jointly with the adapter
    text: bool = True  # train the text format too; False: a task with a head learns its head's answers only
    steps: int = 400
    batch_size: int = 16
    lr: float = 5e-3
    head_lr: float = 2e-3
    seed: int = 0
    log_every: int = 25

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("an adapter serves at least one task")
        if not 1 <= self.rank <= 256:
            raise ValueError(f"rank must be within 1..256, got {self.rank}")
        if self.alpha <= 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("alpha, steps and batch_size must be positive")
