"""Offline tile tuning: profile ATMM and merge tiles over a grid of shapes on this GPU and write its table.

For every shape and K-split count the shrink candidates are timed alone, then the expand candidates on the winner's
output; the best pair over the split counts is the entry (the expand's cost grows with the partials it sums). Where
the pair runs chained by programmatic dependent launch (decode sizes on sm_90+, ``kernels.atmm.chains``), the
fastest few shrinks and expands of each split are then timed as chained pairs, and the fastest chained pair wins:
chained, the expand's start overlaps the shrink's tail, so the sum of the two alone is not what runs.
Candidates come from two fixed pools (so the number of distinct compiled kernels stays small) filtered by shape:
row tiles no taller than twice the rows per segment, rank tiles no wider than the rank, and K splits only while
the K range per split still holds a tile. Timing: CUDA-graph replay, L2 flushed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from kernels.intmath import next_power_of_2
from kernels.tile_config import (
    AtmmConfig,
    ExpandConfig,
    MergeConfig,
    ShapeKey,
    ShrinkConfig,
    TileTable,
    current_device_slug,
    table_path,
)

logger = logging.getLogger(__name__)

# (block_m, block_r, block_k, split_k, num_warps, num_stages)
SHRINK_POOL = [ShrinkConfig(*c) for c in (
    (16, 16, 128, 1, 4, 3), (16, 16, 256, 2, 4, 3), (16, 16, 256, 4, 4, 3), (16, 16, 128, 8, 4, 3),
    (16, 32, 256, 2, 4, 3), (16, 32, 128, 4, 4, 3), (16, 64, 128, 1, 4, 3), (16, 64, 128, 4, 4, 3),
    (32, 32, 128, 1, 4, 3), (32, 64, 128, 1, 4, 3), (32, 16, 128, 2, 4, 3),
    (64, 64, 64, 1, 4, 3), (64, 64, 128, 1, 8, 3), (64, 32, 128, 1, 4, 4),
    (128, 64, 64, 1, 8, 3), (128, 128, 64, 1, 8, 3), (64, 128, 64, 1, 8, 3),
)]
# (block_m, block_n, block_r, num_warps, num_stages, group_n)
EXPAND_POOL = [ExpandConfig(*c) for c in (
    (16, 64, 32, 4, 2, 1), (16, 128, 32, 4, 2, 1), (16, 128, 32, 4, 3, 2), (16, 256, 32, 4, 3, 1),
    (16, 64, 32, 4, 3, 4), (16, 128, 64, 4, 3, 4), (16, 256, 32, 8, 3, 2),
    (32, 128, 32, 4, 3, 2), (32, 64, 32, 4, 3, 4), (32, 256, 32, 8, 3, 2),
    (64, 128, 32, 4, 3, 4), (64, 64, 32, 4, 3, 8), (64, 256, 32, 8, 3, 4), (64, 128, 32, 4, 4, 8),
    (128, 128, 32, 8, 3, 4), (128, 64, 32, 4, 3, 8), (128, 256, 32, 8, 2, 2),
)]
# Extra expand tiles for the routed operator: wider rank chunks (fewer steps of its term walk), and narrow output
# tiles (more programs: every program walks all live experts, so few rows leave the GPU short of parallel work).
ROUTED_EXPAND_EXTRA = [ExpandConfig(*c) for c in (
    (16, 64, 64, 4, 3, 1), (16, 128, 64, 4, 3, 2), (16, 256, 64, 8, 3, 1), (32, 128, 64, 4, 3, 2),
    (16, 64, 32, 4, 3, 2), (16, 32, 64, 4, 3, 1), (16, 32, 32, 4, 2, 1), (16, 16, 64, 4, 3, 1),
)]
# (block_m, block_n, num_warps, num_stages, group_n)
MERGE_POOL = [MergeConfig(*c) for c in (
    (64, 128, 4, 3, 8), (64, 128, 4, 3, 4), (32, 256, 4, 3, 4), (64, 256, 8, 3, 4), (128, 128, 8, 3, 4),
    (64, 64, 4, 4, 16), (128, 64, 4, 3, 8), (32, 128, 4, 4, 16), (128, 256, 8, 3, 4), (64, 256, 4, 3, 8),
    (128, 128, 4, 3, 8), (32, 256, 4, 3, 16),
)]

DIMS = ((3584, 3584), (3584, 512), (3584, 18944), (18944, 3584))  # Qwen2.5-VL-7B projections
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
SEGMENTS = (1, 8, 32)
RANKS = (16, 64, 128)
# The routed operator (MoE-LoRA groups of a 7B as one fused projection each: q/k/v, o, gate/up, down)
ROUTED_DIMS = ((3584, 4608), (3584, 3584), (3584, 37888), (18944, 3584))
ROUTED_ROWS = (1, 4, 16, 64, 256, 1024)


def default_grid(quick: bool = False) -> list[ShapeKey]:
    """The shapes to profile: 7B dims x tokens x segments (<= tokens) x max rank; --quick keeps a corner set."""
    tokens = (1, 32, 128, 2048, 8192) if quick else TOKENS
    dims = DIMS[:3] if quick else DIMS
    ranks = (16, 128) if quick else RANKS
    return [ShapeKey(s, t, i, o, r) for (i, o) in dims for r in ranks for t in tokens for s in SEGMENTS if s <= t]


def routed_grid(quick: bool = False, experts: int = 8, top_k: int = 2) -> list[ShapeKey]:
    """The routed operator's shapes: 7B groups x max rank x routed rows, keyed as routed_add looks them up."""
    rows = (1, 16, 256) if quick else ROUTED_ROWS
    ranks = (64,) if quick else (16, 64)
    return [ShapeKey(experts, t * top_k, i, o, r) for (i, o) in ROUTED_DIMS for r in ranks for t in rows]


