"""Multi-LoRA serving: PEFT adapter reading, the device slot pool, per-iteration batches and the add-LoRA op."""
