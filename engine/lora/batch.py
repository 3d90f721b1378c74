"""The iteration's LoRABatch (built once, shared by every layer) and the multi-LoRA delta that applies it.

Up to the manager's ``fused_rows`` rows (one-row decode batches on the Triton backend; up to 8 with the side stream
off, ``LoRAManager.fused_rows``), the batch is also
described row by row as a ``Routing``: each row picks its segment's terms (gate 1), so the projection's matmul and
its LoRA update run as the fused decode linear (``kernels/fused_linear.py``: the shrink, then one launch that
streams the weight and adds every used adapter's expand before its single store) instead of the matmul, the shrink
and the expand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.lora.delta import LayerDelta, LayerKey
from engine.lora.ops import AddLoRAOp
from engine.lora.pool import AdapterPool
from kernels.intmath import next_power_of_2
from kernels.lora_batch import LoRABatch
from kernels.routing import Routing


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


def mixture_rows(rows: Sequence[LoRARows], num_tokens: int, merged_slot: int) -> list[LoRARows]:
    """Mixture mode's runs: the merged adapter's rows dropped, rows with no plain adapter as slot -1 runs."""
    out = [r for r in rows if r.slot != merged_slot]
    pos = 0
    for start, count in sorted((r.start, r.count) for r in rows):
        if start > pos:
            out.append(LoRARows(-1, pos, start - pos))
        pos = max(pos, start + count)
    if pos < num_tokens:
        out.append(LoRARows(-1, pos, num_tokens - pos))
    return out


def segment_terms(slots: Sequence[int], pool: AdapterPool,
                  merged_slot: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots, ranks, scales) of each segment's terms: [S] for plain multi-LoRA, [S, 2] in mixture mode.

    Mixture: a segment of adapter X computes +X then -M; a segment of rows with no plain adapter (slot -1)
    computes -M alone (its second term is inactive).
    """
    if merged_slot is None:
        return (np.asarray(slots, dtype=np.int32), np.asarray([pool.rank_in[s] for s in slots], dtype=np.int32),
                np.asarray([pool.scale_in[s] for s in slots], dtype=np.float32))
    minus_m = (merged_slot, pool.rank_in[merged_slot], -pool.scale_in[merged_slot])
    terms = [[(s, pool.rank_in[s], pool.scale_in[s]), minus_m] if s >= 0 else [minus_m, (-1, 0, 0.0)]
             for s in slots]
    arr = np.asarray(terms, dtype=np.float64).reshape(len(slots), 2, 3)
    return arr[..., 0].astype(np.int32), arr[..., 1].astype(np.int32), arr[..., 2].astype(np.float32)


def row_terms(indices: np.ndarray, indptr: Sequence[int], seg_slots: np.ndarray, seg_ranks: np.ndarray,
              num_rows: int) -> np.ndarray:
    """[num_rows, K] int32: the flat index s * K + k of each active term (slot >= 0, rank > 0) of each row's segment
    into the [S, K] term tables, -1 for rows in no segment and for inactive terms (K = 1 for 1-D tables)."""
    k = 1 if seg_slots.ndim == 1 else seg_slots.shape[1]
    out = np.full((num_rows, k), -1, dtype=np.int32)
    seg_of = np.repeat(np.arange(len(indptr) - 1), np.diff(np.asarray(indptr)))  # [T_lora]
    active = (seg_slots.reshape(-1, k) >= 0) & (seg_ranks.reshape(-1, k) > 0)  # [S, K]
    out[indices] = np.where(active[seg_of], seg_of[:, None] * k + np.arange(k), -1)
    return out


def batch_routing(batch: LoRABatch, rows: torch.Tensor, gates: torch.Tensor, max_rank: int) -> Routing:
    """``batch`` as a Routing over its terms: expert s * K + k is term k of segment s; ``rows`` [T, K] as from
    ``row_terms``, ``gates`` [T, K] float32 ones. ``max_rank``: the pool's (a fixed bound, so the fused linear's
    compiled variant does not depend on which adapters a batch holds)."""
    slots, ranks, scales = batch.terms()
    return Routing(slots.reshape(-1), ranks.reshape(-1), scales.reshape(-1), rows, gates, max_rank)


