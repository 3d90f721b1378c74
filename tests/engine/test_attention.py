"""Paged attention: the gather path and the Triton kernel against a per-query loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.attention import AttentionMetadata, torch_paged_attention

ROOT = Path(__file__).resolve().parents[2]


def case(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """Four sequences (decode, chunk over a cached prefix, fresh prefill, decode) over shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim, block, blocks = 4, 2, 16, 16, 40
    k_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).to(device, dtype)
    qlens, ctx = [1, 7, 20, 1], [5, 30, 20, 47]
    tables = (torch.randperm(blocks - 1, generator=gen)[:16] + 1).view(4, 4).int().to(device)
    cu = torch.tensor([0, 1, 8, 28, 29], dtype=torch.int32, device=device)
    q = torch.randn(sum(qlens), heads, dim, generator=gen).to(device, dtype)
    meta = AttentionMetadata(torch.zeros(1, dtype=torch.long, device=device), tables, cu,
                             torch.tensor(ctx, dtype=torch.int32, device=device), max(qlens), qlens, ctx)
    return q, k_cache, v_cache, meta


def decode_case(heads: int, kv_heads: int, ctx: list[int], device: str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int = 0):
    """One query row per sequence (the decode kernel's path) over shuffled 16-slot blocks; dim 16."""
    gen = torch.Generator().manual_seed(seed)
    dim, block = 16, 16
    width = -(-max(ctx) // block)
    blocks = len(ctx) * width + 1
    k_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).to(device, dtype)
    v_cache = torch.randn(blocks, block, kv_heads, dim, generator=gen).to(device, dtype)
    tables = (torch.randperm(blocks - 1, generator=gen) + 1)[:len(ctx) * width].view(len(ctx), width).int()
    cu = torch.arange(len(ctx) + 1, dtype=torch.int32)
    q = torch.randn(len(ctx), heads, dim, generator=gen).to(device, dtype)
    meta = AttentionMetadata(torch.zeros(1, dtype=torch.long, device=device), tables.to(device), cu.to(device),
                             torch.tensor(ctx, dtype=torch.int32, device=device), 1, [1] * len(ctx), ctx)
    return q, k_cache, v_cache, meta


DECODE_CASES = [(4, 2, [1, 15, 16, 17, 64, 65, 130]), (14, 2, [3, 100, 33]), (8, 8, [200])]


def loop_reference(q, k_cache, v_cache, meta, scale):
    out = torch.empty_like(q, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[2]
    for b, (qlen, ctx) in enumerate(zip(meta.query_lens_host, meta.context_lens_host, strict=True)):
        blocks = meta.block_tables[b].long().to(k_cache.device)
        k = k_cache[blocks].flatten(0, 1)[:ctx].double()
        v = v_cache[blocks].flatten(0, 1)[:ctx].double()
        start = int(meta.cu_query_lens[b])
        for i in range(qlen):
            pos = ctx - qlen + i
            for h in range(q.shape[1]):
                s = (k[:pos + 1, h // group] @ q[start + i, h].double()) * scale
                out[start + i, h] = s.softmax(0) @ v[:pos + 1, h // group]
    return out


def test_gather_path_matches_loop():
    q, k, v, meta = case()
    ours = torch_paged_attention(q, k, v, meta, 0.25)
    assert torch.allclose(ours.double(), loop_reference(q, k, v, meta, 0.25), atol=1e-5)


_INTERPRETED = """
import torch
from engine.attention_kernel import triton_paged_attention
from tests.engine.test_attention import case, loop_reference
q, k, v, meta = case(seed=1)
out = triton_paged_attention(q, k, v, meta.block_tables, meta.cu_query_lens, meta.context_lens,
                             meta.max_query_len, 0.25)
err = (out.double() - loop_reference(q, k, v, meta, 0.25)).abs().max().item()
assert err < 1e-5, err
from tests.engine.test_attention import DECODE_CASES, decode_case
for heads, kv_heads, ctx in DECODE_CASES:  # the decode kernel: GQA groups as tile rows, several pages a step
    q, k, v, meta = decode_case(heads, kv_heads, ctx, seed=heads)
    out = triton_paged_attention(q, k, v, meta.block_tables, meta.cu_query_lens, meta.context_lens, 1, 0.25)
    derr = (out.double() - loop_reference(q, k, v, meta, 0.25)).abs().max().item()
    assert derr < 1e-5, (heads, kv_heads, ctx, derr)
print("ok", err)
"""


def test_triton_kernel_under_the_interpreter():
    """TRITON_INTERPRET must be set before triton is first imported, hence a fresh interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.gpu
def test_triton_kernel_on_gpu_bf16():
    from engine.attention_kernel import triton_paged_attention

    q, k, v, meta = case("cuda", torch.bfloat16, seed=2)
    out = triton_paged_attention(q, k, v, meta.block_tables, meta.cu_query_lens, meta.context_lens,
                                 meta.max_query_len, 0.25)
    ref = loop_reference(q.cpu(), k.cpu(), v.cpu(), meta, 0.25)
    rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    for heads, kv_heads, ctx in DECODE_CASES:
        q, k, v, meta = decode_case(heads, kv_heads, ctx, "cuda", torch.bfloat16, seed=heads)
        out = triton_paged_attention(q, k, v, meta.block_tables, meta.cu_query_lens, meta.context_lens, 1, 0.25)
        ref = loop_reference(q.cpu(), k.cpu(), v.cpu(), meta, 0.25)
        rel = ((out.cpu().double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, (heads, kv_heads, ctx, rel)


_ROPE = """
import torch
from engine.attention import write_kv
from engine.attention_kernel import triton_rope_and_cache
from engine.model.rope import apply_rope
for heads, kv_heads, dim, tokens in ((4, 2, 16, 5), (6, 2, 12, 3), (2, 2, 8, 1)):
    gen = torch.Generator().manual_seed(heads * dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim + 3, generator=gen)[:, 3:]  # a non-dense row stride
    ang = torch.randn(tokens, dim // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    caches = [torch.full((4, 4, kv_heads, dim), float("nan")) for _ in range(4)]
    slots = torch.randperm(16, generator=gen)[:tokens]
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q_ref, k_ref = apply_rope(q.reshape(tokens, heads, dim), k.reshape(tokens, kv_heads, dim), cos, sin)
    write_kv(k_ref, v.reshape(tokens, kv_heads, dim), caches[0], caches[1], slots)
    q_out = triton_rope_and_cache(qkv, cos, sin, caches[2], caches[3], slots, heads)
    assert torch.allclose(q_out, q_ref, atol=1e-6), (q_out - q_ref).abs().max()
    for ours, ref in ((caches[2], caches[0]), (caches[3], caches[1])):
        assert torch.equal(ours.isnan(), ref.isnan())  # the same slots written, no others
        assert torch.allclose(ours.nan_to_num(), ref.nan_to_num(), atol=1e-6)
print("ok")
"""


def test_rope_and_cache_kernel_under_the_interpreter():
    """The fused rotate + cache-write kernel against apply_rope + write_kv (odd head counts, dim 12 and 8)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _ROPE], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
