"""LoRABatch: how one iteration's tokens map onto adapter slots, built once per step and shared by every layer.

A batch is a list of segments. Each segment is a run of token rows that share the same adapter *terms*; each
term is one (slot, rank, scale) triple. Plain multi-LoRA uses one term per segment (``seg_slots`` is 1-D). VaLoRA's
mixture mode (base merged with adapter M) uses two terms per segment (``seg_slots`` is [S, 2]): the request's own
adapter with ``+s_X`` and the merged adapter with ``-s_M``, so one launch computes ``x ΔW_X − x ΔW_M`` race-free.
``LoRABatch.from_token_slots`` builds both forms from a per-token slot list.

CUDA graphs: the kernels' grids depend only on the host ints (segment count, ``token_indices`` length,
``max_seg_len``, ``max_rank``) and on the weights' shapes. To capture one graph for many batches, build every batch
at a fixed capacity (``pad_segments_to``, ``max_seg_len``, ``max_rank`` and a fixed token count); padding segments
are empty and cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LoRABatch:
    """Segments of tokens that share adapter terms.

    Segment s covers rows ``token_indices[seg_indptr[s]:seg_indptr[s + 1]]`` of the layer input and applies, for each
    of its terms k, ``y[t] += seg_scales[s, k] * (x[t] @ A[slot][:, :r].T) @ B[slot][:, :r].T`` with
    ``slot = seg_slots[s, k]`` and ``r = seg_ranks[s, k]`` (1-D tensors mean one term). A term with slot -1 or rank 0
    is inactive. Tokens outside every segment (no adapter) cost nothing. A row appears in at most one segment.
    The host-side ints let a wrapper choose tiles and grids without reading the device.
    """

    token_indices: torch.Tensor  # [T_lora] int32: rows of x, grouped by segment (any order within x)
    seg_indptr: torch.Tensor  # [S + 1] int32: segment boundaries into token_indices
    seg_slots: torch.Tensor  # [S] or [S, K] int32: adapter slot of each segment's term(s) in the weight pool (-1: none)
    seg_ranks: torch.Tensor  # [S] or [S, K] int32: true rank of each term's adapter (<= pool max rank)
    seg_scales: torch.Tensor  # [S] or [S, K] float32: scale of each term (alpha / r, negative for mixture's -M)
    num_tokens: int  # T: rows of the layer input x
    max_rank: int  # largest rank among the segments (0 when no segment has an adapter)
    max_seg_len: int  # longest segment, in tokens

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.shape[0])

    @property
    def num_terms(self) -> int:
        """Adapter terms per segment: 1 for plain multi-LoRA, 2 for mixture mode."""
        return 1 if self.seg_slots.dim() == 1 else int(self.seg_slots.shape[1])

    @property
    def num_lora_tokens(self) -> int:
        """T_lora: rows covered by some segment (the length of token_indices)."""
        return int(self.token_indices.shape[0])

    def terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The term tensors as [S, K] views (no copy): slots, ranks, scales."""
        k = self.num_terms
        return (
            self.seg_slots.reshape(-1, k),
            self.seg_ranks.reshape(-1, k),
            self.seg_scales.reshape(-1, k),
        )

    def to(self, device: torch.device | str, non_blocking: bool = True) -> LoRABatch:
        """The same batch with its tensors on ``device`` (host ints unchanged)."""
        return replace(
            self,
            token_indices=self.token_indices.to(device, non_blocking=non_blocking),
            seg_indptr=self.seg_indptr.to(device, non_blocking=non_blocking),
            seg_slots=self.seg_slots.to(device, non_blocking=non_blocking),
            seg_ranks=self.seg_ranks.to(device, non_blocking=non_blocking),
            seg_scales=self.seg_scales.to(device, non_blocking=non_blocking),
        )

    @classmethod
    def from_token_slots(
        cls,
        token_slots: Sequence[int] | torch.Tensor,
        slot_ranks: Sequence[int] | torch.Tensor,
        slot_scales: Sequence[float] | torch.Tensor,
        *,
        merged_slot: int | None = None,
        device: torch.device | str | None = None,
        pad_segments_to: int | None = None,
        max_seg_len: int | None = None,
        max_rank: int | None = None,
        include_base_rows: bool = False,
    ) -> LoRABatch:
        """Group tokens by adapter slot into segments (host-side work, no device sync).

        Args:
            token_slots: [T] adapter slot of each row of x, -1 for the base model.
            slot_ranks: [slots] true rank of the adapter in each pool slot.
            slot_scales: [slots] scale (alpha / r) of the adapter in each pool slot.
            merged_slot: mixture mode: the slot M merged into the base weights. Rows of M get no segment; every
                other row gets the term (M, r_M, -s_M) after its own adapter's term (base rows: -M alone).
            device: where the tensors go (host ints are computed before the copy).
            pad_segments_to: append empty segments up to this count (a static grid for CUDA graphs).
            max_seg_len: a static upper bound to report instead of the longest segment (CUDA graphs).
            max_rank: a static upper bound to report instead of the largest rank (CUDA graphs).
            include_base_rows: also give rows without terms (base rows; M's rows in mixture) an inactive segment,
                so that ``token_indices`` always has T entries (a fixed shape for CUDA graphs). They still cost
                nothing: their programs exit before any load.

        Segments are ordered longest first so that the tail of the grid holds the short ones.
        """
        slots = torch.as_tensor(token_slots, dtype=torch.int64).reshape(-1).cpu()  # [T]
        ranks = torch.as_tensor(slot_ranks, dtype=torch.int64).reshape(-1).cpu()  # [slots]
        scales = torch.as_tensor(slot_scales, dtype=torch.float32).reshape(-1).cpu()  # [slots]
        if slots.numel() and int(slots.max()) >= ranks.numel():
            raise ValueError(f"token slot {int(slots.max())} has no rank (slot_ranks has {ranks.numel()} entries)")
        if merged_slot is not None and not 0 <= merged_slot < ranks.numel():
            raise ValueError(f"merged_slot {merged_slot} is not a pool slot (0..{ranks.numel() - 1})")
        if include_base_rows:
            keep = torch.ones_like(slots, dtype=torch.bool)
        else:
            keep = slots != merged_slot if merged_slot is not None else slots >= 0
        rows = torch.nonzero(keep).reshape(-1)  # [T_lora] ascending
        keys, counts = torch.unique(slots[rows], return_counts=True)  # sorted slots and their sizes
        order = torch.argsort(counts, descending=True, stable=True)
        keys, counts = keys[order], counts[order]
        grouped = torch.cat([rows[slots[rows] == k] for k in keys.tolist()]) if keys.numel() else rows
        terms = [cls._segment_terms(k, ranks, scales, merged_slot) for k in keys.tolist()]
        num_terms = 1 if merged_slot is None else 2
        pad = max(0, (pad_segments_to or 0) - len(terms))
        terms += [[(-1, 0, 0.0)] * num_terms] * pad
        indptr = torch.zeros(len(terms) + 1, dtype=torch.int64)
        indptr[1 : counts.numel() + 1] = torch.cumsum(counts, 0)
        indptr[counts.numel() + 1 :] = indptr[counts.numel()]
        seg_slots = torch.tensor([[t[0] for t in seg] for seg in terms], dtype=torch.int32).reshape(-1, num_terms)
        seg_ranks = torch.tensor([[t[1] for t in seg] for seg in terms], dtype=torch.int32).reshape(-1, num_terms)
        seg_scales = torch.tensor([[t[2] for t in seg] for seg in terms], dtype=torch.float32).reshape(-1, num_terms)
        if num_terms == 1:
            seg_slots, seg_ranks, seg_scales = seg_slots[:, 0], seg_ranks[:, 0], seg_scales[:, 0]
        true_max_rank = int(seg_ranks.max()) if seg_ranks.numel() else 0
        true_max_len = int(counts.max()) if counts.numel() else 0
        if max_seg_len is not None and max_seg_len < true_max_len:
            raise ValueError(f"max_seg_len={max_seg_len} is below the longest segment ({true_max_len} tokens)")
        if max_rank is not None and max_rank < true_max_rank:
            raise ValueError(f"max_rank={max_rank} is below the largest rank in the batch ({true_max_rank})")
        batch = cls(
            token_indices=grouped.to(torch.int32),
            seg_indptr=indptr.to(torch.int32),
            seg_slots=seg_slots,
            seg_ranks=seg_ranks,
            seg_scales=seg_scales,
            num_tokens=int(slots.numel()),
            max_rank=true_max_rank if max_rank is None else max_rank,
            max_seg_len=true_max_len if max_seg_len is None else max_seg_len,
        )
        return batch if device is None else batch.to(device)

    @staticmethod
    def _segment_terms(
        slot: int, ranks: torch.Tensor, scales: torch.Tensor, merged_slot: int | None
    ) -> list[tuple[int, int, float]]:
        """The (slot, rank, scale) terms of the segment of rows whose adapter is ``slot``."""
        own = (slot, int(ranks[slot]), float(scales[slot])) if slot >= 0 else None
        if merged_slot is None:
            return [own] if own is not None else [(-1, 0, 0.0)]
        if slot == merged_slot:  # M's rows run on the merged base alone (only present with include_base_rows)
            return [(-1, 0, 0.0), (-1, 0, 0.0)]
        minus_m = (merged_slot, int(ranks[merged_slot]), -float(scales[merged_slot]))
        return [own, minus_m] if own is not None else [minus_m, (-1, 0, 0.0)]


