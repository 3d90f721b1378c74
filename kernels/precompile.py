"""Compile the ATMM kernel variants a server will meet before it serves, not inside a request's iteration.

Triton compiles one variant of a kernel per distinct set of compile-time arguments (tile config, padded rank,
terms, segment-scan width) the first time a launch needs it: about half a second each on an H200 host, paid by
whichever iteration meets the shape first, and by every request in it. ``precompile`` walks a grid of batch shapes
up to the server's limits, asks the tile table which config each would get, derives the compile-time arguments
with the helpers the launches use (``shrink_meta`` / ``expand_meta``), and launches every distinct variant once,
on a one-row batch whose output goes to scratch. With Triton's disk cache (``TRITON_CACHE_DIR``) a restart loads
the variants instead of compiling them. Every walk here may run inside ``kernels.launch.compile_ahead``, which
compiles the variants in threads first (its first pass launches nothing and records nothing as launched).

The grid takes every segment count, tokens one by one up to 16 and at quarter-octave steps beyond, and ranks at
half-octave steps; a shape between grid points whose nearest table entry no grid point reaches (or whose
heuristic tiles differ from every grid point's) still compiles on first use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from kernels.atmm import RowPlan, atmm_add, chains, expand_meta, segment_scan_width, shrink_meta
from kernels.fused_linear import routed_linear
from kernels.launch import compiling_ahead
from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.routed import routed_add, routed_plan
from kernels.routing import Routing
from kernels.tile_config import AtmmConfig, ShapeKey, TileTable, device_table

logger = logging.getLogger(__name__)

_done: set[tuple] = set()  # (weights' device, dtype and layout, variant_key) launched in this process


def _steps(lo: int, hi: int, per_octave: int, dense_to: int = 0) -> list[int]:
    """Ints from lo to hi: every one up to ``dense_to``, then ``per_octave`` geometric steps per doubling."""
    out = set(range(lo, min(dense_to, hi) + 1)) | {lo, hi}
    k = 0
    while (v := round(2 ** (k / per_octave))) <= hi:
        if v >= lo:
            out.add(v)
        k += 1
    return sorted(out)


def shape_grid(max_tokens: int, max_segments: int, max_rank: int) -> Iterator[tuple[int, int, int]]:
    """(segments, tokens, max_rank) shapes a server with these limits can meet, sampled."""
    ranks = _steps(1, max_rank, 2)
    for tokens in _steps(1, max_tokens, 4, dense_to=16):
        for segments in range(1, min(tokens, max_segments) + 1):
            for rank in ranks:
                yield segments, tokens, rank


def _probe(slots: int, segments: int, rank: int, terms: int) -> LoRABatch:
    """A one-row host batch whose launch compiles the variants of ``segments`` segments at ``rank`` with ``terms``
    terms (padding segments are empty; scales are zero, so it adds nothing)."""
    ranks, scales = [rank] * slots, [0.0] * slots
    if terms == 2:  # a base row in mixture mode: the -M term and an inactive one
        return LoRABatch.from_token_slots([-1], ranks, scales, merged_slot=0, pad_segments_to=segments, max_rank=rank)
    return LoRABatch.from_token_slots([0], ranks, scales, pad_segments_to=segments, max_rank=rank)


def variant_key(rows: LoRABatch | Routing, weights: LoRAWeights, config: AtmmConfig,
                pdl: bool | None = None) -> tuple:
    """What decides which compiled variants ``atmm_add(y, x, weights, rows, config, pdl=pdl)`` (or, for a Routing,
    ``routed_add``) runs: the two kernels' compile-time arguments (sizes and strides are fixed by ``weights``),
    chained by PDL or not (``kernels.atmm.chains``; devices without PDL run the unchained variant either way).
    pdl: None for the op's default (``atmm_add`` asks for chaining, ``routed_add`` does not)."""
    routed = isinstance(rows, Routing)
    pdl = not routed if pdl is None else pdl
    plan = routed_plan(rows) if routed else RowPlan.from_batch(rows)
    return _metas(plan, weights, config, weights.a.dtype == torch.float32, chains(plan.num_positions, pdl))


def _metas(plan: RowPlan, weights: LoRAWeights, config: AtmmConfig, ieee: bool, chained: bool = False) -> tuple:
    shrink = shrink_meta(plan, weights.n_slices, config.shrink, ieee, chained)
    expand = expand_meta(plan, weights.n_slices, config.expand, config.shrink.split_k, ieee, chained)
    return tuple(sorted(shrink.items())), tuple(sorted(expand.items()))


