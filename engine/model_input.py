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
    """Lay out ``sched`` as tensors on ``device``; ``slot_of`` maps adapter names to their pool slots."""
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[np.ndarray] = []
    qlens, ctxs, tables = [], [], []
    image_rows: list[np.ndarray] = []
    image_embeds: list[torch.Tensor] = []
    out_rows: dict[str, list] = {"sample_rows": [], "sample_seqs": [], "head_rows": [], "lora_rows": []}
    row = 0
    for chunk in sched.chunks:
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.count
        ids.extend(seq.token_ids[start:end])
        positions.append(seq.positions_of(start, end))
        table = np.asarray(seq.block_table, dtype=np.int64)
        idx = np.arange(start, end)
        slots.append(table[idx // block_size] * block_size + idx % block_size)
        qlens.append(chunk.count)
        ctxs.append(end)
        tables.append(seq.block_table)
        lo, hi = np.searchsorted(seq.image_positions, [start, end])
        if hi > lo:
            image_rows.append(seq.image_positions[lo:hi] - start + row)
            image_embeds.append(seq.image_embeds(int(lo), int(hi)))
        if chunk.completes and seq.head is None:
            out_rows["sample_rows"].append(row + chunk.count - 1)
            out_rows["sample_seqs"].append(seq)
        elif chunk.completes:
            out_rows["head_rows"].append((seq, slice(row + chunk.count - seq.head.positions, row + chunk.count)))
        if seq.adapter is not None:
            out_rows["lora_rows"].append(LoRARows(slot_of[seq.adapter], row, chunk.count))
        row += chunk.count
    width = max(len(t) for t in tables)
    block_tables = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = t
    cu = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    attn = AttentionMetadata(
        slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
        block_tables=torch.from_numpy(block_tables).to(device),
        cu_query_lens=torch.from_numpy(cu).to(device),
        context_lens=torch.tensor(ctxs, dtype=torch.int32).to(device),
        max_query_len=max(qlens), query_lens_host=qlens, context_lens_host=ctxs, use_triton=use_triton,
    )
    return ModelInput(
        input_ids=torch.tensor(ids, dtype=torch.long).to(device),
        positions=torch.cat(positions, dim=1).to(device),
        attn=attn,
        image_rows=torch.from_numpy(np.concatenate(image_rows)).to(device) if image_rows else None,
        image_embeds=torch.cat(image_embeds) if image_embeds else None,
        **out_rows,
    )
