"""The `valora` backend: our Qwen2.5-VL runner, paged KV cache, continuous batching and multi-LoRA slot pool."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

import torch

from engine.adapter_store import AdapterStore
from engine.base import EngineBackend, TokenCallback, error_result, register_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.device import resolve_device, resolve_dtype
from engine.heads import TaskHead
from engine.intake import RequestIntake
from engine.lora.layout import LoRALayout
from engine.lora.ops import resolve_backend_name
from engine.model.checkpoint import Checkpoint
from engine.model.qwen2 import LORA_GROUPS
from engine.model_runner import Launch, ModelRunner, build_model
from engine.moe.adapters import AdapterManager
from engine.orchestrator.orchestrator import Orchestrator
from engine.orchestrator.switcher import WeightSwitcher
from engine.output_processor import OutputProcessor
from engine.policy import ModeDecision, policy_class
from engine.request import EngineRequest, EngineResult
from engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@register_backend("valora")
class ValoraEngine(EngineBackend):
    """In-process engine: ``add_request`` queues, ``step`` runs one iteration (schedule -> run -> postprocess).

    The orchestrator (``self.orchestrator``) decides each iteration's mode and merged adapter through the
    configured policy and switches the base weights with one swift-merge launch; ``merge_state`` is the
    engine-wide record of what the weights hold.
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.engine_id = config.engine_id or f"{socket.gethostname()}:{os.getpid()}"
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._init_model()
        self._init_lora()
        self._init_runner()
        self._init_scheduler()
        self._precompile()
        self.mode, self.steps = "unmerged", 0
        self._ready: list[EngineResult] = []
        self._inflight: Launch | None = None  # launched, tokens not read yet
        self._decision: tuple[ModeDecision, int] | None = None  # made while following, kept for the next schedule
        self.overlap = self.config.overlap_decode  # overlapped decode (``step``); may be changed between steps
        self._collected_at = 0.0
        logger.info("engine %s ready: %s on %s (%s)", self.engine_id, self.config.model, self.device, self.dtype)

    def _precompile(self) -> None:
        """Compile the multi-LoRA kernel variants this engine's batches can need before serving (GPU only)."""
        self.precompiled = (0, 0.0)
        if self.device.type != "cuda" or not self.config.precompile_kernels:
            return
        from kernels.launch import compile_ahead

        cfg, graphs = self.config, self.runner.graphs
        static = [(size, cfg.max_lora_rank) for size in graphs.sizes] if graphs is not None else []
        experts = self.lora.moe.pool  # allocated at start-up when the adapters directory holds MoE-LoRA adapters

        def walk() -> int:
            plain = self.lora.op.precompile(
                self.lora.pool.all_weights(), max_tokens=cfg.max_num_batched_tokens,
                max_segments=min(cfg.lora_slots + 1, cfg.max_num_seqs), static=static)
            routed = self.lora.op.precompile_routed(
                experts.all_weights(), max_tokens=cfg.max_num_batched_tokens,
                experts=experts.num_slots * experts.experts, top_k=experts.top_k, max_rank=experts.max_rank)
            return plain[0] + routed[0] + self._precompile_linears()[0]

        start = time.perf_counter()
        launched = compile_ahead(walk, cfg.precompile_workers)  # variants compiled in threads, then launched once
        self.precompiled = (launched, time.perf_counter() - start)
        logger.info("engine %s: %d multi-LoRA kernel variants ready in %.1f s", self.engine_id, *self.precompiled)
        prefill = self.runner.prefill_graphs
        if prefill is not None:
            start = time.perf_counter()
            # mixture's two-term pieces only where the policy merges (another policy's are captured on use)
            count = prefill.capture_all((0, 1, 2) if policy_class(self.config.policy).merges else (0, 1))
            logger.info("engine %s: %d prefill graph pieces captured in %.1f s", self.engine_id, count,
                        time.perf_counter() - start)

    def _precompile_linears(self) -> tuple[int, float]:
        """The fused decode linear's variants (kernels/fused_linear.py): the base linear (``row_linear``), the routed
        MoE projections up to the backend's ``fused_rows`` rows and plain multi-LoRA batches up to the manager's
        ``fused_rows``."""
        from engine.lora.batch import routed_segments
        from kernels.precompile import routed_cases

        op, cfg, experts, graphs = self.lora.op, self.config, self.lora.moe.pool, self.runner.graphs
        layer0 = [(key, m) for key, m in self.model.adapted_linears().items() if key[0] == 0]
        runs = []
        if self.model.layers[0].mlp.ops.row_linear:
            runs.append(([(m.weight, m.bias, None) for _, m in layer0], []))
        if op.fused_rows and experts.allocated:
            runs.append(([(m.weight, m.bias, experts.weights(key)) for key, m in layer0],
                         routed_cases(op.fused_rows, experts.num_slots * experts.experts, experts.top_k,
                                      experts.max_rank)))
        rows = self.lora.fused_rows
        if rows and cfg.lora_slots:
            terms = (1, 2) if policy_class(cfg.policy).merges else (1,)
            static = [(size, size) for size in (graphs.sizes if graphs is not None else ()) if size <= rows]
            prefill = self.runner.prefill_graphs
            if prefill is not None:
                static += [(size, min(size, cfg.max_num_seqs + 1)) for size in prefill.sizes if size <= rows]
            # eager batches pad their terms (engine/lora/batch.py, routed_segments); graph buckets hold their own
            shapes = [(n, routed_segments(n)) for n in range(1, rows + 1)] + static
            cases = sorted({(n, segments * k, k, cfg.max_lora_rank) for n, segments in shapes for k in terms})
            runs.append(([(m.weight, m.bias, self.lora.pool.weights(key)) for key, m in layer0], cases))
        done = [op.precompile_linears(linears, cases) for linears, cases in runs]
        return sum(n for n, _ in done), sum(t for _, t in done)

    def _init_model(self) -> None:
        self.checkpoint = Checkpoint(self.config.model)
        compiled = self.device.type == "cuda" and self.config.compile_ops
        self.model, self.vision = build_model(self.checkpoint, self.device, self.dtype, self.config.seed, compiled,
                                              self.config.cuda_graphs, self.config.row_linear,
                                              self.config.lora_side_stream_rows)
        self.model.layers[0].mlp.ops.check(self.device, self.dtype)

    def _init_lora(self) -> None:
        layout = LoRALayout(self.checkpoint.spec.num_layers, self.model.lora_group_shapes(), LORA_GROUPS,
                            self.config.max_lora_rank)
        self.lora = AdapterManager(AdapterStore(self.config.adapters), layout, self.config.lora_slots,
                                   self.config.cpu_adapter_cache, self._lora_backend(self.config.policy),
                                   self.device, self.dtype, self.config.pinned_adapters, moe=self.config.moe,
                                   hidden_size=self.checkpoint.spec.hidden_size, linears=self.model.adapted_linears())
        self.lora.side_stream_rows = self.model.layers[0].mlp.ops.side_stream_rows
        self.merge_state = self.lora.merge_state
        # Before the KV cache is sized from free memory: the clean weight copies are part of the model's share.
        copy = self.config.exact_unmerge and policy_class(self.config.policy).merges
        self.switcher = WeightSwitcher(self.model.adapted_linears(), self.lora.pool, self.lora.op, copy)
        if self.switcher.base_copy:  # MoE-LoRA's merge-switch then leaves the weights bit-exact too
            self.lora.moe.switch.restore = lambda: self.switcher.op.swift_merge(self.switcher.plan)

    def _lora_backend(self, policy: str) -> str:
        """The configured multi-LoRA backend, unless 'auto' and the policy is defined by one (punica, on GPU)."""
        wanted = policy_class(policy).lora_backend
        if self.config.lora_backend != "auto" or wanted is None:
            return self.config.lora_backend
        if self.device.type != "cuda":
            logger.warning("policy %r runs the %r kernels on GPU only; the CPU uses the torch backend", policy, wanted)
            return "auto"
        return wanted

    def _init_runner(self) -> None:
        self.runner = ModelRunner(self.config, self.checkpoint, self.lora, self.model, self.vision, self.heads,
                                  self.device)

    def _init_scheduler(self) -> None:
        cfg = self.config
        self.orchestrator = Orchestrator(cfg.policy, self.lora, self.model.adapted_linears(), self.switcher,
                                         cfg.slo_s, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                         graphs=self.runner.graphs is not None,
                                         prefill_graphs=self.runner.prefill_graphs is not None)
        blocks = BlockManager(self.runner.kv.num_blocks, self.runner.kv.block_size)
        self.scheduler = Scheduler(blocks, self.lora, self.orchestrator, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.intake = RequestIntake(self.checkpoint.spec, self.checkpoint.tokenizer, self.lora,
                                    self.runner.vision_cache, self.heads, self.config.max_model_len,
                                    blocks.capacity_tokens, self.config.max_num_batched_tokens)
        self.outputs = OutputProcessor(self.scheduler, Detokenizer(self.checkpoint.tokenizer, self.checkpoint.eos_ids),
                                       self.runner.sampler, self.engine_id)

    def register_head(self, name: str, head: TaskHead) -> None:
        super().register_head(name, head.to(self.device).eval())

    def add_request(self, request: EngineRequest, on_token: TokenCallback | None = None) -> None:
        try:
            seq = self.intake.make(request, on_token)
        except ValueError as exc:  # AdapterError, ImageDecodeError and PromptTooLongError are ValueErrors
            self._ready.append(error_result(request, str(exc), self.engine_id))
            return
        if seq.max_tokens == 0 and seq.head is None:
            seq.finish_reason = "length"
            self._ready.append(self.outputs.finish(seq))
            return
        self.scheduler.add(seq)

    def step(self) -> list[EngineResult]:
        """One iteration: schedule it, run it and apply its tokens; or, overlapped, read the queued one's tokens.

        With overlapped decode (``overlap``), a launched decode step stays in flight until the next call. That
        call first decides the next iteration's mode and, when nothing would change the batch
        (``Scheduler.can_continue``, no waiting request the decision admits), queues the next decode step of the
        same batch (its inputs are the in-flight step's tokens, still on the device); then it reads and applies
        the in-flight step's tokens, so the host's bookkeeping runs while the device computes. A sequence that
        stops at a step has already been given one more overlapped step; that token is dropped. Otherwise the
        decision is kept for the next call's schedule: one decision per iteration either way.
        """
        if self._inflight is not None:
            current, self._inflight = self._inflight, None
            self._inflight = self._follow(current)
            return self._complete(current)
        kept, self._decision = self._decision, None
        sched = self.scheduler.schedule(kept[0] if kept and kept[1] == self.scheduler.num_added else None)
        if sched.chunks:
            launch = self.runner.launch(sched)
            if not (launch.decode_only and self.overlap):
                return self._complete(launch)
            self._inflight = launch
            return []
        self.mode, self.steps = sched.mode, self.steps + 1
        ready, self._ready = self._ready, []
        return ready + self.outputs.process(sched, None)

    def _follow(self, current: Launch) -> Launch | None:
        """Queue the decode step after ``current`` if its batch goes on unchanged (see ``step``)."""
        seqs = [chunk.seq for chunk in current.sched.chunks]
        if not (current.decode_only and self.overlap and self.scheduler.can_continue(seqs)):
            return None
        decision = self.orchestrator.decide(self.scheduler.running, self.scheduler.waiting)
        if ((decision.mode, decision.merged_adapter) != (current.sched.mode, current.sched.merged_adapter)
                or not all(decision.admits(s) for s in seqs) or self.scheduler.admits_waiting(decision)):
            # A switch (already applied), a hold or an admission: the next call schedules in full under this
            # decision, unless a request arrives before it (a merged decision must hold every other group).
            self._decision = (decision, self.scheduler.num_added)
            return None
        return self.runner.launch(self.scheduler.continue_decode(seqs, decision), feed=current)

    def _complete(self, launch: Launch) -> list[EngineResult]:
        out = self.runner.collect(launch)
        now = time.perf_counter()
        self.orchestrator.observe(launch.sched.chunks, now - max(launch.launched_at, self._collected_at),
                                  launch.sched.mode)
        self._collected_at = now
        self.mode, self.steps = launch.sched.mode, self.steps + 1
        ready, self._ready = self._ready, []
        return ready + self.outputs.process(launch.sched, out)

    def set_policy(self, name: str) -> None:
        """Serve with policy ``name`` from now on (between requests): the weights go back to the base first."""
        if self.has_unfinished():
            raise ValueError("the policy can only change while no request is in the engine")
        self.orchestrator.switch_to(None)
        backend = self._lora_backend(name)
        if resolve_backend_name(backend, self.device) != resolve_backend_name(self.lora.op.name, self.device):
            self.lora.set_backend(backend)  # decode graphs are kept per backend
        self.orchestrator.set_policy(name)
        self.mode = "unmerged"

    @property
    def merged_adapter(self) -> str | None:
        return self.merge_state.merged

    def has_unfinished(self) -> bool:
        return bool(self._ready) or self._inflight is not None or self.scheduler.has_unfinished()

    def health(self) -> dict[str, Any]:
        return {
            "ready": True, "backend": "valora", "engine_id": self.engine_id, "model": self.config.model,
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "mode": self.mode, "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
            "steps": self.steps, "preemptions": self.scheduler.num_preemptions,
            "kv_blocks_free": self.scheduler.blocks.num_free, "precompiled_variants": self.precompiled[0],
            **self.orchestrator.stats(), **self.runner.stats(), **self.lora.stats(),
        }

    def close(self) -> None:
        self.lora.close()
        super().close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
