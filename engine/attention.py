"""Paged attention over the block-table KV cache: metadata, cache writes, and the torch / Triton compute paths."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TorchLayout:
    """Index maps of the gather path: padded queries per sequence and the causal / length mask."""

    seq_of: torch.Tensor  # [T] long: sequence of each query row
    row_of: torch.Tensor  # [T] long: row of each query inside its sequence's chunk
    mask: torch.Tensor  # [B, 1, max_q, blocks * block_size] bool: key j visible to query i
    num_blocks: int  # blocks gathered per sequence


@dataclass
class AttentionMetadata:
    """Where this iteration's queries sit in the paged cache.

    Sequence b contributes query rows ``cu_query_lens[b]:cu_query_lens[b + 1]`` (its new tokens, already
    written into the cache) and attends causally over ``context_lens[b]`` cached tokens, the new ones included.
    """

    slot_mapping: torch.Tensor  # [T] long: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical blocks of each sequence
    cu_query_lens: torch.Tensor  # [B + 1] int32: query row offsets
    context_lens: torch.Tensor  # [B] int32: cached tokens per sequence after this step's writes
    max_query_len: int  # longest chunk (host int: sizes the Triton grid)
    query_lens_host: list[int]  # per-sequence chunk lengths, for the gather path
    context_lens_host: list[int]  # per-sequence context lengths, for the gather path
    use_triton: bool = False
    _layout: TorchLayout | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    def torch_layout(self, block_size: int) -> TorchLayout:
        """Built once per iteration on first use and shared by every layer."""
        if self._layout is None:
            self._layout = _build_layout(self, block_size)
        return self._layout


def _build_layout(meta: AttentionMetadata, block_size: int) -> TorchLayout:
    device = meta.block_tables.device
    qlens = torch.tensor(meta.query_lens_host, dtype=torch.long)
    ctx = torch.tensor(meta.context_lens_host, dtype=torch.long)
    max_q = int(qlens.max())
    num_blocks = -(-int(ctx.max()) // block_size)
    seq_of = torch.repeat_interleave(torch.arange(len(qlens)), qlens)
    starts = torch.cumsum(qlens, 0) - qlens
    row_of = torch.arange(int(qlens.sum())) - starts[seq_of]
    q_pos = (ctx - qlens)[:, None] + torch.arange(max_q)[None, :]  # [B, max_q] absolute position
    keys = torch.arange(num_blocks * block_size)
    mask = (keys[None, None, :] <= q_pos[:, :, None]) & (keys[None, None, :] < ctx[:, None, None])
    return TorchLayout(seq_of.to(device), row_of.to(device), mask[:, None].to(device), num_blocks)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, dim] -> their cache slots; caches: [blocks, block_size, kv_heads, dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """q: [T, heads, dim] over the paged cache -> [T, heads, dim] (causal, GQA by head grouping)."""
    if meta.use_triton:
        from engine.attention_kernel import triton_paged_attention

        return triton_paged_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_query_lens,
                                      meta.context_lens, meta.max_query_len, scale)
    return torch_paged_attention(q, k_cache, v_cache, meta, scale)


def torch_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """The gather path: each sequence's blocks gathered into a dense [L] context, then masked SDPA."""
    block_size, kv_heads, dim = k_cache.shape[1:]
    lay = meta.torch_layout(block_size)
    batch, heads = meta.num_seqs, q.shape[1]
    tables = meta.block_tables[:, :lay.num_blocks].long()
    k = k_cache[tables].reshape(batch, -1, kv_heads, dim).transpose(1, 2)  # [B, kv_heads, L, dim]
    v = v_cache[tables].reshape(batch, -1, kv_heads, dim).transpose(1, 2)
    qp = q.new_zeros(batch, lay.mask.shape[2], heads, dim)  # [B, max_q, heads, dim]
    qp[lay.seq_of, lay.row_of] = q
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=lay.mask, scale=scale,
                                         enable_gqa=heads != kv_heads)  # [B, heads, max_q, dim]
    return out.transpose(1, 2)[lay.seq_of, lay.row_of]
