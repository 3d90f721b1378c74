"""ModelInput: the flat tensors of one iteration (token rows, positions, cache slots, pictures, LoRA rows)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.lora.batch import LoRARows
from engine.scheduler import ScheduleOutput
from engine.sequence import Sequence


@dataclass
class ModelInput:
    """Rows follow the schedule's chunk order; each chunk's tokens are consecutive rows."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [3, T] long M-RoPE positions
    attn: AttentionMetadata
    image_rows: torch.Tensor | None  # [n] long: rows whose embedding is a picture's, not the token's
    image_embeds: torch.Tensor | None  # [n, hidden]
    sample_rows: list[int] = field(default_factory=list)  # last row of each chunk that yields a token
    sample_seqs: list[Sequence] = field(default_factory=list)
    head_rows: list[tuple[Sequence, slice]] = field(default_factory=list)  # rows a task head reads
    lora_rows: list[LoRARows] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class HostStaging:
    """Host arrays to the device without the host waiting: pinned buffers, one queued copy per dtype.

    ``tensor.to("cuda")`` from pageable memory makes the host wait until the stream has drained, which would
    undo an overlapped launch. Two buffer sets alternate, so a set is rewritten only after the copy out of it
    two uploads ago has run. On CPU the arrays are wrapped, not copied.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sets: list[dict[torch.dtype, torch.Tensor]] = [{}, {}]
        self.copied: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Device tensors with the arrays' shapes and dtypes (views into one tensor per dtype)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(a) for a in arrays]
        turn, self.turn = self.turn, 1 - self.turn
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()
        buffers = self.sets[turn]
        views: dict[int, torch.Tensor] = {}
        for dtype in dict.fromkeys(a.dtype for a in arrays):
            picks = [i for i, a in enumerate(arrays) if a.dtype == dtype]
            flat = torch.from_numpy(np.concatenate([arrays[i].ravel() for i in picks]))
            buffer = buffers.get(flat.dtype)
            if buffer is None or buffer.numel() < flat.numel():
                buffer = buffers[flat.dtype] = torch.empty(max(2 * flat.numel(), 4096), dtype=flat.dtype,
                                                           pin_memory=True)
            buffer[:flat.numel()].copy_(flat)
            on_device = buffer[:flat.numel()].to(self.device, non_blocking=True)
            offset = 0
            for i in picks:
                views[i] = on_device[offset:offset + arrays[i].size].view(arrays[i].shape)
                offset += arrays[i].size
        self.copied[turn] = torch.cuda.Event()
        self.copied[turn].record()
        return [views[i] for i in range(len(arrays))]


def build_model_input(sched: ScheduleOutput, block_size: int, slot_of: dict[str, int], device: torch.device,
                      use_triton: bool, pending_ids: torch.Tensor | None = None,
                      staging: HostStaging | None = None) -> ModelInput:
    """Lay out ``sched`` as tensors on ``device``; ``slot_of`` maps adapter names to their pool slots.

    Host work is numpy and plain ints (decode steps of 100+ sequences must not cost milliseconds).
    ``pending_ids``: [chunks] device token ids that the sequences do not hold yet (an overlapped decode step:
    each chunk is the one row after its sequence's known tokens, and is sampled). ``staging``: copy the integer
    arrays through it (the host does not wait for the device).
    """
    if pending_ids is not None and (pending_ids.numel() != len(sched.chunks)
                                    or any(c.count != 1 or c.start != c.seq.num_tokens for c in sched.chunks)):
        raise ValueError("pending token ids need one decode row per chunk, just past each sequence's tokens")
    chunks = sched.chunks
    total = sum(c.count for c in chunks)
    ids: list[int] = []
    positions = np.empty((3, total), dtype=np.int64)
    slots = np.empty(total, dtype=np.int64)
    width = max(len(c.seq.block_table) for c in chunks)
    block_tables = np.zeros((len(chunks), width), dtype=np.int32)
    qlens, ctxs = [c.count for c in chunks], [c.start + c.count for c in chunks]
    image_rows: list[np.ndarray] = []
    image_embeds: list[torch.Tensor] = []
    out_rows: dict[str, list] = {"sample_rows": [], "sample_seqs": [], "head_rows": [], "lora_rows": []}
    row = 0
    for i, chunk in enumerate(chunks):
        seq, start, count = chunk.seq, chunk.start, chunk.count
        end = start + count
        table = seq.block_table
        block_tables[i, :len(table)] = table
        if count == 1:
            ids.append(seq.token_ids[start] if pending_ids is None else 0)
            slots[row] = table[start // block_size] * block_size + start % block_size
        else:
            ids.extend(seq.token_ids[start:end])
            idx = np.arange(start, end)
            blocks = np.asarray(table, dtype=np.int64)[idx // block_size]
            slots[row:row + count] = blocks * block_size + idx % block_size
        seq.write_positions(positions, row, start, end)
        if len(seq.image_positions) and start < seq.prompt_len:
            lo, hi = np.searchsorted(seq.image_positions, [start, end])
            if hi > lo:
                image_rows.append(seq.image_positions[lo:hi] - start + row)
                image_embeds.append(seq.image_embeds(int(lo), int(hi)))
        completes = chunk.completes or pending_ids is not None
        if completes and seq.head is None:
            out_rows["sample_rows"].append(row + count - 1)
            out_rows["sample_seqs"].append(seq)
        elif completes:
            out_rows["head_rows"].append((seq, slice(row + count - seq.head.positions, row + count)))
        if seq.adapter in slot_of:  # plain LoRA; other adapter types (MoE-LoRA) add their own deltas
            out_rows["lora_rows"].append(LoRARows(slot_of[seq.adapter], row, count))
        row += count
    cu = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(qlens, out=cu[1:])
    arrays = [slots, block_tables, cu, np.asarray(ctxs, dtype=np.int32), positions]
    if pending_ids is None:
        arrays.append(np.asarray(ids, dtype=np.int64))
    if image_rows:
        arrays.append(np.concatenate(image_rows).astype(np.int64))
    if staging is not None:
        tensors = staging.upload(arrays)
    else:
        tensors = [torch.from_numpy(a).to(device) for a in arrays]
    attn = AttentionMetadata(
        slot_mapping=tensors[0], block_tables=tensors[1], cu_query_lens=tensors[2], context_lens=tensors[3],
        max_query_len=max(qlens), query_lens_host=qlens, context_lens_host=ctxs, use_triton=use_triton,
    )
    return ModelInput(
        input_ids=tensors[5] if pending_ids is None else pending_ids.reshape(-1),
        positions=tensors[4],
        attn=attn,
        image_rows=tensors[-1] if image_rows else None,
        image_embeds=torch.cat(image_embeds) if image_embeds else None,
        **out_rows,
    )
