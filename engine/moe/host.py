"""HostMoE: a MoE-LoRA adapter's experts and routers read from disk, validated and laid out for the expert pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.adapter_store import AdapterError, read_weights
from engine.lora.layout import LoRALayout
from engine.moe.spec import (
    GROUP_OF,
    PREGATED_ROUTER,
    MoESpec,
    expert_key,
    router_key,
    router_sites,
)

RouterKey = tuple[int, str]  # (layer, site group); (-1, "global") for the pregated router


@dataclass
class HostMoE:
    """One MoE-LoRA adapter in host memory.

    ``a[group]``: [layers, experts, n_slices, rank, in_dim]; ``b[group]``: [layers, experts, out_total, rank];
    groups the adapter does not target are absent. ``routers[key]``: [outputs, in_dim] with outputs =
    layers * experts for the pregated router (key (-1, "global")), experts otherwise; routers are kept in fp32.
    """

    spec: MoESpec
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    routers: dict[RouterKey, torch.Tensor]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        tensors = [*self.a.values(), *self.b.values(), *self.routers.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def _take(spec: MoESpec, tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise AdapterError(f"MoE adapter {spec.name!r}: tensor {key} is missing")
    tensor = tensors.pop(key)
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"MoE adapter {spec.name!r}: {key} has shape {tuple(tensor.shape)}; the model needs "
                           f"{list(shape)}")
    return tensor


def read_host_moe(spec: MoESpec, layout: LoRALayout, hidden_size: int, dtype: torch.dtype,
                  pin: bool) -> HostMoE:
    """Read ``spec``'s weights; AdapterError for a corrupt file, a missing tensor or shapes that do not fit."""
    if spec.num_layers != layout.num_layers:
        raise AdapterError(f"MoE adapter {spec.name!r} has {spec.num_layers} layers; the model has "
                           f"{layout.num_layers}")
    tensors = read_weights(spec.path, f"MoE adapter {spec.name!r}")
    n, r = spec.num_experts, spec.rank
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for proj in spec.target_modules:
        group = GROUP_OF[proj]
        in_dim, widths = layout.groups[group]
        index = layout.projections[group].index(proj)
        lo, width = sum(widths[:index]), widths[index]
        if group not in a:
            a[group] = torch.zeros(layout.num_layers, n, len(widths), r, in_dim, dtype=dtype)
            b[group] = torch.zeros(layout.num_layers, n, sum(widths), r, dtype=dtype)
        for layer in range(layout.num_layers):
            a[group][layer, :, index] = _take(spec, tensors, expert_key(layer, proj, "A"), (n, r, in_dim))
            b[group][layer, :, lo:lo + width] = _take(spec, tensors, expert_key(layer, proj, "B"), (n, width, r))
    routers: dict[RouterKey, torch.Tensor] = {}
    if spec.routing == "pregated":
        routers[(-1, "global")] = _take(spec, tensors, PREGATED_ROUTER, (layout.num_layers * n, hidden_size))
    for site in router_sites(spec.routing, spec.groups):
        in_dim = layout.groups[site][0]
        for layer in range(layout.num_layers):
            routers[(layer, site)] = _take(spec, tensors, router_key(layer, site), (n, in_dim))
    if tensors:
        extra = ", ".join(sorted(tensors)[:3]) + (", ..." if len(tensors) > 3 else "")
        raise AdapterError(f"MoE adapter {spec.name!r}: unexpected tensors ({extra})")
    routers = {k: v.float() for k, v in routers.items()}  # gating runs in fp32 on every device
    if pin:
        a = {g: t.pin_memory() for g, t in a.items()}
        b = {g: t.pin_memory() for g, t in b.items()}
        routers = {k: t.pin_memory() for k, t in routers.items()}
    return HostMoE(spec, a, b, routers)
