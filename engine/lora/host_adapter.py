"""HostAdapter: a PEFT LoRA adapter read, validated against the model, and laid out for the slot pool."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from engine.adapter_store import WEIGHTS_FILE, AdapterError, AdapterSpec, read_weights
from engine.lora.layout import LoRALayout
from engine.model.vision import VisionLoRA

_LM_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")
_VISION_KEY = re.compile(r"(?:^|\.)visual\.(.+)\.lora_([AB])\.weight$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class HostAdapter:
    """One adapter in host memory (pinned on GPU machines), padded to its own largest rank.

    ``a[group]``: [layers, n_slices, rank, in_dim]; ``b[group]``: [layers, out_total, rank]; a group the adapter
    does not target is absent. Per-module scaling (alpha_pattern / rank_pattern) is folded into B relative
    to ``scale``, so one scale per adapter holds for every projection.
    """

    name: str
    rank: int
    scale: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    vision: VisionLoRA | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: an exact module name, else a regex matched at a dotted suffix."""
    if module in patterns:
        return patterns[module]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _pairs(spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {'A': lora_A, 'B': lora_B}; rejects tensors this engine cannot serve."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.match(r"(.+)\.lora_([AB])\.weight$", key)
        if match is None:
            raise AdapterError(f"adapter {spec.name!r}: tensor {key!r} is not a LoRA A/B matrix "
                               "(DoRA, LoRA biases, embeddings and modules_to_save are not served)")
        module = match.group(1).removeprefix(_PEFT_PREFIX)
        pairs.setdefault(module, {})[match.group(2)] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"adapter {spec.name!r}: module {module} lacks lora_{'A' if 'A' not in pair else 'B'}")
    return pairs


def read_host_adapter(spec: AdapterSpec, layout: LoRALayout, dtype: torch.dtype, pin: bool) -> HostAdapter:
    """Read ``spec``'s weights; raises AdapterError for a corrupt file or shapes that do not fit the model."""
    pairs = _pairs(spec, read_weights(spec.path, f"adapter {spec.name!r}"))
    lm: list[tuple[int, str, int, torch.Tensor, torch.Tensor, float]] = []
    vision: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise AdapterError(f"adapter {spec.name!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}, which do not form a rank-r pair")
        if rank > layout.max_rank:
            raise AdapterError(f"adapter {spec.name!r}: {module} has rank {rank}, over the pool's "
                               f"max_lora_rank {layout.max_rank}")
        alpha = _pattern_value(spec.alpha_pattern, module, spec.alpha)
        scale = alpha / (math.sqrt(rank) if spec.use_rslora else rank)
        if (vm := _VISION_KEY.search(module + ".lora_A.weight")) is not None:
            vision[vm.group(1)] = (a, b, scale)
            continue
        if (lm_match := _LM_KEY.search(module + ".lora_A.weight")) is None:
            raise AdapterError(f"adapter {spec.name!r}: module {module} is not a language-model projection "
                               "or vision-tower linear this engine adapts")
        layer, proj = int(lm_match.group(1)), lm_match.group(2)
        lm.append((layer, proj, rank, a, b, scale))
    if not lm and not vision:
        raise AdapterError(f"adapter {spec.name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    return _assemble(spec, layout, lm, vision, dtype, pin)


def _assemble(spec: AdapterSpec, layout: LoRALayout, lm, vision, dtype: torch.dtype, pin: bool) -> HostAdapter:
    rank = max((r for _, _, r, _, _, _ in lm), default=0)
    seg_scale = spec.scaling
    a_out: dict[str, torch.Tensor] = {}
    b_out: dict[str, torch.Tensor] = {}
    for layer, proj, r, a, b, scale in lm:
        if layer >= layout.num_layers:
            raise AdapterError(f"adapter {spec.name!r}: layer {layer} does not exist "
                               f"(the model has {layout.num_layers})")
        try:
            group, index = layout.slice_of(proj)
        except KeyError:
            raise AdapterError(f"adapter {spec.name!r}: projection {proj} is not adaptable") from None
        in_dim, widths = layout.groups[group]
        if a.shape[1] != in_dim or b.shape[0] != widths[index]:
            raise AdapterError(f"adapter {spec.name!r}: layers.{layer}.{proj} has lora_A {tuple(a.shape)} and "
                               f"lora_B {tuple(b.shape)}; the model needs [r, {in_dim}] and [{widths[index]}, r]")
        if group not in a_out:
            a_out[group] = torch.zeros(layout.num_layers, len(widths), rank, in_dim, dtype=dtype)
            b_out[group] = torch.zeros(layout.num_layers, sum(widths), rank, dtype=dtype)
        lo = sum(widths[:index])
        a_out[group][layer, index, :r] = a.to(dtype)
        b_part = b if scale == seg_scale else b * (scale / seg_scale)
        b_out[group][layer, lo:lo + widths[index], :r] = b_part.to(dtype)
    if pin:
        a_out = {g: t.pin_memory() for g, t in a_out.items()}
        b_out = {g: t.pin_memory() for g, t in b_out.items()}
    vis = VisionLoRA(spec.name, vision) if vision else None
    return HostAdapter(spec.name, rank, seg_scale, a_out, b_out, vis)
