"""Kernel benchmark: ATMM against three baselines and the physical floor, plus swift merge and the fused switch.

Usage: python bench/kernels.py [--quick] [--only atmm|routed|linear|lora-linear|merge] [--json PATH]
(needs a CUDA GPU; bf16)

Every time is the median device time of a CUDA-graph replay with the L2 flushed before it (kernels/timing.py),
shrink + expand together. Methods, all on the same inputs in the same run:
  torch   per-adapter torch loop: gather the adapter's rows, two matmuls at its true rank, index_add into y
  gbmm    rank-padded gather-bmm (S-LoRA style): rows and adapters gathered per segment, padded to the longest
          segment and the pool rank, two bmm, scatter-add
  fixed   the ATMM kernels with one tile config for every shape (Punica SGMV's policy)
  atmm    the ATMM kernels with the tuned table of this GPU
floor = max(fewest bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate); fewest bytes = x read once,
y read and written once, each adapter's A and B at its true rank read once.

The routed (LoRA-Switch) operator runs on the 7B's MoE-LoRA groups (q/k/v, o, gate/up, down; 8 experts of rank 64,
top-2), against: dense  every expert for every row in torch, gated (graph-safe, no routing metadata);
segmented  the same kernels with the segmented table's tiles (what the routed op used before its own entries);
routed  its own table entries; routed+pdl  the same with programmatic dependent launch. Its floor counts the
experts some row picked.

The fused decode linear (kernels/fused_linear.py) runs on the same groups with a random base weight (and q/k/v's
bias): cublas  F.linear alone (the base projection); gemv  the fused linear without experts; unfused  F.linear then
the routed operator; fused  the fused linear with the experts. Its floor adds the base weight's bytes. With plain
multi-LoRA (``lora-linear``: one adapter per row, as a decode batch of distinct requests) unfused is F.linear then
ATMM, and fused the fused linear over the batch's rows (the engine's form below ``fused_rows``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kernels import reference  # noqa: E402
from kernels.atmm import atmm_add  # noqa: E402
from kernels.fused_linear import MAX_ROWS, routed_linear  # noqa: E402
from kernels.intmath import next_power_of_2  # noqa: E402
from kernels.lora_batch import LoRABatch, LoRAWeights  # noqa: E402
from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget  # noqa: E402
from kernels.routed import routed_add  # noqa: E402
from kernels.routing import Routing  # noqa: E402
from kernels.swift_merge import swift_merge  # noqa: E402
from kernels.switch import fused_switch, selection_terms  # noqa: E402
from kernels.tile_config import FIXED_CONFIG, ShapeKey, device_table  # noqa: E402
from kernels.timing import Timer, copy_bandwidth, matmul_rate  # noqa: E402

HIDDEN = 3584
OUTS = (3584, 512, 18944)
RANK_SPECS = ("16", "64", "128", "mixed")
ADAPTERS = (1, 8, 32)
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
# Best public Triton multi-LoRA kernels (vLLM lora_shrink/expand, SGLang chunked SGMV) on an H200, from issue 3.
REFERENCE_US = {(32, 32, "mixed", 3584): 37.0, (128, 32, "mixed", 18944): 104.0, (2048, 32, "64", 18944): 95.0,
                (8192, 32, "mixed", 3584): 198.0}
QWEN7B = dict(layers=28, hidden=3584, inter=18944, q=3584, kv=512)


@dataclass
class Case:
    tokens: int
    adapters: int
    ranks: str
    out_dim: int
    floor_us: float = 0.0
    us: dict[str, float] = field(default_factory=dict)
    max_rel_err: float = 0.0


def case_ranks(spec: str, adapters: int, gen: torch.Generator) -> list[int]:
    if spec == "mixed":
        return torch.randint(8, 129, (adapters,), generator=gen).tolist()
    return [int(spec)] * adapters


def build(case: Case, dev: str = "cuda"):
    gen = torch.Generator().manual_seed(case.tokens * 131 + case.adapters * 7 + case.out_dim)
    ranks = case_ranks(case.ranks, case.adapters, gen)
    pool_rank = 128 if case.ranks == "mixed" else max(ranks)  # the pool is padded to its largest rank
    dt = torch.bfloat16
    a = torch.zeros(case.adapters, 1, pool_rank, HIDDEN, dtype=dt)
    b = torch.zeros(case.adapters, case.out_dim, pool_rank, dtype=dt)
    for s, r in enumerate(ranks):  # storage padded with zeros past each true rank, like the engine's pool
        a[s, 0, :r] = torch.randn(r, HIDDEN, generator=gen) / HIDDEN**0.5
        b[s, :, :r] = torch.randn(case.out_dim, r, generator=gen) / r**0.5
    weights = LoRAWeights(a.to(dev), b.to(dev), (0, case.out_dim))
    token_slots = torch.randperm(case.tokens, generator=gen) % case.adapters  # decode: one token per request
    scales = [2.0] * case.adapters
    batch = LoRABatch.from_token_slots(token_slots, ranks, scales, device=dev)
    x = torch.randn(case.tokens, HIDDEN, generator=gen).to(dev, dt)
    y_ext = torch.randn(case.tokens + 1, case.out_dim, generator=gen).to(dev, dt)  # last row: gbmm's padding sink
    return ranks, token_slots, scales, weights, batch, x, y_ext


def torch_loop(y, x, weights, token_slots, ranks, scales, dev="cuda"):
    rows = [torch.nonzero(token_slots == s).reshape(-1).to(dev) for s in range(len(ranks))]

    def run():
        for s, (idx, r) in enumerate(zip(rows, ranks, strict=True)):
            if idx.numel():
                h = x[idx] @ weights.a[s, 0, :r].T  # [L, r]
                y.index_add_(0, idx, (h @ weights.b[s, :, :r].T) * scales[s])

    return run


def gather_bmm(y_ext, x, weights, batch, scales, dev="cuda"):
    indptr = batch.seg_indptr.tolist()
    seg_len = max(hi - lo for lo, hi in zip(indptr, indptr[1:], strict=False))
    s_count, t = batch.num_segments, x.shape[0]
    idx = torch.full((s_count, seg_len), t, dtype=torch.long)  # padded positions point at the sink row
    for s in range(s_count):
        rows = batch.token_indices[indptr[s] : indptr[s + 1]].long().cpu()
        idx[s, : rows.numel()] = rows
    idx = idx.to(dev)
    x_ext = torch.zeros(t + 1, x.shape[1], dtype=x.dtype, device=dev)
    x_ext[:t] = x
    slots = batch.seg_slots.long()
    seg_scale = torch.tensor([scales[s] for s in batch.seg_slots.tolist()], device=dev, dtype=x.dtype)

    def run():
        xs = x_ext[idx]  # [S, L, in]
        a = weights.a[slots, 0]  # [S, R, in] rank-padded
        b = weights.b[slots]  # [S, out, R]
        h = torch.bmm(xs, a.transpose(1, 2)) * seg_scale[:, None, None]  # [S, L, R]
        out = torch.bmm(h, b.transpose(1, 2))  # [S, L, out]
        y_ext.index_add_(0, idx.reshape(-1), out.reshape(-1, out.shape[-1]))

    return run


def floor_us(case: Case, ranks: list[int], token_slots: torch.Tensor, bw: float, rate: float) -> float:
    out = case.out_dim
    used = sorted(set(token_slots.tolist()))
    nbytes = 2 * (case.tokens * HIDDEN + 2 * case.tokens * out + sum(ranks[s] * (HIDDEN + out) for s in used))
    flops = sum(2 * ranks[s] * (HIDDEN + out) for s in token_slots.tolist())
    return max(nbytes / bw, flops / rate) * 1e6


def run_case(timer: Timer, case: Case, bw: float, rate: float) -> Case:
    ranks, token_slots, scales, weights, batch, x, y_ext = build(case)
    y = y_ext[: case.tokens]
    case.floor_us = floor_us(case, ranks, token_slots, bw, rate)
    y0 = y.clone()
    expected = y.float().clone()
    torch_loop(expected, x.float(), LoRAWeights(weights.a.float(), weights.b.float(), weights.slice_bounds),
               token_slots, ranks, scales)()
    atmm_add(y, x, weights, batch)
    case.max_rel_err = ((y.float() - expected).norm() / (expected - y0.float()).norm()).item()
    methods = {
        "torch": torch_loop(y, x, weights, token_slots, ranks, scales),
        "gbmm": gather_bmm(y_ext, x, weights, batch, scales),
        "fixed": lambda: atmm_add(y, x, weights, batch, FIXED_CONFIG, pdl=False),  # Punica: one tile, unchained
        "atmm": lambda: atmm_add(y, x, weights, batch),
    }
    for name, fn in methods.items():
        case.us[name] = timer.graph_time_us(fn)
    return case


def grid(quick: bool) -> list[Case]:
    if quick:
        picks = [(32, 32, "mixed", 3584), (128, 32, "mixed", 18944), (2048, 32, "64", 18944),
                 (8192, 32, "mixed", 3584), (1, 1, "16", 3584), (8, 8, "128", 512), (256, 32, "mixed", 3584),
                 (8192, 8, "128", 18944), (512, 1, "16", 512)]
        return [Case(t, a, r, o) for t, a, r, o in picks]
    return [Case(t, a, r, o) for o in OUTS for r in RANK_SPECS for a in ADAPTERS for t in TOKENS]


# The 7B's MoE-LoRA projection groups: (in_dim, slice widths)
ROUTED_GROUPS = {"qkv": (3584, (3584, 512, 512)), "o": (3584, (3584,)), "gate_up": (3584, (18944, 18944)),
                 "down": (18944, (3584,))}


@dataclass
class RoutedCase:
    group: str
    rows: int
    experts: int = 8
    rank: int = 64
    top_k: int = 2
    floor_us: float = 0.0
    us: dict[str, float] = field(default_factory=dict)
    max_rel_err: float = 0.0


def build_routed(case: RoutedCase, dev: str = "cuda"):
    """Expert pool of one group, random router logits' top-k per row (gates softmax over the k), x and y."""
    in_dim, widths = ROUTED_GROUPS[case.group]
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    gen = torch.Generator().manual_seed(case.rows * 31 + in_dim + bounds[-1])
    e, r, dt = case.experts, case.rank, torch.bfloat16
    weights = LoRAWeights((torch.randn(e, len(widths), r, in_dim, generator=gen) / in_dim**0.5).to(dev, dt),
                          (torch.randn(e, bounds[-1], r, generator=gen) / r**0.5).to(dev, dt), tuple(bounds))
    routing = Routing.from_router_logits(torch.randn(case.rows, e, generator=gen).to(dev), case.top_k,
                                         torch.arange(e, dtype=torch.int32, device=dev),
                                         torch.full((e,), r, dtype=torch.int32, device=dev),
                                         torch.full((e,), 2.0, device=dev), r)
    x = torch.randn(case.rows, in_dim, generator=gen).to(dev, dt)
    y = torch.randn(case.rows, bounds[-1], generator=gen).to(dev, dt)
    return weights, routing, x, y