def plan_variants(weights: LoRAWeights, *, max_tokens: int, max_segments: int, terms: Sequence[int] = (1, 2),
                  config: AtmmConfig | None = None, static: Sequence[tuple[int, int]] = (),
                  table: TileTable | None = None, pdl: bool = True) -> dict[tuple, tuple[LoRABatch, AtmmConfig, bool]]:
    """Every variant the shape grid reaches, keyed by ``variant_key``, with a host probe batch, the config and the
    PDL chaining that run it.

    weights: one projection's slot pool (variants depend on its dims, slices and dtype, not on its contents).
    max_tokens: the most rows an iteration carries (the engine's token budget); max_segments: the most segments
    (distinct adapters) in one batch; terms: 1 (plain), 2 (mixture); config: a fixed config (the Punica-style
    baseline), else ``table``'s pick per shape (the device's by default); static: extra (segments, max_rank) pairs
    reported by fixed-capacity batches (CUDA-graph buckets report their size as segments and the pool's rank);
    pdl: the launches ask for PDL chaining (``atmm_add``'s ``pdl``, on by default), so decode-sized shapes plan
    chained variants.
    """
    table = table or device_table()
    points = [*shape_grid(max_tokens, max_segments, weights.pool_rank), *((s, s, r) for s, r in static)]
    keys = [ShapeKey(s, t, weights.in_dim, weights.out_dim, r) for s, t, r in points]
    configs = [config] * len(keys) if config is not None else table.lookup_many(keys)
    probes: dict[tuple, tuple] = {}  # one probe per (config, scan width, rank, terms, chained)
    for (segments, tokens, rank), cfg in zip(points, configs, strict=True):
        chained = chains(tokens, pdl)
        for n_terms in terms:
            probes.setdefault((cfg, segment_scan_width(segments), rank, n_terms, chained),
                              (segments, rank, n_terms, cfg, chained))
    variants: dict[tuple, tuple[LoRABatch, AtmmConfig, bool]] = {}
    for segments, rank, n_terms, cfg, chained in probes.values():
        batch = _probe(int(weights.a.shape[0]), segments, rank, n_terms)  # one row: chained whenever asked
        variants.setdefault(variant_key(batch, weights, cfg, chained), (batch, cfg, chained))
    return variants


def _routed_probe(weights: LoRAWeights, experts: int, top_k: int, max_rank: int) -> Routing:
    """A one-row host routing over ``experts`` experts at ``max_rank`` (zero scales: it adds nothing)."""
    slots = int(weights.a.shape[0])
    return Routing(expert_slots=torch.arange(experts, dtype=torch.int32) % slots,
                   expert_ranks=torch.full((experts,), max_rank, dtype=torch.int32),
                   expert_scales=torch.zeros(experts), topk_ids=torch.arange(top_k, dtype=torch.int32)[None] % experts,
                   topk_gates=torch.zeros(1, top_k), max_rank=max_rank)


def plan_routed_variants(weights: LoRAWeights, *, max_tokens: int, experts: int, top_k: int, max_rank: int,
                         config: AtmmConfig | None = None,
                         table: TileTable | None = None) -> dict[tuple, tuple[Routing, AtmmConfig, bool]]:
    """The routed operator's variants (kernels/routed.py) for 1..max_tokens routed rows, keyed like
    ``variant_key``: a routing's shape is fixed by the expert pool (``experts`` = slots x experts per adapter,
    ``top_k``, ``max_rank``), so only the row count picks the tiles."""
    table = table or device_table()
    keys = [ShapeKey(experts, rows * top_k, weights.in_dim, weights.out_dim, max_rank)
            for rows in _steps(1, max_tokens, 4, dense_to=16)]
    probe = _routed_probe(weights, experts, top_k, max_rank)
    variants: dict[tuple, tuple[Routing, AtmmConfig, bool]] = {}
    for cfg in dict.fromkeys([config] if config is not None else table.lookup_many_routed(keys)):
        variants.setdefault(variant_key(probe, weights, cfg, pdl=False), (probe, cfg, False))
    return variants


def precompile(weights: LoRAWeights, **limits) -> int:
    """Launch once every variant ``plan_variants(weights, **limits)`` finds that this process has not launched yet
    (into scratch, on the weights' CUDA device); returns how many it launched. Does nothing off CUDA."""
    if weights.a.device.type != "cuda":
        return 0
    return _launch(weights, plan_variants(weights, **limits))


def _layout(weights: LoRAWeights) -> tuple:
    """What a variant's operands share across layers: device, dtype, dims, slices and pool rank."""
    return (str(weights.a.device), weights.a.dtype, weights.in_dim, weights.out_dim, weights.slice_bounds,
            weights.pool_rank)