def routed_segments(rows: int) -> int:
    """Segments an eager batch of ``rows`` rows pads its row-wise Routing to (``build_lora_batch``)."""
    return next_power_of_2(rows)


def build_lora_batch(rows: Sequence[LoRARows], pool: AdapterPool, num_tokens: int, device: torch.device,
                     merged_slot: int | None = None, routed_rows: int = 0) -> tuple[LoRABatch, Routing | None] | None:
    """The batch for ``num_tokens`` input rows, and when ``num_tokens <= routed_rows`` the same row by row as a
    Routing over ``routed_segments(num_tokens)`` x K experts (as in ``batch_routing``; else None); None when no row
    needs LoRA work.

    ``merged_slot``: the adapter folded into the base weights (mixture / merged mode), see ``mixture_rows``.
    """
    rows = [r for r in rows if r.count > 0]
    if merged_slot is not None:
        rows = mixture_rows(rows, num_tokens, merged_slot)
    if not rows:
        return None
    indices, indptr, slots = _segments(rows)
    seg_slots, seg_ranks, seg_scales = segment_terms(slots, pool, merged_slot)
    batch = LoRABatch(
        token_indices=torch.from_numpy(indices).to(device),
        seg_indptr=torch.tensor(indptr, dtype=torch.int32).to(device),
        seg_slots=torch.from_numpy(seg_slots).to(device),
        seg_ranks=torch.from_numpy(seg_ranks).to(device),
        seg_scales=torch.from_numpy(seg_scales).to(device),
        num_tokens=num_tokens,
        max_rank=int(seg_ranks.max()),
        max_seg_len=int(np.diff(indptr).max()),
    )
    if num_tokens > routed_rows:
        return batch, None
    # Term tables padded (inactive: rank 0) to the next power of two of segments >= the rows, a CUDA-graph bucket's
    # own count (StaticLoRABatch): the fused linear's variant, and its sums, depend on the row count alone, not on
    # how many adapters the rows use, and an eager step at a bucket size computes what the bucket's graph does.
    k, pad = (1 if seg_slots.ndim == 1 else seg_slots.shape[1]), routed_segments(num_tokens) - len(slots)
    tables = [torch.from_numpy(np.concatenate([a.reshape(-1, k), np.zeros((pad, k), a.dtype)]).reshape(-1)).to(device)
              for a in (seg_slots, seg_ranks, seg_scales)]
    ids = torch.from_numpy(row_terms(indices, indptr, seg_slots, seg_ranks, num_tokens)).to(device)
    return batch, Routing(*tables, ids, torch.ones(ids.shape, device=device), pool.layout.max_rank)


