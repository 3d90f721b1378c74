"""Problem generators and a float64 per-token oracle shared by the CPU (interpreted) and GPU kernel sweeps.

Sweep axes (issue 3): rank {1, 8, 16, 64, 128} x adapters {1, 3, 17} x tokens {1, 7, 300} x hidden sizes (odd ones
included; 1, 2 and 3 fused slices with GQA-like widths), plus dtype, mode (plain / mixture) and tile config. Every
problem mixes ranks (adapter 0 has the case's rank, the others a random rank <= it), gives ~20% of tokens no adapter,
pads the batch with empty segments, and assigns adapters to tokens at random so segments are scattered in x.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch

from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.merge_plan import MergeTarget
from kernels.routing import Routing
from kernels.tile_config import FIXED_CONFIG, AtmmConfig, ExpandConfig, ShrinkConfig

RANKS = (1, 8, 16, 64, 128)
ADAPTERS = (1, 3, 17)
TOKENS = (1, 7, 300)
DIMS = ((33, (47,)), (64, (64,)), (129, (96, 16, 16)), (200, (72, 72)))  # (in_dim, output width of each slice)
MODES = ("plain", "mixture")
CONFIGS = {
    "table": None,  # the device table's lookup (heuristic on CPU)
    "fixed": FIXED_CONFIG,
    "split": AtmmConfig(ShrinkConfig(16, 16, 32, 3, 4, 1), ExpandConfig(32, 32, 16, 4, 1, 3)),
}

# |out - expected| <= RTOL * |expected| + ATOL * max|delta|, elementwise (rounding of y, and of tmp before expand).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (1.5e-3, 6e-3), torch.bfloat16: (1e-2, 3e-2)}


def covering_rows(axes: dict[str, tuple], seed: int = 0, allowed=lambda row: True) -> list[dict]:
    """A small set of rows in which every pair of values of every two axes appears (greedy pairwise cover).

    ``allowed(row)`` rejects rows too slow for the interpreter; each pair must still fit in some allowed row.
    """
    names = list(axes)
    pairs = list(itertools.combinations(names, 2))
    todo = {((a, va), (b, vb)) for a, b in pairs for va in axes[a] for vb in axes[b]}
    rng = random.Random(seed)

    def draw(fixed: dict) -> dict:
        for _ in range(1000):
            row = {n: rng.choice(axes[n]) for n in names} | fixed
            if allowed(row):
                return row
        raise ValueError(f"no allowed row holds {fixed}")

    rows = []
    while todo:
        best, best_gain = None, 0
        for _ in range(300):
            row = draw({})
            gain = sum(((a, row[a]), (b, row[b])) in todo for a, b in pairs)
            if gain > best_gain:
                best, best_gain = row, gain
        if best is None:  # random draws missed the last pairs: build a row around one of them
            (a, va), (b, vb) = next(iter(todo))
            best = draw({a: va, b: vb})
        rows.append(best)
        todo -= {((a, best[a]), (b, best[b])) for a, b in pairs}
    return rows


@dataclass
class Problem:
    x: torch.Tensor  # [T, in_dim]
    y0: torch.Tensor  # [T, out_total] poisoned (random) output before the op
    weights: LoRAWeights
    batch: LoRABatch
    expected: torch.Tensor  # [T, out_total] float64 oracle
    touched: torch.Tensor  # [T] bool rows the op must update (others must stay bit-identical)


def make_weights(slots: int, rank: int, in_dim: int, widths: tuple[int, ...], dtype, device, gen) -> LoRAWeights:
    out_total = sum(widths)
    bounds = (0, *itertools.accumulate(widths))
    a = torch.randn(slots, len(widths), rank, in_dim, generator=gen) / in_dim**0.5
    b = torch.randn(slots, out_total, rank, generator=gen) / max(rank, 1) ** 0.5
    return LoRAWeights(a.to(device, dtype), b.to(device, dtype), bounds)


def poison_padding(weights: LoRAWeights, slots, ranks) -> None:
    """NaN in every pool element past each used slot's true rank (``slots``, ``ranks``: matching 1-D tensors, slot
    -1 skipped) and in every unused slot: an op may read only a term's first r columns of A and B, whatever the
    pool holds past them."""
    true_rank = {}
    for slot, rank in zip(slots.flatten().tolist(), ranks.flatten().tolist(), strict=True):
        if slot >= 0:
            true_rank[slot] = max(true_rank.get(slot, 0), rank)
    for slot in range(weights.a.shape[0]):
        rank = true_rank.get(slot, 0)
        weights.a[slot, :, rank:] = float("nan")
        weights.b[slot, :, rank:] = float("nan")


def dense_delta(weights: LoRAWeights, slot: int, rank: int) -> torch.Tensor:
    """The adapter's full update matrix in float64: [in_dim, out_total], per-slice B_i A_i transposed."""
    out = torch.zeros(weights.in_dim, weights.out_dim, dtype=torch.float64)
    bounds = weights.slice_bounds
    for i in range(weights.n_slices):
        a = weights.a[slot, i, :rank].double().cpu()  # [r, in]
        b = weights.b[slot, bounds[i] : bounds[i + 1], :rank].double().cpu()  # [w_i, r]
        out[:, bounds[i] : bounds[i + 1]] = a.T @ b.T
    return out


