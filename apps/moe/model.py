"""MoELoRAModel: MoE-LoRA experts and routers on a transformers Qwen2.5-VL language model (training + reference).

A straightforward implementation on purpose: each adapted ``nn.Linear`` becomes a ``MoELoRALinear`` holding its N
experts, and routers are forward pre-hooks on the projection whose input they read. The gating is the engine's
(top-k of the router's logits, softmax over the k chosen, fp32), computed densely ([tokens, N] gates with zeros
for unchosen experts) so that it trains with plain autograd. Weights save to and load from the engine's MoE-LoRA
format (``engine/moe/spec.py``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from engine.adapter_store import WEIGHTS_FILE
from engine.moe.spec import (
    FFN_PROJECTIONS,
    GROUP_OF,
    PREGATED_ROUTER,
    MoESpec,
    expert_key,
    read_moe_spec,
    router_key,
    router_sites,
    site_of,
    write_moe_config,
)

logger = logging.getLogger(__name__)

# The projection whose input a router site reads (the first one the model calls in that group).
SITE_INPUT = {"qkv": "q_proj", "o": "o_proj", "gate_up": "gate_proj", "down": "down_proj"}


def dense_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits [..., E] -> gates [..., E]: softmax over the top-k logits, zero elsewhere (fp32)."""
    values, ids = torch.topk(logits.float(), top_k, dim=-1)
    return torch.zeros_like(logits, dtype=torch.float32).scatter(-1, ids, torch.softmax(values, dim=-1))


class RoutingState:
    """The current forward's gates per (layer, group), written by router hooks and read by the experts."""

    def __init__(self) -> None:
        self.gates: dict[tuple[int, str], torch.Tensor] = {}  # each [tokens, E]
        self.balance: list[torch.Tensor] = []  # load-balancing terms of this forward (training)
        self.track = False

    def clear(self) -> None:
        self.gates.clear()
        self.balance.clear()


class MoELoRALinear(nn.Module):
    """y = base(x) + scale * sum_e gate[t, e] * (x A_e^T) B_e^T, with gates from the layer's routing."""

    def __init__(self, base: nn.Linear, experts: int, rank: int, scale: float, key: tuple[int, str],
                 state: RoutingState) -> None:
        super().__init__()
        self.base, self.key, self.state, self.scale = base, key, state, scale
        self.lora_A = nn.Parameter(torch.zeros(experts, rank, base.in_features))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, rank))  # [E, out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        gates = self.state.gates[self.key]  # [tokens, E]
        flat = x.reshape(-1, x.shape[-1])  # [tokens, in]
        shrunk = torch.einsum("ti,eri->ter", flat, self.lora_A) * gates[:, :, None]  # [tokens, E, r]
        delta = torch.einsum("ter,eor->to", shrunk, self.lora_B) * self.scale  # [tokens, out]
        return y + delta.view(*y.shape[:-1], -1).to(y.dtype)


