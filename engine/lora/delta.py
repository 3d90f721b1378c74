"""LayerDelta: what an adapter type adds to an adapted linear's output in one iteration."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

LayerKey = tuple[int, str]  # (decoder layer index, projection group: "qkv", "o", "gate_up" or "down")


class LayerDelta(ABC):
    """Built once per iteration by an adapter type and shared by every layer.

    Plain multi-LoRA is one; a MoE-LoRA adapter type (token-wise routed experts) would be another. The model
    calls ``apply`` for every adapted projection, in order, after the base matmul; or, when this is the step's only
    delta, ``linear`` first, which may compute the base matmul and the update together (None: it does not).
    """

    def linear(self, key: LayerKey, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor | None:
        """x: [tokens, in_dim] -> x Wᵀ + b with this iteration's update, [tokens, out_total]; or None, and the
        model runs the base matmul then ``apply``."""
        return None

    @abstractmethod
    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        """x: [tokens, in_dim], y: [tokens, out_total]; adds this iteration's update to y in place."""
