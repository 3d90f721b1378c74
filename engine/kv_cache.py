"""KVCache: one block-paged key and value tensor per layer, sized from the config or from free GPU memory."""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.model.spec import ModelSpec

logger = logging.getLogger(__name__)

GIB = 1 << 30


class KVCache:
    """k[layer], v[layer]: [num_blocks, block_size, kv_heads, head_dim]; block 0 is scratch for padded rows."""

    def __init__(self, spec: ModelSpec, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.block_size = config.kv_block_size
        elt = torch.finfo(dtype).bits // 8
        self.block_bytes = 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * elt
        self.num_blocks = self._size(spec, config, device)
        shape = (2, spec.num_layers, self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
                    self.data.numel() * elt / GIB)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[0, index], self.data[1, index]

    def _size(self, spec: ModelSpec, config: EngineConfig, device: torch.device) -> int:
        if config.kv_cache_blocks:
            return config.kv_cache_blocks
        per_seq = -(-config.max_model_len // self.block_size)
        if device.type != "cuda":
            # CPU: room for every sequence at full length, capped at 2 GiB.
            return max(2, min(config.max_num_seqs * per_seq + 1, 2 * GIB // self.block_bytes))
        free, total = torch.cuda.mem_get_info(device)
        # Activations of the largest prefill iteration, CUDA-graph pools and allocator slack stay free.
        activations = config.max_num_batched_tokens * (2 * spec.intermediate_size + 6 * spec.hidden_size) * 4
        budget = total * config.gpu_memory_fraction - (total - free) - activations - 2 * GIB
        blocks = int(budget // self.block_bytes)
        if blocks < per_seq + 1:
            raise ValueError(f"only {max(blocks, 0)} KV blocks fit in GPU memory; one max_model_len sequence "
                             f"needs {per_seq} (lower max_model_len or raise gpu_memory_fraction)")
        return blocks
