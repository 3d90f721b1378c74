"""Triton paged attention for a varlen batch of query chunks over the block-table KV cache (CUDA-graph safe)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.intmath import cdiv, next_power_of_2


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width varies per batch
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


@triton.jit(do_not_specialize=["stride_bt"])  # the block-table width varies per batch
def _paged_decode_kernel(
    # pointers
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_q_ptr, ctx_lens_ptr,
    # sizes
    scale, head_dim,
    # strides
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    # meta
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One query row per sequence: a program per (sequence, kv head) takes the GROUP query heads that share it as
    the rows of one tile, so K and V are read once per kv head, and walks BLOCK_N keys (several pages) per step."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(cu_q_ptr + seq)
    if tl.load(cu_q_ptr + seq + 1) > row:
        ctx_len = tl.load(ctx_lens_ptr + seq)
        offs_g = tl.arange(0, BLOCK_G)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < head_dim
        heads = kv_head * GROUP + offs_g
        q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634  # softmax in base 2
        for start in range(0, ctx_len, BLOCK_N):
            keys = start + offs_n
            k_ok = keys < ctx_len
            block = tl.load(block_tables_ptr + seq * stride_bt + keys // PAGE, mask=k_ok, other=0)
            slot = block.to(tl.int64) * stride_kb + (keys % PAGE) * stride_ks
            k = tl.load(k_cache_ptr + slot[:, None] + kv_head * stride_kh + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v_slot = block.to(tl.int64) * stride_vb + (keys % PAGE) * stride_vs
            v = tl.load(v_cache_ptr + v_slot[:, None] + kv_head * stride_vh + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


DECODE_KEYS = 64  # keys per step of the decode kernel (four 16-slot pages)


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
    block_d = max(16, next_power_of_2(dim))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    operands = (  # the two kernels take the same pointers, sizes and strides
        q, k_cache, v_cache, out, block_tables, cu_query_lens, context_lens, scale, dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
    )
    if max_query_len == 1:  # decode: one row per sequence, query heads grouped by the kv head they read
        group = heads // kv_heads
        _paged_decode_kernel[(block_tables.shape[0], kv_heads)](
            *operands, GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), PAGE=block_size,
            BLOCK_N=max(DECODE_KEYS, block_size), BLOCK_D=block_d, PRECISION=precision,
        )
        return out
    block_m = 16 if max_query_len <= 16 else 64
    grid = (block_tables.shape[0], heads, cdiv(max(max_query_len, 1), block_m))
    _paged_attention_kernel[grid](
        *operands, GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_size, BLOCK_D=block_d,
        PRECISION=precision,
    )
    return out


@triton.jit
def _rope_cache_kernel(
    # pointers
    qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    # strides
    stride_t, stride_cos, stride_sin, stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    # meta
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    t = tl.program_id(0)
    part = tl.program_id(1)  # 0: q heads, 1: k heads, 2: v heads
    dim = 2 * HALF
    offs_h = tl.arange(0, BLOCK_H)
    offs_j = tl.arange(0, BLOCK_J)
    n_heads = tl.where(part == 0, HEADS, KV_HEADS)
    col = tl.where(part == 0, 0, tl.where(part == 1, HEADS * dim, (HEADS + KV_HEADS) * dim))
    mask = (offs_h < n_heads)[:, None] & (offs_j < HALF)[None, :]
    src = qkv_ptr + t.to(tl.int64) * stride_t + col + offs_h[:, None] * dim + offs_j[None, :]
    lo = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if part < 2:  # rotate: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x_hi, x_lo]
        c_lo = tl.load(cos_ptr + t * stride_cos + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + t * stride_cos + HALF + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + t * stride_sin + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + t * stride_sin + HALF + offs_j, mask=offs_j < HALF, other=0.0).to(tl.float32)
        lo, hi = lo * c_lo[None, :] - hi * s_lo[None, :], hi * c_hi[None, :] + lo * s_hi[None, :]
    if part == 0:
        dst = q_out_ptr + t.to(tl.int64) * stride_qt + offs_h[:, None] * stride_qh + offs_j[None, :]
    else:
        slot = tl.load(slot_ptr + t)
        if part == 1:
            dst = k_cache_ptr + slot * stride_ks + offs_h[:, None] * stride_kh + offs_j[None, :]
        else:
            dst = v_cache_ptr + slot * stride_vs + offs_h[:, None] * stride_vh + offs_j[None, :]
    tl.store(dst, lo.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, hi.to(dst.dtype.element_ty), mask=mask)


def triton_rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate q and k and write k and v into their cache slots, in one launch.

    Semantics: q[t] = rope(qkv[t, q part]); k_cache[slot[t]] = rope(qkv[t, k part]);
        v_cache[slot[t]] = qkv[t, v part], with rope(x) = x * cos[t] + rotate_half(x) * sin[t] in fp32, one rounding.

    qkv: [T, (heads + 2 kv_heads) * dim] the fused projection's output (row stride free, columns contiguous);
    cos, sin: [T, dim]; k_cache, v_cache: [blocks, block_size, kv_heads, dim]; slot_mapping: [T] int64.
    Returns q: [T, heads, dim] in qkv's dtype. The grid is (T, 3): a CUDA graph can capture it.
    """
    tokens = qkv.shape[0]
    _, _, kv_heads, dim = k_cache.shape
    if qkv.shape[1] != (heads + 2 * kv_heads) * dim or qkv.stride(1) != 1 or dim % 2:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not hold {heads} + 2 x {kv_heads} heads of even dim {dim}")
    q = torch.empty(tokens, heads, dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("the KV caches must be contiguous, and cos / sin contiguous along dim")
    half = dim // 2
    _rope_cache_kernel[(tokens, 3)](
        qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        HEADS=heads, KV_HEADS=kv_heads, HALF=half, BLOCK_H=next_power_of_2(max(heads, kv_heads)),
        BLOCK_J=next_power_of_2(half),
    )
    return q
