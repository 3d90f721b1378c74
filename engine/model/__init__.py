"""Our Qwen2 / Qwen2.5-VL model: spec, checkpoint reading, decoder layers, M-RoPE and the reused vision tower."""
