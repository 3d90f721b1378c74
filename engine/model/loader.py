"""Filling our decoder (and the vision tower) from a checkpoint's tensors, or with seeded random weights."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch

from engine.model.qwen2 import Qwen2LM

logger = logging.getLogger(__name__)

_VISION_PREFIXES = ("model.visual.", "visual.")
_LM_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_FUSED = {  # checkpoint projection -> (our fused module, slice index)
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(self_attn\.[qkv]_proj|mlp\.(?:gate|up)_proj)\.(weight|bias)$")


def split_name(name: str) -> tuple[str, str]:
    """('vision' | 'lm' | 'other', name inside that part) for a checkpoint tensor name (4.x or 5.x layout)."""
    for prefix in _VISION_PREFIXES:
        if name.startswith(prefix):
            return "vision", name[len(prefix):]
    if name.startswith("lm_head."):
        return "lm", name
    for prefix in _LM_PREFIXES:
        if name.startswith(prefix):
            return "lm", name[len(prefix):]
    return "other", name


def load_weights(lm: Qwen2LM, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Copy the language model's tensors into ``lm`` (fusing q/k/v and gate/up); return the vision tower's."""
    params = dict(lm.named_parameters())
    missing = set(params)
    vision: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in tensors:
            part, local = split_name(name)
            if part == "vision":
                vision[local] = tensor
                continue
            if part == "other" or local.endswith("rotary_emb.inv_freq"):
                logger.debug("ignoring checkpoint tensor %s", name)
                continue
            target, index = _fused_target(local)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in the model (as {target})")
            param = params[target]
            if index is None:
                dest = param
            else:
                owner = lm.get_submodule(target.rsplit(".", 1)[0])
                lo, hi = owner.slice_bounds[index], owner.slice_bounds[index + 1]
                dest = param[lo:hi]
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(dest.shape)}")
            dest.copy_(tensor)
            missing.discard(target)
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return vision


def _fused_target(local: str) -> tuple[str, int | None]:
    """Our parameter name (and slice) for a checkpoint-local name like ``layers.3.self_attn.k_proj.bias``."""
    match = _LAYER_KEY.match(local)
    if match is None:
        return local, None
    layer, proj, kind = match.groups()
    module, index = _FUSED[proj]
    return f"layers.{layer}.{module}.{kind}", index


def init_dummy(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights with the right shapes: norms at one, vision biases at zero, the rest N(0, std²)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
                param.fill_(1.0)
            elif name.endswith("bias") and not isinstance(module, Qwen2LM):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
