"""MoE-LoRA adapters (LoRA-Switch token-wise pre-gating and the per-layer / block-wise baselines) in the engine."""
