"""The engine's LoRABatch builders, through the torch backend, against a per-token loop."""

from __future__ import annotations

import pytest
import torch

from engine.lora.batch import LoRARows, StaticLoRABatch, build_lora_batch
from kernels.backend import get_backend
from kernels.lora_batch import LoRAWeights

SLICES = (0, 48, 64, 80)  # q / k / v widths of a GQA projection


class FakePool:
    """Slot ranks and scales, as AdapterPool exposes them to the batch builders."""

    def __init__(self, ranks, scales):
        self.rank_in, self.scale_in = ranks, scales


def weights(slots: int = 4, max_rank: int = 16, in_dim: int = 40, seed: int = 0) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(slots, 3, max_rank, in_dim, generator=gen)
    b = torch.randn(slots, SLICES[-1], max_rank, generator=gen)
    return LoRAWeights(a, b, SLICES)


def loop_reference(x, w, slot_of_row, ranks, scales):
    y = torch.zeros(x.shape[0], SLICES[-1], dtype=torch.float64)
    for t, slot in enumerate(slot_of_row):
        if slot is None:
            continue
        r = ranks[slot]
        for i in range(3):
            a = w.a[slot, i, :r].double()
            b = w.b[slot, SLICES[i]:SLICES[i + 1], :r].double()
            y[t, SLICES[i]:SLICES[i + 1]] += scales[slot] * (b @ (a @ x[t].double()))
    return y


@pytest.mark.parametrize("static", [False, True])
def test_add_lora_matches_loop(static):
    w = weights()
    ranks, scales = [3, 16, 0, 8], [2.0, 0.5, 1.0, -1.25]
    pool = FakePool(ranks, scales)
    # Rows of three sequences and a no-adapter one, slots interleaved (segments gather rows in any order).
    rows = [LoRARows(1, 0, 5), LoRARows(3, 5, 1), LoRARows(1, 9, 3), LoRARows(0, 12, 2)]
    slot_of_row = [1] * 5 + [3] + [None] * 3 + [1] * 3 + [0] * 2
    x = torch.randn(len(slot_of_row), 40)
    if static:
        holder = StaticLoRABatch(16, 16, torch.device("cpu"))
        holder.fill(rows, pool)
        batch = holder.batch
        assert batch.num_segments == 16 and batch.max_seg_len == 16
    else:
        batch = build_lora_batch(rows, pool, x.shape[0], torch.device("cpu"))
        assert batch.num_segments == 3 and batch.max_rank == 16 and batch.max_seg_len == 8
    y = torch.full((x.shape[0], SLICES[-1]), 0.5)
    get_backend("torch").add_lora(y, x, w, batch)
    expected = loop_reference(x, w, slot_of_row, ranks, scales) + 0.5
    assert torch.allclose(y.double(), expected, atol=1e-4)


def test_no_adapter_rows_build_no_batch():
    assert build_lora_batch([LoRARows(2, 0, 0)], FakePool([1] * 4, [1.0] * 4), 3, torch.device("cpu")) is None
