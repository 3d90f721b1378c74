"""Routing: LoRA-Switch token-wise pre-gating, k (expert, gate) pairs per token, shared by every adapted layer.

The router at the first adapted layer computes one Routing per forward step; every projection of every layer then
runs the routed operator (``kernels/routed.py``) from it, and the fused switch (``kernels/switch.py``) turns a
token's pairs into DeltaTerms. Everything here is built with device-side torch ops from device tensors whose shapes
are fixed by the batch size, so a CUDA graph can capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.merge_plan import DeltaTerms


@dataclass(frozen=True)
class Routing:
    """The experts of one MoE-LoRA adapter and each token's top-k choice among them."""

    expert_slots: torch.Tensor  # [E] int32: pool slot of each expert (the same slot in every layer's pool)
    expert_ranks: torch.Tensor  # [E] int32: true rank of each expert
    expert_scales: torch.Tensor  # [E] float32: alpha / r of each expert
    topk_ids: torch.Tensor  # [T, k] int32: expert index in [0, E) per pair, -1 for an unused pair
    topk_gates: torch.Tensor  # [T, k] float32: gate of each pair
    max_rank: int  # host-side bound on expert_ranks

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.expert_slots.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    def check(self) -> None:
        e = self.num_experts
        if self.expert_ranks.shape != (e,) or self.expert_scales.shape != (e,) or self.expert_slots.dim() != 1:
            raise ValueError("expert_slots, expert_ranks and expert_scales must all be [E]")
        if self.topk_ids.dim() != 2 or self.topk_gates.shape != self.topk_ids.shape:
            raise ValueError(f"topk_ids {tuple(self.topk_ids.shape)} and topk_gates "
                             f"{tuple(self.topk_gates.shape)} must both be [T, k]")
        if self.topk_ids.dtype != torch.int32 or self.expert_slots.dtype != torch.int32 \
                or self.expert_ranks.dtype != torch.int32:
            raise ValueError("topk_ids, expert_slots and expert_ranks must be int32")
        if self.topk_gates.dtype != torch.float32 or self.expert_scales.dtype != torch.float32:
            raise ValueError("topk_gates and expert_scales must be float32")
        if not (self.topk_ids.is_contiguous() and self.topk_gates.is_contiguous()):
            raise ValueError("topk_ids and topk_gates must be contiguous")

    def to(self, device: torch.device | str) -> Routing:
        """The same routing with its tensors on ``device``."""
        return Routing(self.expert_slots.to(device), self.expert_ranks.to(device), self.expert_scales.to(device),
                       self.topk_ids.to(device), self.topk_gates.to(device), self.max_rank)

    @classmethod
    def from_router_logits(
        cls,
        logits: torch.Tensor,
        top_k: int,
        expert_slots: torch.Tensor,
        expert_ranks: torch.Tensor,
        expert_scales: torch.Tensor,
        max_rank: int,
    ) -> Routing:
        """Top-k of the router's logits, gates = softmax over the k chosen (LoRA-Switch's gating).

        logits: [T, E] router output for each token; the rest as in the fields.
        """
        values, ids = torch.topk(logits.float(), top_k, dim=-1)  # [T, k]
        gates = torch.softmax(values, dim=-1)
        return cls(expert_slots, expert_ranks, expert_scales, ids.to(torch.int32).contiguous(),
                   gates.contiguous(), max_rank)

    def token_terms(self, row: int = 0) -> DeltaTerms:
        """Row ``row``'s pairs as DeltaTerms [1, k] for the fused switch (gate folded into the scale)."""
        ids = self.topk_ids[row : row + 1].long()  # [1, k]
        used = ids >= 0
        safe = ids.clamp(min=0)
        slots = torch.where(used, self.expert_slots[safe], -1).to(torch.int32)
        ranks = torch.where(used, self.expert_ranks[safe], 0).to(torch.int32)
        scales = torch.where(used, self.topk_gates[row : row + 1] * self.expert_scales[safe], 0.0)
        return DeltaTerms(slots.contiguous(), ranks.contiguous(), scales.float().contiguous(), self.max_rank)
