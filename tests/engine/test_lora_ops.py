"""The engine's LoRABatch builders, through the torch backend, against a per-token loop; and the same batches row by
row (their Routing) through the fused decode linear, in torch and in Triton (interpreted on CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.lora.batch import LoRARows, StaticLoRABatch, build_lora_batch
from kernels.backend import get_backend
from kernels.lora_batch import LoRAWeights

SLICES = (0, 48, 64, 80)  # q / k / v widths of a GQA projection


class FakePool:
    """Slot ranks and scales, as AdapterPool exposes them to the batch builders."""

    def __init__(self, ranks, scales, max_rank: int = 16):
        self.rank_in, self.scale_in = ranks, scales
        self.layout = SimpleNamespace(max_rank=max_rank)


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


def check_fused_linear(x, w, routing, update):
    """The fused decode linear over a batch's row-wise routing gives x Wᵀ + b + ``update`` (the first rows' LoRA
    update; x's further rows are a static batch's padding, with none), in the torch reference and the Triton kernel."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(SLICES[-1], x.shape[1], generator=gen)
    bias = torch.randn(SLICES[-1], generator=gen)
    want = x.double() @ weight.double().T + bias.double()
    want[:update.shape[0]] += update
    assert routing.num_tokens == x.shape[0]
    for name in ("torch", "triton"):
        got = get_backend(name).routed_linear(x, weight, bias, w, routing)
        assert torch.allclose(got.double(), want, atol=1e-3), name


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
        holder = StaticLoRABatch(16, 16, torch.device("cpu"), routed=True)
        holder.fill(rows, pool)
        batch, routing = holder.batch, holder.routing
        assert batch.num_segments == 16 and batch.max_seg_len == 16
    else:
        batch, routing = build_lora_batch(rows, pool, x.shape[0], torch.device("cpu"), routed_rows=16)
        assert batch.num_segments == 3 and batch.max_rank == 16 and batch.max_seg_len == 8
        assert build_lora_batch(rows, pool, x.shape[0], torch.device("cpu"), routed_rows=13)[1] is None
    y = torch.full((x.shape[0], SLICES[-1]), 0.5)
    get_backend("torch").add_lora(y, x, w, batch)
    update = loop_reference(x, w, slot_of_row, ranks, scales)
    assert torch.allclose(y.double(), update + 0.5, atol=1e-4)
    padded = torch.cat([x, torch.randn(routing.num_tokens - x.shape[0], x.shape[1])])
    check_fused_linear(padded, w, routing, update)


def test_a_static_batch_refills_its_rows():
    """Refilling a static batch with fewer segments leaves no row on a stale term."""
    holder = StaticLoRABatch(8, 16, torch.device("cpu"), routed=True)
    pool = FakePool([3, 16, 0, 8], [2.0, 0.5, 1.0, -1.25])
    holder.fill([LoRARows(1, 0, 2), LoRARows(3, 2, 3), LoRARows(0, 5, 3)], pool)
    holder.fill([LoRARows(3, 1, 2)], pool)
    assert holder.rows[:, 0].tolist() == [-1, 0, 0, -1, -1, -1, -1, -1]
    assert holder.routing.expert_slots[0].item() == 3 and holder.routing.expert_ranks[1:].eq(0).all()


def test_no_adapter_rows_build_no_batch():
    assert build_lora_batch([LoRARows(2, 0, 0)], FakePool([1] * 4, [1.0] * 4), 3, torch.device("cpu")) is None


def test_linear_beside_adds_the_update_to_the_base_matmul():
    """``FusedOps.linear_beside`` (the update into a zeroed side buffer, then one add) gives x Wᵀ + b + every
    delta's update, as the base matmul followed by the deltas in place does (CPU: the same steps in order)."""
    from engine.model.layers import AdaptedLinear, FusedOps

    w = weights()
    pool = FakePool([3, 16, 0, 8], [2.0, 0.5, 1.0, -1.25])
    rows = [LoRARows(1, 0, 2), LoRARows(3, 2, 1), LoRARows(0, 3, 2)]
    batch, _ = build_lora_batch(rows, pool, 6, torch.device("cpu"))
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    weight, bias = torch.randn(SLICES[-1], 40), torch.randn(SLICES[-1])
    torch_op = get_backend("torch")

    def update(z):  # two deltas, as a mixture step adds its second term
        torch_op.add_lora(z, x, w, batch)
        torch_op.add_lora(z, x, w, batch)

    ops = FusedOps(compiled=False, side_stream_rows=16)
    assert not ops.beside(x)  # CPU tensors never take the side stream
    got = ops.linear_beside(x, weight, bias, update)
    want = x.double() @ weight.double().T + bias.double() + 2 * loop_reference(x, w, [1, 1, 3, 0, 0, None],
                                                                               pool.rank_in, pool.scale_in)
    assert torch.allclose(got.double(), want, atol=1e-4)
    in_place = ops.linear(x, weight, bias)
    update(in_place)
    assert torch.allclose(got, in_place, atol=1e-5)
    layer = AdaptedLinear(40, (48, 16, 16), True, (0, "qkv"), ops).to(torch.float64)  # a module like any other
    assert layer.weight.dtype == torch.float64


@pytest.mark.parametrize(("backend_rows", "side_rows", "fused"), [(8, 0, 8), (8, 1, 8), (8, 16, 1), (0, 16, 0)])
def test_fused_rows_give_way_to_the_side_stream(backend_rows, side_rows, fused):
    """Plain multi-LoRA batches of two rows or more take the side stream where it is on, not the fused linear."""
    from engine.lora.manager import LoRAManager

    manager = SimpleNamespace(op=SimpleNamespace(fused_lora_rows=backend_rows), side_stream_rows=side_rows)
    assert LoRAManager.fused_rows.fget(manager) == fused
