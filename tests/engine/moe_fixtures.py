"""Shared MoE-LoRA test pieces: random adapters in the engine format, the HF reference, a one-sequence runner."""

from __future__ import annotations

from pathlib import Path

import torch

from apps.moe.model import MoELoRAModel
from engine.attention import AttentionMetadata
from engine.forward_context import ForwardContext
from engine.lora.layout import LoRALayout
from engine.model.checkpoint import Checkpoint
from engine.model.qwen2 import LORA_GROUPS
from engine.model_runner import build_model
from engine.moe.config import MoEConfig
from engine.moe.manager import MoEManager, MoERows
from engine.moe.spec import FFN_PROJECTIONS, PROJECTIONS, MoESpec
from kernels.backend import get_backend

# name -> (routing, experts, top_k, rank, alpha, seed)
MOE_ADAPTERS = {
    "moe_pre": ("pregated", 4, 2, 4, 8.0, 5),
    "moe_layer": ("per_layer", 4, 2, 4, 8.0, 6),
    "moe_block": ("block", 4, 2, 8, 8.0, 7),
    "moe_pre3": ("pregated", 6, 1, 8, 4.0, 8),
}


def hf_base(base: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=dtype).to(device).eval()


def save_moe_adapters(base: Path, root: Path) -> Path:
    """Write every MOE_ADAPTERS entry (random A, B and routers) under ``root``; returns root."""
    for name, (routing, experts, top_k, rank, alpha, seed) in MOE_ADAPTERS.items():
        folder = root / name
        if (folder / "adapter_model.safetensors").is_file():
            continue
        hf = hf_base(base)
        targets = FFN_PROJECTIONS if routing == "block" else PROJECTIONS
        spec = MoESpec(name, folder, routing, experts, top_k, rank, alpha, False, targets,
                       hf.config.text_config.num_hidden_layers)
        model = MoELoRAModel(hf, spec)
        model.init_random(seed, b_std=0.08)
        with torch.no_grad():  # routers far from ties, so top-k choices are stable across implementations
            for router in model.routers.values():
                router.weight.mul_(50.0)
        model.save(folder)
    return root


def reference_model(base: Path, folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    return MoELoRAModel.from_folder(hf_base(base, dtype, device), folder).eval()


@torch.no_grad()
def reference_greedy(model: MoELoRAModel, ids: list[int], steps: int, eos: int | None = None) -> list[int]:
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps,
                         min_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


class OneSequence:
    """Our decoder and a MoEManager, running one text-only sequence over a contiguous KV cache (no scheduler)."""

    def __init__(self, base: Path, adapters: Path, config: MoEConfig, backend: str = "torch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32, blocks: int = 16) -> None:
        self.device = torch.device(device)
        checkpoint = Checkpoint(str(base))
        self.model, _ = build_model(checkpoint, self.device, dtype, 0, False)
        spec = checkpoint.spec
        layout = LoRALayout(spec.num_layers, self.model.lora_group_shapes(), LORA_GROUPS, 16)
        self.moe = MoEManager(adapters, layout, config, spec.hidden_size, self.model.adapted_linears(),
                              get_backend(backend), self.device, dtype)
        self.block_size = 16
        self.kv = torch.zeros(2, spec.num_layers, blocks, self.block_size, spec.num_kv_heads, spec.head_dim,
                              dtype=dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv[0, i], self.kv[1, i]
        self.blocks = blocks
        self.paths: list[str] = []

    def step(self, adapter: str | None, ids: list[int], start: int) -> torch.Tensor:
        """Tokens ``ids`` at positions start.. (cached before them: start tokens) -> fp32 logits [len(ids), V]."""
        t, ctx_len = len(ids), start + len(ids)
        dev = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.arange(start, ctx_len, device=dev),
            block_tables=torch.arange(self.blocks, dtype=torch.int32, device=dev)[None],
            cu_query_lens=torch.tensor([0, t], dtype=torch.int32, device=dev),
            context_lens=torch.tensor([ctx_len], dtype=torch.int32, device=dev),
            max_query_len=t, query_lens_host=[t], context_lens_host=[ctx_len])
        rows = [MoERows(adapter, 0, t)] if adapter else []
        plan = self.moe.plan(rows, t, decode=start > 0 and t == 1)
        self.paths.append(plan.path)
        ctx = ForwardContext(attn, self.moe.build_deltas(plan))
        positions = torch.arange(start, ctx_len, device=dev)[None].expand(3, t)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids, device=dev), positions, ctx)
            return self.model.compute_logits(hidden)

    def greedy(self, adapter: str | None, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
        """Prefill then ``steps`` greedy tokens; returns (tokens, last-position logits of each step)."""
        logits = self.step(adapter, ids, 0)[-1:]
        tokens, history = [], [logits[0]]
        for i in range(steps):
            tokens.append(int(logits[-1].argmax()))
            if i + 1 < steps:
                logits = self.step(adapter, [tokens[-1]], len(ids) + i)
                history.append(logits[0])
        return tokens, history

    def acquire(self, name: str) -> None:
        self.moe.load_now(name)
        self.moe.acquire(name)
