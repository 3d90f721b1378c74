"""Fused decode linear: a few rows' base matmul and the routed experts' expand in one launch.

Public op: ``routed_linear(x, weight, bias, weights, routing)`` -> y, the base layer's output with LoRA-Switch's
routed update already in it (what ``F.linear`` then ``routed_add`` compute, with one launch and one rounding fewer).

Why: at decode sizes (1-16 rows) a projection's time is its weight stream plus launch latency. ``routed_add`` after
``F.linear`` costs three launches per projection (matmul, shrink, expand), and the expand re-reads and re-writes y.
Here the shrink runs first (``kernels/atmm.py``'s routed shrink, unchanged), then one kernel streams W for every row
and, before its single store, walks the experts some row picked, reading their shrink partials and B. For one row
(ranks up to 64) its k experts are known up front, so their tables, shrink outputs and B tiles are loaded before the
W stream and their latency hides behind it (``ROW_DIRECT``). Where the GPU supports it (``LINEAR_PDL``, sm_90+) the
kernel is the shrink's programmatic dependent: it streams W while the shrink runs and reads the shrink output after a
grid-dependency wait.

Work layout: a 1-D grid over output blocks; slices (q/k/v, gate/up) own whole blocks, so a block reads one slice's
shrink output. Each program holds all T rows (T <= MAX_ROWS): for one row the product is an fp32 multiply-reduce
over [BLOCK_N, BLOCK_K] tiles (no tensor-core padding of a 1-row operand); for more rows it is ``tl.dot`` on
[16, BLOCK_K] x [BLOCK_K, BLOCK_N]. With several rows a block may be split along K (``LinearConfig.split_k``): its
programs each stream a share of K and walk a share of the expert terms into an fp32 partial, and the last of them to
arrive (a per-block counter) sums the partials in a fixed order and stores y, so the result does not depend on
timing. The grid depends only on the output width, so CUDA graphs can capture it.

The same kernel without experts is the engine's base projection for up to MAX_ROWS rows (``EngineConfig.row_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import atmm
from kernels.atmm import (
    MAX_SLICES,
    MAX_TERMS_BLOCK,
    _dot,
    _pick,
    _pow2,
    _rank_fetch,
    _slice_of,
    _split_sum,
    _term_tables,
    check_operands,
    launch_shrink,
    pdl_supported,
    workspace_for,
)
from kernels.intmath import cdiv
from kernels.launch import launch
from kernels.lora_batch import LoRAWeights
from kernels.routed import routed_plan
from kernels.routing import Routing
from kernels.tile_config import AtmmConfig, ShapeKey, ShrinkConfig, device_table

MAX_ROWS = 16  # rows one program holds: a decode batch's worth; larger batches take F.linear + routed_add
ROW_DIRECT = True  # one row: its experts' loads issued before the W stream (``_row_experts``)
# The shrink and this kernel chained by programmatic dependent launch (the W stream overlaps the shrink). Measured on
# an H200 (bench/RESULTS.md, LoRA-Switch, eleventh session): 1.05-1.22x faster per projection, LoRA-Switch decode
# 6.07 -> 5.50 ms at batch 1. Only where ``pdl_supported`` (sm_90+); elsewhere the plain launch.
LINEAR_PDL = True


@dataclass(frozen=True)
class LinearConfig:
    """Tiles of the fused linear: output columns and K chunk per step, warps, software-pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs per output block (several rows only), each over 1/split_k of K and of the experts


