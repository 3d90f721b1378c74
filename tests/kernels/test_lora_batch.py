"""LoRABatch.from_token_slots: segments, mixture terms, padding and the host ints the kernels rely on."""

from __future__ import annotations

import pytest
import torch

from kernels.lora_batch import LoRABatch, LoRAWeights

RANKS = [8, 16, 4, 32]
SCALES = [1.0, 0.5, 2.0, 0.25]


def _segments(batch):
    indptr = batch.seg_indptr.tolist()
    return [sorted(batch.token_indices[indptr[s] : indptr[s + 1]].tolist()) for s in range(batch.num_segments)]


def test_groups_rows_by_slot_longest_first_without_base_rows():
    batch = LoRABatch.from_token_slots([2, -1, 0, 2, 2, 0, -1, 3], RANKS, SCALES)
    assert _segments(batch) == [[0, 3, 4], [2, 5], [7]]
    assert batch.seg_slots.tolist() == [2, 0, 3]
    assert batch.seg_ranks.tolist() == [4, 8, 32]
    assert batch.seg_scales.tolist() == [2.0, 1.0, 0.25]
    assert (batch.num_tokens, batch.num_lora_tokens, batch.max_rank, batch.max_seg_len) == (8, 6, 32, 3)
    assert batch.num_terms == 1 and batch.token_indices.dtype == torch.int32


def test_mixture_adds_minus_merged_term_and_drops_merged_rows():
    batch = LoRABatch.from_token_slots([1, -1, 0, 1, -1, -1], RANKS, SCALES, merged_slot=1)
    slots, ranks, scales = batch.terms()
    segs = list(zip(map(tuple, _segments(batch)), slots.tolist(), scales.tolist(), strict=True))
    assert ranks.tolist()[[s for s, *_ in segs].index((1, 4, 5))] == [16, 0]
    assert ((1, 4, 5), [1, -1], [-0.5, 0.0]) in segs  # base rows: only -M
    assert ((2,), [0, 1], [1.0, -0.5]) in segs  # adapter 0 rows: +A0 - M
    assert batch.num_lora_tokens == 4 and batch.num_terms == 2 and batch.max_rank == 16


def test_padding_and_static_bounds_for_graphs():
    batch = LoRABatch.from_token_slots([0, 0, 1], RANKS, SCALES, pad_segments_to=5, max_seg_len=8, max_rank=32)
    assert batch.num_segments == 5
    assert batch.seg_indptr.tolist() == [0, 2, 3, 3, 3, 3]
    assert batch.seg_slots.tolist()[2:] == [-1, -1, -1]
    assert (batch.max_seg_len, batch.max_rank) == (8, 32)
    with pytest.raises(ValueError, match="max_seg_len"):
        LoRABatch.from_token_slots([0, 0, 1], RANKS, SCALES, max_seg_len=1)
    with pytest.raises(ValueError, match="max_rank"):
        LoRABatch.from_token_slots([0, 0, 1], RANKS, SCALES, max_rank=8)


def test_all_base_rows_give_an_empty_batch():
    batch = LoRABatch.from_token_slots([-1, -1], RANKS, SCALES)
    assert batch.num_segments == 0 and batch.num_lora_tokens == 0 and batch.max_rank == 0


def test_rejects_unknown_slots():
    with pytest.raises(ValueError, match="no rank"):
        LoRABatch.from_token_slots([7], RANKS, SCALES)
    with pytest.raises(ValueError, match="merged_slot"):
        LoRABatch.from_token_slots([0], RANKS, SCALES, merged_slot=9)


def test_weights_check_catches_layout_errors():
    a = torch.zeros(2, 2, 4, 8)
    LoRAWeights(a, torch.zeros(2, 10, 4), (0, 6, 10)).check()
    with pytest.raises(ValueError, match="slice_bounds"):
        LoRAWeights(a, torch.zeros(2, 10, 4), (0, 6, 9)).check()
    with pytest.raises(ValueError, match="does not match"):
        LoRAWeights(a, torch.zeros(2, 10, 5), (0, 6, 10)).check()


def test_include_base_rows_keeps_every_row_in_an_inactive_segment():
    batch = LoRABatch.from_token_slots([2, -1, 0, 2], RANKS, SCALES, include_base_rows=True)
    assert batch.num_lora_tokens == 4
    assert sorted(batch.token_indices.tolist()) == [0, 1, 2, 3]
    assert -1 in batch.seg_slots.tolist()
    mixture = LoRABatch.from_token_slots([2, -1, 0, 2], RANKS, SCALES, merged_slot=2, include_base_rows=True)
    slots, _, _ = mixture.terms()
    assert mixture.num_lora_tokens == 4 and [-1, -1] in slots.tolist()
