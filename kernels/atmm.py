"""ATMM: the adaptive-tiling multi-LoRA matmul, a shrink and an expand kernel that run each adapter at its true rank.

Public op: ``atmm_add(y, x, weights, batch)``. Internally the two kernels also serve the routed (LoRA-Switch)
operator in ``kernels/routed.py``: there every row is one segment and each expert is a term whose per-row gate comes
from the routing table (``ROUTED``).

Work layout (both kernels use a flat 1-D grid):
- row blocks: segment s holds ``cdiv(len_s, BLOCK_M)`` blocks; a program finds its segment by a prefix sum over
  ``seg_indptr`` (no host sync, no block table). The grid is an upper bound on the block count computed from host
  ints, so it is data-independent under CUDA graphs; extra programs exit at once.
- shrink: each row block is split over (term, slice, rank block, K split); programs of one row block are adjacent
  in launch order so that the x tile they share is read from DRAM once. Rank blocks past a term's true rank exit.
- expand: each row block is split over output blocks; slices (q/k/v, gate/up) own whole output blocks. One or two
  terms whose ranks fit a register tile are preloaded once; more terms (routed experts, wide mixtures) are walked as
  a flat, branch-free loop over (live term, rank chunk), 64 terms' tables in registers at a time. Either way the
  rank loop stops at each term's true rank, the K-split partials of the shrink are summed on load, and y is updated
  with one read-modify-write of fp32 ``y + sum_terms`` per tile, so several terms of a row never race.
- launches: ``launch_pair`` runs the shrink then the expand; for decode-sized batches (``pdl``, on by default in
  ``atmm_add``) the expand is a programmatic dependent of the shrink (Hopper+), whose prologue overlaps the
  shrink's tail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.intmath import cdiv, next_power_of_2
from kernels.launch import launch
from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.tile_config import AtmmConfig, ExpandConfig, ShapeKey, ShrinkConfig, device_table

MAX_SLICES = 4
PRELOAD_ELEMENTS = 64 * 128  # the expand keeps [BM, terms x rank] of shrink output in registers up to this
VEC_R = True  # B and shrink-output tiles read in 16-byte loads (masks on the rank rounded up to 8; ``_rank_fetch``)
# The same in the expand's term walk: off. On an H200 (Triton 3.6) the walk with 16-byte rank loads raised 'misaligned
# address' at rank 128 with several tiles of the tuner's pool, segmented and routed (bench/RESULTS.md, Kernels,
# eleventh session); with per-element rank loads every tile ran. The fault kills the CUDA context, so it cannot be
# caught at run time.
VEC_R_WALK = False
MAX_TERMS_BLOCK = 64  # terms whose tables the expand's term walk holds in registers at once


@triton.jit
def _segment_block(indptr_ptr, slot_ptr, rank_ptr, num_segments, n_terms, term, pid_m,
                   SEG_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row block ``pid_m`` -> (segment, first position, end position, slot and rank of ``term``).

    The segment is >= num_segments past the last block. The term's slot and rank are loaded as vectors in the
    same round trip as the segment boundaries (one dependent DRAM access fewer on a cold cache).
    """
    idx = tl.arange(0, SEG_POW2)
    valid = idx < num_segments
    lo = tl.load(indptr_ptr + idx, mask=valid, other=0)
    hi = tl.load(indptr_ptr + idx + 1, mask=valid, other=0)
    slots = tl.load(slot_ptr + idx * n_terms + term, mask=valid, other=-1)
    ranks = tl.load(rank_ptr + idx * n_terms + term, mask=valid, other=0)
    blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, axis=0)
    seg = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    here = idx == seg
    first = tl.sum(tl.where(here, ends - blocks, 0), axis=0)
    seg_lo = tl.sum(tl.where(here, lo, 0), axis=0)
    seg_hi = tl.sum(tl.where(here, hi, 0), axis=0)
    slot = tl.sum(tl.where(here, slots, 0), axis=0)
    rank = tl.sum(tl.where(here, ranks, 0), axis=0)
    return seg, seg_lo + (pid_m - first) * BLOCK_M, seg_hi, slot, rank


@triton.jit
def _route_gate(id_ptr, gate_ptr, offs_m, mask_m, expert, top_k, TOP_K_POW2: tl.constexpr):
    """Per-row gate of ``expert``: sum_j gates[t, j] * (ids[t, j] == expert), for rows offs_m -> [BLOCK_M] fp32."""
    offs_j = tl.arange(0, TOP_K_POW2)
    mask = mask_m[:, None] & (offs_j[None, :] < top_k)
    ids = tl.load(id_ptr + offs_m[:, None] * top_k + offs_j[None, :], mask=mask, other=-1)
    gates = tl.load(gate_ptr + offs_m[:, None] * top_k + offs_j[None, :], mask=mask, other=0.0)
    return tl.sum(tl.where(ids == expert, gates, 0.0), axis=1)


