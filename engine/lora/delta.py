"""LayerDelta: what an adapter type adds to an adapted linear's output in one iteration."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

LayerKey = tuple[int, str]  # (decoder layer index, projection group: "qkv", "o", "gate_up" or "down")


class LayerDelta(ABC):
    """Built once per iteration by an adapter type and shared by every layer.

    Plain multi-LoRA is one; a MoE-LoRA adapter type (token-wise routed experts) would be another. The model
    calls ``apply`` for every adapted projection, in order, after the base matmul.
    """

    @abstractmethod
    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: [tokens, in_dim], y: [tokens, out_total]; adds this iteration's update to y in place."""
