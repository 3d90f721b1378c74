"""MoE-LoRA adapters on the tiny Qwen2.5-VL model: pre-gated (LoRA-Switch), per-layer and block-wise routing."""
