"""Task heads: modules that read a request's prefill hidden states and answer without decoding."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class TaskHead(torch.nn.Module, ABC):
    """A head trained jointly with an adapter; the engine runs prefill with that adapter, then the head.

    ``positions`` says how many trailing prompt positions the head reads (1 for a classifier on the
    last token, N for N query tokens at the end of the prompt).
    """

    adapter: str | None = None
    positions: int = 1

    @abstractmethod
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [positions, hidden_size] final-norm states -> raw head output."""

    @abstractmethod
    def decode(self, output: torch.Tensor) -> dict[str, Any]:
        """Raw head output -> the structured, JSON-serialisable answer."""

    def answer(self, hidden: torch.Tensor) -> dict[str, Any]:
        """hidden: [positions, hidden_size] -> structured answer."""
        with torch.no_grad():
            return self.decode(self.forward(hidden.to(next(self.parameters()).dtype)))
