"""Router: turns a router site's input into each row's top-k (expert, gate) pairs, for every resident MoE slot.

Every op is a device-side torch op on tensors whose shapes depend only on the row count and the pool's fixed
sizes (no host reads), so the routed path can be captured in a CUDA graph. Each row carries its MoE slot
(``row_slot``, -1 for rows of other adapters or none); the logits of every slot's router are computed for every
row and each row keeps its own slot's (the pool holds few slots and the router is tiny next to the layers).
"""

from __future__ import annotations

import torch

from engine.moe.pool import MoEPool
from kernels.routing import Routing


class Router:
    """Routing of one step's rows; ``row_slot``: [T] long pool slot per row, -1 where the row is not routed.

    ``refresh`` reads ``row_slot`` (and the pool's per-slot tables); call it at the start of every forward pass,
    inside it, so that a captured CUDA graph re-reads the buffer on each replay.
    """

    def __init__(self, pool: MoEPool, row_slot: torch.Tensor) -> None:
        self.pool = pool
        self.row_slot = row_slot
        self.pick = row_slot  # set by refresh
        self.live = row_slot

    def refresh(self) -> None:
        row_slot, pool = self.row_slot, self.pool
        self.pick = row_slot.clamp(min=0)  # [T] a valid slot index for gathers (masked out where row_slot < 0)
        # [T, 1, K] pairs that exist: routed rows, within their adapter's top-k
        self.live = (pool.pair_live[self.pick] & (row_slot >= 0)[:, None])[:, None, :]

    def pregated(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global router on the first adapted layer's input: (ids, gates) [layers, T, K] for every layer.

        x: [T, hidden].
        """
        pool = self.pool
        logits = torch.einsum("th,soh->tso", x.float(), pool.global_router)  # [T, slots, layers * E]
        logits = self._own(logits).view(x.shape[0], pool.layout.num_layers, pool.experts)  # [T, layers, E]
        return self._top_k(logits)

    def site(self, layer: int, group: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-layer router on group ``group``'s input x: [T, in_dim] -> (ids, gates) [1, T, K]."""
        logits = torch.einsum("ti,sei->tse", x.float(), self.pool.site_router[group][layer])  # [T, slots, E]
        return self._top_k(self._own(logits)[:, None, :])

    def routing(self, ids: torch.Tensor, gates: torch.Tensor) -> Routing:
        """The kernels' Routing of one layer: ids, gates [T, K] contiguous."""
        pool = self.pool
        return Routing(pool.expert_slots, pool.expert_ranks, pool.expert_scales, ids, gates, pool.max_rank)

    def _own(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, slots, O] -> [T, O]: each row's own slot's logits."""
        index = self.pick[:, None, None].expand(-1, 1, logits.shape[2])
        return logits.gather(1, index).squeeze(1)

    def _top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, G, E] -> (ids int32, gates fp32), each [G, T, K]; ids index the pool's expert space.

        Gates are the softmax over the k chosen logits; pairs past an adapter's top-k, and rows not routed,
        get id -1 and gate 0.
        """
        pool = self.pool
        logits = logits + pool.logit_bias[self.pick][:, None, :]  # experts past the adapter's count: -inf
        values, ids = torch.topk(logits, pool.top_k, dim=-1)  # [T, G, K]
        values = values.masked_fill(~self.live, float("-inf"))
        gates = torch.softmax(values, dim=-1)
        ids = ids + (self.pick * pool.experts)[:, None, None]
        ids = torch.where(self.live, ids, -1).to(torch.int32)
        gates = torch.where(self.live, gates, 0.0)
        return ids.transpose(0, 1).contiguous(), gates.transpose(0, 1).contiguous()
