"""bench/kernels.py's routed section on CPU: its dense torch baseline computes the routed operator's semantics (the
pure-torch reference), and its floor counts only the experts some row picked; its plain multi-LoRA cases describe one
update both ways (batch and rows)."""

from __future__ import annotations

import pytest
import torch

from bench import kernels as bench
from kernels import reference
from kernels.lora_batch import LoRAWeights


@pytest.mark.parametrize("group", sorted(bench.ROUTED_GROUPS))
def test_dense_baseline_matches_the_reference(group):
    case = bench.RoutedCase(group, rows=5, rank=8)
    weights, routing, x, y = bench.build_routed(case, dev="cpu")
    weights = LoRAWeights(weights.a.float(), weights.b.float(), weights.slice_bounds)
    x, y = x.float(), y.float()
    ours, ref = y.clone(), y.clone()
    bench.dense_routed(ours, x, weights, routing)()
    reference.add_routed(ref, x, weights, routing)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref, y)


def test_floor_counts_picked_experts():
    case = bench.RoutedCase("o", rows=1)
    weights, routing, _, _ = bench.build_routed(case, dev="cpu")
    one = bench.routed_floor_us(case, weights, routing, bw=1e12, rate=1e30)
    expert_bytes = 2 * case.rank * (weights.in_dim + weights.out_dim)
    io_bytes = 2 * (weights.in_dim + 2 * weights.out_dim)
    assert one == pytest.approx((io_bytes + case.top_k * expert_bytes) / 1e12 * 1e6)


def test_linear_floor_adds_the_base_weight():
    """The fused linear's floor: the routed operator's bytes plus the base weight (and q/k/v's bias) read once."""
    for group in ("qkv", "down"):
        case = bench.RoutedCase(group, rows=1)
        weights, routing, _, _ = bench.build_routed(case, dev="cpu")
        routed = bench.routed_floor_us(case, weights, routing, bw=1e12, rate=1e30)
        base = 2 * weights.out_dim * (weights.in_dim + (group == "qkv")) / 1e12 * 1e6
        assert bench.linear_floor_us(case, weights, routing, bw=1e12, rate=1e30) == pytest.approx(routed + base)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_plain_cases_batch_and_rows_agree(rows):
    """The lora-linear section times F.linear + ATMM against the fused linear: both must compute one update."""
    case = bench.RoutedCase("qkv", rows=rows, experts=rows, rank=16, top_k=1)
    weights, batch, routing, x = bench.build_plain(case, dev="cpu")
    weights = LoRAWeights(weights.a.float(), weights.b.float(), weights.slice_bounds)
    x, weight = x.float(), torch.randn(weights.out_dim, weights.in_dim) * 0.02
    want = torch.nn.functional.linear(x, weight)
    base = want.clone()
    reference.add_lora(want, x, weights, batch)
    got = reference.routed_linear(x, weight, None, weights, routing)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want, base)
