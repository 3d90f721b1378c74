"""MergeSwitch: which pre-gated MoE-LoRA experts are merged into the backbone now, and the fused switch to others.

While one pre-gated MoE sequence decodes alone, its current token's experts (per layer: k experts with their gates)
are folded into the base weights, ``W = W0 + sum_j g_j * s * B_j A_j``, so the step costs what the backbone costs.
Each token the fused switch kernel swaps the previous selection for the new one in one launch over all layers,
leaving every layer whose selection (experts and gates) did not change untouched. Before any other batch runs,
``unmerge`` restores the backbone.

The weights are shared with the orchestrator's merged modes: the switch first ``claim``s them from the engine's
merge state (granted only while no plain adapter is merged; while held, the orchestrator merges none), and
releases them on ``unmerge``.

Precision: each switch rounds W once (fp32 accumulation inside the kernel), so in bf16 the weights drift from
W0 by rounding noise that grows with the number of switches; bench/switch.py measures the logit drift after
2,000 switches. ``unmerge`` takes the drift away when the engine keeps clean copies of the weights
(``restore``: W = base, bit-exact); without them it subtracts the last selection, leaving the accumulated
rounding (fp32 on CPU: at the fp32 rounding level).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.lora.delta import LayerKey
from engine.moe.pool import MoEPool
from kernels.backend import LoRABackend
from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget

logger = logging.getLogger(__name__)

OWNER = "moe-lora"  # this adapter type's name in the merge state's claims


class WeightClaims(Protocol):
    """The engine-wide record of what the base weights hold (the orchestrator's MergeState)."""

    claimed_by: str | None

    @property
    def merged(self) -> str | None: ...

    def claim(self, owner: str) -> bool: ...

    def release(self, owner: str) -> None: ...


@dataclass
class LocalClaims:
    """WeightClaims for a decoder no orchestrator shares (tests, benchmarks): nothing else ever merges."""

    claimed_by: str | None = None
    merged: str | None = None

    def claim(self, owner: str) -> bool:
        if self.claimed_by not in (None, owner):
            return False
        self.claimed_by = owner
        return True

    def release(self, owner: str) -> None:
        if self.claimed_by == owner:
            self.claimed_by = None


def empty_terms(layers: int, k: int, max_rank: int, device: torch.device) -> DeltaTerms:
    """DeltaTerms [layers, k] with every term unused (nothing merged)."""
    return DeltaTerms(slots=torch.full((layers, k), -1, dtype=torch.int32, device=device),
                      ranks=torch.zeros(layers, k, dtype=torch.int32, device=device),
                      scales=torch.zeros(layers, k, dtype=torch.float32, device=device), max_rank=max_rank)


class MergeSwitch:
    """The merged selection (``current``, one row of k terms per layer) and the fused-switch plan of the backbone.

    ``merged``: the adapter whose experts are in the weights (None: the backbone is clean). The merged adapter's
    pool slot is held (one extra reference) until ``unmerge``, so it cannot be evicted while its experts are in W.
    """

    def __init__(self, pool: MoEPool, linears: dict[LayerKey, torch.nn.Module], op: LoRABackend | None,
                 claims: WeightClaims | None = None, restore: Callable[[], None] | None = None) -> None:
        self.pool, self.op, self.linears = pool, op, linears
        self.claims: WeightClaims = claims if claims is not None else LocalClaims()
        self.restore = restore
        self.layers, self.device = pool.layout.num_layers, pool.device
        self.current = empty_terms(self.layers, pool.top_k, pool.max_rank, pool.device)
        self._empty = empty_terms(self.layers, pool.top_k, pool.max_rank, pool.device)
        self._plans: dict[tuple[str, ...], MergePlan] = {}
        self.plan: MergePlan | None = None
        self.merged: str | None = None
        self.switches = 0  # steps that ran the fused switch
        self.unmerges = 0

    def plan_for(self, groups: tuple[str, ...]) -> MergePlan:
        """The merge plan over every layer's projections of ``groups`` (target group = layer index)."""
        if groups not in self._plans:
            targets = [MergeTarget(self.linears[(layer, g)].weight, self.pool.weights((layer, g)), group=layer)
                       for layer in range(self.layers) for g in groups]
            self._plans[groups] = MergePlan(targets)
        return self._plans[groups]

    def available(self) -> bool:
        """Whether the weights may take MoE experts now (no plain adapter merged, no other claim)."""
        return self.claims.merged is None and self.claims.claimed_by in (None, OWNER)

    def begin(self, name: str, groups: tuple[str, ...]) -> None:
        """Make ``name`` the merged adapter (its slot already held by the caller); unmerges another first."""
        if self.merged == name:
            return
        self.unmerge()
        if not self.claims.claim(OWNER):
            raise ValueError(f"the base weights are not free for MoE experts (merged: {self.claims.merged!r}, "
                             f"claimed by {self.claims.claimed_by!r})")
        self.plan = self.plan_for(groups)
        self.merged = name
        self.pool.acquire(name, None)

    def switch_to(self, new: DeltaTerms) -> None:
        """Swap the merged experts for ``new`` ([layers, k], device tensors): one fused-switch launch."""
        if self.plan is None:
            raise ValueError("no MoE adapter is being merged; call begin() first")
        self.op.fused_switch(self.plan, self.current, new)
        self.current.slots.copy_(new.slots)
        self.current.ranks.copy_(new.ranks)
        self.current.scales.copy_(new.scales)
        self.switches += 1

    def unmerge(self) -> None:
        """Restore the backbone (from the clean copies, or by removing the last selection) and release the
        adapter's slot and the claim on the weights."""
        if self.merged is None:
            return
        if self.restore is not None:
            self.restore()
        else:
            self.op.fused_switch(self.plan, self.current, self._empty)
        self.current.slots.fill_(-1)
        self.current.ranks.zero_()
        self.current.scales.zero_()
        self.pool.release(self.merged)
        logger.debug("unmerged MoE adapter %s", self.merged)
        self.merged, self.plan = None, None
        self.claims.release(OWNER)
        self.unmerges += 1