def shrink_candidates(key: ShapeKey, rows: int | None = None) -> list[ShrinkConfig]:
    """Shrink tiles worth timing for ``key``; ``rows``: rows per segment (default tokens / segments)."""
    rows = rows or max(1, key.tokens // key.segments)
    out = [c for c in SHRINK_POOL
           if c.block_m <= max(16, 2 * next_power_of_2(rows)) and c.block_r <= max(16, next_power_of_2(key.max_rank))
           and key.in_dim // c.split_k >= c.block_k]
    return out or SHRINK_POOL[:1]


def expand_candidates(key: ShapeKey, rows: int | None = None, pool: list[ExpandConfig] = EXPAND_POOL
                      ) -> list[ExpandConfig]:
    rows = rows or max(1, key.tokens // key.segments)
    out = [c for c in pool
           if c.block_m <= max(16, 2 * next_power_of_2(rows)) and c.block_r <= max(16, next_power_of_2(key.max_rank))]
    return out or pool[:1]


def synthetic_problem(key: ShapeKey, device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """x, y, weights and a batch of ``key``'s shape: tokens spread evenly over segments, every adapter at max rank."""
    from kernels.lora_batch import LoRABatch, LoRAWeights

    segments = min(key.segments, key.tokens)
    a = torch.randn(segments, 1, key.max_rank, key.in_dim, device=device, dtype=dtype) / key.in_dim**0.5
    b = torch.randn(segments, key.out_dim, key.max_rank, device=device, dtype=dtype) / key.max_rank**0.5
    weights = LoRAWeights(a, b, (0, key.out_dim))
    token_slots = torch.arange(key.tokens) % segments
    batch = LoRABatch.from_token_slots(token_slots, [key.max_rank] * segments, [1.0] * segments, device=device)
    x = torch.randn(key.tokens, key.in_dim, device=device, dtype=dtype)
    y = torch.randn(key.tokens, key.out_dim, device=device, dtype=dtype)
    return x, y, weights, batch


def routed_problem(key: ShapeKey, top_k: int = 2, device: torch.device | str = "cuda",
                   dtype: torch.dtype = torch.bfloat16):
    """x, y, weights and a Routing of ``key``'s shape: key.segments experts at max rank, tokens / top_k rows, each
    row's top-k drawn from random router logits."""
    from kernels.lora_batch import LoRAWeights
    from kernels.routing import Routing

    experts, rank, rows = key.segments, key.max_rank, max(1, key.tokens // top_k)
    a = torch.randn(experts, 1, rank, key.in_dim, device=device, dtype=dtype) / key.in_dim**0.5
    b = torch.randn(experts, key.out_dim, rank, device=device, dtype=dtype) / rank**0.5
    weights = LoRAWeights(a, b, (0, key.out_dim))
    routing = Routing.from_router_logits(
        torch.randn(rows, experts, device=device), min(top_k, experts),
        torch.arange(experts, dtype=torch.int32, device=device),
        torch.full((experts,), rank, dtype=torch.int32, device=device), torch.ones(experts, device=device), rank)
    x = torch.randn(rows, key.in_dim, device=device, dtype=dtype)
    y = torch.randn(rows, key.out_dim, device=device, dtype=dtype)
    return x, y, weights, routing


TRACE: list[dict] = []  # every candidate's time, for `valora kernels tune --trace`
CHAINED_SHRINKS, CHAINED_EXPANDS = 2, 3  # per K split, the fastest alone that are then timed as chained pairs


def _ranked(timer, candidates: Iterable, run: Callable, label: str = "") -> list[tuple[object, float]]:
    """(config, us) for every candidate that ran, fastest first (ties keep the candidates' order)."""
    ranked = []
    for cfg in candidates:
        try:
            us = timer.graph_time_us(lambda cfg=cfg: run(cfg))
        except Exception as exc:  # a tile that does not fit this GPU (shared memory, registers): skip it
            _check_context(cfg, exc)
            logger.debug("skip %s: %s", cfg, exc)
            continue
        TRACE.append({"shape": label, "config": repr(cfg), "us": us})
        ranked.append((cfg, us))
    if not ranked:
        raise RuntimeError("no candidate tile config ran")
    return sorted(ranked, key=lambda item: item[1])


def _best(timer, candidates: Iterable, run: Callable, label: str = "") -> tuple[object, float]:
    return _ranked(timer, candidates, run, label)[0]


def _check_context(cfg, exc: Exception) -> None:
    """A tile that failed to compile or launch leaves the GPU usable and is skipped; one that faulted on the device
    (a misaligned address, an illegal access) has broken the CUDA context, so every later candidate would fail too:
    stop, naming the tile."""
    if not torch.cuda.is_available():
        return
    try:
        torch.cuda.synchronize()
    except Exception as fault:
        raise RuntimeError(f"tile {cfg} faulted on the GPU ({exc}); the CUDA context is lost") from fault


def profile_shape(timer, key: ShapeKey, chained: bool | None = None) -> tuple[AtmmConfig, float]:
    """Per K-split count the fastest shrink, then the fastest expand after it, for one shape; returns the fastest
    pair and its us. chained: pick by chained-pair timing (default: where ``atmm_add`` chains this shape)."""
    from kernels.atmm import RowPlan, chains, pdl_supported

    x, y, weights, batch = synthetic_problem(key, timer.device)
    if chained is None:
        chained = chains(key.tokens, True) and pdl_supported(torch.device(timer.device))
    return _profile_pair(timer, x, y, weights, RowPlan.from_batch(batch), shrink_candidates(key),
                         expand_candidates(key), repr(key), chained)


def profile_routed_shape(timer, key: ShapeKey, top_k: int = 2) -> tuple[AtmmConfig, float]:
    """``profile_shape`` for the routed operator (kernels/routed.py): one segment of tokens / top_k rows whose terms
    are the key's experts; the expand pool adds wider rank chunks.

    Up to the fused linear's rows (kernels/fused_linear.py MAX_ROWS) the engine runs a routed projection as the
    shrink and the fused linear, which reads only the entry's shrink tiles; there the shrink is picked by timing
    that pair on a base weight of the key's shape (the entry's time is then the fused projection's), since the
    shrink that serves the routed expand best can slow the fused linear (bench/RESULTS.md, Kernels, thirteenth
    session)."""
    from kernels.fused_linear import MAX_ROWS, routed_linear
    from kernels.routed import routed_plan

    x, y, weights, routing = routed_problem(key, top_k, timer.device)
    rows = routing.num_tokens
    label = f"routed {key!r}"
    pair, us = _profile_pair(timer, x, y, weights, routed_plan(routing), shrink_candidates(key, rows),
                             expand_candidates(key, rows, EXPAND_POOL + ROUTED_EXPAND_EXTRA), label)
    if rows > MAX_ROWS:
        return pair, us
    weight = torch.randn(key.out_dim, key.in_dim, device=x.device, dtype=x.dtype) / key.in_dim**0.5
    shrink, us = _best(timer, shrink_candidates(key, rows),
                       lambda c: routed_linear(x, weight, None, weights, routing, shrink=c), f"fused {label}")
    return AtmmConfig(shrink, pair.expand), us


def _profile_pair(timer, x, y, weights, plan, shrinks: list[ShrinkConfig], expands: list[ExpandConfig],
                  label: str, chained: bool = False) -> tuple[AtmmConfig, float]:
    from kernels.atmm import launch_expand, launch_pair, launch_shrink, workspace_shape

    tmps: dict[int, torch.Tensor] = {}

    def tmp_for(split: int) -> torch.Tensor:
        if split not in tmps:
            probe = AtmmConfig(ShrinkConfig(16, 16, 64, split, 4, 2), EXPAND_POOL[0])
            tmps[split] = torch.zeros(workspace_shape(plan, weights, probe), device=timer.device)
        return tmps[split]

    # The expand reads every K-split partial of the shrink, so the split is chosen for the pair: per split count,
    # the fastest shrink, then the fastest expand after it; the best total wins.
    # Chained, the few fastest of each are then timed together as the launch runs them.
    best: tuple[AtmmConfig, float] | None = None
    for split in sorted({c.split_k for c in shrinks}):
        tmp = tmp_for(split)
        shrink_ranks = _ranked(timer, [c for c in shrinks if c.split_k == split],
                               lambda c, tmp=tmp: launch_shrink(x, weights, plan, tmp, c), label)
        launch_shrink(x, weights, plan, tmp, shrink_ranks[0][0])
        expand_ranks = _ranked(timer, expands, lambda c, tmp=tmp: launch_expand(y, weights, plan, tmp, c), label)
        if chained:
            pairs = [AtmmConfig(s, e) for s, _ in shrink_ranks[:CHAINED_SHRINKS]
                     for e, _ in expand_ranks[:CHAINED_EXPANDS]]
            pair, us = _best(timer, pairs, lambda c, tmp=tmp: launch_pair(y, x, weights, plan, tmp, c, pdl=True),
                             f"chained {label}")
        else:
            pair, us = AtmmConfig(shrink_ranks[0][0], expand_ranks[0][0]), shrink_ranks[0][1] + expand_ranks[0][1]
        if best is None or us < best[1]:
            best = pair, us
    return best


def profile_merge(timer, rank: int, targets: int = 8, dim: int = 3584) -> tuple[MergeConfig, float]:
    """The fastest merge tiles for one adapter of ``rank`` into ``targets`` square bf16 matrices."""
    from kernels.swift_merge import swift_merge

    plan, terms = _merge_problem(rank, targets, dim, str(timer.device))
    return _best(timer, _merge_pool(rank), lambda c: swift_merge(plan, add=terms, config=c), f"merge rank {rank}")


def _warm_worker(job: tuple[list[ShrinkConfig], list[ExpandConfig], list[MergeConfig], bool]) -> int:
    """Compile (by running once on a tiny problem) the given configs; the disk cache then serves the parent.
    With ``routed`` set, the ATMM configs compile in the routed operator's variants."""
    from kernels.atmm import RowPlan, launch_expand, launch_shrink, workspace_shape
    from kernels.routed import routed_plan
    from kernels.swift_merge import swift_merge

    shrinks, expands, merges, routed = job
    # The same argument specialisation as the 7B shapes: dims and strides divisible by 16.
    if routed:
        x, y, weights, routing = routed_problem(ShapeKey(8, 4, 3584, 512, 16))
        plan = routed_plan(routing)
    else:
        x, y, weights, batch = synthetic_problem(ShapeKey(2, 4, 3584, 512, 16))
        plan = RowPlan.from_batch(batch)
    launches = []
    for cfg in shrinks:
        tmp = torch.zeros(workspace_shape(plan, weights, AtmmConfig(cfg, EXPAND_POOL[0])), device="cuda")
        launches.append((cfg, lambda cfg=cfg, tmp=tmp: launch_shrink(x, weights, plan, tmp, cfg)))
    tmps = [torch.zeros(workspace_shape(plan, weights, AtmmConfig(ShrinkConfig(16, 16, 64, split, 4, 2),
                                                                  EXPAND_POOL[0])), device="cuda")
            for split in sorted({c.split_k for c in SHRINK_POOL})]
    for cfg in expands:  # the expand compiles one variant per K-split count of the shrinks it may follow
        launches += [(cfg, lambda cfg=cfg, tmp=tmp: launch_expand(y, weights, plan, tmp, cfg)) for tmp in tmps]
    if merges:
        plan_m, terms = _merge_problem(16, targets=1, dim=512)
        launches += [(cfg, lambda cfg=cfg: swift_merge(plan_m, add=terms, config=cfg)) for cfg in merges]
    for cfg, launch in launches:
        try:
            launch()
        except Exception as exc:  # a tile that does not fit this GPU: _best skips it too
            logger.debug("skip %s: %s", cfg, exc)
    torch.cuda.synchronize()
    return len(shrinks) + len(expands) + len(merges)


def warm_cache(extra: Iterable[AtmmConfig] = (), processes: int = 8, routed: bool = False) -> None:
    """Compile every pool config in parallel worker processes (Triton's disk cache is shared); ``routed``: the
    routed operator's variants (and its extra expand tiles), no merge tiles."""
    import multiprocessing

    shrinks = list(dict.fromkeys(SHRINK_POOL + [c.shrink for c in extra]))
    expands = list(dict.fromkeys(EXPAND_POOL + (ROUTED_EXPAND_EXTRA if routed else []) + [c.expand for c in extra]))
    merges = [] if routed else list(dict.fromkeys(c for r in RANKS for c in _merge_pool(r)))
    jobs = [(shrinks[i::processes], expands[i::processes], merges[i::processes], routed) for i in range(processes)]
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        done = sum(pool.map(_warm_worker, jobs))
    logger.info("compiled %d kernel configs in %.0f s", done, time.monotonic() - started)


def _merge_pool(rank: int) -> tuple[MergeConfig, ...]:
    return tuple(MERGE_POOL)


def _merge_problem(rank: int, targets: int, dim: int, device: str = "cuda"):
    from kernels.lora_batch import LoRAWeights
    from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget

    dt = torch.bfloat16
    items = []
    for _ in range(targets):
        lora = LoRAWeights(torch.randn(2, 1, rank, dim, device=device, dtype=dt) * 0.01,
                           torch.randn(2, dim, rank, device=device, dtype=dt) * 0.01, (0, dim))
        items.append(MergeTarget(torch.randn(dim, dim, device=device, dtype=dt), lora))
    return MergePlan(items), DeltaTerms.of_adapter(1, rank, 0.5, device)


def tune(
    grid: list[ShapeKey] | None = None,
    out_path: Path | None = None,
    budget_s: float | None = None,
    merge_ranks: Iterable[int] = RANKS,
    trace_path: Path | None = None,
    merge_only: bool = False,
    routed_only: bool = False,
) -> Path:
    """Profile ``grid`` (default: ``default_grid()``) on the current GPU and write the device's table.

    Shapes past ``budget_s`` seconds are left out (lookups fall back to the nearest profiled shape).
    ``merge_only`` keeps the table's ATMM entries and profiles the merge tiles again; ``routed_only`` keeps the
    ATMM and merge entries and profiles the routed operator's entries (default grid: ``routed_grid()``).
    """
    from kernels.timing import Timer

    slug = current_device_slug()
    if slug is None:
        raise ValueError("tuning needs a CUDA GPU (kernels are timed on the device whose table is written)")
    out_path = out_path or table_path(slug)
    from kernels.tile_config import FIXED_CONFIG

    if merge_only or routed_only:
        table = TileTable.load(out_path) if out_path.is_file() else TileTable(slug)
    if merge_only:
        table.merge.clear()
        grid = []
    elif routed_only:
        table.routed = TileTable(slug)
        grid = grid if grid is not None else routed_grid()
        merge_ranks = ()
        warm_cache(routed=True)
    else:
        grid = grid if grid is not None else default_grid()
        warm_cache(extra=[FIXED_CONFIG])
        table = TileTable(slug)
    timer = Timer()
    started = time.monotonic()
    for rank in merge_ranks:
        table.merge[rank], us = profile_merge(timer, rank)
        logger.info("merge rank %d: %s %.1f us", rank, table.merge[rank], us)
    for i, key in enumerate(grid):
        if budget_s is not None and time.monotonic() - started > budget_s:
            logger.warning("time budget spent: %d of %d shapes profiled", i, len(grid))
            break
        if routed_only:
            config, us = profile_routed_shape(timer, key)
            table.routed.add(key, config, us)
        else:
            config, us = profile_shape(timer, key)
            table.add(key, config, us)
        logger.info("[%d/%d] %s: %.1f us %s", i + 1, len(grid), key, us, config)
        table.save(out_path)  # keep what is done if the run is cut short
    table.save(out_path)
    if trace_path is not None:
        trace_path.write_text(json.dumps(TRACE, indent=0))
    return out_path
