"""The add-LoRA op the multi-LoRA layers call: a backend from the kernels package's registry."""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from kernels.backend import get_backend
from kernels.lora_batch import LoRABatch, LoRAWeights

logger = logging.getLogger(__name__)


class AddLoRAOp(Protocol):
    """What the engine needs of a LoRA backend: ``add_lora`` (and whether CUDA graphs may capture it)."""

    def add_lora(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None: ...


def resolve_backend_name(name: str, device: torch.device) -> str:
    """'auto' -> 'triton' on GPU, 'torch' on CPU; other names unchanged."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def resolve_lora_op(name: str, device: torch.device) -> AddLoRAOp:
    """``name`` ('auto', 'torch', 'triton', 'punica') from kernels.backend's registry; 'auto' picks by device."""
    return get_backend(resolve_backend_name(name, device))


def graph_safe(op: AddLoRAOp) -> bool:
    """Whether decode iterations that run this op may be captured in CUDA graphs (the torch paths read on host)."""
    return bool(getattr(op, "cuda_graph_safe", getattr(op, "name", "") != "torch"))
