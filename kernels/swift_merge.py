"""Swift merge: one launch adds or removes s * B @ A in place in every weight matrix of a MergePlan.

The orchestrator's mode switch (merged <-> unmerged <-> mixture) calls ``swift_merge`` with the adapters to add and to
remove; LoRA-Switch's fused switch (``kernels/switch.py``) is the same kernel with per-layer terms and skipping.

Precision and drift. The delta of every tile is accumulated in fp32 over all terms and rounded into W once. Merged
in place, a merge followed by an unmerge of the same adapter computes bit-identical |delta| (the scale's sign is
applied after the same dot products), so one cycle maps w -> round(round(w + d) - d), and round-to-nearest makes
that map idempotent: after n >= 1 cycles W_n == W_1 exactly. Hence the drift never accumulates:
    |W_n - W_0| <= ulp(max(|W_0|, |W_0 + delta|))   elementwise, for every n >= 1
(one unit in the last place of the larger magnitude; tested over 1000 cycles). Targets with a ``base`` copy are
merged from it instead (W = base + delta), which restores the base bit-exactly at the cost of a second copy of the
weights in memory; the memory traffic per merge is the same (read one matrix, write one).

Work layout: a persistent grid (a few programs per SM) walks the plan's targets; a program takes every
``num_programs``-th tile of each target, so a whole target is skipped with one check (fused switch, unchanged layer).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.merge_plan import TABLE_WIDTH, DeltaTerms, MergePlan
from kernels.tile_config import MergeConfig, device_table

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
PROGRAMS_PER_SM = 8


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, stride_a_slot, stride_a_rank, stride_b_slot, stride_b_row,
                offs_m, offs_n, mask_m, mask_n, slot_ptr, rank_ptr, scale_ptr, n_terms, sign,
                IEEE: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc += sign * sum_j scale_j * B[slot_j][offs_m, :r_j] @ A[slot_j][:r_j, offs_n]."""
    for j in range(0, n_terms):
        slot = tl.load(slot_ptr + j)
        rank = tl.load(rank_ptr + j)
        scale = tl.load(scale_ptr + j) * sign
        if (slot >= 0) & (rank > 0):
            b_base = b_ptr + slot.to(tl.int64) * stride_b_slot + offs_m[:, None] * stride_b_row
            a_base = a_ptr + slot.to(tl.int64) * stride_a_slot + offs_n[None, :]
            for r_lo in range(0, rank, BLOCK_R):
                offs_r = r_lo + tl.arange(0, BLOCK_R)
                mask_r = offs_r < rank
                b_tile = tl.load(b_base + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
                a_tile = tl.load(a_base + offs_r[:, None] * stride_a_rank, mask=mask_r[:, None] & mask_n[None, :],
                                 other=0.0)
                if IEEE:
                    acc += scale * tl.dot(b_tile, a_tile, input_precision="ieee")
                else:
                    acc += scale * tl.dot(b_tile, a_tile)
    return acc


@triton.jit
def _same_terms(add_slot, add_rank, add_scale, sub_slot, sub_rank, sub_scale, n_terms):
    same = 1
    for j in range(0, n_terms):
        same = same & (tl.load(add_slot + j) == tl.load(sub_slot + j)).to(tl.int32)
        same = same & (tl.load(add_rank + j) == tl.load(sub_rank + j)).to(tl.int32)
        same = same & (tl.load(add_scale + j) == tl.load(sub_scale + j)).to(tl.int32)
    return same


@triton.jit(do_not_specialize=["n_rows", "k_sub", "k_add", "stride_sub_group", "stride_add_group"])
def _delta_merge_kernel(
    # pointers
    table_ptr, start_ptr, sub_slot_ptr, sub_rank_ptr, sub_scale_ptr, add_slot_ptr, add_rank_ptr, add_scale_ptr,
    # sizes
    n_rows, k_sub, k_add,
    # strides
    stride_sub_group, stride_add_group,
    # meta
    W_DTYPE: tl.constexpr, TABLE_COLS: tl.constexpr, FROM_BASE: tl.constexpr, SKIP_UNCHANGED: tl.constexpr,
    IEEE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    for target in range(0, n_rows):
        row = table_ptr + target * TABLE_COLS
        group = tl.load(row + 12)
        sub_off = group * stride_sub_group
        add_off = group * stride_add_group
        live = 1
        if SKIP_UNCHANGED:
            live = 1 - _same_terms(add_slot_ptr + add_off, add_rank_ptr + add_off, add_scale_ptr + add_off,
                                   sub_slot_ptr + sub_off, sub_rank_ptr + sub_off, sub_scale_ptr + sub_off, k_add)
        tile_lo = tl.load(start_ptr + target)
        tile_hi = tl.load(start_ptr + target + 1)
        first = tile_lo + (pid - tile_lo % n_programs + n_programs) % n_programs
        if live != 0:
            w_ptr = tl.load(row + 0).to(tl.pointer_type(W_DTYPE))
            src_ptr = tl.load(row + 1).to(tl.pointer_type(W_DTYPE))
            a_ptr = tl.load(row + 2).to(tl.pointer_type(W_DTYPE))
            b_ptr = tl.load(row + 3).to(tl.pointer_type(W_DTYPE))
            n_rows_w = tl.load(row + 4)
            n_cols = tl.load(row + 5)
            stride_w = tl.load(row + 6)
            stride_src = tl.load(row + 7)
            stride_a_slot = tl.load(row + 8)
            stride_a_rank = tl.load(row + 9)
            stride_b_slot = tl.load(row + 10)
            stride_b_row = tl.load(row + 11)
            n_tiles_n = tl.load(row + 13)
            if ALIGNED:  # pointers loaded from the table carry no alignment: restore it (checked by the plan)
                w_ptr = tl.multiple_of(w_ptr, 16)
                src_ptr = tl.multiple_of(src_ptr, 16)
                a_ptr = tl.multiple_of(a_ptr, 16)
                b_ptr = tl.multiple_of(b_ptr, 16)
                stride_w = tl.multiple_of(stride_w, 8)
                stride_src = tl.multiple_of(stride_src, 8)
                stride_a_slot = tl.multiple_of(stride_a_slot, 8)
                stride_a_rank = tl.multiple_of(stride_a_rank, 8)
                stride_b_slot = tl.multiple_of(stride_b_slot, 8)
                stride_b_row = tl.multiple_of(stride_b_row, 8)
            for tile in range(first, tile_hi, n_programs):
                local = tile - tile_lo
                offs_m = (local // n_tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
                offs_n = (local % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
                mask_m = offs_m < n_rows_w
                mask_n = offs_n < n_cols
                mask = mask_m[:, None] & mask_n[None, :]
                rows64 = offs_m.to(tl.int64)[:, None]
                # The weight tile's load goes first: its DRAM latency overlaps the adapter tiles' loads and dots.
                if FROM_BASE:
                    src = tl.load(src_ptr + rows64 * stride_src + offs_n[None, :], mask=mask, other=0.0)
                else:
                    src = tl.load(w_ptr + rows64 * stride_w + offs_n[None, :], mask=mask, other=0.0)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                acc = _accumulate(acc, a_ptr, b_ptr, stride_a_slot, stride_a_rank, stride_b_slot, stride_b_row,
                                  offs_m, offs_n, mask_m, mask_n, sub_slot_ptr + sub_off, sub_rank_ptr + sub_off,
                                  sub_scale_ptr + sub_off, k_sub, -1.0, IEEE, BLOCK_R)
                acc = _accumulate(acc, a_ptr, b_ptr, stride_a_slot, stride_a_rank, stride_b_slot, stride_b_row,
                                  offs_m, offs_n, mask_m, mask_n, add_slot_ptr + add_off, add_rank_ptr + add_off,
                                  add_scale_ptr + add_off, k_add, 1.0, IEEE, BLOCK_R)
                tl.store(w_ptr + rows64 * stride_w + offs_n[None, :], (src.to(tl.float32) + acc).to(W_DTYPE),
                         mask=mask)


@functools.cache
def _program_count(device_index: int | None) -> int:
    if device_index is None:
        return 4  # the CPU interpreter runs programs one after another: few programs, same work
    return torch.cuda.get_device_properties(device_index).multi_processor_count * PROGRAMS_PER_SM


def _terms_args(terms: DeltaTerms | None, fallback: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, int, int]:
    if terms is None:
        return fallback, fallback, fallback, 0, 0
    stride = terms.num_terms if terms.num_groups > 1 else 0
    return terms.slots, terms.ranks, terms.scales, terms.num_terms, stride


def swift_merge(
    plan: MergePlan,
    add: DeltaTerms | None = None,
    sub: DeltaTerms | None = None,
    config: MergeConfig | None = None,
    *,
    skip_unchanged: bool = False,
) -> None:
    """Add ``add``'s adapters to and remove ``sub``'s from every target weight, in one launch.

    Semantics: for each target (W, group g), slice i: W[rows_i] = round(src[rows_i]
        + sum_j add.scales[g, j] * b[add.slots[g, j], rows_i, :r] @ a[add.slots[g, j], i, :r]
        - sum_j sub.scales[g, j] * b[sub.slots[g, j], rows_i, :r] @ a[sub.slots[g, j], i, :r]),
        src = the target's base copy if the plan has them, else W; fp32 accumulation, one rounding.

    Args:
        plan: the targets (e.g. all layers x q/k/v/o/gate/up/down of a model), built once.
        add: DeltaTerms [G, K] to add (G = 1 applies to every target, else one row per target group).
        sub: DeltaTerms [G, K'] to remove.
        config: tiles; default from the device table (heuristic without one).
        skip_unchanged: leave a group's targets untouched when add[g] == sub[g] (needs K == K'): the fused switch.
    """
    if add is None and sub is None and not plan.from_base:
        return
    for terms in (add, sub):
        if terms is not None:
            terms.check(plan.num_groups)
            if terms.slots.device != plan.device:
                raise ValueError(f"DeltaTerms on {terms.slots.device}, weights on {plan.device}")
    if skip_unchanged and (add is None or sub is None or add.num_terms != sub.num_terms):
        raise ValueError("skip_unchanged compares add and sub term by term: both are needed with the same K")
    if plan.dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported weight dtype {plan.dtype}")
    max_rank = max([t.max_rank for t in (add, sub) if t is not None] + [1])
    config = config or device_table().lookup_merge(max_rank)
    table, tile_start, total = plan.table(config.block_m, config.block_n)
    if total == 0:
        return
    device_index = plan.device.index if plan.device.type == "cuda" else None
    if device_index is None and plan.device.type == "cuda":
        device_index = torch.cuda.current_device()
    grid = (min(total, _program_count(device_index)),)
    sub_slots, sub_ranks, sub_scales, k_sub, stride_sub = _terms_args(sub, tile_start)
    add_slots, add_ranks, add_scales, k_add, stride_add = _terms_args(add, tile_start)
    _delta_merge_kernel[grid](
        table, tile_start, sub_slots, sub_ranks, sub_scales, add_slots, add_ranks, add_scales,
        plan.num_rows, k_sub, k_add,
        stride_sub, stride_add,
        W_DTYPE=_TL_DTYPES[plan.dtype], TABLE_COLS=TABLE_WIDTH, FROM_BASE=plan.from_base,
        SKIP_UNCHANGED=skip_unchanged, IEEE=plan.dtype == torch.float32, ALIGNED=plan.aligned,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
