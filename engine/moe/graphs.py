"""StaticMoE: the fixed row-slot buffers that CUDA-graph-captured MoE deltas read, one per (bucket, routing).

A captured decode graph keeps the deltas it was captured with; their only per-step input is each row's MoE pool
slot (-1 for rows of other adapters and for padding rows), which ``fill`` writes before every replay. Routing,
top-k, gates and the routed / fused-switch launches all run inside the graph on device tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.lora.delta import LayerDelta
from engine.moe.manager import MoEManager, MoEPlan
from engine.moe.spec import ROUTINGS

KINDS = (*ROUTINGS, "switch")


class StaticMoE:
    """Row-slot buffers [bucket] long per bucket size and kind (routing scheme, or the switch path)."""

    def __init__(self, moe: MoEManager, sizes: Sequence[int], device: torch.device) -> None:
        self.moe = moe
        self.buffers = {(size, kind): torch.full((size,), -1, dtype=torch.long, device=device)
                        for size in sizes for kind in KINDS}

    def fill(self, plan: MoEPlan, size: int) -> None:
        """Load the plan's row slots into the bucket's buffers (padding rows: -1)."""
        for kind, rows in self.moe.row_slots(plan).items():
            padded = np.full(size, -1, dtype=np.int64)
            padded[:len(rows)] = rows
            self.buffers[size, kind].copy_(torch.from_numpy(padded))

    def deltas(self, plan: MoEPlan, size: int) -> list[LayerDelta]:
        """The plan's deltas over the bucket's buffers (for capture)."""
        if plan.path == "none":
            return []
        return self.moe.deltas(plan, {kind: self.buffers[size, kind] for kind in KINDS})