def make_problem(rank: int, adapters: int, tokens: int, dims, mode: str, dtype, device="cpu", seed=0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    in_dim, widths = dims
    slots = adapters + 2  # two pool slots stay unused
    pool_rank = rank + 3  # storage padded past every true rank
    weights = make_weights(slots, pool_rank, in_dim, widths, dtype, device, gen)
    ranks = torch.randint(1, rank + 1, (slots,), generator=gen)
    ranks[1] = rank  # adapter 0 lives in slot 1 and has the case's rank
    scales = torch.rand(slots, generator=gen) + 0.5
    adapter_slots = torch.arange(1, adapters + 1)
    token_slots = adapter_slots[torch.randint(0, adapters, (tokens,), generator=gen)]
    token_slots[torch.rand(tokens, generator=gen) < 0.2] = -1
    merged = int(adapter_slots[-1]) if mode == "mixture" else None
    batch = LoRABatch.from_token_slots(token_slots, ranks, scales, merged_slot=merged,
                                       pad_segments_to=adapters + 3, device=device)
    x = (torch.randn(tokens, in_dim, generator=gen)).to(device, dtype)
    y0 = torch.randn(tokens, weights.out_dim, generator=gen).to(device, dtype)
    expected = y0.double().cpu()
    x64 = x.double().cpu()
    deltas = {s: dense_delta(weights, s, int(ranks[s])) for s in set(token_slots.tolist()) | {merged} if s is not None
              and s >= 0}
    # Per token: y[t] += s_a x[t] dW_a (own adapter), and -= s_M x[t] dW_M (mixture), grouped by adapter for speed.
    own = token_slots >= 0
    skip = token_slots == merged if merged is not None else torch.zeros(tokens, dtype=torch.bool)
    for s in deltas:
        rows = own & ~skip & (token_slots == s)
        expected[rows] += float(scales[s]) * (x64[rows] @ deltas[s])
    touched = own & ~skip
    if merged is not None:
        expected[~skip] -= float(scales[merged]) * (x64[~skip] @ deltas[merged])
        touched = ~skip
    return Problem(x, y0, weights, batch, expected, touched)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, y0: torch.Tensor, touched: torch.Tensor) -> None:
    """Untouched rows are bit-identical to the poisoned input; touched rows match the oracle within tolerance."""
    out, y0 = out.cpu(), y0.cpu()
    assert torch.isfinite(out).all(), "non-finite output (read of an unwritten workspace?)"
    assert torch.equal(out[~touched], y0[~touched]), "rows without an adapter were modified"
    if not touched.any():
        return
    rtol, atol = TOLERANCE[out.dtype]
    got, want = out[touched].double(), expected[touched]
    delta_scale = (want - y0[touched].double()).abs().max().item()
    bound = rtol * want.abs() + atol * max(delta_scale, 1e-6)
    worst = ((got - want).abs() - bound).max().item()
    assert worst <= 0, f"max excess error {worst:.3g} (delta scale {delta_scale:.3g}, dtype {out.dtype})"