@triton.jit(do_not_specialize=["num_segments", "num_rows", "n_terms", "top_k", "r_blocks"])
def _shrink_kernel(
    # pointers
    x_ptr, a_ptr, tmp_ptr, tok_ptr, indptr_ptr, slot_ptr, rank_ptr, route_id_ptr, route_gate_ptr,
    # sizes
    num_segments, num_rows, in_dim, n_terms, top_k, r_blocks,
    # strides
    stride_x_row, stride_a_slot, stride_a_slice, stride_a_rank,
    stride_t_split, stride_t_pos, stride_t_term, stride_t_slice,
    # meta
    N_SLICES: tl.constexpr, SPLIT_K: tl.constexpr, SEG_POW2: tl.constexpr,
    ROUTED: tl.constexpr, TOP_K_POW2: tl.constexpr, IEEE: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if USE_PDL:
        # Let the expand (launched as a programmatic dependent) start its prologue once every program here runs;
        # it waits for this grid's completion before it reads tmp.
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    inner = n_terms * r_blocks * (N_SLICES * SPLIT_K)
    pid_m = pid // inner
    rest = pid % inner
    split = rest % SPLIT_K
    rest = rest // SPLIT_K
    r_block = rest % r_blocks
    rest = rest // r_blocks
    slice_id = rest % N_SLICES
    term = rest // N_SLICES
    if ROUTED:
        seg = 0
        m_lo = pid_m * BLOCK_M
        m_hi = num_rows
        slot = tl.load(slot_ptr + term)
        rank = tl.load(rank_ptr + term)
    else:
        seg, m_lo, m_hi, slot, rank = _segment_block(indptr_ptr, slot_ptr, rank_ptr, num_segments, n_terms, term,
                                                     pid_m, SEG_POW2, BLOCK_M)
        if seg >= num_segments:
            return
    r_lo = r_block * BLOCK_R
    if (slot < 0) | (r_lo >= rank):
        return
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m_hi
    if ROUTED:
        rows = offs_m
    else:
        rows = tl.load(tok_ptr + offs_m, mask=mask_m, other=0)
    offs_r = r_lo + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    t_ptrs = (tmp_ptr + split * stride_t_split + offs_m[:, None] * stride_t_pos + term * stride_t_term
              + slice_id * stride_t_slice + offs_r[None, :])
    t_mask = mask_m[:, None] & mask_r[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    picked = 1.0
    if ROUTED:
        gate = _route_gate(route_id_ptr, route_gate_ptr, offs_m, mask_m, term, top_k, TOP_K_POW2)
        picked = tl.max(tl.abs(gate), axis=0)
    if picked != 0.0:
        k_per_split = tl.cdiv(tl.cdiv(in_dim, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = split * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, in_dim)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row + offs_k[None, :]
        a_ptrs = (a_ptr + slot.to(tl.int64) * stride_a_slot + slice_id * stride_a_slice
                  + offs_r[None, :] * stride_a_rank + offs_k[:, None])
        for k in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k + offs_k) < in_dim
            x_tile = tl.load(x_ptrs + k, mask=mask_m[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
            a_tile = tl.load(a_ptrs + k, mask=k_mask[:, None] & mask_r[None, :], other=0.0)  # [BK, BR]
            if IEEE:
                acc += tl.dot(x_tile, a_tile, input_precision="ieee")
            else:
                acc += tl.dot(x_tile, a_tile)
        if ROUTED:
            acc = acc * gate[:, None]
    tl.store(t_ptrs, acc, mask=t_mask)


@triton.jit
def _term_tile(tmp_ptr, slot_ptr, rank_ptr, scale_ptr, seg, n_terms, term, offs_m, mask_m, offs_r,
               stride_t_split, stride_t_pos, stride_t_term, t_slice_off, N_SPLITS: tl.constexpr, VEC_R: tl.constexpr):
    """One term's shrink output for a row block, summed over K splits and scaled -> ([BM, BR] fp32, slot, rank)."""
    slot = tl.load(slot_ptr + seg * n_terms + term)
    rank = tl.load(rank_ptr + seg * n_terms + term)
    scale = tl.load(scale_ptr + seg * n_terms + term)
    rank = tl.where(slot >= 0, rank, 0)
    t = _split_sum(tmp_ptr + term * stride_t_term + t_slice_off, offs_m, mask_m, offs_r, rank, stride_t_split,
                   stride_t_pos, N_SPLITS, VEC_R)
    return t * scale, slot, rank


@triton.jit
def _split_sum(t_base, offs_m, mask_m, offs_r, rank, stride_t_split, stride_t_pos, N_SPLITS: tl.constexpr,
               VEC_R: tl.constexpr):
    """The [BM, BR] fp32 shrink output at ``t_base`` (one term and slice), its N_SPLITS K-split partials summed;
    zero past ``rank``."""
    t_ptrs = t_base + offs_m[:, None] * stride_t_pos + offs_r[None, :]
    t_mask = mask_m[:, None] & _rank_fetch(offs_r, rank, VEC_R)[None, :]
    t = tl.load(t_ptrs, mask=t_mask, other=0.0)
    for split in tl.static_range(1, N_SPLITS):
        t += tl.load(t_ptrs + split * stride_t_split, mask=t_mask, other=0.0)
    if VEC_R:
        t = tl.where((offs_r < rank)[None, :], t, 0.0)
    return t


@triton.jit
def _rank_fetch(offs_r, rank, VEC_R: tl.constexpr):
    """Which of the rank columns ``offs_r`` to load for a term of rank ``rank``. With VEC_R, every column below the
    rank rounded up to 8: a mask constant over 8 contiguous columns lets the compiler issue 16-byte loads (a mask
    cut at the true rank forces one load per element); the caller zeroes the columns past ``rank`` after the
    load, so whatever a pool's or workspace's padding holds never reaches the sum."""
    if VEC_R:
        return offs_r < tl.multiple_of((rank + 7) // 8 * 8, 8)
    return offs_r < rank


@triton.jit
def _rank_rows(b_tile, offs_r, rank, VEC_R: tl.constexpr):
    """A [BR, BN] B tile loaded with ``_rank_fetch``'s mask, its rows past ``rank`` zeroed."""
    if VEC_R:
        return tl.where((offs_r < rank)[:, None], b_tile, 0.0)
    return b_tile


@triton.jit
def _slice_of(group, out_total, bound1, bound2, bound3, first1, first2, first3, N_SLICES: tl.constexpr):
    """Output group ``group`` -> (its slice, the slice's first and end column, the slice's first group), where
    slice i owns columns [bound_i, bound_{i+1}) and groups [first_i, first_{i+1})."""
    if N_SLICES == 1:
        return 0, 0, out_total, 0
    slice_id = (group >= first1).to(tl.int32) + (group >= first2).to(tl.int32) + (group >= first3)
    n_lo = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, bound1, tl.where(slice_id == 2, bound2, bound3)))
    n_hi = tl.where(slice_id == 0, bound1, tl.where(slice_id == 1, bound2, tl.where(slice_id == 2, bound3, out_total)))
    g0 = tl.where(slice_id == 0, 0, tl.where(slice_id == 1, first1, tl.where(slice_id == 2, first2, first3)))
    return slice_id, n_lo, n_hi, g0


@triton.jit
def _pick(offs, index, values):
    """values[index] of a register vector (a masked sum: no memory access)."""
    return tl.sum(tl.where(offs == index, values, 0), axis=0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit(do_not_specialize=["num_segments", "num_rows", "n_terms", "top_k", "r_blocks", "n_groups", "first1",
                               "first2", "first3"])
def _expand_kernel(
    # pointers
    y_ptr, tmp_ptr, b_ptr, tok_ptr, indptr_ptr, slot_ptr, rank_ptr, scale_ptr, route_id_ptr,
    # sizes
    num_segments, num_rows, n_terms, top_k, r_blocks, n_groups, out_total,
    bound1, bound2, bound3, first1, first2, first3,
    # strides
    stride_y_row, stride_b_slot, stride_b_row, stride_t_split, stride_t_pos, stride_t_slice, stride_t_term,
    # meta
    N_SLICES: tl.constexpr, SEG_POW2: tl.constexpr, ROUTED: tl.constexpr, N_SPLITS: tl.constexpr,
    TOP_K_POW2: tl.constexpr, TERMS_BLOCK: tl.constexpr, IEEE: tl.constexpr, PRELOAD_TERMS: tl.constexpr,
    R_PAD: tl.constexpr, USE_PDL: tl.constexpr, VEC_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m = pid // n_groups
    group = pid % n_groups
    if ROUTED:
        seg = 0
        m_lo = pid_m * BLOCK_M
        m_hi = num_rows
    else:
        seg, m_lo, m_hi, slot0, rank0 = _segment_block(indptr_ptr, slot_ptr, rank_ptr, num_segments, n_terms, 0,
                                                       pid_m, SEG_POW2, BLOCK_M)
        if seg >= num_segments:
            return
    # Groups of GROUP_N output blocks never straddle slices: slice i owns groups [first_i, first_{i+1}).
    slice_id, n_lo, n_hi, g0 = _slice_of(group, out_total, bound1, bound2, bound3, first1, first2, first3, N_SLICES)
    nb_lo = (group - g0) * GROUP_N
    nb_hi = tl.minimum(nb_lo + GROUP_N, tl.cdiv(n_hi - n_lo, BLOCK_N))
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    mask_m = offs_m < m_hi
    if ROUTED:
        rows = offs_m
    else:
        rows = tl.load(tok_ptr + offs_m, mask=mask_m, other=0)
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_y_row
    t_slice_off = slice_id * stride_t_slice
    dtype = b_ptr.dtype.element_ty
    if USE_PDL:
        # Launched as the shrink's programmatic dependent: everything above overlapped the shrink's tail; its
        # output (tmp) is read only after this wait. (y, B and the batch tables are not written by the shrink.)
        tl.extra.cuda.gdc_wait()
    if PRELOAD_TERMS > 0:
        # One or two terms whose ranks fit a tile: load their shrink output once, then stream y and B over the
        # output blocks (the loop body is loads -> dot -> store, which the compiler software-pipelines).
        offs_r = tl.arange(0, R_PAD)
        t0, slot0, rank0 = _term_tile(tmp_ptr, slot_ptr, rank_ptr, scale_ptr, seg, n_terms, 0, offs_m, mask_m,
                                      offs_r, stride_t_split, stride_t_pos, stride_t_term, t_slice_off, N_SPLITS,
                                      VEC_R)
        b0 = b_ptr + slot0.to(tl.int64) * stride_b_slot + offs_r[:, None]
        live0 = _rank_fetch(offs_r, rank0, VEC_R)  # B rows past the rank meet zeros in t0
        t0 = t0.to(dtype)
        if PRELOAD_TERMS == 2:
            t1, slot1, rank1 = _term_tile(tmp_ptr, slot_ptr, rank_ptr, scale_ptr, seg, n_terms, 1, offs_m, mask_m,
                                          offs_r, stride_t_split, stride_t_pos, stride_t_term, t_slice_off, N_SPLITS,
                                          VEC_R)
            b1 = b_ptr + slot1.to(tl.int64) * stride_b_slot + offs_r[:, None]
            live1 = _rank_fetch(offs_r, rank1, VEC_R)
            t1 = t1.to(dtype)
            if rank0 + rank1 == 0:
                return
        else:
            if rank0 == 0:
                return
        for nb in range(nb_lo, nb_hi):
            offs_n = n_lo + nb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_hi
            y_mask = mask_m[:, None] & mask_n[None, :]
            y_tile = tl.load(y_rows + offs_n[None, :], mask=y_mask, other=0.0)
            b_tile = _rank_rows(tl.load(b0 + offs_n[None, :] * stride_b_row, mask=live0[:, None] & mask_n[None, :],
                                        other=0.0), offs_r, rank0, VEC_R)
            acc = _dot(t0, b_tile, IEEE)
            if PRELOAD_TERMS == 2:
                b_tile1 = _rank_rows(tl.load(b1 + offs_n[None, :] * stride_b_row,
                                             mask=live1[:, None] & mask_n[None, :], other=0.0), offs_r, rank1, VEC_R)
                acc += _dot(t1, b_tile1, IEEE)
            tl.store(y_rows + offs_n[None, :], (y_tile.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        # Any number of terms (mixtures of wide ranks, routed experts), TERMS_BLOCK at a time: a chunk's slots,
        # ranks and scales sit in registers and one flat loop walks its (live term, rank chunk) pairs with no
        # branch, so the compiler pipelines the B loads. Dead terms (no slot, rank 0, or -- routed -- picked by no
        # row of the block) are left out of the walk; a block with none leaves y untouched.
        offs_c = tl.arange(0, TERMS_BLOCK)
        if ROUTED:
            offs_j = tl.arange(0, TOP_K_POW2)
            id_mask = mask_m[:, None] & (offs_j[None, :] < top_k)
            ids = tl.load(route_id_ptr + offs_m[:, None] * top_k + offs_j[None, :], mask=id_mask, other=-1)
        else:
            ids = tl.full((BLOCK_M, TOP_K_POW2), -1, dtype=tl.int32)
        hits = 0
        for e0 in range(0, n_terms, TERMS_BLOCK):
            hits += tl.sum(_live_terms(slot_ptr, rank_ptr, seg, n_terms, e0, offs_c, ids, ROUTED, TOP_K_POW2,
                                       TERMS_BLOCK).to(tl.int32), axis=0)
        if hits == 0:
            return
        offs_k = tl.arange(0, BLOCK_R)
        for nb in range(nb_lo, nb_hi):
            offs_n = n_lo + nb * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < n_hi
            y_mask = mask_m[:, None] & mask_n[None, :]
            y_tile = tl.load(y_rows + offs_n[None, :], mask=y_mask, other=0.0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for e0 in range(0, n_terms, TERMS_BLOCK):
                slots, ranks, scales, order, count = _term_tables(slot_ptr, rank_ptr, scale_ptr, seg, n_terms, e0,
                                                                  offs_c, ids, ROUTED, TOP_K_POW2, TERMS_BLOCK)
                for it in range(0, count * r_blocks):
                    local = _pick(order, it // r_blocks, offs_c)
                    offs_r = (it % r_blocks) * BLOCK_R + offs_k
                    slot = _pick(offs_c, local, slots)
                    rank = _pick(offs_c, local, ranks)
                    t = _split_sum(tmp_ptr + (e0 + local) * stride_t_term + t_slice_off, offs_m, mask_m, offs_r, rank,
                                   stride_t_split, stride_t_pos, N_SPLITS, VEC_R) * _pick(offs_c, local, scales)
                    b_ptrs = (b_ptr + slot.to(tl.int64) * stride_b_slot + offs_n[None, :] * stride_b_row
                              + offs_r[:, None])
                    b_mask = _rank_fetch(offs_r, rank, VEC_R)[:, None] & mask_n[None, :]
                    b_tile = _rank_rows(tl.load(b_ptrs, mask=b_mask, other=0.0), offs_r, rank, VEC_R)
                    acc += _dot(t.to(dtype), b_tile, IEEE)
            tl.store(y_rows + offs_n[None, :], (y_tile.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _term_tables(slot_ptr, rank_ptr, scale_ptr, seg, n_terms, e0, offs_c, ids, ROUTED: tl.constexpr,
                 TOP_K_POW2: tl.constexpr, TERMS_BLOCK: tl.constexpr):
    """Terms e0 + offs_c of segment ``seg`` for a term walk: (slots, ranks, scales, each live term's place among the
    live ones (-1 if dead), live count); see ``_live_terms``."""
    live = _live_terms(slot_ptr, rank_ptr, seg, n_terms, e0, offs_c, ids, ROUTED, TOP_K_POW2, TERMS_BLOCK)
    slots = tl.load(slot_ptr + seg * n_terms + e0 + offs_c, mask=live, other=-1)
    ranks = tl.load(rank_ptr + seg * n_terms + e0 + offs_c, mask=live, other=0)
    scales = tl.load(scale_ptr + seg * n_terms + e0 + offs_c, mask=live, other=0.0)
    order = tl.where(live, tl.cumsum(live.to(tl.int32), axis=0) - 1, -1)
    return slots, ranks, scales, order, tl.sum(live.to(tl.int32), axis=0)


@triton.jit
def _live_terms(slot_ptr, rank_ptr, seg, n_terms, e0, offs_c, ids, ROUTED: tl.constexpr, TOP_K_POW2: tl.constexpr,
                TERMS_BLOCK: tl.constexpr):
    """[TERMS_BLOCK] bool: which of terms e0 + offs_c of segment ``seg`` have a slot and a rank and (routed) are
    picked by some row of the block (``ids``: [BLOCK_M, TOP_K_POW2] expert per row and pair, -1 for none)."""
    terms = e0 + offs_c
    in_range = terms < n_terms
    live = (tl.load(slot_ptr + seg * n_terms + terms, mask=in_range, other=-1) >= 0) \
        & (tl.load(rank_ptr + seg * n_terms + terms, mask=in_range, other=0) > 0)
    if ROUTED:
        offs_j = tl.arange(0, TOP_K_POW2)
        picked = tl.zeros((TERMS_BLOCK,), dtype=tl.int32)
        for j in tl.static_range(TOP_K_POW2):
            col = tl.sum(tl.where(offs_j[None, :] == j, ids, 0), axis=1)  # [BM] expert of pair j per row
            picked = tl.maximum(picked, tl.max((col[:, None] == terms[None, :]).to(tl.int32), axis=0))
        live = live & (picked > 0)
    return live


@dataclass(frozen=True)
class RowPlan:
    """How rows map to terms for one launch pair: a LoRABatch's segments, or (routed) every row in one segment."""

    tok: torch.Tensor  # [T_lora] int32 rows of x (unused when routed)
    indptr: torch.Tensor  # [S + 1] int32 (unused when routed)
    slots: torch.Tensor  # [S, K] int32 (routed: [E] expert slots)
    ranks: torch.Tensor  # [S, K] int32 (routed: [E])
    scales: torch.Tensor  # [S, K] float32 (routed: [E])
    num_segments: int
    num_positions: int  # rows of tmp: T_lora, or T when routed
    n_terms: int
    max_seg_len: int
    max_rank: int
    route_ids: torch.Tensor | None = None  # [T, k] int32 expert index per pair (routed only)
    route_gates: torch.Tensor | None = None  # [T, k] float32 gate per pair (routed only)

    @property
    def routed(self) -> bool:
        return self.route_ids is not None

    @property
    def top_k(self) -> int:
        return int(self.route_ids.shape[1]) if self.route_ids is not None else 1

    def row_blocks(self, block_m: int) -> int:
        """An upper bound on the row blocks (from host ints only, so a CUDA graph may capture it)."""
        if self.routed:
            return cdiv(self.num_positions, block_m)
        by_longest = self.num_segments * cdiv(self.max_seg_len, block_m)
        by_total = cdiv(self.num_positions, block_m) + self.num_segments
        return min(by_longest, by_total)

    @classmethod
    def from_batch(cls, batch: LoRABatch) -> RowPlan:
        slots, ranks, scales = batch.terms()
        return cls(batch.token_indices, batch.seg_indptr, slots, ranks, scales, batch.num_segments,
                   batch.num_lora_tokens, batch.num_terms, batch.max_seg_len, batch.max_rank)


def _pow2(value: int, floor: int = 1) -> int:
    return max(floor, next_power_of_2(max(value, 1)))


def segment_scan_width(num_segments: int) -> int:
    """Width of the in-kernel segment scan (SEG_POW2); one value (64) for up to 64 segments keeps recompiles rare."""
    return _pow2(num_segments, 64)


def _seg_pow2(plan: RowPlan) -> int:
    return 1 if plan.routed else segment_scan_width(plan.num_segments)


def workspace_shape(plan: RowPlan, weights: LoRAWeights, config: AtmmConfig) -> tuple[int, ...]:
    """Shape of the fp32 shrink output: [split_k, positions, slices, terms, max_rank rounded up to 16].

    Within a slice the terms' ranks sit side by side (the expand reads them as one concatenated rank axis). The
    rounding keeps every row 64-byte aligned, and the kernels' stride specialisation the same for every rank.
    """
    rank = cdiv(max(plan.max_rank, 1), 16) * 16
    return (config.shrink.split_k, plan.num_positions, weights.n_slices, plan.n_terms, rank)


def shrink_meta(plan: RowPlan, n_slices: int, cfg: ShrinkConfig, ieee: bool, pdl: bool = False) -> dict:
    """The shrink kernel's compile-time arguments for ``plan``: one Triton variant per distinct dict."""
    return dict(N_SLICES=n_slices, SPLIT_K=cfg.split_k, SEG_POW2=_seg_pow2(plan), ROUTED=plan.routed,
                TOP_K_POW2=_pow2(plan.top_k), IEEE=ieee, USE_PDL=pdl, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
                BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def launch_shrink(x: torch.Tensor, weights: LoRAWeights, plan: RowPlan, tmp: torch.Tensor, cfg: ShrinkConfig,
                  pdl: bool = False) -> None:
    """Semantics: tmp[split, p, k, i, :r] = partial over K split of x[row(p)] @ a[slot(p,k), i, :r].T (* gate).

    x: [T, in_dim]; tmp: workspace_shape(...) fp32, written where a term is live and r < its rank.
    pdl: the next launch (the expand) is a programmatic dependent of this one (``pdl_supported``).
    """
    r_blocks = cdiv(plan.max_rank, cfg.block_r)
    inner = plan.n_terms * weights.n_slices * r_blocks * cfg.split_k
    grid = (plan.row_blocks(cfg.block_m) * inner,)
    if grid[0] == 0:
        return
    routes = (plan.route_ids, plan.route_gates) if plan.routed else (plan.slots, plan.scales)
    launch(_shrink_kernel, grid)(
        x, weights.a, tmp, plan.tok, plan.indptr, plan.slots, plan.ranks, *routes,
        plan.num_segments, plan.num_positions, weights.in_dim, plan.n_terms, plan.top_k, r_blocks,
        x.stride(0), weights.a.stride(0), weights.a.stride(1), weights.a.stride(2),
        tmp.stride(0), tmp.stride(1), tmp.stride(3), tmp.stride(2),
        **shrink_meta(plan, weights.n_slices, cfg, x.dtype == torch.float32, pdl),
    )


def expand_meta(plan: RowPlan, n_slices: int, cfg: ExpandConfig, n_splits: int, ieee: bool,
                pdl: bool = False) -> dict:
    """The expand kernel's compile-time arguments for ``plan``: one Triton variant per distinct dict.

    One or two terms whose padded ranks fit in registers are preloaded (R_PAD wide); otherwise R_PAD is unused and
    pinned to 16, so that batches of different ranks share that variant. ``pdl``: launched as the shrink's
    programmatic dependent (``launch_pdl`` is a launch option of the variant).
    """
    r_pad = _pow2(plan.max_rank, 16)
    preload = plan.n_terms if (not plan.routed and plan.n_terms <= 2
                               and r_pad * cfg.block_m * plan.n_terms <= PRELOAD_ELEMENTS) else 0
    terms_block = 1 if preload else min(_pow2(plan.n_terms), MAX_TERMS_BLOCK)
    vec_r = VEC_R and (preload > 0 or VEC_R_WALK)
    meta = dict(N_SLICES=n_slices, SEG_POW2=_seg_pow2(plan), ROUTED=plan.routed, N_SPLITS=n_splits,
                TOP_K_POW2=_pow2(plan.top_k), TERMS_BLOCK=terms_block, IEEE=ieee, PRELOAD_TERMS=preload,
                R_PAD=r_pad if preload else 16, USE_PDL=pdl, VEC_R=vec_r, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_R=cfg.block_r, GROUP_N=cfg.group_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if pdl:
        meta["launch_pdl"] = True
    return meta


def launch_expand(y: torch.Tensor, weights: LoRAWeights, plan: RowPlan, tmp: torch.Tensor, cfg: ExpandConfig,
                  pdl: bool = False) -> None:
    """Semantics: y[row(p), out_i] += sum_k scale(p,k) * (sum_split tmp[:, p, i, k, :r]) @ b[slot(p,k), out_i, :r].T.

    y: [T, out_total]; tmp: as written by launch_shrink with the same plan (and the same ``pdl``).
    """
    bounds = list(weights.slice_bounds) + [weights.out_dim] * (MAX_SLICES + 1 - len(weights.slice_bounds))
    firsts, n_groups = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        firsts.append(n_groups)
        n_groups += cdiv(cdiv(hi - lo, cfg.block_n), cfg.group_n)
    firsts = [f if i < weights.n_slices else n_groups for i, f in enumerate(firsts)]
    grid = (plan.row_blocks(cfg.block_m) * n_groups,)
    if grid[0] == 0:
        return
    ieee = y.dtype == torch.float32 and weights.b.dtype == torch.float32
    launch(_expand_kernel, grid)(
        y, tmp, weights.b, plan.tok, plan.indptr, plan.slots, plan.ranks, plan.scales,
        plan.route_ids if plan.routed else plan.slots,
        plan.num_segments, plan.num_positions, plan.n_terms, plan.top_k, cdiv(plan.max_rank, cfg.block_r), n_groups,
        weights.out_dim, bounds[1], bounds[2], bounds[3], firsts[1], firsts[2], firsts[3],
        y.stride(0), weights.b.stride(0), weights.b.stride(1), tmp.stride(0), tmp.stride(1), tmp.stride(2),
        tmp.stride(3),
        **expand_meta(plan, weights.n_slices, cfg, tmp.shape[0], ieee, pdl),
    )


def launch_pair(y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, plan: RowPlan, tmp: torch.Tensor,
                config: AtmmConfig, pdl: bool = False) -> None:
    """The shrink then the expand; with ``pdl``, chained by programmatic dependent launch where ``pdl_supported``
    and the batch is decode-sized (``chains``)."""
    pdl = chains(plan.num_positions, pdl) and pdl_supported(x.device)
    launch_shrink(x, weights, plan, tmp, config.shrink, pdl)
    launch_expand(y, weights, plan, tmp, config.expand, pdl)


_PDL: dict[torch.device, bool] = {}
PDL_MAX_ROWS = 512


def chains(positions: int, pdl: bool) -> bool:
    """Whether a pair over ``positions`` rows asked for ``pdl`` is chained where the device supports it: decode-
    sized batches only (a 2048-row prefill measured 8% slower chained; bench/RESULTS.md, Kernels, sixth session)."""
    return pdl and positions <= PDL_MAX_ROWS


def pdl_supported(device: torch.device) -> bool:
    """Whether ``device`` can chain launches by programmatic dependent launch: an NVIDIA device of compute
    capability 9.0+ with a Triton that has grid-dependency control, not the CPU interpreter (ROCm builds of torch
    also report their GPUs as ``cuda`` devices, with capabilities of 9 and up, and have no such launch).

    ``atmm_add`` chains decode-sized pairs by default (1.0-1.4 us saved per pair in 7 of 8 decode cases on an
    H200, fourteenth session); ``routed_add`` only on request (its routed pair at 16 rows ran up to 2x slower
    chained, sixth session). bench/RESULTS.md, Kernels.
    """
    if device.type != "cuda":
        return False
    if device not in _PDL:
        gdc = getattr(getattr(tl, "extra", None), "cuda", None)
        _PDL[device] = (hasattr(gdc, "gdc_wait") and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
                        and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9)
    return _PDL[device]


def check_operands(y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, num_tokens: int) -> None:
    """Raise ValueError unless x [T, in_dim] and y [T, out_total] fit the weights (no device reads)."""
    weights.check()
    if weights.n_slices > MAX_SLICES:
        raise ValueError(f"at most {MAX_SLICES} fused slices are supported, got {weights.n_slices}")
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != num_tokens or y.shape[0] != num_tokens:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the batch's {num_tokens} rows")
    if x.shape[1] != weights.in_dim or y.shape[1] != weights.out_dim:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not match in_dim {weights.in_dim} and "
                         f"out_dim {weights.out_dim}")
    if x.dtype != weights.a.dtype:
        raise ValueError(f"x dtype {x.dtype} must match the weights' {weights.a.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y must have unit stride along the hidden dim")
    if not (x.device == y.device == weights.a.device):
        raise ValueError("x, y and the weights must be on one device")


def shape_key(batch: LoRABatch, weights: LoRAWeights) -> ShapeKey:
    return ShapeKey(segments=batch.num_segments, tokens=batch.num_lora_tokens, in_dim=weights.in_dim,
                    out_dim=weights.out_dim, max_rank=batch.max_rank)


def atmm_add(
    y: torch.Tensor,
    x: torch.Tensor,
    weights: LoRAWeights,
    batch: LoRABatch,
    config: AtmmConfig | None = None,
    *,
    workspace: torch.Tensor | None = None,
    pdl: bool = True,
) -> None:
    """Add every segment's LoRA update into the base layer's output, in place, in one shrink + expand launch pair.

    Semantics: for s, t in segments, k in terms, i in slices:
        y[t, out_i] += seg_scales[s, k] * (x[t] @ a[slot, i, :r].T) @ b[slot, out_i, :r].T
        with slot = seg_slots[s, k], r = seg_ranks[s, k]; one fp32 sum over k, one rounding into y.

    Args:
        y: [T, out_total] the base layer's output (any float dtype), updated in place; rows outside the batch are
            not touched.
        x: [T, in_dim] the layer input, in the weights' dtype.
        weights: the projection's slot pool (a [slots, n_slices, R, in_dim], b [slots, out_total, R]).
        batch: the iteration's segments (1 term, or 2 in mixture mode).
        config: tiles; by default looked up in the current device's table by shape (exact, nearest, heuristic).
        workspace: optional fp32 tensor of ``workspace_shape`` (static buffers for CUDA graphs, or tests).
        pdl: chain the pair by programmatic dependent launch where the device supports it and the batch is
            decode-sized (``launch_pair``, ``chains``); on by default.
    """
    check_operands(y, x, weights, batch.num_tokens)
    if batch.num_segments == 0 or batch.max_rank == 0 or batch.num_lora_tokens == 0:
        return
    if batch.max_rank > weights.pool_rank:
        raise ValueError(f"batch max_rank {batch.max_rank} exceeds the pool's rank {weights.pool_rank}")
    config = config or device_table().lookup(shape_key(batch, weights))[0]
    plan = RowPlan.from_batch(batch)
    tmp = workspace_for(plan, weights, config, workspace, x.device)
    launch_pair(y, x, weights, plan, tmp, config, pdl)


def workspace_for(
    plan: RowPlan, weights: LoRAWeights, config: AtmmConfig, workspace: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The shrink's fp32 buffer: ``workspace`` once checked against ``workspace_shape``, or a new one."""
    shape = workspace_shape(plan, weights, config)
    if workspace is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(workspace.shape) != shape or workspace.dtype != torch.float32 or not workspace.is_contiguous():
        raise ValueError(f"workspace must be a contiguous fp32 tensor of shape {shape}, got "
                         f"{tuple(workspace.shape)} {workspace.dtype}")
    return workspace