def dense_routed(y, x, weights: LoRAWeights, routing: Routing):
    """Every expert on every row, gated: y[t] += sum_e g[t, e] * s_e * (x[t] @ A_e.T) @ B_e.T (no host reads)."""
    e_ids = torch.arange(routing.num_experts, device=x.device)
    bounds = weights.slice_bounds

    def run():
        gate = ((routing.topk_ids[:, :, None] == e_ids) * routing.topk_gates[:, :, None]).sum(1)  # [T, E]
        gate = (gate * routing.expert_scales).to(x.dtype)
        for e in range(routing.num_experts):
            for i in range(weights.n_slices):
                h = x @ weights.a[e, i].T  # [T, R]
                y[:, bounds[i]:bounds[i + 1]] += gate[:, e:e + 1] * (h @ weights.b[e, bounds[i]:bounds[i + 1]].T)

    return run


def routed_floor_us(case: RoutedCase, weights: LoRAWeights, routing: Routing, bw: float, rate: float) -> float:
    picked = len({int(i) for i in routing.topk_ids.flatten().tolist() if i >= 0})
    in_dim, out = weights.in_dim, weights.out_dim
    nbytes = 2 * (case.rows * in_dim + 2 * case.rows * out + picked * case.rank * (weights.n_slices * in_dim + out))
    flops = 2 * case.rows * case.top_k * case.rank * (weights.n_slices * in_dim + out)
    return max(nbytes / bw, flops / rate) * 1e6


