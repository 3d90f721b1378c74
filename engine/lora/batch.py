"""The iteration's LoRABatch (built once, shared by every layer) and the multi-LoRA delta that applies it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.lora.delta import LayerDelta, LayerKey
from engine.lora.ops import AddLoRAOp
from engine.lora.pool import AdapterPool
from kernels.lora_batch import LoRABatch


@dataclass(frozen=True)
class LoRARows:
    """A run of consecutive input rows (one sequence's tokens this step) served by one adapter slot."""

    slot: int
    start: int
    count: int


def _segments(rows: Sequence[LoRARows]) -> tuple[np.ndarray, list[int], list[int]]:
    """(token indices grouped by slot, segment boundaries, slot of each segment); slots in ascending order."""
    by_slot: dict[int, list[np.ndarray]] = {}
    for run in rows:
        by_slot.setdefault(run.slot, []).append(np.arange(run.start, run.start + run.count, dtype=np.int32))
    indices: list[np.ndarray] = []
    indptr, slots = [0], []
    for slot in sorted(by_slot):
        part = np.concatenate(by_slot[slot])
        indices.append(part)
        indptr.append(indptr[-1] + len(part))
        slots.append(slot)
    return np.concatenate(indices), indptr, slots


def build_lora_batch(rows: Sequence[LoRARows], pool: AdapterPool, num_tokens: int,
                     device: torch.device) -> LoRABatch | None:
    """The batch for ``num_tokens`` input rows; None when no row has an adapter."""
    rows = [r for r in rows if r.count > 0]
    if not rows:
        return None
    indices, indptr, slots = _segments(rows)
    ranks = [pool.rank_in[s] for s in slots]
    return LoRABatch(
        token_indices=torch.from_numpy(indices).to(device),
        seg_indptr=torch.tensor(indptr, dtype=torch.int32).to(device),
        seg_slots=torch.tensor(slots, dtype=torch.int32).to(device),
        seg_ranks=torch.tensor(ranks, dtype=torch.int32).to(device),
        seg_scales=torch.tensor([pool.scale_in[s] for s in slots], dtype=torch.float32).to(device),
        num_tokens=num_tokens,
        max_rank=max(ranks),
        max_seg_len=int(np.diff(indptr).max()),
    )


class StaticLoRABatch:
    """A LoRABatch in fixed buffers for a CUDA-graph bucket of ``size`` rows.

    Shapes and host ints never change (``size`` segments, max_seg_len = size, max_rank = the pool's), so a
    captured launch replays; unused segments are empty (repeated indptr) with rank 0.
    """

    def __init__(self, size: int, max_rank: int, device: torch.device) -> None:
        self.size = size
        self.batch = LoRABatch(
            token_indices=torch.zeros(size, dtype=torch.int32, device=device),
            seg_indptr=torch.zeros(size + 1, dtype=torch.int32, device=device),
            seg_slots=torch.zeros(size, dtype=torch.int32, device=device),
            seg_ranks=torch.zeros(size, dtype=torch.int32, device=device),
            seg_scales=torch.zeros(size, dtype=torch.float32, device=device),
            num_tokens=size, max_rank=max_rank, max_seg_len=size,
        )

    def fill(self, rows: Sequence[LoRARows], pool: AdapterPool) -> None:
        live = [r for r in rows if r.count > 0]
        indices, indptr, slots = _segments(live) if live else (np.zeros(0, dtype=np.int32), [0], [])
        n_seg = len(slots)
        tok = np.zeros(self.size, dtype=np.int32)
        tok[:len(indices)] = indices
        ptr = np.full(self.size + 1, indptr[-1], dtype=np.int32)
        ptr[:len(indptr)] = indptr
        seg = np.zeros((3, self.size), dtype=np.float64)
        seg[0, :n_seg] = slots
        seg[1, :n_seg] = [pool.rank_in[s] for s in slots]
        seg[2, :n_seg] = [pool.scale_in[s] for s in slots]
        b = self.batch
        b.token_indices.copy_(torch.from_numpy(tok))
        b.seg_indptr.copy_(torch.from_numpy(ptr))
        b.seg_slots.copy_(torch.from_numpy(seg[0].astype(np.int32)))
        b.seg_ranks.copy_(torch.from_numpy(seg[1].astype(np.int32)))
        b.seg_scales.copy_(torch.from_numpy(seg[2].astype(np.float32)))


class MultiLoRADelta(LayerDelta):
    """Plain multi-LoRA: every adapted projection adds its slot-pool update for the iteration's segments."""

    def __init__(self, pool: AdapterPool, op: AddLoRAOp, batch: LoRABatch) -> None:
        self.pool, self.op, self.batch = pool, op, batch

    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        self.op.add_lora(y, x, self.pool.weights(key), self.batch)
