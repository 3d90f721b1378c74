"""Mixture-mode LoRA batches (engine builders, torch backend) against a per-token loop of x·ΔW_X − x·ΔW_M."""

from __future__ import annotations

import pytest
import torch

from engine.lora.batch import LoRARows, StaticLoRABatch, build_lora_batch
from kernels.backend import get_backend
from tests.engine.test_lora_ops import SLICES, FakePool, check_fused_linear, loop_reference, weights


def mixture_reference(x, w, slot_of_row, ranks, scales, merged):
    """Each row: + its adapter's update (none for base rows), - the merged adapter's; M's own rows nothing."""
    plus = loop_reference(x, w, [None if s == merged else s for s in slot_of_row], ranks, scales)
    minus = loop_reference(x, w, [None if s == merged else merged for s in slot_of_row], ranks, scales)
    return plus - minus


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("merged", [0, 1, 3])
def test_mixture_batch_matches_loop(static, merged):
    w = weights()
    ranks, scales = [3, 16, 0, 8], [2.0, 0.5, 1.0, -1.25]
    pool = FakePool(ranks, scales)
    rows = [LoRARows(1, 0, 5), LoRARows(3, 5, 1), LoRARows(1, 9, 3), LoRARows(0, 12, 2)]
    slot_of_row = [1] * 5 + [3] + [None] * 3 + [1] * 3 + [0] * 2 + [None]  # the last row: no adapter, at the end
    x = torch.randn(len(slot_of_row), 40)
    if static:
        holder = StaticLoRABatch(16, 16, torch.device("cpu"), num_terms=2, routed=True)
        holder.fill(rows, pool, len(slot_of_row), merged)
        batch, routing = holder.batch, holder.routing
        assert batch.num_terms == 2 and batch.num_segments == 16
    else:
        batch, routing = build_lora_batch(rows, pool, x.shape[0], torch.device("cpu"), merged, routed_rows=16)
        assert batch.num_terms == 2
        covered = batch.num_lora_tokens
        assert covered == len(slot_of_row) - slot_of_row.count(merged), "M's rows must get no segment"
    y = torch.full((x.shape[0], SLICES[-1]), 0.5)
    get_backend("torch").add_lora(y, x, w, batch)
    update = mixture_reference(x, w, slot_of_row, ranks, scales, merged)
    assert torch.allclose(y.double(), update + 0.5, atol=1e-4)
    padded = torch.cat([x, torch.randn(routing.num_tokens - x.shape[0], x.shape[1])])
    check_fused_linear(padded, w, routing, update)


def test_merged_rows_alone_need_no_batch():
    pool = FakePool([4] * 4, [1.0] * 4)
    assert build_lora_batch([LoRARows(2, 0, 3)], pool, 3, torch.device("cpu"), merged_slot=2) is None
    assert build_lora_batch([LoRARows(2, 0, 3)], pool, 4, torch.device("cpu"), merged_slot=2)[0].num_lora_tokens == 1


def test_a_static_batch_refuses_the_wrong_term_count():
    with pytest.raises(ValueError, match="term"):
        StaticLoRABatch(4, 8, torch.device("cpu")).fill([], FakePool([1], [1.0]), 2, merged_slot=0)
