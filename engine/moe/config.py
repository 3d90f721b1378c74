"""MoEConfig: the engine settings of MoE-LoRA adapters (the expert pool and the serving paths)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MoEConfig(BaseModel):
    """Sizes of the device expert pool (fixed, so that CUDA graphs can capture the routed path) and path choice."""

    model_config = ConfigDict(extra="forbid")

    slots: int = Field(2, ge=1, le=64, description="MoE-LoRA adapters resident on the device at once.")
    max_experts: int = Field(8, ge=1, le=64, description="Most experts per adapted linear an adapter may have.")
    max_top_k: int = Field(2, ge=1, le=8, description="Most experts per token (top-k) an adapter may route to.")
    max_rank: int = Field(64, ge=1, le=256, description="Largest expert rank the pool accepts.")
    merge_switch: bool = Field(
        False, description="Serve the decode of a lone pre-gated MoE-LoRA sequence by merging its experts into the "
        "backbone with the fused switch (LoRA-Switch); otherwise every step uses the routed unmerged path. Off by "
        "default: on an H200 (7B, 8 experts of rank 64, every layer's selection changing each token) a switching "
        "step measured 45.8 ms against 5.5 ms routed, 1.12x the backbone (bench/RESULTS.md, LoRA-Switch). Turn it on "
        "where selections rarely change: the switch skips every layer whose selection did not change, so such a "
        "step moves no weights.",
    )
