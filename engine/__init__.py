"""The LMM serving engine: model runner, paged KV cache, LoRA manager, scheduler and orchestrator.

Imports neither redis nor streamlit, so it runs wherever only the ML stack is installed.
"""
