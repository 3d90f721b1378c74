"""MergePlan: the weight matrices one delta-merge launch updates, and DeltaTerms: the adapters it adds or removes.

The plan is built once (weights and pools do not move) and turns every (projection, slice) into one row of an
int64 pointer table, so a single launch can walk all layers x projections of a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.intmath import cdiv
from kernels.lora_batch import LoRAWeights

# Columns of the table, one row per (target, slice). Addresses are element offsets from the first target's
# tensors (weight, lora.a, lora.b), which the kernel receives as pointer arguments.
(W_OFF, BASE_OFF, A_OFF, B_OFF, ROWS, COLS, W_STRIDE, BASE_STRIDE,
 A_SLOT, A_RANK, B_SLOT, B_ROW, GROUP, N_GROUPS) = range(14)
TABLE_WIDTH = 14


@dataclass(frozen=True)
class MergeTarget:
    """One adapted projection's base weight and the slot pool of its LoRA (fused slices stacked on the rows)."""

    weight: torch.Tensor  # [out_total, in_dim]: updated in place
    lora: LoRAWeights  # slice i of the pool owns weight rows slice_bounds[i]:slice_bounds[i + 1]
    group: int = 0  # row of the DeltaTerms that applies here (the layer, for the fused switch)
    base: torch.Tensor | None = None  # [out_total, in_dim] clean copy: merge writes base + delta instead of W + delta


