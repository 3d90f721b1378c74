"""Pure-torch references of every kernel op; the "torch" LoRA backend runs these (vectorised per segment/expert).

Each op accumulates in fp32 and rounds into its output once, like the kernels. They read the batch's small
metadata tensors on the host, so on a GPU they synchronise: use them on CPU, or as a test oracle.
"""

from __future__ import annotations

import torch

from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget
from kernels.routing import Routing


def _slices(weights: LoRAWeights) -> list[tuple[int, int, int]]:
    bounds = weights.slice_bounds
    return [(i, bounds[i], bounds[i + 1]) for i in range(weights.n_slices)]


def lora_delta(x: torch.Tensor, weights: LoRAWeights, slot: int, rank: int) -> torch.Tensor:
    """Semantics: out[:, out_i] = (x @ a[slot, i, :r].T) @ b[slot, out_i, :r].T, in fp32.

    x: [L, in_dim] -> [L, out_total] float32.
    """
    a = weights.a[slot, :, :rank].float()  # [n_slices, r, in]
    shrunk = torch.einsum("li,nri->lnr", x.float(), a)  # [L, n_slices, r]
    out = x.new_zeros((x.shape[0], weights.out_dim), dtype=torch.float32)
    for i, lo, hi in _slices(weights):
        out[:, lo:hi] = shrunk[:, i] @ weights.b[slot, lo:hi, :rank].float().T
    return out


def add_lora(y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None:
    """Semantics: y[t, out_i] += sum_k scale[s, k] * (x[t] @ a[slot, i, :r].T) @ b[slot, out_i, :r].T per segment s.

    y: [T, out_total] updated in place (rows outside the batch untouched); x: [T, in_dim]; batch: LoRABatch.
    """
    slots, ranks, scales = (t.tolist() for t in batch.terms())
    indptr = batch.seg_indptr.tolist()
    for s in range(batch.num_segments):
        lo, hi = indptr[s], indptr[s + 1]
        live = [(sl, r, sc) for sl, r, sc in zip(slots[s], ranks[s], scales[s], strict=True) if sl >= 0 and r > 0]
        if hi == lo or not live:
            continue
        rows = batch.token_indices[lo:hi].long()  # [L]
        xs = x[rows]  # [L, in_dim]
        delta = sum(sc * lora_delta(xs, weights, sl, r) for sl, r, sc in live)
        y[rows] = (y[rows].float() + delta).to(y.dtype)


def add_routed(y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, routing: Routing) -> None:
    """Semantics: y[t] += sum_j topk_gates[t, j] * scale[e] * (x[t] @ a[slot_e, i, :r_e].T) @ b[slot_e, out_i, :r_e].T
    with e = topk_ids[t, j].

    y: [T, out_total] updated in place; x: [T, in_dim]; routing: T rows of k pairs.
    """
    ids = routing.topk_ids.long()  # [T, k]
    gates = torch.where(ids >= 0, routing.topk_gates, 0.0)  # [T, k]
    dense = torch.zeros((ids.shape[0], routing.num_experts), dtype=torch.float32, device=x.device)
    dense.scatter_add_(1, ids.clamp(min=0), gates)  # [T, E] gate of each expert per row
    delta = torch.zeros((x.shape[0], weights.out_dim), dtype=torch.float32, device=x.device)
    slots, ranks, scales = (routing.expert_slots.tolist(), routing.expert_ranks.tolist(),
                            routing.expert_scales.tolist())
    for e in range(routing.num_experts):
        rows = torch.nonzero(dense[:, e]).reshape(-1)
        if rows.numel() == 0 or slots[e] < 0 or ranks[e] == 0:
            continue
        gate = dense[rows, e, None] * scales[e]  # [L, 1]
        delta[rows] += gate * lora_delta(x[rows], weights, slots[e], ranks[e])
    y.copy_((y.float() + delta).to(y.dtype))


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  weights: LoRAWeights | None = None, routing: Routing | None = None) -> torch.Tensor:
    """Semantics: y = x @ weight.T + bias (+ add_routed's update), summed in fp32 and rounded once.

    x: [T, in_dim]; weight: [out_total, in_dim]; bias: [out_total] or None -> [T, out_total] in x's dtype.
    """
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    if weights is not None and routing is not None:
        add_routed(y, x, weights, routing)
    return y.to(x.dtype)


def target_delta(target: MergeTarget, slot: int, rank: int) -> torch.Tensor:
    """Semantics: D[out_i, :] = b[slot, out_i, :r] @ a[slot, i, :r], in fp32 -> [out_total, in_dim]."""
    lora = target.lora
    delta = torch.zeros(tuple(target.weight.shape), dtype=torch.float32, device=target.weight.device)
    for i, lo, hi in _slices(lora):
        delta[lo:hi] = lora.b[slot, lo:hi, :rank].float() @ lora.a[slot, i, :rank].float()
    return delta


def _terms_of(terms: DeltaTerms | None, group: int) -> list[tuple[int, int, float]]:
    if terms is None:
        return []
    g = group if terms.num_groups > 1 else 0
    return list(zip(terms.slots[g].tolist(), terms.ranks[g].tolist(), terms.scales[g].tolist(), strict=True))


def delta_merge(
    plan: MergePlan, add: DeltaTerms | None = None, sub: DeltaTerms | None = None, skip_unchanged: bool = False
) -> None:
    """Semantics: for each target (W, group g): W = round(src + sum_j add.s[g,j] B_j A_j - sum_j sub.s[g,j] B_j A_j),
    src = the target's base copy if it has one, else W; skip_unchanged leaves W alone where add[g] == sub[g].

    plan: the targets; add, sub: DeltaTerms with G = 1 or G = plan.num_groups rows of K terms each.
    """
    for target in plan.targets:
        plus, minus = _terms_of(add, target.group), _terms_of(sub, target.group)
        if skip_unchanged and plus == minus:
            continue
        delta = torch.zeros(tuple(target.weight.shape), dtype=torch.float32, device=target.weight.device)
        for sign, terms in ((-1.0, minus), (1.0, plus)):
            for slot, rank, scale in terms:
                if slot >= 0 and rank > 0:
                    delta += (sign * scale) * target_delta(target, slot, rank)
        src = target.base if target.base is not None else target.weight
        target.weight.copy_((src.float() + delta).to(target.weight.dtype))


def swift_merge(plan: MergePlan, add: DeltaTerms | None = None, sub: DeltaTerms | None = None) -> None:
    """Semantics: W = round(src + sum add.s * B A - sum sub.s * B A) for every target (see delta_merge)."""
    delta_merge(plan, add, sub)


def fused_switch(plan: MergePlan, prev: DeltaTerms, new: DeltaTerms) -> None:
    """Semantics: per layer g with new[g] != prev[g]: W += [-G_prev D_prev || G_new D_new] @ [U_prev; U_new]."""
    delta_merge(plan, add=new, sub=prev, skip_unchanged=True)
