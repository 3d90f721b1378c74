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

Work layout: one program per (target, block of rows, group of column tiles). It loads s * B for its rows once
(every term side by side on one rank axis), then streams its column tiles: load W (or base) and A, one dot with
fp32 accumulation, store. A program of a skipped group (fused switch, unchanged layer) exits after a scalar check.
Weight, A and B addresses are element offsets from the first target's tensors, so the plan's alignment check
(``MergePlan.aligned``) can restore the 16-byte divisibility the compiler needs for vector loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.intmath import next_power_of_2
from kernels.merge_plan import TABLE_WIDTH, DeltaTerms, MergePlan
from kernels.tile_config import MergeConfig, device_table

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
MAX_TERM_ELEMENTS = 64 * 128  # row block x (terms x padded rank) of s * B kept in registers


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
    w_base, a_base, b_base, table_ptr, start_ptr,
    sub_slot_ptr, sub_rank_ptr, sub_scale_ptr, add_slot_ptr, add_rank_ptr, add_scale_ptr,
    # sizes
    n_rows, k_sub, k_add,
    # strides
    stride_sub_group, stride_add_group,
    # meta
    TABLE_COLS: tl.constexpr, ROWS_POW2: tl.constexpr, FROM_BASE: tl.constexpr, SKIP_UNCHANGED: tl.constexpr,
    IEEE: tl.constexpr, ALIGNED: tl.constexpr, R_PAD: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = tl.arange(0, ROWS_POW2)
    starts = tl.load(start_ptr + idx, mask=idx < n_rows, other=2147483647)
    target = tl.sum((starts <= pid).to(tl.int32), axis=0) - 1
    row = table_ptr + target * TABLE_COLS
    group = tl.load(row + 12)
    sub_off = group * stride_sub_group
    add_off = group * stride_add_group
    if SKIP_UNCHANGED:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if _same_terms(add_slot_ptr + add_off, add_rank_ptr + add_off, add_scale_ptr + add_off,
                       sub_slot_ptr + sub_off, sub_rank_ptr + sub_off, sub_scale_ptr + sub_off, k_add) != 0:
            return
    # All terms side by side on one rank axis k = term * R_PAD + j (sub terms first, with negated scales).
    offs_k = tl.arange(0, K_PAD)
    term = offs_k // R_PAD
    j = offs_k % R_PAD
    is_sub = term < k_sub
    is_add = (term >= k_sub) & (term < k_sub + k_add)
    slot = tl.where(is_sub, tl.load(sub_slot_ptr + sub_off + term, mask=is_sub, other=-1),
                    tl.load(add_slot_ptr + add_off + term - k_sub, mask=is_add, other=-1))
    rank = tl.where(is_sub, tl.load(sub_rank_ptr + sub_off + term, mask=is_sub, other=0),
                    tl.load(add_rank_ptr + add_off + term - k_sub, mask=is_add, other=0))
    scale = tl.where(is_sub, -tl.load(sub_scale_ptr + sub_off + term, mask=is_sub, other=0.0),
                     tl.load(add_scale_ptr + add_off + term - k_sub, mask=is_add, other=0.0))
    live = (is_sub | is_add) & (slot >= 0) & (j < rank)
    if not FROM_BASE:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if tl.sum(live.to(tl.int32), axis=0) == 0:
            return
    local = pid - tl.load(start_ptr + target)
    n_groups = tl.load(row + 13)
    w_off = tl.load(row + 0)
    src_off = tl.load(row + 1)
    a_off = tl.load(row + 2)
    b_off = tl.load(row + 3)
    n_rows_w = tl.load(row + 4)
    n_cols = tl.load(row + 5)
    stride_w = tl.load(row + 6)
    stride_src = tl.load(row + 7)
    stride_a_slot = tl.load(row + 8)
    stride_a_rank = tl.load(row + 9)
    stride_b_slot = tl.load(row + 10)
    stride_b_row = tl.load(row + 11)
    if ALIGNED:  # offsets and strides loaded from the table carry no divisibility: restore it (checked by the plan)
        w_off = tl.multiple_of(w_off, 8)
        src_off = tl.multiple_of(src_off, 8)
        a_off = tl.multiple_of(a_off, 8)
        b_off = tl.multiple_of(b_off, 8)
        stride_w = tl.multiple_of(stride_w, 8)
        stride_src = tl.multiple_of(stride_src, 8)
        stride_a_slot = tl.multiple_of(stride_a_slot, 8)
        stride_a_rank = tl.multiple_of(stride_a_rank, 8)
        stride_b_slot = tl.multiple_of(stride_b_slot, 8)
        stride_b_row = tl.multiple_of(stride_b_row, 8)
        # The column count bounds every W and A mask along the contiguous axis: without its divisibility the
        # masks vary within a 16-byte vector and every load and store is split into 2-byte accesses.
        n_cols = tl.multiple_of(n_cols, 8)
    offs_m = (local // n_groups) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_rows_w
    rows64 = offs_m.to(tl.int64)[:, None]
    # s * B for this row block, once: [BM, K_PAD], as a high and a low part in the weights' dtype so that the dot
    # keeps ~16 mantissa bits of s * B (rounding is odd-symmetric, so a merge and an unmerge with opposite scales
    # still add exactly opposite deltas).
    b_cat = tl.load(b_base + b_off + slot.to(tl.int64)[None, :] * stride_b_slot + rows64 * stride_b_row + j[None, :],
                    mask=mask_m[:, None] & live[None, :], other=0.0)
    scaled = b_cat.to(tl.float32) * scale[None, :]
    b_hi = scaled.to(w_base.dtype.element_ty)
    b_lo = (scaled - b_hi.to(tl.float32)).to(w_base.dtype.element_ty)
    a_rows = a_base + a_off + slot.to(tl.int64)[:, None] * stride_a_slot + j[:, None] * stride_a_rank
    w_rows = w_base + w_off + rows64 * stride_w
    src_rows = w_base + src_off + rows64 * stride_src
    nt_lo = (local % n_groups) * GROUP_N
    nt_hi = tl.minimum(nt_lo + GROUP_N, tl.cdiv(n_cols, BLOCK_N))
    for nt in range(nt_lo, nt_hi):  # loads -> dot -> store: the compiler pipelines the column tiles
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_cols
        mask = mask_m[:, None] & mask_n[None, :]
        src = tl.load(src_rows + offs_n[None, :], mask=mask, other=0.0)
        a_tile = tl.load(a_rows + offs_n[None, :], mask=live[:, None] & mask_n[None, :], other=0.0)  # [K_PAD, BN]
        if IEEE:
            acc = tl.dot(b_hi, a_tile, input_precision="ieee")
        else:
            acc = tl.dot(b_hi, a_tile) + tl.dot(b_lo, a_tile)
        tl.store(w_rows + offs_n[None, :], (src.to(tl.float32) + acc).to(w_base.dtype.element_ty), mask=mask)


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
    n_terms = sum(t.num_terms for t in (add, sub) if t is not None)
    config = config or device_table().lookup_merge(max_rank)
    r_pad = next_power_of_2(max(max_rank, 16))
    k_pad = next_power_of_2(max(n_terms, 1) * r_pad)
    block_m = max(16, min(config.block_m, MAX_TERM_ELEMENTS // k_pad))  # s * B stays in registers
    table, item_start, total = plan.table(block_m, config.block_n, config.group_n)
    if total == 0:
        return
    first = plan.targets[0]
    sub_slots, sub_ranks, sub_scales, k_sub, stride_sub = _terms_args(sub, item_start)
    add_slots, add_ranks, add_scales, k_add, stride_add = _terms_args(add, item_start)
    _delta_merge_kernel[(total,)](
        first.weight, first.lora.a, first.lora.b, table, item_start,
        sub_slots, sub_ranks, sub_scales, add_slots, add_ranks, add_scales,
        plan.num_rows, k_sub, k_add,
        stride_sub, stride_add,
        TABLE_COLS=TABLE_WIDTH, ROWS_POW2=next_power_of_2(plan.num_rows), FROM_BASE=plan.from_base,
        SKIP_UNCHANGED=skip_unchanged, IEEE=plan.dtype == torch.float32, ALIGNED=plan.aligned,
        R_PAD=r_pad, K_PAD=k_pad, BLOCK_M=block_m, BLOCK_N=config.block_n, GROUP_N=config.group_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
