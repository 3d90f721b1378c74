"""Triton kernels for multi-LoRA serving, each beside a pure-torch reference (imports only torch and triton)."""