@dataclass(frozen=True)
class LoRAWeights:
    """The slot pool of one adapted projection, or of several fused ones (q/k/v, gate/up) as slices.

    Slice i owns output columns ``slice_bounds[i]:slice_bounds[i + 1]`` and rank block ``a[:, i]``.
    Storage is padded to the pool's max rank; compute runs at each adapter's true rank.
    """

    a: torch.Tensor  # [slots, n_slices, max_rank, in_dim]: lora_A of each slice (PEFT layout, [r, in])
    b: torch.Tensor  # [slots, out_total, max_rank]: lora_B of all slices stacked on the output dim
    slice_bounds: tuple[int, ...]  # [n_slices + 1] output column offsets of each slice

    @property
    def n_slices(self) -> int:
        return len(self.slice_bounds) - 1

    @property
    def in_dim(self) -> int:
        return int(self.a.shape[3])

    @property
    def out_dim(self) -> int:
        return int(self.b.shape[1])

    @property
    def pool_rank(self) -> int:
        """The padded rank of the storage (the pool's max rank)."""
        return int(self.a.shape[2])

    def check(self) -> None:
        """Raise ValueError if the tensors disagree with each other or with slice_bounds."""
        if self.a.dim() != 4 or self.b.dim() != 3:
            raise ValueError(f"a must be 4-D and b 3-D, got {tuple(self.a.shape)} and {tuple(self.b.shape)}")
        slots, n_slices, rank, _ = self.a.shape
        if self.b.shape[0] != slots or self.b.shape[2] != rank:
            raise ValueError(f"b {tuple(self.b.shape)} does not match a {tuple(self.a.shape)} (slots, max_rank)")
        if n_slices != self.n_slices or self.slice_bounds[0] != 0 or self.slice_bounds[-1] != self.b.shape[1]:
            raise ValueError(
                f"slice_bounds {self.slice_bounds} do not cover b's {self.b.shape[1]} outputs in {n_slices} slices"
            )
        if any(hi < lo for lo, hi in zip(self.slice_bounds, self.slice_bounds[1:], strict=False)):
            raise ValueError(f"slice_bounds {self.slice_bounds} must not decrease")
        if self.a.dtype != self.b.dtype or self.a.device != self.b.device:
            raise ValueError("a and b must share dtype and device")
        if not (self.a.is_contiguous() and self.b.is_contiguous()):
            raise ValueError("a and b must be contiguous")