def _launch(weights: LoRAWeights, variants: dict[tuple, tuple[LoRABatch | Routing, AtmmConfig, bool]]) -> int:
    device, layout = weights.a.device, _layout(weights)
    x = torch.zeros(1, weights.in_dim, dtype=weights.a.dtype, device=device)
    y = torch.zeros(1, weights.out_dim, dtype=weights.a.dtype, device=device)
    launched = 0
    for key, (probe, cfg, chained) in variants.items():
        if (layout, key) in _done:
            continue
        if isinstance(probe, Routing):
            routed_add(y, x, weights, probe.to(device), cfg)
        else:
            atmm_add(y, x, weights, probe.to(device), cfg, pdl=chained)
        _mark((layout, key))
        launched += 1
    return launched


def _mark(variant: tuple) -> None:
    """Record a variant as launched in this process (not in ``compile_ahead``'s first pass, which only compiles)."""
    if not compiling_ahead():
        _done.add(variant)


def precompile_pools(pools: Sequence[LoRAWeights], **limits) -> tuple[int, float]:
    """``precompile`` over projections, once per distinct layout; returns (variants launched, seconds)."""
    return _prepare(pools, lambda w: plan_variants(w, **limits), "multi-LoRA")


def precompile_routed_pools(pools: Sequence[LoRAWeights], **shape) -> tuple[int, float]:
    """The routed operator's variants (``plan_routed_variants(w, **shape)``) over MoE expert pools, once per
    distinct layout; returns (variants launched, seconds)."""
    return _prepare(pools, lambda w: plan_routed_variants(w, **shape), "routed MoE-LoRA")


def _prepare(pools: Sequence[LoRAWeights], plan, label: str) -> tuple[int, float]:
    started = time.perf_counter()
    layouts = {_layout(w): w for w in pools if w.a.device.type == "cuda"}
    plans = [(w, plan(w)) for w in layouts.values()]
    if plans:
        logger.info("%s %d %s kernel variants for %d projection layouts (compiled ones load from the Triton cache)",
                    "compiling (in threads)" if compiling_ahead() else "preparing", sum(len(v) for _, v in plans),
                    label, len(plans))
    launched = sum(_launch(w, variants) for w, variants in plans)
    if launched:
        torch.cuda.synchronize(plans[0][0].a.device)
    return launched, time.perf_counter() - started


LinearCase = tuple[int, int, int, int]  # (rows, experts, top_k, max_rank) of one fused-linear launch shape


def routed_cases(rows: int, experts: int, top_k: int, max_rank: int) -> list[LinearCase]:
    """Cases of an expert pool's routed projections: every row count from 1 to ``rows``."""
    return [(n, experts, top_k, max_rank) for n in range(1, rows + 1)] if experts and max_rank else []


def precompile_linears(linears: Sequence[tuple[torch.Tensor, torch.Tensor | None, LoRAWeights | None]],
                       cases: Sequence[LinearCase] = ()) -> tuple[int, float]:
    """The fused decode linear's variants (kernels/fused_linear.py) for projections given as (weight, bias, pool or
    None): without a pool the base linear (its one-row GEMV and its several-row variant); with one, its routed form
    for each case (a routing of ``rows`` rows over ``experts`` experts, ``top_k`` pairs per row, at ``max_rank``).
    Each distinct (layout, case) is launched once per process, into scratch, with zero gates; returns (launches,
    seconds). Nothing off CUDA."""
    started, launched, device = time.perf_counter(), 0, None
    for weight, bias, pool in linears:
        if weight.device.type != "cuda":
            continue
        device = weight.device
        layout = ("linear", str(device), weight.dtype, tuple(weight.shape), bias is not None)
        if pool is None:
            if (layout, None) not in _done:
                for rows in (1, 2):  # one row (the GEMV) and several (one variant serves 2 to MAX_ROWS)
                    routed_linear(torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=device), weight, bias)
                _mark((layout, None))
                launched += 2
            continue
        for case in cases:
            if (layout, _layout(pool), case) in _done:
                continue
            rows, experts, top_k, max_rank = case
            probe = _routed_probe(pool, experts, top_k, max_rank).to(device)
            routing = replace(probe, topk_ids=probe.topk_ids.expand(rows, -1).contiguous(),
                              topk_gates=torch.zeros(rows, top_k, device=device))
            routed_linear(torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=device), weight, bias,
                          pool, routing)
            _mark((layout, _layout(pool), case))
            launched += 1
    if launched:
        torch.cuda.synchronize(device)
    return launched, time.perf_counter() - started
