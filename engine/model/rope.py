"""M-RoPE: the 3-D (temporal, height, width) positions of a prompt, and the rotary embedding they drive."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mrope_positions(ids: Sequence[int], image_grids: Sequence[Sequence[int]], image_token_id: int | None,
                    merge_size: int) -> tuple[torch.Tensor, int]:
    """(positions [3, len(ids)] int64, delta) as transformers' ``get_rope_index`` computes them for images.

    Text tokens advance all three axes together. Each picture's run of pad tokens gets (t, h, w) grid
    coordinates offset by the running position, which then advances by max(h, w) / merge. Tokens after
    the prompt sit at ``index + delta`` on every axis.
    """
    n = len(ids)
    out = torch.empty(3, n, dtype=torch.long)
    pos, i = 0, 0
    grids = list(image_grids)
    while i < n:
        if image_token_id is not None and ids[i] == image_token_id and grids:
            t, h, w = (int(v) for v in grids.pop(0))
            gh, gw = h // merge_size, w // merge_size
            count = t * gh * gw
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            out[:, i:i + count] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
            pos += max(gh, gw)
            i += count
            continue
        j = i
        while j < n and not (image_token_id is not None and ids[j] == image_token_id and grids):
            j += 1
        out[:, i:j] = torch.arange(pos, pos + j - i)
        pos += j - i
        i = j
    if grids:
        raise ValueError(f"prompt has fewer image tokens than its {len(image_grids)} pictures need")
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


class MRotaryEmbedding(nn.Module):
    """cos/sin [tokens, head_dim] from 3-D positions: frequency j takes its position from axis section(j)."""

    def __init__(self, head_dim: int, theta: float, section: tuple[int, int, int]) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        axis = torch.cat([torch.full((s,), a, dtype=torch.long) for a, s in enumerate(section)])
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [head_dim / 2]
        self.register_buffer("axis", axis, persistent=False)  # [head_dim / 2]: which position axis

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [3, tokens] -> (cos, sin), each [tokens, head_dim] in ``dtype``."""
        picked = positions[self.axis]  # [head_dim / 2, tokens]
        freqs = picked.t().float() * self.inv_freq  # [tokens, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [tokens, heads, dim], k: [tokens, kv_heads, dim], cos/sin: [tokens, dim] -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
