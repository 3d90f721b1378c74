"""LoRAManager: adapter names -> host copies (loaded ahead in a thread) -> device slots -> each iteration's delta."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from engine.adapter_store import AdapterError, AdapterSpec, AdapterStore
from engine.lora.batch import LoRARows, MultiLoRADelta, build_lora_batch
from engine.lora.host_adapter import HostAdapter, read_host_adapter
from engine.lora.layout import LoRALayout
from engine.lora.ops import AddLoRAOp, graph_safe, resolve_lora_op
from engine.lora.pool import AdapterPool
from engine.model.vision import VisionLoRA
from engine.orchestrator.state import MergeState
from engine.slots import HostLoader, SlotStatus

logger = logging.getLogger(__name__)


__all__ = ["LoRAManager", "SlotStatus"]


class LoRAManager(HostLoader[HostAdapter]):
    """Owns the adapter pool, the host cache (pinned CPU memory on GPU) and the background loader."""

    def __init__(self, store: AdapterStore, layout: LoRALayout, slots: int, host_capacity: int,
                 backend: str, device: torch.device, dtype: torch.dtype, pinned: Sequence[str] = ()) -> None:
        super().__init__(max(host_capacity, len(pinned)), "adapter-load", pin_memory=device.type == "cuda")
        self.store, self.layout, self.device, self.dtype = store, layout, device, dtype
        self.pool = AdapterPool(layout, slots, device, dtype)
        self.side_stream_rows = 0  # the model's FusedOps.side_stream_rows (the engine sets it)
        self.set_backend(backend)
        self.merge_state = MergeState()  # the adapter folded into the base weights (the orchestrator's)
        self._vision: dict[str, VisionLoRA | None] = {}
        for name in pinned:
            self.pool.pin(name, self.load_now(name))

    def set_backend(self, backend: str) -> None:
        """Use the multi-LoRA backend ``backend`` ('auto', 'torch', 'triton', 'punica') from now on."""
        self.op: AddLoRAOp = resolve_lora_op(backend, self.device)
        self.graph_safe = graph_safe(self.op)

    @property
    def fused_rows(self) -> int:
        """Most rows of a plain multi-LoRA batch that run each projection as the fused linear: the backend's
        ``fused_lora_rows``, but one row at most while projections of several rows run their update on a side stream,
        which measured faster from two rows on (bench/RESULTS.md, Engine, sixteenth session)."""
        rows = getattr(self.op, "fused_lora_rows", 0)
        return min(rows, 1) if self.side_stream_rows > 1 else rows

    def add_adapter(self, spec: AdapterSpec, host: HostAdapter, pin: bool = False) -> None:
        """Serve an adapter built in memory (benchmarks, training loops) under ``spec.name``.

        A pinned one goes straight into a device slot for good; otherwise it joins the host cache, from which
        it loads like any other (it cannot be re-read from disk once the cache drops it).
        """
        self.store.add(spec)
        if pin:
            self.pool.pin(spec.name, host)
        else:
            self._remember(spec.name, host)

    def spec(self, name: str) -> AdapterSpec:
        """The adapter's spec; AdapterError for an unknown or malformed adapter."""
        spec = self.store.get(name)
        if spec.rank > self.layout.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {spec.rank}, over max_lora_rank {self.layout.max_rank}")
        return spec

    def _read(self, spec: AdapterSpec, pin_memory: bool) -> HostAdapter:
        return read_host_adapter(spec, self.layout, self.dtype, pin_memory)

    def slot(self, name: str) -> int:
        return self.pool.slot_of[name]

    def vision_lora(self, name: str | None) -> VisionLoRA | None:
        """The device copy of ``name``'s vision-tower updates (None for LM-only adapters)."""
        return self._vision.get(name) if name else None

    def num_terms(self, rows: Sequence[LoRARows], num_tokens: int) -> int:
        """Adapter terms per segment this iteration needs: 0 (no LoRA work), 1 (plain) or 2 (mixture)."""
        merged = self.merge_state.slot
        if merged is None:
            return 1 if any(r.count for r in rows) else 0
        return 2 if sum(r.count for r in rows if r.slot == merged) < num_tokens else 0

    def build_delta(self, rows: Sequence[LoRARows], num_tokens: int) -> MultiLoRADelta | None:
        """This iteration's multi-LoRA update (mixture terms while an adapter is merged); None when there is none."""
        self.pool.wait_ready()
        built = build_lora_batch(rows, self.pool, num_tokens, self.device, self.merge_state.slot,
                                 routed_rows=self.fused_rows)
        return None if built is None else MultiLoRADelta(self.pool, self.op, *built)

    def stats(self) -> dict[str, Any]:
        return {"lora_backend": getattr(self.op, "name", type(self.op).__name__), "lora_slots": self.pool.num_slots,
                "adapters_resident": self.pool.resident(), "adapters_pinned": sorted(self.pool.pinned),
                "adapters_in_host_cache": list(self.host), "adapter_loads": self.pool.loads,
                "adapter_evictions": self.pool.evictions}

    def _remember(self, name: str, host: HostAdapter) -> None:
        if name not in self._vision:
            vis = host.vision
            self._vision[name] = None if vis is None else VisionLoRA(vis.name, {
                path: (a.to(self.device, self.dtype), b.to(self.device, self.dtype), s)
                for path, (a, b, s) in vis.modules.items()})
        super()._remember(name, host)
