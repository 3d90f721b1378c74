"""The project's own tiny Qwen2.5-VL-architecture model: tokenizer, configuration, checkpoint files, training."""
