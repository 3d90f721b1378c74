"""LoRA-Switch's routed unmerged operator: each token carries k (expert, gate) pairs; one launch pair per projection.

It runs the ATMM kernels in routed mode: all T rows form one segment whose terms are the E experts of the MoE-LoRA
adapter; each row's gate for expert e is read from the routing table inside the kernels. A row block skips an
expert no row of it picked, so every expert's weights are read once per row block that uses it, and the per-row
sum over the k experts happens in fp32 registers before one rounding into y (deterministic, no atomics). Grids
depend only on T, E and the host max rank, so a CUDA graph can capture the call. Tiles come from the device table's
routed entries (``valora kernels tune --routed``), keyed as E segments of T * k rows.
"""

from __future__ import annotations

import torch

from kernels.atmm import RowPlan, check_operands, launch_pair, workspace_for
from kernels.lora_batch import LoRAWeights
from kernels.routing import Routing
from kernels.tile_config import AtmmConfig, ShapeKey, device_table


def routed_plan(routing: Routing) -> RowPlan:
    """The ATMM row plan of a routing: one segment of T rows, one term per expert, gates from the table."""
    t = routing.num_tokens
    return RowPlan(
        tok=routing.topk_ids, indptr=routing.topk_ids, slots=routing.expert_slots, ranks=routing.expert_ranks,
        scales=routing.expert_scales, num_segments=1, num_positions=t, n_terms=routing.num_experts,
        max_seg_len=t, max_rank=routing.max_rank, route_ids=routing.topk_ids, route_gates=routing.topk_gates,
    )


def routed_add(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: LoRAWeights,
    routing: Routing,
    config: AtmmConfig | None = None,
    *,
    workspace: torch.Tensor | None = None,
    pdl: bool = False,
) -> None:
    """Add each token's top-k expert updates into the base layer's output, in place.

    Semantics: y[t, out_i] += sum_j topk_gates[t, j] * expert_scales[e] * (x[t] @ a[slot_e, i, :r_e].T)
        @ b[slot_e, out_i, :r_e].T, with e = topk_ids[t, j] (skipped if -1), slot_e = expert_slots[e].

    Args:
        y: [T, out_total] base output, updated in place.
        x: [T, in_dim] layer input in the weights' dtype.
        weights: the projection's pool holding the experts' slots.
        routing: the step's Routing (shared by every layer).
        config: tiles; default from the device table's routed entries, keyed as E segments of T * k rows.
        workspace: optional fp32 [split_k, T, E, n_slices, max_rank] shrink buffer.
        pdl: chain the pair by programmatic dependent launch (``kernels.atmm.launch_pair``); off by default.
    """
    routing.check()
    check_operands(y, x, weights, routing.num_tokens)
    if routing.num_tokens == 0 or routing.num_experts == 0 or routing.max_rank == 0:
        return
    if routing.max_rank > weights.pool_rank:
        raise ValueError(f"routing max_rank {routing.max_rank} exceeds the pool's rank {weights.pool_rank}")
    if routing.topk_ids.device != x.device:
        raise ValueError("the routing and x must be on one device")
    plan = routed_plan(routing)
    if config is None:
        key = ShapeKey(segments=routing.num_experts, tokens=routing.num_tokens * routing.top_k,
                       in_dim=weights.in_dim, out_dim=weights.out_dim, max_rank=routing.max_rank)
        config = device_table().lookup_routed(key)[0]
    launch_pair(y, x, weights, plan, workspace_for(plan, weights, config, workspace, x.device), config, pdl)
