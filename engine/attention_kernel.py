"""Triton paged attention for a varlen batch of query chunks over the block-table KV cache (CUDA-graph safe)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    # pointers
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_q_ptr, ctx_lens_ptr,
    # sizes
    scale, head_dim,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    # meta
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_blk = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    if m_blk * BLOCK_M < q_len:
        ctx_len = tl.load(ctx_lens_ptr + seq)
        kv_head = head // GROUP
        offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < q_len
        d_ok = offs_d < head_dim
        q = tl.load(q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = ctx_len - q_len + offs_m  # absolute position of each query row
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        kv_end = tl.minimum(ctx_len, ctx_len - q_len + (m_blk + 1) * BLOCK_M)
        for start in range(0, kv_end, BLOCK_N):
            block = tl.load(block_tables_ptr + seq * stride_bt + start // BLOCK_N)
            k = tl.load(k_cache_ptr + block * stride_kb + offs_n[:, None] * stride_ks + kv_head * stride_kh
                        + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            keys = start + offs_n
            visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < ctx_len)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + block * stride_vb + offs_n[:, None] * stride_vs + kv_head * stride_vh
                        + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, cu_query_lens: torch.Tensor, context_lens: torch.Tensor,
                           max_query_len: int, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its cached context.

    Semantics: out[t, h] = softmax(scale · q[t, h] · K[b, :p_t + 1, h // G]ᵀ) · V[b, :p_t + 1, h // G],
    with b the sequence of row t, p_t = context_lens[b] − query_len[b] + (t − cu_query_lens[b]), G = heads / kv_heads.

    q: [T, heads, dim]; k_cache, v_cache: [blocks, block_size, kv_heads, dim]; block_tables: [B, max_blocks]
    int32; cu_query_lens: [B + 1] int32; context_lens: [B] int32; returns [T, heads, dim] in q's dtype.
    The grid depends only on B, heads and ``max_query_len``, so a decode launch replays under a CUDA graph.
    """
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group evenly over {kv_heads} kv heads")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton path needs a power-of-two kv_block_size >= 16, got {block_size}")
    out = torch.empty_like(q)
    block_m = 16 if max_query_len <= 16 else 64
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (block_tables.shape[0], heads, triton.cdiv(max(max_query_len, 1), block_m))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_query_lens, context_lens,
        scale, dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_size, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
