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
