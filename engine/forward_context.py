"""ForwardContext: the per-iteration state every layer of one forward pass reads."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.attention import AttentionMetadata
from engine.lora.delta import LayerDelta


@dataclass
class ForwardContext:
    """Attention layout of the batch, and the adapter updates (multi-LoRA, ...) its linears add."""

    attn: AttentionMetadata
    deltas: list[LayerDelta] = field(default_factory=list)