def run_routed_case(timer: Timer, case: RoutedCase, bw: float, rate: float) -> RoutedCase:
    weights, routing, x, y = build_routed(case)
    case.floor_us = routed_floor_us(case, weights, routing, bw, rate)
    y0 = y.clone()
    expected = y.float().clone()
    dense_routed(expected, x.float(), LoRAWeights(weights.a.float(), weights.b.float(), weights.slice_bounds),
                 routing)()
    routed_add(y, x, weights, routing)
    case.max_rel_err = ((y.float() - expected).norm() / (expected - y0.float()).norm()).item()
    key = ShapeKey(case.experts, case.rows * case.top_k, weights.in_dim, weights.out_dim, case.rank)
    segmented = device_table().lookup(key)[0]
    methods = {
        "dense": dense_routed(y, x, weights, routing),
        "segmented": lambda: routed_add(y, x, weights, routing, segmented),
        "routed": lambda: routed_add(y, x, weights, routing),
        "routed+pdl": lambda: routed_add(y, x, weights, routing, pdl=True),
    }
    for name, fn in methods.items():
        case.us[name] = timer.graph_time_us(fn)
    return case


def routed_grid(quick: bool) -> list[RoutedCase]:
    return [RoutedCase(g, rows) for g in ROUTED_GROUPS for rows in ((1, 16) if quick else (1, 4, 16, 64, 256))]