def balance_loss(logits: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing: E * sum_e (share of tokens routed to e) * (mean router prob of e).

    logits, gates: [tokens, G, E] -> mean over the G routing decisions.
    """
    experts = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1).mean(0)  # [G, E]
    share = (gates > 0).float().mean(0)  # [G, E]
    return experts * (probs * share).sum(-1).mean()


class MoELoRAModel(nn.Module):
    """A frozen Qwen2_5_VLForConditionalGeneration with MoE-LoRA on its language model's projections."""

    def __init__(self, hf_model, spec: MoESpec) -> None:
        super().__init__()
        self.hf, self.spec = hf_model, spec
        hf_model.requires_grad_(False)
        self.layers = hf_model.model.language_model.layers
        if len(self.layers) != spec.num_layers:
            raise ValueError(f"the MoE spec has {spec.num_layers} layers; the model has {len(self.layers)}")
        self.state = RoutingState()
        self.experts = nn.ModuleDict()
        self.routers = nn.ModuleDict()
        self._install_experts()
        self._install_routers()

    def _install_experts(self) -> None:
        spec = self.spec
        for layer, block in enumerate(self.layers):
            for proj in spec.target_modules:
                parent = block.mlp if proj in FFN_PROJECTIONS else block.self_attn
                module = MoELoRALinear(getattr(parent, proj), spec.num_experts, spec.rank, spec.scaling,
                                       (layer, GROUP_OF[proj]), self.state)
                setattr(parent, proj, module)
                self.experts[f"{layer}_{proj}"] = module

    def _projection(self, layer: int, proj: str) -> nn.Module:
        block = self.layers[layer]
        return getattr(block.mlp if proj in FFN_PROJECTIONS else block.self_attn, proj)

    def _install_routers(self) -> None:
        spec, n = self.spec, self.spec.num_experts
        hidden = self.hf.config.text_config.hidden_size
        if spec.routing == "pregated":
            self.routers["global"] = nn.Linear(hidden, spec.num_layers * n, bias=False)
            self._projection(0, SITE_INPUT["qkv"]).register_forward_pre_hook(self._route_pregated)
        for site in router_sites(spec.routing, spec.groups):
            for layer in range(spec.num_layers):
                module = self._projection(layer, SITE_INPUT[site])
                in_dim = module.base.in_features if isinstance(module, MoELoRALinear) else module.in_features
                self.routers[f"{layer}_{site}"] = nn.Linear(in_dim, n, bias=False)
                module.register_forward_pre_hook(self._site_hook(layer, site))
        for router in self.routers.values():
            nn.init.normal_(router.weight, std=0.02)

    def _route_pregated(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])  # [tokens, hidden]: layer 0's attention input
        logits = self.routers["global"](x.float()).view(x.shape[0], self.spec.num_layers, -1)  # [tokens, L, E]
        gates = dense_gates(logits, self.spec.top_k)
        self._record(logits, gates)
        for layer in range(self.spec.num_layers):
            for group in self.spec.groups:
                self.state.gates[(layer, group)] = gates[:, layer]

    def _site_hook(self, layer: int, site: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [tokens, in_dim]
            logits = self.routers[f"{layer}_{site}"](x.float())[:, None]  # [tokens, 1, E]
            gates = dense_gates(logits, self.spec.top_k)
            self._record(logits, gates)
            for group in self.spec.groups:
                if site_of(self.spec.routing, group) == site:
                    self.state.gates[(layer, group)] = gates[:, 0]

        return hook

    def _record(self, logits: torch.Tensor, gates: torch.Tensor) -> None:
        if self.state.track:
            self.state.balance.append(balance_loss(logits, gates))

    def forward(self, **inputs):
        self.state.clear()
        return self.hf(**inputs)

    def generate(self, **inputs):
        return self.hf.generate(**inputs)

    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing term of the last forward (0 when not tracked)."""
        if not self.state.balance:
            return torch.zeros(())
        return torch.stack(self.state.balance).mean()

    def trainable(self) -> list[nn.Parameter]:
        """Experts' A and B and the routers (the base model stays frozen)."""
        experts = [p for m in self.experts.values() for p in (m.lora_A, m.lora_B)]
        return experts + [r.weight for r in self.routers.values()]

    def init_random(self, seed: int, b_std: float = 0.0) -> None:
        """A like PEFT (Kaiming-uniform), B zero (or normal with ``b_std`` for tests), routers normal(0.02)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.experts.values():
                bound = 1.0 / math.sqrt(module.lora_A.shape[-1])
                module.lora_A.copy_(torch.rand(module.lora_A.shape, generator=gen) * 2 * bound - bound)
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * b_std)
            for router in self.routers.values():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.02)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the format's tensor names."""
        out: dict[str, torch.Tensor] = {}
        for layer in range(self.spec.num_layers):
            for proj in self.spec.target_modules:
                module = self.experts[f"{layer}_{proj}"]
                out[expert_key(layer, proj, "A")] = module.lora_A.detach()
                out[expert_key(layer, proj, "B")] = module.lora_B.detach()
        for name, router in self.routers.items():
            if name == "global":
                out[PREGATED_ROUTER] = router.weight.detach()
            else:
                layer, site = name.split("_", 1)
                out[router_key(int(layer), site)] = router.weight.detach()
        return out

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write adapter_config.json and adapter_model.safetensors in the MoE-LoRA format."""
        from safetensors.torch import save_file

        out = Path(folder)
        write_moe_config(out, self.spec)
        save_file({k: v.to(dtype).contiguous() for k, v in self.tensors().items()}, str(out / WEIGHTS_FILE))
        return out

    def load(self, folder: str | Path) -> None:
        """Load weights saved by ``save`` (the spec must match)."""
        from safetensors.torch import load_file

        tensors = load_file(str(Path(folder) / WEIGHTS_FILE))
        with torch.no_grad():
            for key, value in self.tensors().items():
                if key not in tensors:
                    raise ValueError(f"{folder}: tensor {key} is missing")
                value.copy_(tensors[key].float())

    @classmethod
    def from_folder(cls, hf_model, folder: str | Path) -> MoELoRAModel:
        model = cls(hf_model, read_moe_spec(folder))
        model.load(folder)
        return model
