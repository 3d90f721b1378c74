"""Our Qwen2 / Qwen2.5-VL language-model decoder over the paged KV cache (GQA, M-RoPE, SwiGLU, fused q/k/v)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import paged_attention, write_kv
from engine.forward_context import ForwardContext
from engine.lora.delta import LayerKey
from engine.model.layers import AdaptedLinear, FusedOps, RMSNorm
from engine.model.rope import MRotaryEmbedding
from engine.model.spec import ModelSpec

# Projection groups of a decoder layer, as (group, sub-projections on the output dim); the LoRA pool mirrors it.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, ops: FusedOps) -> None:
        super().__init__()
        self.ops = ops
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = spec.head_dim ** -0.5
        self.qkv_proj = AdaptedLinear(spec.hidden_size, (spec.q_size, spec.kv_size, spec.kv_size), True,
                                      (layer, "qkv"), ops)
        self.o_proj = AdaptedLinear(spec.q_size, (spec.hidden_size,), False, (layer, "o"), ops)
        self.k_cache = torch.empty(0)  # [blocks, block_size, kv_heads, dim], bound by the runner
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [tokens, hidden] -> [tokens, hidden]."""
        return self.o_proj(self.attend(self.project(x, cos, sin, ctx), ctx), ctx.deltas)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [tokens, hidden] -> rotated queries [tokens, heads, dim]; the keys and values go into the cache."""
        tokens = x.shape[0]
        qkv = self.qkv_proj(x, ctx.deltas)  # [tokens, (heads + 2 kv_heads) * dim]
        if ctx.attn.use_triton:  # one launch: rotate q and k, write k and v into the cache
            from engine.attention_kernel import triton_rope_and_cache

            return triton_rope_and_cache(qkv, cos, sin, self.k_cache, self.v_cache, ctx.attn.slot_mapping,
                                         self.heads)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.reshape(tokens, self.kv_heads, self.head_dim)
        q, k = self.ops.apply_rope(q, k, cos, sin)
        write_kv(k, v, self.k_cache, self.v_cache, ctx.attn.slot_mapping)
        return q

    def attend(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q: [tokens, heads, dim] over the paged cache -> [tokens, heads * dim] (the o projection's input)."""
        return paged_attention(q, self.k_cache, self.v_cache, ctx.attn, self.scale).reshape(q.shape[0], -1)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, ops: FusedOps) -> None:
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = AdaptedLinear(spec.hidden_size, (inter, inter), False, (layer, "gate_up"), ops)
        self.down_proj = AdaptedLinear(inter, (spec.hidden_size,), False, (layer, "down"), ops)
        self.ops = ops

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x, ctx.deltas)), ctx.deltas)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, ops: FusedOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.self_attn = Attention(spec, layer, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.mlp = MLP(spec, layer, ops)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(sub-layer output, residual stream) in -> out; the residual add is fused into the next norm."""
        q, residual = self.pre_attention(x, residual, cos, sin, ctx)
        return self.post_attention(self.self_attn.attend(q, ctx), residual, ctx)

    def pre_attention(self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its attention: (queries [tokens, heads, dim], residual stream); no cross-row work, so
        that piecewise CUDA graphs (engine/prefill_graph.py) can capture it at a padded row count."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(h, cos, sin, ctx), residual

    def post_attention(self, attn: torch.Tensor, residual: torch.Tensor,
                       ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after its attention: attention output [tokens, heads * dim] -> (MLP output, residual)."""
        h, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn, ctx.deltas), residual)
        return self.mlp(h, ctx), residual


class Qwen2LM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head of a Qwen2 / Qwen2.5-VL model."""

    def __init__(self, spec: ModelSpec, ops: FusedOps | None = None) -> None:
        super().__init__()
        self.spec = spec
        ops = ops or FusedOps(compiled=False)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, ops) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.rotary = MRotaryEmbedding(spec.head_dim, spec.rope_theta, spec.mrope_section)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [tokens], positions: [3, tokens] -> final-norm hidden states [tokens, hidden]."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, ctx)
        out, _ = self.norm(x, residual)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> fp32 logits [n, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def adapted_linears(self) -> dict[LayerKey, AdaptedLinear]:
        """Every adapted projection by (layer, group): the base weights a merged mode would fold adapters into."""
        return {m.key: m for m in self.modules() if isinstance(m, AdaptedLinear)}

    def lora_group_shapes(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        """group -> (in_dim, output widths of its slices), as the adapter pool allocates them."""
        return {g: (m.in_dim, m.out_dims) for (layer, g), m in self.adapted_linears().items() if layer == 0}
