"""ModelRunner: owns the model, KV cache, vision cache and graphs; runs one scheduled iteration on the device."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.config import EngineConfig
from engine.cuda_graph import GraphRunner
from engine.forward_context import ForwardContext
from engine.heads import TaskHead
from engine.kv_cache import KVCache
from engine.model.checkpoint import Checkpoint
from engine.model.layers import FusedOps
from engine.model.loader import init_dummy, load_weights
from engine.model.qwen2 import Qwen2LM
from engine.model.vision import VisionTower
from engine.model_input import HostStaging, ModelInput, build_model_input
from engine.moe.adapters import AdapterManager
from engine.moe.manager import MoEPlan
from engine.prefill_graph import PrefillGraphs
from engine.sampler import Sampler
from engine.scheduler import ScheduleOutput
from engine.sequence import Sequence
from engine.vision_cache import VisionCache

logger = logging.getLogger(__name__)


@dataclass
class RunOutput:
    """What one iteration produced, by sequence id."""

    tokens: dict[int, int] = field(default_factory=dict)
    head_outputs: dict[int, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Launch:
    """An iteration queued on the device; its sampled tokens are read by ``ModelRunner.collect``."""

    sched: ScheduleOutput
    sample_seqs: list[Sequence]
    tokens: torch.Tensor | None  # [n] int64 on the device, in sample_seqs order (the next step's inputs)
    host_tokens: torch.Tensor | None  # the same, copied to the host behind the device's work
    copied: torch.cuda.Event | None  # recorded after that copy (CUDA only)
    head_outputs: dict[int, dict[str, Any]]
    decode_only: bool  # one sampled decode row per chunk, no task head, no MoE-LoRA row: the next can follow
    launched_at: float  # when the launch began (host clock)


def build_model(checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, seed: int,
                compiled: bool, graphs: bool = True,
                row_linear: bool = False, side_stream_rows: int = 0) -> tuple[Qwen2LM, VisionTower | None]:
    """Our decoder (and transformers' vision tower) with the checkpoint's weights, or seeded random ones.

    ``graphs``: the vision tower replays CUDA graphs of its encodes (GPU only). ``row_linear``: projections of up to 16
    rows take the Triton linear (``FusedOps.linear``; GPU only). ``side_stream_rows``: projections of up to this many
    rows run their adapter update on a side stream (``FusedOps.linear_beside``; GPU only)."""
    spec = checkpoint.spec
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            on_gpu = device.type == "cuda"
            lm = Qwen2LM(spec, FusedOps(compiled, row_linear and on_gpu, side_stream_rows if on_gpu else 0)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    lm.requires_grad_(False)
    vision = VisionTower(spec, checkpoint.image_processor, device, dtype, cuda_graphs=graphs) if spec.has_vision \
        else None
    if checkpoint.is_dummy:
        init_dummy(lm, seed)
        if vision is not None:
            init_dummy(vision.module, seed + 1)
    else:
        vision_weights = load_weights(lm, checkpoint.tensors(device))
        if vision is not None:
            vision.load_state_dict(vision_weights)
    return lm, vision


class ModelRunner:
    """Turns a ScheduleOutput into hidden states, sampled tokens and task-head answers."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, lora: AdapterManager, model: Qwen2LM,
                 vision: VisionTower | None, heads: dict[str, TaskHead], device: torch.device) -> None:
        self.config, self.lora, self.model, self.heads, self.device = config, lora, model, heads, device
        self.vision_cache = VisionCache(vision, config.vision_cache_size) if vision is not None else None
        self.kv = KVCache(checkpoint.spec, config, device, next(model.parameters()).dtype)
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv.layer(i)
        self.use_triton = self._attention_path(config.attention, device)
        self.sampler = Sampler(config.seed)
        self.staging = HostStaging(device)
        self.graphs = None
        if device.type == "cuda" and config.cuda_graphs and self.use_triton:
            max_blocks = -(-config.max_model_len // self.kv.block_size)
            self.graphs = GraphRunner(model, lora, config.max_num_seqs, max_blocks, device)
        self.prefill_graphs = None
        if self.graphs is not None and config.prefill_graph_tokens:
            self.prefill_graphs = PrefillGraphs(model, lora, config.prefill_graph_tokens, config.max_num_seqs, device,
                                                use_triton=True)

    @staticmethod
    def _attention_path(choice: str, device: torch.device) -> bool:
        if choice == "triton" and device.type != "cuda":
            raise ValueError("attention='triton' needs a CUDA device")
        return choice == "triton" or (choice == "auto" and device.type == "cuda")

    def collect(self, launch: Launch) -> RunOutput:
        """Wait for ``launch``'s tokens (the host copy only, not later work queued behind it)."""
        if launch.copied is not None:
            launch.copied.synchronize()
        ids = launch.host_tokens.tolist() if launch.host_tokens is not None else []
        return RunOutput(tokens={seq.seq_id: tok for seq, tok in zip(launch.sample_seqs, ids, strict=True)},
                         head_outputs=launch.head_outputs)

    @torch.inference_mode()
    def launch(self, sched: ScheduleOutput, feed: Launch | None = None) -> Launch:
        """Queue the scheduled chunks on the weights as the orchestrator left them (``lora.merge_state``).

        ``feed``: the previous launch, still in flight, whose sampled tokens are this step's inputs. Then every
        chunk is one decode row of the same sequences in the same order, and nothing here waits for the device.
        """
        started = time.perf_counter()
        if sched.merged_adapter != self.lora.merge_state.merged:
            raise ValueError(f"schedule expects {sched.merged_adapter!r} merged, the weights hold "
                             f"{self.lora.merge_state.merged!r}")
        pending = [c.seq for c in sched.chunks if any(img.embeds is None for img in c.seq.images)]
        if pending and self.vision_cache is not None:
            self.vision_cache.encode(pending, self.lora.vision_lora)
        fed_ids = None if feed is None else feed.tokens
        inp = build_model_input(sched, self.kv.block_size, self.lora.pool.slot_of, self.device, self.use_triton,
                                fed_ids, self.staging if feed is not None else None)
        moe = self.lora.moe_plan(sched.chunks, inp.num_tokens, sched.is_decode)
        hidden = self._forward(inp, sched.is_decode, moe)
        tokens = host = copied = None
        if inp.sample_rows:
            rows = inp.sample_rows
            # Decode samples every row: a slice, not a host index list (whose copy to the device waits for the GPU).
            picked = hidden[rows[0]:rows[-1] + 1] if rows == list(range(rows[0], rows[0] + len(rows))) else hidden[rows]
            tokens = self.sampler.sample(self.model.compute_logits(picked), inp.sample_seqs)
            host = tokens
            if self.device.type == "cuda":
                host = tokens.to("cpu", non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
        # A copy: a piecewise prefill's hidden states are a view of a static buffer that the next prefill overwrites,
        # and a head may keep what it reads (one that returns its input on CPU answers with that very view).
        heads = {seq.seq_id: seq.head.answer(hidden[rows].clone()) for seq, rows in inp.head_rows}
        decode_only = (sched.is_decode and not heads and moe.path == "none"
                       and len(inp.sample_seqs) == len(sched.chunks))
        return Launch(sched, inp.sample_seqs, tokens, host, copied, heads, decode_only, started)

    def _forward(self, inp: ModelInput, is_decode: bool, moe: MoEPlan) -> torch.Tensor:
        """hidden states [T, hidden] of every scheduled row.

        Rows of the merged adapter need no LoRA work; while one is merged every other row gets its mixture terms.
        MoE-LoRA rows (no plain adapter) add the deltas of ``moe``.
        """
        terms = self.lora.num_terms(inp.lora_rows, inp.num_tokens)
        if is_decode and self.graphs is not None and self.graphs.can_run(inp.num_tokens, terms, moe):
            return self.graphs.run(inp, terms, moe)
        prefill = self.prefill_graphs
        if not is_decode and prefill is not None and prefill.can_run(inp.num_tokens, terms, moe):
            hidden = prefill.run(inp, terms, self.staging)
            if hidden is not None:
                return hidden
        delta = self.lora.build_delta(inp.lora_rows, inp.num_tokens)
        ctx = ForwardContext(inp.attn, ([delta] if delta is not None else []) + self.lora.moe.build_deltas(moe))
        embeds = None
        if inp.image_rows is not None:
            embeds = self.model.embed_tokens(inp.input_ids)
            embeds[inp.image_rows] = inp.image_embeds.to(embeds.dtype)
        return self.model(inp.input_ids, inp.positions, ctx, embeds)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kv_blocks_total": self.kv.num_blocks - 1, "kv_block_size": self.kv.block_size,
                               "attention": "triton" if self.use_triton else "torch",
                               "cuda_graphs": self.graphs is not None,
                               "prefill_graph_pieces": 0 if self.prefill_graphs is None or self.prefill_graphs.failed
                               else sum(len(pieces) for pieces in self.prefill_graphs.graphs.values())}
        if self.vision_cache is not None:
            out.update(self.vision_cache.stats())
        return out
