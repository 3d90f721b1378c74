"""EngineConfig: the typed settings of the serving engine (composed into the root settings by pipeline.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.moe.config import MoEConfig


class EngineConfig(BaseModel):
    """Settings of one engine replica."""

    model_config = ConfigDict(extra="forbid")

    backend: Literal["valora", "hf"] = Field(
        "valora",
        description="Engine implementation: 'valora' (our runner, paged KV cache, multi-LoRA) "
        "or 'hf' (transformers + peft, one request at a time; the reference baseline).",
    )
    model: str = Field(
        "models/base",
        description="Hugging Face checkpoint directory of a Qwen2 / Qwen2.5-VL model, "
        "or 'dummy:<preset>' for the right architecture with random weights.",
    )
    adapters: str = Field("models/adapters", description="Directory of PEFT adapters, one sub-folder each.")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu' or 'cuda[:N]'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; 'auto' is bfloat16 on GPU and float32 on CPU."
    )
    max_num_seqs: int = Field(64, ge=1, le=1024, description="Most sequences running in one iteration.")
    max_num_batched_tokens: int = Field(
        2048, ge=16, description="Token budget of one iteration (prefill chunks + decode tokens)."
    )
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + output, in tokens.")
    kv_block_size: int = Field(16, ge=1, le=256, description="Tokens per paged KV-cache block.")
    kv_cache_blocks: int = Field(
        0, ge=0, description="KV-cache blocks to allocate; 0 sizes the cache from free memory."
    )
    gpu_memory_fraction: float = Field(
        0.85, gt=0.0, le=1.0, description="Share of GPU memory the engine may use (weights, KV, adapters)."
    )
    lora_slots: int = Field(32, ge=1, le=1024, description="Adapter slots in the device pool.")
    max_lora_rank: int = Field(64, ge=1, le=256, description="Largest adapter rank the pool accepts.")
    moe: MoEConfig = Field(
        default_factory=MoEConfig, description="MoE-LoRA adapters (LoRA-Switch): expert pool sizes and serving paths."
    )
    pinned_adapters: list[str] = Field(
        default_factory=list, description="Adapters kept resident in the device pool."
    )
    policy: Literal["valora", "slora", "dlora", "punica", "merged-only"] = Field(
        "valora", description="Orchestration policy choosing merged / unmerged / mixture per iteration."
    )
    slo_s: float = Field(
        10.0, gt=0.0, description="Latency SLO of requests without a deadline (deadline = created_at + slo_s); "
        "the valora policy never holds a request past it when the engine has room."
    )
    exact_unmerge: bool = Field(
        True, description="Keep a clean copy of the adapted base weights (one more copy of the language model's "
        "linears, allocated only for policies that merge) so that merges write base + ΔW and switching back "
        "restores the base bit-exactly; off, merges update the weights in place within a stated rounding bound."
    )
    cuda_graphs: bool = Field(
        True, description="On GPU, run decode iterations, prefill iterations (see prefill_graph_tokens) and picture "
        "encodes as CUDA-graph replays."
    )
    prefill_graph_tokens: int = Field(
        1024, ge=0, description="On GPU with cuda_graphs, iterations with prefill rows of up to this many tokens run "
        "as piecewise CUDA graphs (every layer but its attention, at a padded row count); 0 runs them eagerly."
    )
    overlap_decode: bool = Field(
        True, description="Queue the next decode step of an unchanged batch before reading the current step's "
        "tokens, so the host's per-step work overlaps the device's (tokens after a stop are dropped)."
    )
    precompile_kernels: bool = Field(
        True, description="On GPU, compile the multi-LoRA kernel variants that batches within the limits above can "
        "need at start-up (seconds per variant the first time; Triton's disk cache keeps them across restarts), "
        "instead of inside the first iteration that needs each."
    )
    precompile_workers: int | None = Field(
        None, ge=1, description="Threads that compile those variants at once (Triton's AsyncCompileMode; 1 compiles "
        "them one at a time); None: one per CPU core, up to 8."
    )
    compile_ops: bool = Field(
        True, description="torch.compile the element-wise ops (norms, RoPE, SwiGLU) on GPU; CPU stays eager."
    )
    row_linear: bool = Field(
        True, description="On GPU, projections of up to 16 rows (decode batches) use the Triton linear of "
        "kernels/fused_linear.py instead of cuBLAS (faster on an H200 for the 7B's shapes: bench/RESULTS.md, Engine, "
        "seventh and thirteenth sessions)."
    )
    lora_side_stream_rows: int = Field(
        16, ge=0, description="On GPU, adapted projections of up to this many rows that do not take the fused "
        "linear run their multi-LoRA update on a second CUDA stream while the base matmul streams its weight, and "
        "add it after (bench/RESULTS.md, Engine, sixteenth session); 0 runs the two one after the other."
    )
    attention: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Paged-attention path: 'triton' (GPU kernel, graph-capturable), 'torch' (gather + "
        "SDPA, any device); 'auto' picks triton on GPU and torch on CPU."
    )
    lora_backend: str = Field(
        "auto", description="kernels.backend registry name of the multi-LoRA op ('triton', 'torch', 'punica'); "
        "'auto' is triton on GPU, torch on CPU."
    )
    cpu_adapter_cache: int = Field(
        64, ge=1, description="Adapters kept in host memory (pinned on GPU machines) for fast reloads."
    )
    vision_cache_size: int = Field(256, ge=0, description="Encoded pictures kept in the vision cache.")
    engine_id: str = Field("", description="Name of this replica in results and health keys; default host:pid.")
    seed: int = Field(0, description="Seed for dummy weights and sampled decoding.")
