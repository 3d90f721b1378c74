"""GPU: the kernel sweeps in bf16 with compiled kernels, the 1000-cycle drift bound, and CUDA-graph capture.

Compiled kernels are fast, so the ATMM sweep runs the full cross product (rank x adapters x tokens x hidden sizes
x mode) with the device table's tiles and with the fixed (punica) tiles.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from kernels import atmm, reference, tuning
from kernels.atmm import RowPlan, atmm_add, shape_key, workspace_shape
from kernels.lora_batch import LoRABatch
from kernels.merge_plan import DeltaTerms, MergePlan
from kernels.routed import routed_add
from kernels.swift_merge import swift_merge
from kernels.switch import fused_switch, selection_terms
from kernels.tile_config import FIXED_CONFIG, AtmmConfig, ShapeKey, device_table
from tests.kernels.sweep import (
    ADAPTERS,
    DIMS,
    MODES,
    RANKS,
    TOKENS,
    assert_matches,
    make_model,
    make_problem,
    make_routed_problem,
    merged_oracle,
)
from tests.kernels.test_swift_merge import _assert_drift_bounded, _cycles, assert_close_to

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


@pytest.mark.parametrize("config", ["table", "fixed", "pdl"])
@pytest.mark.parametrize(("rank", "adapters", "tokens", "dims", "mode"),
                         list(itertools.product(RANKS, ADAPTERS, TOKENS, range(len(DIMS)), MODES)))
def test_atmm_bf16(rank, adapters, tokens, dims, mode, config):
    """The sweep with the table's tiles, the fixed tiles, and the table's tiles chained by PDL (the expand then
    prefetches its B rows before it waits): the same bits as the plain launch."""
    p = make_problem(rank, adapters, tokens, DIMS[dims], mode, BF16, device="cuda", seed=rank + tokens + dims)
    cfg = FIXED_CONFIG if config == "fixed" else device_table().lookup(shape_key(p.batch, p.weights))[0]
    y = p.y0.clone()
    if p.batch.max_rank:
        ws = torch.full(workspace_shape(RowPlan.from_batch(p.batch), p.weights, cfg), float("nan"), device="cuda")
        atmm_add(y, p.x, p.weights, p.batch, cfg, workspace=ws, pdl=config == "pdl")
        if config == "pdl":
            plain = p.y0.clone()
            atmm_add(plain, p.x, p.weights, p.batch, cfg)
            assert torch.equal(y, plain)
    assert_matches(y, p.expected, p.y0, p.touched)


@pytest.mark.parametrize("rank", [128, 256])
@pytest.mark.parametrize("path", ["preload", "walk"])
@pytest.mark.parametrize("expand", tuning.EXPAND_POOL + tuning.ROUTED_EXPAND_EXTRA, ids=repr)
def test_every_tuner_expand_tile_on_a_7b_shape(expand, path, rank, monkeypatch):
    """Every expand tile `valora kernels tune` may put in a table, on a 7B k/v shape at ranks 128 and 256 (aligned
    pool, so the 16-byte rank loads are in play), preloaded where the tile allows it and forced through the term
    walk. The walk with 16-byte rank loads raised 'misaligned address' on an H200 at rank 128 (``VEC_R_WALK``)."""
    if path == "walk":
        monkeypatch.setattr(atmm, "PRELOAD_ELEMENTS", 0)
    x, y, weights, batch = tuning.synthetic_problem(ShapeKey(3, 300, 3584, 512, rank), "cuda")
    plan = RowPlan.from_batch(batch)
    cfg = AtmmConfig(tuning.SHRINK_POOL[0], expand)
    meta = atmm.expand_meta(plan, weights.n_slices, expand, 1, False)
    assert (meta["PRELOAD_TERMS"] == 0) == (path == "walk" or rank * expand.block_m > atmm.PRELOAD_ELEMENTS)
    want = y.clone()
    reference.add_lora(want, x, weights, batch)
    try:
        atmm_add(y, x, weights, batch, cfg)
        torch.cuda.synchronize()
    except triton.runtime.errors.OutOfResources:
        pytest.skip(f"{expand} needs more shared memory than this GPU has")
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(("rank", "experts", "top_k", "tokens"),
                         list(itertools.product(RANKS, (1, 3, 8), (1, 2, 3), TOKENS)))
def test_routed_bf16(rank, experts, top_k, tokens):
    p = make_routed_problem(rank, experts, top_k, tokens, DIMS[2], BF16, device="cuda", seed=rank + tokens)
    y = p.y0.clone()
    routed_add(y, p.x, p.weights, p.routing)
    assert_matches(y, p.expected, p.y0, p.touched)


def test_merge_and_switch_bf16():
    model = make_model(3, BF16, device="cuda", seed=21)
    plan = MergePlan(model.targets)
    r, s = model.ranks.tolist(), model.scales.tolist()
    start = [t.weight.clone() for t in model.targets]
    swift_merge(plan, add=DeltaTerms.of_adapter(2, r[2], s[2], "cuda"))
    for t, w0 in zip(model.targets, start, strict=True):
        assert_close_to(t.weight, merged_oracle(t, [(2, r[2], s[2])], w0))
    slots = torch.tensor([0, 1, 3], dtype=torch.int32, device="cuda")
    ranks, scales = model.ranks[[0, 1, 3]].int().cuda(), model.scales[[0, 1, 3]].cuda()
    prev = selection_terms(torch.tensor([[0, 1], [1, 2], [0, 2]], device="cuda"),
                           torch.full((3, 2), 0.5, device="cuda"), slots, ranks, scales, max(r))
    new = selection_terms(torch.tensor([[0, 1], [2, 1], [2, 0]], device="cuda"),
                          torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.3, 0.7]], device="cuda"), slots, ranks, scales,
                          max(r))
    mid = [t.weight.clone() for t in model.targets]
    fused_switch(plan, prev, new)
    for t, w1 in zip(model.targets, mid, strict=True):
        if t.group == 0:
            assert torch.equal(t.weight, w1)
            continue
        terms = [(int(prev.slots[t.group, j]), int(prev.ranks[t.group, j]), -float(prev.scales[t.group, j]))
                 for j in range(2)]
        terms += [(int(new.slots[t.group, j]), int(new.ranks[t.group, j]), float(new.scales[t.group, j]))
                  for j in range(2)]
        assert_close_to(t.weight, merged_oracle(t, terms, w1))


def test_drift_bound_over_1000_cycles_kernel_bf16():
    model = make_model(1, BF16, device="cuda", seed=22)
    start = [t.weight.clone() for t in model.targets]
    model.scales[0] = 40.0
    terms = DeltaTerms.of_adapter(0, int(model.ranks[0]), 40.0, "cuda")
    history = _cycles(MergePlan(model.targets), terms, 1000, swift_merge)
    _assert_drift_bounded(model, [w.cpu() for w in start], [[w.cpu() for w in h] for h in history], 0)


def test_atmm_cuda_graph_replays_new_batches():
    """Capture once at a static capacity, then copy new batch metadata in place and replay: same result as eager."""
    p = make_problem(64, 3, 40, DIMS[2], "mixture", BF16, device="cuda", seed=31)  # pool: 5 slots, rank 67
    capacity = dict(pad_segments_to=8, max_seg_len=40, max_rank=67, include_base_rows=True, device="cuda")
    batches = []
    for seed in (41, 42):
        gen = torch.Generator().manual_seed(seed)
        token_slots = torch.randint(-1, 4, (40,), generator=gen)
        scales = torch.rand(5, generator=gen) + 0.5
        ranks = torch.tensor([3, 64, 17, 64, 9])
        batches.append(LoRABatch.from_token_slots(token_slots, ranks, scales, merged_slot=3, **capacity))
    static = batches[0]
    y, x = p.y0.clone(), p.x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        atmm_add(y, x, p.weights, static)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        atmm_add(y, x, p.weights, static)
    for batch in batches[::-1]:
        for name in ("token_indices", "seg_indptr", "seg_slots", "seg_ranks", "seg_scales"):
            getattr(static, name).copy_(getattr(batch, name))
        y.copy_(p.y0)
        graph.replay()
        expected = p.y0.clone()
        atmm_add(expected, x, p.weights, batch)
        assert torch.equal(y, expected)
        assert not torch.equal(y, p.y0)


def test_routed_cuda_graph():
    p = make_routed_problem(16, 8, 2, 64, DIMS[2], BF16, device="cuda", seed=51)
    q = make_routed_problem(16, 8, 2, 64, DIMS[2], BF16, device="cuda", seed=52)
    y, x = p.y0.clone(), p.x.clone()
    routing = p.routing
    routed_add(y, x, p.weights, routing)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        routed_add(y, x, p.weights, routing)
    routing.topk_ids.copy_(q.routing.topk_ids)
    routing.topk_gates.copy_(q.routing.topk_gates)
    y.copy_(p.y0)
    graph.replay()
    expected = p.y0.clone()
    routed_add(expected, x, p.weights, routing)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
