"""MoEPool: device slots holding MoE-LoRA adapters' experts (every layer and group) and routers, with LRU eviction.

Slot s owns experts ``s * E .. s * E + E - 1`` of every layer's expert pool (E = the pool's max experts), so one
expert index space [slots * E] serves every layer and a Routing's ``expert_slots`` is simply ``arange``. Per-slot
metadata (ranks, scales, which experts and top-k pairs are live) sits in fixed device tensors that slot loads
overwrite in place, so captured CUDA graphs read the current adapters.
"""

from __future__ import annotations

import logging

import torch

from engine.lora.delta import LayerKey
from engine.lora.layout import LoRALayout
from engine.moe.config import MoEConfig
from engine.moe.host import HostMoE
from engine.slots import SlotTable
from kernels.lora_batch import LoRAWeights

logger = logging.getLogger(__name__)


class MoEPool(SlotTable[HostMoE]):
    """Expert storage per group: a [layers, slots * E, n_slices, R, in], b [layers, slots * E, out, R].

    Routers (fp32): ``global_router`` [slots, layers * E, hidden] (pre-gated) and ``site_router[group]``
    [layers, slots, E, in_dim] (per-layer and block). ``logit_bias`` [slots, E] is 0 for an adapter's experts
    and -inf past them; ``pair_live`` [slots, K] marks its top-k pairs.

    The expert and router storage is allocated by ``allocate`` (the manager calls it at start-up when the
    adapters directory holds MoE-LoRA adapters, so the KV cache is sized after it) or else on the first load.
    """

    kind = "MoE adapter"

    def __init__(self, layout: LoRALayout, config: MoEConfig, hidden_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__(config.slots)
        self.layout, self.device, self.dtype, self.hidden_size = layout, device, dtype, hidden_size
        self.experts, self.top_k, self.max_rank = config.max_experts, config.max_top_k, config.max_rank
        n = self.num_slots * self.experts
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        self._weights: dict[LayerKey, LoRAWeights] = {}
        self.global_router = torch.empty(0)
        self.site_router: dict[str, torch.Tensor] = {}
        f32 = dict(dtype=torch.float32, device=device)
        self.expert_slots = torch.arange(n, dtype=torch.int32, device=device)
        self.expert_ranks = torch.zeros(n, dtype=torch.int32, device=device)
        self.expert_scales = torch.zeros(n, **f32)
        self.logit_bias = torch.zeros(self.num_slots, self.experts, **f32)
        self.pair_live = torch.zeros(self.num_slots, self.top_k, dtype=torch.bool, device=device)

    @property
    def allocated(self) -> bool:
        return bool(self.a)

    def allocate(self) -> None:
        """Allocate the expert and router storage (zeros) once."""
        if self.allocated:
            return
        layout, dev, n = self.layout, self.device, self.num_slots * self.experts
        self.a = {g: torch.zeros(layout.num_layers, n, len(w), self.max_rank, d, dtype=self.dtype, device=dev)
                  for g, (d, w) in layout.groups.items()}
        self.b = {g: torch.zeros(layout.num_layers, n, sum(w), self.max_rank, dtype=self.dtype, device=dev)
                  for g, (d, w) in layout.groups.items()}
        self._weights = {(layer, g): LoRAWeights(self.a[g][layer], self.b[g][layer], layout.slice_bounds(g))
                         for g in layout.groups for layer in range(layout.num_layers)}
        f32 = dict(dtype=torch.float32, device=dev)
        self.global_router = torch.zeros(self.num_slots, layout.num_layers * self.experts, self.hidden_size, **f32)
        self.site_router = {g: torch.zeros(layout.num_layers, self.num_slots, self.experts, d, **f32)
                            for g, (d, _) in layout.groups.items()}
        logger.info("MoE expert pool: %d slots x %d experts of rank <= %d (%.2f GiB)", self.num_slots,
                    self.experts, self.max_rank, self.nbytes / 2**30)

    def weights(self, key: LayerKey) -> LoRAWeights:
        return self._weights[key]

    def all_weights(self) -> list[LoRAWeights]:
        """Every layer's view of every projection group (none before ``allocate``)."""
        return list(self._weights.values())

    @property
    def nbytes(self) -> int:
        """Device bytes of the expert and router storage (0 until allocated)."""
        tensors = [*self.a.values(), *self.b.values(), self.global_router, *self.site_router.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def routing_of(self, slot: int) -> str:
        host = self.occupant[slot]
        if host is None:
            raise ValueError(f"MoE slot {slot} is empty")
        return host.spec.routing

    def fits(self, host: HostMoE) -> str | None:
        """Why ``host`` cannot live in this pool, or None."""
        spec = host.spec
        if spec.num_experts > self.experts:
            return f"has {spec.num_experts} experts, over the pool's max_experts {self.experts}"
        if spec.top_k > self.top_k:
            return f"routes to top-{spec.top_k}, over the pool's max_top_k {self.top_k}"
        if spec.rank > self.max_rank:
            return f"has rank {spec.rank}, over the pool's max_rank {self.max_rank}"
        return None

    def _write(self, slot: int, host: HostMoE) -> None:
        """Copy ``host`` into ``slot`` (synchronously: loads are rare and happen between iterations)."""
        self.allocate()
        spec, e, n = host.spec, self.experts, host.spec.num_experts
        lo, r = slot * e, spec.rank
        for group in self.layout.groups:
            a, b = self.a[group][:, lo:lo + e], self.b[group][:, lo:lo + e]
            a.zero_()
            b.zero_()
            if group in host.a:
                a[:, :n, :, :r].copy_(host.a[group])
                b[:, :n, :, :r].copy_(host.b[group])
            self.site_router[group][:, slot].zero_()
        self.global_router[slot].zero_()
        for (layer, site), weight in host.routers.items():
            if layer < 0:
                self.global_router[slot].view(self.layout.num_layers, e, -1)[:, :n].copy_(
                    weight.view(self.layout.num_layers, n, -1))
            else:
                self.site_router[site][layer, slot, :n].copy_(weight)
        live = torch.arange(e) < n
        self.expert_ranks[lo:lo + e].copy_(torch.where(live, r, 0).to(torch.int32))
        self.expert_scales[lo:lo + e].copy_(torch.where(live, spec.scaling, 0.0).float())
        self.logit_bias[slot].copy_(torch.where(live, 0.0, float("-inf")))
        self.pair_live[slot].copy_(torch.arange(self.top_k) < spec.top_k)
        self._occupy(slot, host.name, host)