def linear_config(rows: int, out_dim: int, in_dim: int, lora: bool = False) -> LinearConfig:
    """Tiles by shape, from sweeps on an H200 over the 7B's projections (bench/RESULTS.md, Kernels, seventh session).

    One row: ~500-900 programs of 4-8 output rows stream W in 1-2 KB chunks (a bandwidth-bound GEMV wants many
    programs with many loads in flight); with the experts' epilogue, 512-wide chunks and 4 warps measured best for
    every group. More rows: 64-column dot tiles, with 128-wide K chunks on the widest output (gate/up); re-swept
    with the 16-byte rank loads and the shrink chained by PDL (eleventh session): the best tile at 8 plain rows for
    every group (1.04-1.21x faster than 32 columns), and at 16 routed rows for q/k/v and gate/up (1.07-1.09x). The
    narrow outputs (o and down, 3584 wide: 56 blocks of 64 columns for 132 SMs) split K in two (thirteenth session):
    plain multi-LoRA at 8 / 16 rows o 25.6 -> 23.2 / 35.2 -> 27.0 us, down 62.1 -> 55.0 / 79.6 -> 61.8 us, and
    their base projections alone faster than cuBLAS (down 46.8 against 50.8 us at 8 rows).
    """
    if rows > 1 and out_dim <= 4096:
        return LinearConfig(64, 256, 4, 4, split_k=2)
    if rows > 1:
        return LinearConfig(64, 128 if out_dim >= 16384 else 256, 4, 4)
    block_n = 8 if out_dim > 4096 else 4
    if lora:
        return LinearConfig(block_n, 512, 4, 2)
    wide = max(out_dim, in_dim) >= 8192
    return LinearConfig(block_n, 1024 if in_dim >= 8192 else 512, 4 if wide else 8, 2)


@triton.jit
def _row_experts(b_ptr, slot_ptr, rank_ptr, scale_ptr, route_id_ptr, top_k, offs_n, mask_n, stride_b_slot,
                 stride_b_row, TOP_K_POW2: tl.constexpr, BLOCK_R: tl.constexpr, VEC_R: tl.constexpr):
    """One row's experts for the epilogue: (expert [K] index, ranks [K] (0 for a dead pair: -1, no slot, or an
    expert picked by an earlier pair, whose gate the shrink already summed), scales [K], b [K, BN, BR] fp32 their B
    rows, zero past each rank). Reads nothing the shrink writes."""
    offs_j = tl.arange(0, TOP_K_POW2)
    ids = tl.load(route_id_ptr + offs_j, mask=offs_j < top_k, other=-1)
    earlier = (ids[:, None] == ids[None, :]) & (offs_j[None, :] < offs_j[:, None])  # [K, K]: j' < j picked it too
    live = (ids >= 0) & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    expert = tl.where(live, ids, 0)
    slots = tl.load(slot_ptr + expert, mask=live, other=-1)
    ranks = tl.where(live & (slots >= 0), tl.load(rank_ptr + expert, mask=live, other=0), 0)
    scales = tl.load(scale_ptr + expert, mask=live, other=0.0)
    offs_r = tl.arange(0, BLOCK_R)
    b_ptrs = (b_ptr + tl.maximum(slots, 0).to(tl.int64)[:, None, None] * stride_b_slot
              + offs_n[None, :, None] * stride_b_row + offs_r[None, None, :])
    fetch = _row_fetch(offs_r, ranks, VEC_R)
    b = tl.load(b_ptrs, mask=fetch[:, None, :] & mask_n[None, :, None], other=0.0)
    keep = offs_r[None, :] < ranks[:, None]
    return expert, ranks, scales, tl.where(keep[:, None, :], b.to(tl.float32), 0.0)


@triton.jit
def _row_shrink(t_slice, expert, ranks, scales, stride_t_split, stride_t_term, dtype: tl.constexpr,
                N_SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, VEC_R: tl.constexpr):
    """One row's shrink outputs for ``_row_experts``' experts: [K, BR] fp32, the K-split partials summed, x scale
    and rounded to the weights' dtype as the term walk does, zero past each rank."""
    offs_r = tl.arange(0, BLOCK_R)
    fetch = _row_fetch(offs_r, ranks, VEC_R)
    t_ptrs = t_slice + expert[:, None] * stride_t_term + offs_r[None, :]
    t = tl.load(t_ptrs, mask=fetch, other=0.0)
    for split in tl.static_range(1, N_SPLITS):
        t += tl.load(t_ptrs + split * stride_t_split, mask=fetch, other=0.0)
    return tl.where(offs_r[None, :] < ranks[:, None], (t * scales[:, None]).to(dtype).to(tl.float32), 0.0)


