"""LoRABatch: how one iteration's tokens map onto adapter slots, built once per step and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRABatch:
    """Segments of tokens that share an adapter slot.

    Segment s covers rows ``token_indices[seg_indptr[s]:seg_indptr[s + 1]]`` of the layer input and
    applies ``y[t] += seg_scales[s] * (x[t] @ A[slot][:, :r].T) @ B[slot][:, :r].T`` with
    ``slot = seg_slots[s]`` and ``r = seg_ranks[s]``. Tokens outside every segment (no adapter) cost nothing.
    The host-side ints let a wrapper choose tiles and grids without reading the device.
    """

    token_indices: torch.Tensor  # [T_lora] int32: rows of x, grouped by segment (any order within x)
    seg_indptr: torch.Tensor  # [S + 1] int32: segment boundaries into token_indices
    seg_slots: torch.Tensor  # [S] int32: adapter slot of each segment in the weight pool
    seg_ranks: torch.Tensor  # [S] int32: true rank of each segment's adapter (<= pool max rank)
    seg_scales: torch.Tensor  # [S] float32: scale of each segment's update (alpha / r, signed for mixture)
    num_tokens: int  # T: rows of the layer input x
    max_rank: int  # largest rank among the segments (0 when no segment has an adapter)
    max_seg_len: int  # longest segment, in tokens

    @property
    def num_segments(self) -> int:
        return int(self.seg_slots.shape[0])


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
