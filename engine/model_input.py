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


def build_model_input(sched: ScheduleOutput, block_size: int, slot_of: dict[str, int], device: torch.device,
                      use_triton: bool) -> ModelInput:
    """Lay out ``sched`` as tensors on ``device``; ``slot_of`` maps adapter names to their pool slots.

    Host work is numpy and plain ints (decode steps of 100+ sequences must not cost milliseconds).
    """
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
            ids.append(seq.token_ids[start])
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
        if chunk.completes and seq.head is None:
            out_rows["sample_rows"].append(row + count - 1)
            out_rows["sample_seqs"].append(seq)
        elif chunk.completes:
            out_rows["head_rows"].append((seq, slice(row + count - seq.head.positions, row + count)))
        if seq.adapter is not None:
            out_rows["lora_rows"].append(LoRARows(slot_of[seq.adapter], row, count))
        row += count
    cu = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(qlens, out=cu[1:])
    attn = AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        block_tables=torch.from_numpy(block_tables).to(device),
        cu_query_lens=torch.from_numpy(cu).to(device),
        context_lens=torch.tensor(ctxs, dtype=torch.int32).to(device),
        max_query_len=max(qlens), query_lens_host=qlens, context_lens_host=ctxs, use_triton=use_triton,
    )
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device),
        positions=torch.from_numpy(positions).to(device),
        attn=attn,
        image_rows=torch.from_numpy(np.concatenate(image_rows)).to(device) if image_rows else None,
        image_embeds=torch.cat(image_embeds) if image_embeds else None,
        **out_rows,
    )
