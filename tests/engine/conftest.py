"""Engine test fixtures: a factory of `valora` engines over the tiny checkpoint, and a hidden-state task head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.base import create_engine
from engine.config import EngineConfig
from engine.heads import TaskHead

# Tiny models: a second intra-op thread costs more in hand-offs than it saves, on 2 shared cores many times more.
torch.set_num_threads(1)


class HiddenHead(TaskHead):
    """Answers with the final-norm hidden states it reads, so tests can compare prefill logits."""

    def __init__(self, positions: int, adapter: str | None = None) -> None:
        super().__init__()
        self.positions, self.adapter = positions, adapter
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def decode(self, output: torch.Tensor) -> dict:
        return {"hidden": output.float().cpu()}


@pytest.fixture(scope="module")
def make_engine(tiny_checkpoint):
    """make_engine(**config overrides) -> a CPU `valora` engine on the tiny checkpoint; closed after the module."""
    engines = []

    def make(**overrides):
        settings = {"model": str(tiny_checkpoint / "base"), "adapters": str(tiny_checkpoint / "adapters"),
                    "device": "cpu", **{k: str(v) if k in ("model", "adapters") else v for k, v in overrides.items()}}
        cfg = EngineConfig(**settings)
        engine = create_engine(cfg)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
