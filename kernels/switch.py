"""LoRA-Switch's fused switch: swap the merged experts of every layer for the next token's, in one launch.

With token-wise pre-gating, the router at the first adapted layer picks each layer's experts for the next token;
the backbone keeps the picked experts merged (``W = W0 + sum_j g_j D_j U_j``), so decoding runs at base-model cost.
The switch removes the previous token's experts and adds the new ones in one delta-merge launch over all layers,
and leaves untouched every layer whose selection (experts and gates) did not change.
"""

from __future__ import annotations

import torch

from kernels.merge_plan import DeltaTerms, MergePlan
from kernels.swift_merge import swift_merge
from kernels.tile_config import MergeConfig


def selection_terms(
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    expert_slots: torch.Tensor,
    expert_ranks: torch.Tensor,
    expert_scales: torch.Tensor,
    max_rank: int,
) -> DeltaTerms:
    """Per-layer selections as DeltaTerms (device-side torch ops only, so a CUDA graph can capture it).

    expert_ids: [G, k] expert index in [0, E) per layer (-1: unused); gates: [G, k] float;
    expert_slots, expert_ranks, expert_scales: [E] as in Routing. Returns slots/ranks/scales [G, k].
    """
    ids = expert_ids.long()
    used = ids >= 0
    safe = ids.clamp(min=0)
    slots = torch.where(used, expert_slots[safe], -1).to(torch.int32).contiguous()
    ranks = torch.where(used, expert_ranks[safe], 0).to(torch.int32).contiguous()
    scales = torch.where(used, gates.float() * expert_scales[safe], 0.0).float().contiguous()
    return DeltaTerms(slots, ranks, scales, max_rank)


def fused_switch(plan: MergePlan, prev: DeltaTerms, new: DeltaTerms, config: MergeConfig | None = None) -> None:
    """Switch the merged experts of every layer from ``prev`` to ``new`` in one launch.

    Semantics: for each layer g with new[g] != prev[g], each target W of g:
        W = round(W + [-prev.scales[g] * D_prev || new.scales[g] * D_new] @ [U_prev; U_new])
        (D = lora_B, U = lora_A of the selected experts' slots; fp32 accumulation, one rounding).

    Args:
        plan: every adapted projection of every layer, target group = layer index.
        prev: DeltaTerms [G, k] merged now (gate * scale folded into scales); G = 1 or the plan's group count.
        new: DeltaTerms [G, k] to merge instead.
        config: merge tiles; default from the device table.
    """
    if prev.num_terms != new.num_terms:
        raise ValueError(f"prev has {prev.num_terms} experts per layer, new has {new.num_terms}")
    swift_merge(plan, add=new, sub=prev, config=config, skip_unchanged=True)
