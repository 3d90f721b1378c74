"""The MoE-LoRA LayerDeltas: the routed unmerged path (any routing scheme) and the merge-switch path (pre-gated).

Both hook into the engine's adapter seam (``engine/lora/delta.py``): the model calls ``apply`` for every adapted
projection in forward order, after the base matmul, so the routing is computed where its router reads its input
(the pre-gated router at layer 0's attention projections, which run first) and reused by the projections after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.lora.delta import LayerDelta, LayerKey
from engine.moe.pool import MoEPool
from engine.moe.router import Router
from engine.moe.spec import GROUPS, site_of
from engine.moe.switch import MergeSwitch
from kernels.backend import LoRABackend
from kernels.routing import Routing
from kernels.switch import selection_terms

FIRST_KEY: LayerKey = (0, GROUPS[0])  # the first adapted projection of a forward pass (layer 0's q/k/v)


class RoutedMoEDelta(LayerDelta):
    """Each routed row adds its top-k experts' updates through the routed multi-LoRA operator; the routing is
    computed once per step (pre-gated) or once per router site (baselines).

    Up to the op's ``fused_rows`` rows (decode batches) and with ``fuse``, the projection's matmul and the experts'
    expand run as one launch after the shrink (``linear``); otherwise ``apply`` adds the update after the matmul
    (one launch pair per projection).
    """

    def __init__(self, pool: MoEPool, op: LoRABackend, routing: str, row_slot: torch.Tensor,
                 fuse: bool = True) -> None:
        self.pool, self.op, self.scheme, self.fuse = pool, op, routing, fuse
        self.router = Router(pool, row_slot)
        self.routes: dict[LayerKey, Routing] = {}  # per router site (baselines)
        self.layer_routes: list[Routing] = []  # per layer (pre-gated)

    def linear(self, key: LayerKey, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor | None:
        if not (self.fuse and 0 < x.shape[0] <= self.op.fused_rows and self._adapts(key[1])):
            return None  # ``apply`` runs instead (and refreshes the router where this would have)
        return self.op.routed_linear(x, weight, bias, self.pool.weights(key), self._step_routing(key, x))

    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        routing = self._step_routing(key, x)
        if routing is not None:
            self.op.add_routed(y, x, self.pool.weights(key), routing)

    def _step_routing(self, key: LayerKey, x: torch.Tensor) -> Routing | None:
        if key == FIRST_KEY:
            self.router.refresh()
        return self._routing(key, x)

    def _adapts(self, group: str) -> bool:
        """Whether this scheme adapts ``group`` (block-wise routing leaves attention alone)."""
        return self.scheme != "block" or group in ("gate_up", "down")

    def _routing(self, key: LayerKey, x: torch.Tensor) -> Routing | None:
        layer, group = key
        if self.scheme == "pregated":
            if key == FIRST_KEY:
                ids, gates = self.router.pregated(x)  # [layers, T, K]
                self.layer_routes = [self.router.routing(ids[i], gates[i]) for i in range(ids.shape[0])]
            return self.layer_routes[layer]
        if not self._adapts(group):
            return None
        if site_of(self.scheme, group) == group:
            ids, gates = self.router.site(layer, group, x)  # [1, T, K]
            self.routes[key] = self.router.routing(ids[0], gates[0])
        return self.routes[(layer, site_of(self.scheme, group))]


class SwitchMoEDelta(LayerDelta):
    """Merge-switch (LoRA-Switch at batch 1): the lone sequence's experts live merged in the backbone.

    At the first projection the pre-gated router picks the token's experts for every layer; one fused-switch
    launch swaps them in (leaving the layers whose selection did not change untouched), and the first projection,
    which ran on the previous token's weights, is recomputed. Every other projection then runs at base cost.
    Only valid when this sequence's single row is the whole batch (the manager guarantees it).
    """

    def __init__(self, switch: MergeSwitch, row_slot: torch.Tensor, first: torch.nn.Module) -> None:
        self.switch, self.first = switch, first
        self.router = Router(switch.pool, row_slot)

    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        if key != FIRST_KEY:
            return
        pool = self.switch.pool
        self.router.refresh()
        ids, gates = self.router.pregated(x)  # [layers, 1, K]
        new = selection_terms(ids[:, 0], gates[:, 0], pool.expert_slots, pool.expert_ranks, pool.expert_scales,
                              pool.max_rank)  # [layers, K]
        self.switch.switch_to(new)
        y.copy_(F.linear(x, self.first.weight, self.first.bias))