class StaticLoRABatch:
    """A LoRABatch in fixed buffers for a CUDA-graph bucket of ``size`` rows, with 1 term (plain) or 2 (mixture).

    Shapes and host ints never change (``segments`` segments, by default ``size``; max_seg_len = size, max_rank =
    the pool's), so a captured launch replays; unused segments are empty (repeated indptr) with rank 0. A prefill
    bucket of hundreds of rows holds at most one segment per sequence (and mixture's base rows), so its
    ``segments`` is that bound: the kernels scan the segment table in every program. With ``routed`` it also holds
    the batch row by row (``routing``, as ``batch_routing``), for a backend that fuses the update into the matmul at
    this size; otherwise ``routing`` is None and a fill does no row-wise work.
    """

    def __init__(self, size: int, max_rank: int, device: torch.device, num_terms: int = 1,
                 segments: int | None = None, routed: bool = False) -> None:
        self.size, self.num_terms = size, num_terms
        self.segments = size if segments is None else min(size, segments)
        shape = (self.segments,) if num_terms == 1 else (self.segments, num_terms)
        self.batch = LoRABatch(
            token_indices=torch.zeros(size, dtype=torch.int32, device=device),
            seg_indptr=torch.zeros(self.segments + 1, dtype=torch.int32, device=device),
            seg_slots=torch.zeros(shape, dtype=torch.int32, device=device),
            seg_ranks=torch.zeros(shape, dtype=torch.int32, device=device),
            seg_scales=torch.zeros(shape, dtype=torch.float32, device=device),
            num_tokens=size, max_rank=max_rank, max_seg_len=size,
        )
        self.rows = torch.full((size, num_terms), -1, dtype=torch.int32, device=device) if routed else None
        self.routing = None if self.rows is None else batch_routing(
            self.batch, self.rows, torch.ones(size, num_terms, device=device), max_rank)

    def fill(self, rows: Sequence[LoRARows], pool: AdapterPool, num_rows: int | None = None,
             merged_slot: int | None = None,
             upload: Callable[[list[np.ndarray]], list[torch.Tensor]] | None = None) -> None:
        """Load the segments of ``rows``; in mixture mode (``merged_slot``) rows < ``num_rows`` without a plain
        adapter get the -M term (padding rows beyond ``num_rows`` get none). ``upload``: how host arrays reach
        the device without the host waiting (``HostStaging.upload``); by default plain copies."""
        if (merged_slot is None) != (self.num_terms == 1):
            raise ValueError(f"a {self.num_terms}-term static batch cannot hold merged_slot={merged_slot}")
        if merged_slot is not None and num_rows is None:
            raise ValueError("mixture mode needs num_rows: the rows without a plain adapter get -M")
        live = [r for r in rows if r.count > 0]
        if merged_slot is not None:
            live = mixture_rows(live, num_rows, merged_slot)
        indices, indptr, slots = _segments(live) if live else (np.zeros(0, dtype=np.int32), [0], [])
        n_seg = len(slots)
        if n_seg > self.segments or len(indices) > self.size:
            raise ValueError(f"{n_seg} segments of {len(indices)} rows do not fit a static batch of "
                             f"{self.segments} segments and {self.size} rows")
        tok = np.zeros(self.size, dtype=np.int32)
        tok[:len(indices)] = indices
        ptr = np.full(self.segments + 1, indptr[-1], dtype=np.int32)
        ptr[:len(indptr)] = indptr
        shape = (self.segments,) if self.num_terms == 1 else (self.segments, self.num_terms)
        seg_slots, seg_ranks = np.zeros(shape, dtype=np.int32), np.zeros(shape, dtype=np.int32)
        seg_scales = np.zeros(shape, dtype=np.float32)
        if n_seg:
            seg_slots[:n_seg], seg_ranks[:n_seg], seg_scales[:n_seg] = segment_terms(slots, pool, merged_slot)
        arrays = [tok, ptr, seg_slots, seg_ranks, seg_scales]
        b = self.batch
        targets = [b.token_indices, b.seg_indptr, b.seg_slots, b.seg_ranks, b.seg_scales]
        if self.rows is not None:
            arrays.append(row_terms(indices, indptr, seg_slots, seg_ranks, self.size))
            targets.append(self.rows)
        sources = upload(arrays) if upload is not None else [torch.from_numpy(a) for a in arrays]
        for dst, src in zip(targets, sources, strict=True):
            dst.copy_(src)


class MultiLoRADelta(LayerDelta):
    """Plain multi-LoRA: every adapted projection adds its slot-pool update for the iteration's segments.

    With ``routing`` (the batch row by row, which its builders make only up to the backend's ``fused_lora_rows``),
    each projection is the fused decode linear instead (``linear``): one launch fewer per projection and no
    read-modify-write of y.
    """

    def __init__(self, pool: AdapterPool, op: AddLoRAOp, batch: LoRABatch, routing: Routing | None = None) -> None:
        self.pool, self.op, self.batch, self.routing = pool, op, batch, routing

    def linear(self, key: LayerKey, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor | None:
        if self.routing is None or x.shape[0] != self.routing.num_tokens:
            return None
        return self.op.routed_linear(x, weight, bias, self.pool.weights(key), self.routing)

    def apply(self, key: LayerKey, x: torch.Tensor, y: torch.Tensor) -> None:
        self.op.add_lora(y, x, self.pool.weights(key), self.batch)