@triton.jit
def _row_fetch(offs_r, ranks, VEC_R: tl.constexpr):
    """[K, BR] columns to load, as ``_rank_fetch`` for a vector of ranks: with VEC_R each rank rounded up to 8 (16-byte
    loads; the callers zero the columns past the true rank)."""
    if VEC_R:
        return offs_r[None, :] < tl.multiple_of((ranks + 7) // 8 * 8, 8)[:, None]
    return offs_r[None, :] < ranks[:, None]


@triton.jit(do_not_specialize=["num_rows", "n_terms", "top_k", "r_blocks", "first1", "first2", "first3"])
def _linear_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, y_ptr, tmp_ptr, b_ptr, slot_ptr, rank_ptr, scale_ptr, route_id_ptr, part_ptr, count_ptr,
    # sizes
    num_rows, in_dim, k_chunk, n_terms, top_k, r_blocks, out_total, bound1, bound2, bound3, first1, first2, first3,
    # strides
    stride_x_row, stride_w_row, stride_y_row, stride_b_slot, stride_b_row,
    stride_t_split, stride_t_pos, stride_t_slice, stride_t_term,
    # meta
    N_SLICES: tl.constexpr, HAS_BIAS: tl.constexpr, LORA: tl.constexpr, N_SPLITS: tl.constexpr,
    TOP_K_POW2: tl.constexpr, TERMS_BLOCK: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ROW_DIRECT: tl.constexpr, VEC_R: tl.constexpr, USE_PDL: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    block = pid // SPLIT  # SPLIT programs share an output block: each streams k_chunk of K and walks every
    split = pid % SPLIT   # SPLIT-th expert term; the last to finish sums their fp32 partials in split order
    slice_id, n_lo, n_hi, g0 = _slice_of(block, out_total, bound1, bound2, bound3, first1, first2, first3, N_SLICES)
    offs_n = n_lo + (block - g0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_hi
    t_slice = tmp_ptr + slice_id * stride_t_slice
    if ROW_DIRECT:
        # One row whose experts' ranks fit one BLOCK_R chunk: its top-k experts are the only live terms, so their
        # tables, B tiles and (unless the shrink may still be running: USE_PDL) shrink outputs are loaded here,
        # before the W stream, and their latency hides behind it (the term walk below issues them one dependent
        # step at a time after it).
        expert, ranks, scales, b_row = _row_experts(b_ptr, slot_ptr, rank_ptr, scale_ptr, route_id_ptr, top_k,
                                                    offs_n, mask_n, stride_b_slot, stride_b_row, TOP_K_POW2,
                                                    BLOCK_R, VEC_R)
        if not USE_PDL:
            t_row = _row_shrink(t_slice, expert, ranks, scales, stride_t_split, stride_t_term,
                                w_ptr.dtype.element_ty, N_SPLITS, BLOCK_R, VEC_R)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < num_rows
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w_row + offs_k[None, :]  # [BN, BK]
    dtype = w_ptr.dtype.element_ty
    if BLOCK_M == 1:
        # One row: elementwise products summed once at the end (the row would fill 1/16 of a tensor-core tile).
        part = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, in_dim, BLOCK_K):
            if EVEN_K:
                x_row = tl.load(x_ptr + k + offs_k)
                w_tile = tl.load(w_ptrs + k, mask=mask_n[:, None], other=0.0)
            else:
                k_mask = (k + offs_k) < in_dim
                x_row = tl.load(x_ptr + k + offs_k, mask=k_mask, other=0.0)
                w_tile = tl.load(w_ptrs + k, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
            part += w_tile.to(tl.float32) * x_row.to(tl.float32)[None, :]
        acc = tl.sum(part, axis=1)[None, :]  # [1, BN]
    else:
        x_ptrs = x_ptr + offs_m[:, None] * stride_x_row + offs_k[None, :]  # [BM, BK]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = split * k_chunk  # k_chunk: a multiple of BLOCK_K (all of K when SPLIT is 1)
        for k in range(k_lo, tl.minimum(k_lo + k_chunk, in_dim), BLOCK_K):
            k_mask = (k + offs_k) < in_dim
            x_tile = tl.load(x_ptrs + k, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(w_ptrs + k, mask=mask_n[:, None] & k_mask[None, :], other=0.0)
            acc += _dot(x_tile, tl.trans(w_tile), IEEE)
    if HAS_BIAS:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if split == 0:  # once per block: the first split adds it
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if USE_PDL:
        # Launched as the shrink's programmatic dependent: the W stream above overlapped the shrink; its output
        # (tmp) is read only after this wait.
        tl.extra.cuda.gdc_wait()
    if ROW_DIRECT:
        if USE_PDL:
            t_row = _row_shrink(t_slice, expert, ranks, scales, stride_t_split, stride_t_term,
                                w_ptr.dtype.element_ty, N_SPLITS, BLOCK_R, VEC_R)
        acc += tl.sum(tl.sum(b_row * t_row[:, None, :], axis=2), axis=0)[None, :]
    elif LORA:
        # The experts some row picked (their shrink output already carries each row's gate; rows that did not
        # pick an expert hold zeros there), walked as (live expert, rank chunk) pairs, TERMS_BLOCK at a time.
        offs_c = tl.arange(0, TERMS_BLOCK)
        offs_j = tl.arange(0, TOP_K_POW2)
        ids = tl.load(route_id_ptr + offs_m[:, None] * top_k + offs_j[None, :],
                      mask=mask_m[:, None] & (offs_j[None, :] < top_k), other=-1)  # [BM, K]
        offs_rb = tl.arange(0, BLOCK_R)
        for e0 in range(0, n_terms, TERMS_BLOCK):
            slots, ranks, scales, order, count = _term_tables(slot_ptr, rank_ptr, scale_ptr, 0, n_terms, e0, offs_c,
                                                              ids, True, TOP_K_POW2, TERMS_BLOCK)
            for it in range(split, count * r_blocks, SPLIT):
                local = _pick(order, it // r_blocks, offs_c)
                offs_r = (it % r_blocks) * BLOCK_R + offs_rb
                slot = _pick(offs_c, local, slots)
                rank = _pick(offs_c, local, ranks)
                t = _split_sum(t_slice + (e0 + local) * stride_t_term, offs_m, mask_m, offs_r, rank,
                               stride_t_split, stride_t_pos, N_SPLITS, VEC_R) * _pick(offs_c, local, scales)  # [BM, BR]
                b_tile = tl.load(b_ptr + slot.to(tl.int64) * stride_b_slot + offs_n[:, None] * stride_b_row
                                 + offs_r[None, :], mask=mask_n[:, None] & _rank_fetch(offs_r, rank, VEC_R)[None, :],
                                 other=0.0)
                if VEC_R:
                    b_tile = tl.where((offs_r < rank)[None, :], b_tile, 0.0)
                t = t.to(dtype)
                if BLOCK_M == 1:
                    acc += tl.sum(b_tile.to(tl.float32) * t.to(tl.float32), axis=1)[None, :]
                else:
                    acc += _dot(t, tl.trans(b_tile), IEEE)
    y_ptrs = y_ptr + offs_m[:, None] * stride_y_row + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    else:
        # Publish this program's partial, then count arrivals; the last of the block's SPLIT programs reads them
        # all (L2, past L1) in split order, so the sum does not depend on which finished last, stores y and
        # re-arms the counter for the next launch. No program waits for another.
        tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(part_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + tile, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            first = block.to(tl.int64) * SPLIT * (BLOCK_M * BLOCK_N)
            for s in tl.static_range(SPLIT):
                total += tl.load(part_ptr + first + s * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tl.atomic_xchg(count_ptr + block, 0)


def _slice_blocks(bounds: list[int], n_slices: int, block_n: int) -> tuple[list[int], int]:
    """(first program of slices 1-3, program count): each slice owns cdiv(width, block_n) whole programs."""
    firsts, programs = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        firsts.append(programs)
        programs += cdiv(hi - lo, block_n)
    return [f if i < n_slices else programs for i, f in enumerate(firsts)], programs


def linear_meta(rows: int, in_dim: int, config: LinearConfig, bias: bool, ieee: bool, n_slices: int = 1,
                splits: int = 0, top_k: int = 1, experts: int = 1, block_r: int = 16, max_rank: int = 0,
                row_direct: bool | None = None, pdl: bool = False) -> dict:
    """The kernel's compile-time arguments: one Triton variant per distinct dict. ``splits`` > 0: the experts'
    epilogue over a shrink of that many K-split partials (``n_slices`` slices, ``experts`` terms, ranks up to
    ``max_rank``). ``row_direct``: one row's experts loaded before the W stream (default ``ROW_DIRECT`` where
    every rank fits one ``block_r`` chunk), else walked after it. ``pdl``: launched as the shrink's programmatic
    dependent (the W stream overlaps the shrink; ``launch_pdl`` is a launch option of the variant). SPLIT is
    ``config.split_k`` for several rows (``split_k_for``), 1 for one row."""
    lora = splits > 0
    row_direct = (ROW_DIRECT if row_direct is None else row_direct) and lora and rows == 1 and max_rank <= block_r
    meta = dict(N_SLICES=n_slices if lora else 1, HAS_BIAS=bias, LORA=lora, N_SPLITS=max(splits, 1),
                TOP_K_POW2=_pow2(top_k) if lora else 1, TERMS_BLOCK=min(_pow2(experts), MAX_TERMS_BLOCK) if lora else 1,
                EVEN_K=in_dim % config.block_k == 0, IEEE=ieee, BLOCK_M=1 if rows == 1 else 16,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=block_r if lora else 16,
                ROW_DIRECT=row_direct, VEC_R=atmm.VEC_R, USE_PDL=pdl and lora, SPLIT=split_k_for(rows, config),
                num_warps=config.num_warps, num_stages=config.num_stages)
    if meta["USE_PDL"]:
        meta["launch_pdl"] = True
    return meta


def split_k_for(rows: int, config: LinearConfig) -> int:
    """Programs per output block: ``config.split_k`` for several rows; one row keeps one (its GEMV already runs
    hundreds of programs)."""
    return config.split_k if rows > 1 else 1


# Split-K scratch, one per device, allocated once (outside CUDA-graph capture) and shared by every launch: launches
# on one stream run one after another, and each leaves its counters at zero.
SPLIT_PROGRAMS = 2048  # most programs x split_k of one launch that may split
_PART_TILE = 16 * 64  # a program's fp32 partial: BLOCK_M (16) x BLOCK_N (at most 64)
_SPLIT_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def split_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials [SPLIT_PROGRAMS x 16 x 64], int32 arrival counters [SPLIT_PROGRAMS], zeros) for ``device``."""
    if device not in _SPLIT_SCRATCH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the fused linear's split-K scratch must exist before CUDA-graph capture: run the "
                               "captured call once eagerly first (the engine's warm-up and precompile do)")
        _SPLIT_SCRATCH[device] = (torch.empty(SPLIT_PROGRAMS * _PART_TILE, dtype=torch.float32, device=device),
                                  torch.zeros(SPLIT_PROGRAMS, dtype=torch.int32, device=device))
    return _SPLIT_SCRATCH[device]


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ValueError unless x [T <= MAX_ROWS, in] and weight [out, in] (bias [out]) fit the fused linear."""
    if weight.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [T, in] and [out, in]")
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"the fused linear takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"x {x.dtype}, weight {weight.dtype} and bias must share a dtype")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [{weight.shape[0]}]")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x and weight must have unit stride along the input dim")
    if x.device != weight.device:
        raise ValueError("x and weight must be on one device")


def routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weights: LoRAWeights | None = None,
    routing: Routing | None = None,
    config: LinearConfig | None = None,
    *,
    workspace: torch.Tensor | None = None,
    row_direct: bool | None = None,
    pdl: bool | None = None,
    shrink: ShrinkConfig | None = None,
) -> torch.Tensor:
    """The base linear of a few rows with each row's top-k expert updates, in one fp32 sum and one rounding.

    Semantics: y[t] = x[t] @ weight.T + bias + sum_j topk_gates[t, j] * expert_scales[e]
        * (x[t] @ a[slot_e, i, :r_e].T) @ b[slot_e, out_i, :r_e].T, e = topk_ids[t, j] (skipped if -1).

    Args:
        x: [T, in_dim] layer input, 1 <= T <= MAX_ROWS.
        weight: [out_total, in_dim] base weight (its dtype is x's); bias: [out_total] or None.
        weights, routing: the projection's expert pool and the step's Routing (``kernels/routed.py``); both None
            for the base linear alone.
        config: tiles; default ``linear_config`` by shape. The shrink's tiles come from the device table's routed
            entries, as for ``routed_add``.
        workspace: optional fp32 shrink buffer (``kernels.atmm.workspace_shape`` of the routed plan).
        row_direct: for one row, load its experts before the W stream (``linear_meta``); default ``ROW_DIRECT``.
        pdl: chain the shrink and this kernel by programmatic dependent launch, so that the W stream overlaps the
            shrink (default ``LINEAR_PDL``; only where ``pdl_supported``).
        shrink: the shrink's tiles (the tuner times candidates this way); default the device table's routed entry.
    Returns:
        y: [T, out_total] in x's dtype.
    """
    check_linear(x, weight, bias)
    rows, out_total = x.shape[0], weight.shape[0]
    y = torch.empty((rows, out_total), dtype=x.dtype, device=x.device)
    lora = weights is not None and routing is not None and routing.num_experts > 0 and routing.max_rank > 0
    config = config or linear_config(rows, out_total, x.shape[1], lora)
    if lora:
        routing.check()
        check_operands(y, x, weights, rows)
        if routing.num_tokens != rows or routing.topk_ids.device != x.device:
            raise ValueError(f"the routing must hold the {rows} rows of x, on x's device")
        if routing.max_rank > weights.pool_rank:
            raise ValueError(f"routing max_rank {routing.max_rank} exceeds the pool's rank {weights.pool_rank}")
        plan = routed_plan(routing)
        key = ShapeKey(segments=routing.num_experts, tokens=rows * routing.top_k, in_dim=weights.in_dim,
                       out_dim=weights.out_dim, max_rank=routing.max_rank)
        pair = device_table().lookup_routed(key)[0]  # the routed operator's tiles; only its shrink runs here
        if shrink is not None:
            pair = AtmmConfig(shrink, pair.expand)
        tmp = workspace_for(plan, weights, pair, workspace, x.device)
        pdl = (LINEAR_PDL if pdl is None else pdl) and pdl_supported(x.device)
        launch_shrink(x, weights, plan, tmp, pair.shrink, pdl)
        bounds = list(weights.slice_bounds) + [out_total] * (MAX_SLICES + 1 - len(weights.slice_bounds))
        n_slices, block_r = weights.n_slices, min(64, _pow2(routing.max_rank, 16))
        tables = (tmp, weights.b, routing.expert_slots, routing.expert_ranks, routing.expert_scales,
                  routing.topk_ids)
        sizes = (routing.num_experts, routing.top_k, cdiv(routing.max_rank, block_r))
        strides = (weights.b.stride(0), weights.b.stride(1), tmp.stride(0), tmp.stride(1), tmp.stride(2),
                   tmp.stride(3))
        meta = linear_meta(rows, x.shape[1], config, bias is not None, x.dtype == torch.float32, n_slices,
                           tmp.shape[0], routing.top_k, routing.num_experts, block_r, routing.max_rank, row_direct,
                           pdl)
    else:
        bounds, n_slices = [0, out_total, out_total, out_total, out_total], 1
        tables, sizes, strides = (y,) * 6, (0, 1, 1), (0,) * 6
        meta = linear_meta(rows, x.shape[1], config, bias is not None, x.dtype == torch.float32)
    firsts, programs = _slice_blocks(bounds, n_slices, config.block_n)
    split, in_dim = meta["SPLIT"], x.shape[1]
    if split > 1:
        if programs * split > SPLIT_PROGRAMS or config.block_n * 16 > _PART_TILE:
            raise ValueError(f"split_k {split} needs at most {SPLIT_PROGRAMS} programs x splits (got "
                             f"{programs} x {split}) and block_n <= 64 (got {config.block_n})")
        part, counts = split_scratch(x.device)
    else:
        part = counts = y
    k_chunk = cdiv(cdiv(in_dim, split), config.block_k) * config.block_k
    launch(_linear_kernel, (programs * split,))(
        x, weight, bias if bias is not None else weight, y, *tables, part, counts,
        rows, in_dim, k_chunk, *sizes, out_total, bounds[1], bounds[2], bounds[3], firsts[1], firsts[2], firsts[3],
        x.stride(0), weight.stride(0), y.stride(0), *strides, **meta,
    )
    return y
