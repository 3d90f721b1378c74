"""GraphRunner: decode iterations captured as CUDA graphs per (batch-size bucket, LoRA terms), replayed."""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata
from engine.device import capture_graph
from engine.forward_context import ForwardContext
from engine.lora.batch import MultiLoRADelta, StaticLoRABatch
from engine.model.qwen2 import Qwen2LM
from engine.model_input import ModelInput
from engine.moe.adapters import AdapterManager
from engine.moe.graphs import StaticMoE
from engine.moe.manager import MoEPlan

logger = logging.getLogger(__name__)


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 16, up to ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class GraphRunner:
    """Static input buffers sized for the largest bucket; each bucket's graph reads a prefix of them.

    Padded rows write their keys into scratch block 0 and attend over it; their outputs are dropped.
    Graphs are keyed by (bucket, LoRA terms per segment): 0 runs no multi-LoRA op (base rows only, or merged
    mode), 1 plain multi-LoRA, 2 mixture mode (+X -M). Merges rewrite the weights in place, so every graph stays
    valid across mode switches. Graphs are captured on first use, so unused keys cost nothing.
    """

    def __init__(self, model: Qwen2LM, lora: AdapterManager, max_batch: int, max_blocks: int,
                 device: torch.device) -> None:
        self.model, self.lora, self.device = model, lora, device
        self.sizes = buckets(max_batch)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.cu_query_lens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.static_lora = {(b, k): StaticLoRABatch(b, lora.layout.max_rank, device, k,
                                                    routed=b <= lora.fused_rows)
                            for b in self.sizes for k in (1, 2)}
        self.static_moe = StaticMoE(lora.moe, self.sizes, device)
        self.lora_filled: dict[tuple[int, int], tuple] = {}  # (bucket, terms) -> what its LoRA buffers hold
        # (multi-LoRA backend, bucket, LoRA terms, MoE plan key) -> graph and its output
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, batch: int, terms: int, moe: MoEPlan) -> bool:
        return batch <= self.sizes[-1] and (self.lora.graph_safe or not (terms or moe.path != "none"))

    def run(self, inp: ModelInput, terms: int, moe: MoEPlan) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds ``inp``; returns hidden states [B, hidden]."""
        batch = inp.num_tokens
        size = next(b for b in self.sizes if b >= batch)
        self._load(inp, size)
        if terms:
            merged = self.lora.merge_state.slot if terms == 2 else None
            pool = self.lora.pool
            # Decode steps of one batch repeat the same segments: the buffers keep them (no host-to-device copy).
            key = (batch, merged, tuple((r.slot, r.start, r.count, pool.rank_in[r.slot], pool.scale_in[r.slot])
                                        for r in inp.lora_rows))
            if self.lora_filled.get((size, terms)) != key:
                self.static_lora[size, terms].fill(inp.lora_rows, pool, batch, merged)
                self.lora_filled[size, terms] = key
            pool.wait_ready()
        self.lora.moe.prepare(moe)
        self.static_moe.fill(moe, size)
        key = (getattr(self.lora.op, "name", ""), size, terms, moe.key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, terms, moe)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:batch]

    def _load(self, inp: ModelInput, size: int) -> None:
        b, width = inp.num_tokens, inp.attn.block_tables.shape[1]
        self.input_ids[:b].copy_(inp.input_ids)
        self.positions[:, :b].copy_(inp.positions)
        self.slot_mapping[:b].copy_(inp.attn.slot_mapping)
        self.block_tables[:b, :width].copy_(inp.attn.block_tables)
        self.block_tables[:b, width:].zero_()
        self.context_lens[:b].copy_(inp.attn.context_lens)
        if size > b:  # padding rows: scratch slot 0 of block 0, one visible key
            self.input_ids[b:size].zero_()
            self.positions[:, b:size].zero_()
            self.slot_mapping[b:size].zero_()
            self.block_tables[b:size].zero_()
            self.context_lens[b:size].fill_(1)

    def _capture(self, size: int, terms: int, moe: MoEPlan) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        logger.info("capturing decode graph for batch %d (LoRA terms %d, MoE %s)", size, terms, moe.key)
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            cu_query_lens=self.cu_query_lens[:size + 1], context_lens=self.context_lens[:size],
            max_query_len=1, query_lens_host=[1] * size, context_lens_host=[1] * size, use_triton=True,
        )
        static = self.static_lora[size, terms] if terms else None
        deltas = [MultiLoRADelta(self.lora.pool, self.lora.op, static.batch, static.routing)] if static else []
        ctx = ForwardContext(attn, deltas + self.static_moe.deltas(moe, size))
        return capture_graph(lambda: self.model(self.input_ids[:size], self.positions[:, :size], ctx), self.device,
                             self.pool)