@dataclass
class RoutedProblem:
    x: torch.Tensor  # [T, in_dim]
    y0: torch.Tensor  # [T, out_total]
    weights: LoRAWeights
    routing: Routing
    expected: torch.Tensor  # [T, out_total] float64
    touched: torch.Tensor  # [T] bool


def make_routed_problem(rank: int, experts: int, top_k: int, tokens: int, dims, dtype, device="cpu",
                        seed=0) -> RoutedProblem:
    """k pairs per token over E experts in scattered pool slots; some pairs unused (-1), one expert never picked."""
    gen = torch.Generator().manual_seed(seed)
    in_dim, widths = dims
    slots = experts + 3
    weights = make_weights(slots, rank + 2, in_dim, widths, dtype, device, gen)
    expert_slots = torch.randperm(slots, generator=gen)[:experts].to(torch.int32)
    expert_ranks = torch.randint(1, rank + 1, (experts,), generator=gen).to(torch.int32)
    expert_ranks[0] = rank
    expert_scales = torch.rand(experts, generator=gen) + 0.5
    pickable = max(experts - 1, 1)  # the last expert is never picked when there are several
    top_k = min(top_k, pickable)
    ids = torch.stack([torch.randperm(pickable, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    if top_k > 1:
        ids[torch.rand(tokens, generator=gen) < 0.25, -1] = -1  # an unused pair
    ids[torch.rand(tokens, generator=gen) < 0.15] = -1  # tokens with no expert at all
    gates = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    routing = Routing(expert_slots.to(device), expert_ranks.to(device), expert_scales.to(device),
                      ids.contiguous().to(device), gates.contiguous().to(device), rank)
    x = torch.randn(tokens, in_dim, generator=gen).to(device, dtype)
    y0 = torch.randn(tokens, weights.out_dim, generator=gen).to(device, dtype)
    expected, x64 = y0.double().cpu(), x.double().cpu()
    for e in range(experts):
        picked = (ids == e).double() * gates.double()  # [T, k]
        gate = picked.sum(dim=1)  # [T]
        if gate.any():
            delta = dense_delta(weights, int(expert_slots[e]), int(expert_ranks[e]))
            expected += (gate * float(expert_scales[e]))[:, None] * (x64 @ delta)
    touched = (ids >= 0).any(dim=1)
    return RoutedProblem(x, y0, weights, routing, expected, touched)


# A toy decoder's adapted projections: (name, in_dim, output widths of the fused slices), GQA-like q/k/v widths.
PROJECTIONS = (("qkv", 40, (48, 16, 16)), ("o", 48, (40,)), ("gate_up", 40, (56, 56)), ("down", 56, (40,)))


@dataclass
class ToyModel:
    targets: list[MergeTarget]  # layers x projections, group = layer
    ranks: torch.Tensor  # [slots] true rank per slot
    scales: torch.Tensor  # [slots]


def make_model(layers: int, dtype, device="cpu", seed=0, with_base=False, slots=5, pool_rank=19) -> ToyModel:
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(1, pool_rank + 1, (slots,), generator=gen)
    ranks[0] = pool_rank
    scales = torch.rand(slots, generator=gen) + 0.5
    targets = []
    for layer in range(layers):
        for _, in_dim, widths in PROJECTIONS:
            lora = make_weights(slots, pool_rank, in_dim, widths, dtype, device, gen)
            weight = (torch.randn(sum(widths), in_dim, generator=gen) * 0.05).to(device, dtype)
            base = weight.clone() if with_base else None
            targets.append(MergeTarget(weight, lora, group=layer, base=base))
    return ToyModel(targets, ranks, scales)


def merged_oracle(target: MergeTarget, terms: list[tuple[int, int, float]], start: torch.Tensor) -> torch.Tensor:
    """float64: start + sum_j s_j * B_j[:, :r] @ A_j[:r] for each slice (the sign is in s_j)."""
    out = start.double().cpu()
    for slot, rank, scale in terms:
        out += scale * dense_delta(target.lora, slot, rank).T
    return out