def linear_floor_us(case: RoutedCase, weights: LoRAWeights, routing: Routing, bw: float, rate: float) -> float:
    """The routed operator's floor plus the base weight (and bias) read once, and its FLOPs."""
    out, in_dim = weights.out_dim, weights.in_dim
    base_bytes = 2 * out * (in_dim + (1 if case.group == "qkv" else 0))
    routed = routed_floor_us(case, weights, routing, bw, rate) * 1e-6
    return max(routed + base_bytes / bw, 2 * case.rows * out * in_dim / rate) * 1e6


def base_linear(case: RoutedCase, weights: LoRAWeights) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random base weight for the group's projection, and q/k/v's bias."""
    dev = weights.a.device
    gen = torch.Generator(device=dev).manual_seed(case.rows)
    weight = torch.randn(weights.out_dim, weights.in_dim, generator=gen, device=dev).to(weights.a.dtype) * 0.02
    bias = torch.randn(weights.out_dim, device=dev).to(weights.a.dtype) if case.group == "qkv" else None
    return weight, bias


def time_linear(timer: Timer, case: RoutedCase, weights: LoRAWeights, routing: Routing, x: torch.Tensor,
                add_update, gemv: bool) -> RoutedCase:
    """The fused linear's error against the torch reference, then the times of cuBLAS alone, (``gemv``) the fused
    linear without experts, unfused (``F.linear`` then ``add_update(y)``) and fused."""
    weight, bias = base_linear(case, weights)
    want = reference.routed_linear(x, weight, bias, weights, routing).float()
    got = routed_linear(x, weight, bias, weights, routing).float()
    case.max_rel_err = ((got - want).norm() / want.norm()).item()

    def unfused():
        add_update(torch.nn.functional.linear(x, weight, bias))

    methods = {"cublas": lambda: torch.nn.functional.linear(x, weight, bias)}
    if gemv:
        methods["gemv"] = lambda: routed_linear(x, weight, bias)
    methods.update(unfused=unfused, fused=lambda: routed_linear(x, weight, bias, weights, routing))
    for name, fn in methods.items():
        case.us[name] = timer.graph_time_us(fn)
    return case


def run_linear_case(timer: Timer, case: RoutedCase, bw: float, rate: float) -> RoutedCase:
    weights, routing, x, _ = build_routed(case)
    case.floor_us = linear_floor_us(case, weights, routing, bw, rate)
    return time_linear(timer, case, weights, routing, x, lambda y: routed_add(y, x, weights, routing), gemv=True)


PLAIN_RANKS = (8, 16, 32, 64)  # the engine bench's adapters: ranks cycle through these in a pool of rank 64


def build_plain(case: RoutedCase, dev: str = "cuda"):
    """Plain multi-LoRA at decode size: a 32-slot pool at rank 64, row t served by the adapter in slot t (ranks
    cycling 8-64); the batch as a LoRABatch and row by row as a Routing (the engine's form, engine/lora/batch.py:
    terms padded to the next power of two of the rows). Returns weights, batch, routing, x."""
    in_dim, widths = ROUTED_GROUPS[case.group]
    bounds = [0]
    for width in widths:
        bounds.append(bounds[-1] + width)
    gen = torch.Generator().manual_seed(case.rows * 17 + in_dim + bounds[-1])
    slots, r, dt = 32, case.rank, torch.bfloat16
    weights = LoRAWeights((torch.randn(slots, len(widths), r, in_dim, generator=gen) / in_dim**0.5).to(dev, dt),
                          (torch.randn(slots, bounds[-1], r, generator=gen) / r**0.5).to(dev, dt), tuple(bounds))
    ranks = [min(PLAIN_RANKS[i % len(PLAIN_RANKS)], r) for i in range(slots)]
    batch = LoRABatch.from_token_slots(list(range(case.rows)), ranks, [2.0] * slots, device=dev, max_rank=r)
    experts = next_power_of_2(case.rows)
    live = torch.arange(experts) < case.rows
    routing = Routing(torch.arange(experts, dtype=torch.int32, device=dev),
                      torch.where(live, torch.tensor(ranks[:experts]), 0).to(dev, torch.int32),
                      torch.where(live, 2.0, 0.0).to(dev),
                      torch.arange(case.rows, dtype=torch.int32, device=dev)[:, None],
                      torch.ones(case.rows, 1, device=dev), r)
    x = torch.randn(case.rows, in_dim, generator=gen).to(dev, dt)
    return weights, batch, routing, x


def run_plain_linear_case(timer: Timer, case: RoutedCase, bw: float, rate: float) -> RoutedCase:
    """The projection with plain multi-LoRA: F.linear + ATMM (the engine's path above fused_lora_rows) vs the fused
    linear over the batch's rows; the floor adds each row's adapter at its true rank to the base weight's bytes."""
    weights, batch, routing, x = build_plain(case)
    in_dim, out = weights.in_dim, weights.out_dim
    adapter_bytes = 2 * sum(int(r) for r in routing.expert_ranks.tolist()) * (weights.n_slices * in_dim + out)
    nbytes = 2 * (case.rows * in_dim + case.rows * out + out * in_dim) + adapter_bytes
    case.floor_us = max(nbytes / bw, 2 * case.rows * out * in_dim / rate) * 1e6
    return time_linear(timer, case, weights, routing, x, lambda y: atmm_add(y, x, weights, batch), gemv=False)


def print_groups(cases: list[RoutedCase], methods: dict[str, str], ours: str, versus: str) -> None:
    """One row per (group, rows): the floor, each method's time (``methods``: key -> column label), ours / floor
    and versus / ours."""
    head = (f"{'group':>8} {'rows':>5} | {'floor':>7} " + " ".join(f"{label:>8}" for label in methods.values())
            + f" | {'/floor':>8} {versus[:4] + '/' + ours[:3]:>8} {'err':>7}")
    print(head)
    print("-" * len(head))
    for c in cases:
        times = " ".join(f"{c.us[m]:8.1f}" for m in methods)
        print(f"{c.group:>8} {c.rows:>5} | {c.floor_us:7.1f} {times} | {c.us[ours] / c.floor_us:8.2f} "
              f"{c.us[versus] / c.us[ours]:8.2f} {c.max_rel_err:7.1e}")


def qwen7b_targets(dev: str, slots: int, rank: int, with_base: bool = False) -> list[MergeTarget]:
    """All 28 layers x fused qkv / o / fused gate_up / down of Qwen2.5-7B, bf16, one pool per projection."""
    h, i, q, kv = QWEN7B["hidden"], QWEN7B["inter"], QWEN7B["q"], QWEN7B["kv"]
    shapes = [((q, kv, kv), h), ((h,), q), ((i, i), h), ((h,), i)]
    targets = []
    for layer in range(QWEN7B["layers"]):
        for widths, in_dim in shapes:
            out = sum(widths)
            bounds = tuple([0] + [sum(widths[: k + 1]) for k in range(len(widths))])
            lora = LoRAWeights(torch.randn(slots, len(widths), rank, in_dim, device=dev, dtype=torch.bfloat16) * .01,
                               torch.randn(slots, out, rank, device=dev, dtype=torch.bfloat16) * 0.01, bounds)
            weight = torch.randn(out, in_dim, device=dev, dtype=torch.bfloat16) * 0.02
            targets.append(MergeTarget(weight, lora, group=layer, base=weight.clone() if with_base else None))
    return targets


def bench_merge(timer: Timer, bw: float, rank: int = 64) -> dict:
    """Swift merge of one rank-64 adapter into all of a 7B's q/k/v/o/gate/up/down (in place)."""
    targets = qwen7b_targets("cuda", slots=2, rank=rank)
    plan = MergePlan(targets)
    w_bytes = sum(t.weight.numel() * 2 for t in targets)
    ab_bytes = sum((t.lora.a[1].numel() + t.lora.b[1].numel()) * 2 for t in targets)
    floor = (2 * w_bytes + ab_bytes) / bw * 1e6
    add = DeltaTerms.of_adapter(1, rank, 0.5, "cuda")
    us = timer.replay_time_us(lambda: swift_merge(plan, add=add), reps=10, flush=False)
    switch_us = timer.replay_time_us(lambda: swift_merge(plan, add=add, sub=add), reps=10, flush=False)
    return {"rank": rank, "weights_gb": w_bytes / 1e9, "floor_us": floor, "merge_us": us,
            "merge_ratio": us / floor, "m1_to_m2_us": switch_us}


def bench_switch(timer: Timer, bw: float, experts: int = 8, rank: int = 16, top_k: int = 2) -> dict:
    """LoRA-Switch fused switch over the 7B: every layer changes, half change, none change."""
    targets = qwen7b_targets("cuda", slots=experts, rank=rank)
    plan = MergePlan(targets)
    layers = QWEN7B["layers"]
    w_bytes = sum(t.weight.numel() * 2 for t in targets)
    slots = torch.arange(experts, dtype=torch.int32, device="cuda")
    e_ranks = torch.full((experts,), rank, dtype=torch.int32, device="cuda")
    e_scales = torch.full((experts,), 2.0, device="cuda")
    gates = torch.full((layers, top_k), 1.0 / top_k, device="cuda")
    prev_ids = torch.arange(top_k, device="cuda").repeat(layers, 1)
    all_new = (prev_ids + top_k) % experts
    half_new = torch.where(torch.arange(layers, device="cuda")[:, None] % 2 == 0, all_new, prev_ids)
    prev = selection_terms(prev_ids, gates, slots, e_ranks, e_scales, rank)
    out = {"experts": experts, "rank": rank, "top_k": top_k}
    for name, ids in (("all_layers", all_new), ("half_layers", half_new), ("no_layer", prev_ids)):
        new = selection_terms(ids, gates, slots, e_ranks, e_scales, rank)
        changed = int((ids != prev_ids).any(dim=1).sum())
        floor = 2 * w_bytes * changed / layers / bw * 1e6
        us = timer.replay_time_us(lambda new=new: fused_switch(plan, prev, new), reps=10, flush=False)
        out[name] = {"changed_layers": changed, "us": us, "floor_us": floor}
    return out


def print_cases(cases: list[Case]) -> None:
    head = (f"{'tokens':>6} {'ad':>3} {'ranks':>6} {'out':>6} | {'floor':>8} {'torch':>9} {'gbmm':>9} {'fixed':>8} "
            f"{'atmm':>8} | {'atmm/fl':>7} {'fix/atmm':>8} {'ref/atmm':>8} {'err':>7}")
    print(head)
    print("-" * len(head))
    for c in cases:
        ref = REFERENCE_US.get((c.tokens, c.adapters, c.ranks, c.out_dim))
        ref_txt = f"{ref / c.us['atmm']:8.2f}" if ref else f"{'':>8}"
        print(f"{c.tokens:>6} {c.adapters:>3} {c.ranks:>6} {c.out_dim:>6} | {c.floor_us:8.1f} {c.us['torch']:9.1f} "
              f"{c.us['gbmm']:9.1f} {c.us['fixed']:8.1f} {c.us['atmm']:8.1f} | {c.us['atmm'] / c.floor_us:7.2f} "
              f"{c.us['fixed'] / c.us['atmm']:8.2f} {ref_txt} {c.max_rel_err:7.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A few cases (the issue's reference points) only.")
    parser.add_argument("--json", type=Path, default=None, help="Write all numbers here.")
    parser.add_argument("--only", choices=["all", "atmm", "routed", "linear", "lora-linear", "merge"], default="all",
                        help="Run only the ATMM grid, the routed operator's 7B groups, the fused decode linear on "
                        "them or with plain multi-LoRA batches, or the 7B swift merge and fused switch (13 GB).")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    timer = Timer()
    bw, rate = copy_bandwidth(timer), matmul_rate(timer)
    one = torch.zeros(1, device="cuda")
    empty_us = timer.graph_time_us(lambda: one.add_(1.0))  # one trivial kernel: the method's own latency floor
    two_us = timer.graph_time_us(lambda: (one.add_(1.0), one.add_(1.0)))
    print(f"# {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"a graph of 1 / 2 trivial kernels: {empty_us:.1f} / {two_us:.1f} us "
          f"(times in us, CUDA-graph replay, L2 flushed)")
    cases = [run_case(timer, c, bw, rate) for c in grid(args.quick)] if args.only in ("all", "atmm") else []
    if cases:
        print_cases(cases)
    routed = ([run_routed_case(timer, c, bw, rate) for c in routed_grid(args.quick)]
              if args.only in ("all", "routed") else [])
    if routed:
        print_groups(routed, {"dense": "dense", "segmented": "segm.", "routed": "routed", "routed+pdl": "+pdl"},
                     "routed", "segmented")
    linear = ([run_linear_case(timer, c, bw, rate) for c in routed_grid(args.quick) if c.rows <= MAX_ROWS]
              if args.only in ("all", "linear") else [])
    if linear:
        print_groups(linear, {"cublas": "cublas", "gemv": "gemv", "unfused": "unfused", "fused": "fused"}, "fused",
                     "unfused")
    plain = ([run_plain_linear_case(timer, RoutedCase(g, rows, experts=rows, top_k=1), bw, rate)
              for g in ROUTED_GROUPS for rows in ((1, 2, 4, 8, 16) if args.quick else range(1, MAX_ROWS + 1))]
             if args.only in ("all", "lora-linear") else [])
    if plain:
        print("# plain multi-LoRA, one adapter per row (ranks 8-64): F.linear + ATMM vs the fused linear")
        print_groups(plain, {"cublas": "cublas", "unfused": "unfused", "fused": "fused"}, "fused", "unfused")
    result = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bw, "bf16_flops_per_s": rate,
              "trivial_graph_us": [empty_us, two_us], "cases": [asdict(c) for c in cases],
              "routed": [asdict(c) for c in routed], "linear": [asdict(c) for c in linear],
              "lora_linear": [asdict(c) for c in plain]}
    if args.only in ("all", "merge"):
        result["merge"] = bench_merge(timer, bw)
        m = result["merge"]
        print(f"# swift merge rank {m['rank']} into 7B q/k/v/o/gate/up/down ({m['weights_gb']:.1f} GB): "
              f"{m['merge_us']:.0f} us, floor {m['floor_us']:.0f} us ({m['merge_ratio']:.2f}x); "
              f"M1->M2 in one launch {m['m1_to_m2_us']:.0f} us")
        torch.cuda.empty_cache()
        result["switch"] = bench_switch(timer, bw)
        s = result["switch"]
        print(f"# fused switch ({s['experts']} experts, rank {s['rank']}, top-{s['top_k']}): " + ", ".join(
            f"{k} {v['us']:.0f} us (floor {v['floor_us']:.0f})" for k, v in s.items() if isinstance(v, dict)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