@dataclass(frozen=True)
class DeltaTerms:
    """Adapter terms of a weight delta: delta[g] = sum_j scales[g, j] * B[slots[g, j]][:, :r] @ A[slots[g, j]][:r].

    A row g applies to the targets of group g; with one row (G == 1) it applies to every target.
    Slot -1 or rank 0 marks an unused term.
    """

    slots: torch.Tensor  # [G, K] int32 pool slots
    ranks: torch.Tensor  # [G, K] int32 true ranks
    scales: torch.Tensor  # [G, K] float32 scales (alpha / r, times the gate for LoRA-Switch experts)
    max_rank: int  # host-side bound on ranks (tiles and grid come from it)

    @property
    def num_groups(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_terms(self) -> int:
        return int(self.slots.shape[1])

    def check(self, num_groups: int) -> None:
        if not (self.slots.dim() == self.ranks.dim() == self.scales.dim() == 2):
            raise ValueError("DeltaTerms tensors must be [G, K]")
        if not (self.slots.shape == self.ranks.shape == self.scales.shape):
            raise ValueError(f"DeltaTerms shapes differ: {tuple(self.slots.shape)}, {tuple(self.ranks.shape)}, "
                             f"{tuple(self.scales.shape)}")
        if self.num_groups not in (1, num_groups):
            raise ValueError(f"DeltaTerms has {self.num_groups} groups; the plan needs 1 or {num_groups}")
        if self.slots.dtype != torch.int32 or self.ranks.dtype != torch.int32 or self.scales.dtype != torch.float32:
            raise ValueError("DeltaTerms must be int32 slots, int32 ranks and float32 scales")
        if not (self.slots.is_contiguous() and self.ranks.is_contiguous() and self.scales.is_contiguous()):
            raise ValueError("DeltaTerms tensors must be contiguous")

    @classmethod
    def of_adapter(cls, slot: int, rank: int, scale: float, device: torch.device | str) -> DeltaTerms:
        """One adapter applied to every target (swift merge). Copies three scalars to the device."""
        return cls(
            slots=torch.tensor([[slot]], dtype=torch.int32, device=device),
            ranks=torch.tensor([[rank]], dtype=torch.int32, device=device),
            scales=torch.tensor([[scale]], dtype=torch.float32, device=device),
            max_rank=rank,
        )


class MergePlan:
    """All targets of one merge launch; their pointer tables are cached per tile shape."""

    def __init__(self, targets: list[MergeTarget]) -> None:
        if not targets:
            raise ValueError("a merge plan needs at least one target")
        first = targets[0].weight
        for t in targets:
            t.lora.check()
            if t.weight.dim() != 2 or tuple(t.weight.shape) != (t.lora.out_dim, t.lora.in_dim):
                raise ValueError(f"weight {tuple(t.weight.shape)} does not match its pool "
                                 f"[{t.lora.out_dim}, {t.lora.in_dim}]")
            if t.weight.dtype != first.dtype or t.weight.device != first.device:
                raise ValueError("all merge targets must share dtype and device")
            if t.lora.a.dtype != first.dtype or t.lora.a.device != first.device:
                raise ValueError("adapter pools must match the weights' dtype and device")
            if t.weight.stride(1) != 1:
                raise ValueError("merge targets need unit stride along in_dim")
            if t.group < 0:
                raise ValueError(f"target group must be >= 0, got {t.group}")
            if t.base is not None and (t.base.shape != t.weight.shape or t.base.dtype != t.weight.dtype
                                       or t.base.stride(1) != 1):
                raise ValueError("a target's base copy must match its weight's shape, dtype and layout")
        if len({t.base is None for t in targets}) > 1:
            raise ValueError("either every target has a base copy or none has")
        self.targets = list(targets)
        self.num_groups = max(t.group for t in targets) + 1
        self.from_base = targets[0].base is not None
        self.aligned = all(self._aligned(t) for t in targets)
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}

    @staticmethod
    def _aligned(target: MergeTarget) -> bool:
        """Row starts of W, base, A and B and the column count are 16-byte multiples (vector loads from the table)."""
        lora, w = target.lora, target.weight
        base = target.base if target.base is not None else w
        size = w.element_size()
        pointers = [w.data_ptr(), base.data_ptr(), lora.a.data_ptr(), lora.b.data_ptr()]
        strides = [w.shape[1], w.stride(0), base.stride(0), lora.a.stride(0), lora.a.stride(1), lora.a.stride(2),
                   lora.b.stride(0), lora.b.stride(1)] + list(lora.slice_bounds)
        return all(p % 16 == 0 for p in pointers) and all(s * size % 16 == 0 and s % 8 == 0 for s in strides)

    @property
    def dtype(self) -> torch.dtype:
        return self.targets[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.targets[0].weight.device

    @property
    def num_rows(self) -> int:
        """Rows of the pointer table: one per (target, slice)."""
        return sum(t.lora.n_slices for t in self.targets)

    def table(self, block_m: int, block_n: int, group_n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(table [rows, TABLE_WIDTH] int64, item_start [rows + 1] int32, total work items) for this tiling.

        A work item is one block of ``block_m`` weight rows times ``group_n`` tiles of ``block_n`` columns.
        """
        key = (block_m, block_n, group_n)
        if key not in self._tables:
            self._tables[key] = self._build(block_m, block_n, group_n)
        return self._tables[key]

    def _build(self, block_m: int, block_n: int, group_n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        first = self.targets[0]
        size = first.weight.element_size()
        w0, a0, b0 = first.weight.data_ptr(), first.lora.a.data_ptr(), first.lora.b.data_ptr()
        rows, starts, total = [], [0], 0
        for t in self.targets:
            a, b, w = t.lora.a, t.lora.b, t.weight
            base = t.base if t.base is not None else w
            for i, (lo, hi) in enumerate(zip(t.lora.slice_bounds[:-1], t.lora.slice_bounds[1:], strict=False)):
                n_groups = cdiv(cdiv(w.shape[1], block_n), group_n)
                row = [0] * TABLE_WIDTH
                row[W_OFF] = (w.data_ptr() - w0) // size + lo * w.stride(0)
                row[BASE_OFF] = (base.data_ptr() - w0) // size + lo * base.stride(0)
                row[A_OFF] = (a.data_ptr() - a0) // size + i * a.stride(1)
                row[B_OFF] = (b.data_ptr() - b0) // size + lo * b.stride(1)
                row[ROWS], row[COLS] = hi - lo, w.shape[1]
                row[W_STRIDE], row[BASE_STRIDE] = w.stride(0), base.stride(0)
                row[A_SLOT], row[A_RANK] = a.stride(0), a.stride(2)
                row[B_SLOT], row[B_ROW] = b.stride(0), b.stride(1)
                row[GROUP], row[N_GROUPS] = t.group, n_groups
                rows.append(row)
                total += cdiv(hi - lo, block_m) * n_groups
                starts.append(total)
        table = torch.tensor(rows, dtype=torch.int64).to(self.device)
        item_start = torch.tensor(starts, dtype=torch.int32).to(self.device)
        return table, item_start, total
