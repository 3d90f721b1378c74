"""LoRAManager: adapter names -> host copies (loaded ahead in a thread) -> device slots -> each iteration's delta."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from enum import Enum
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

logger = logging.getLogger(__name__)


class SlotStatus(Enum):
    """Whether a sequence's adapter can run this iteration."""

    READY = "ready"  # resident in a device slot, now held for the sequence
    LOADING = "loading"  # its host copy is still being read
    NO_SLOT = "no_slot"  # every slot is held by running sequences or pinned


class LoRAManager:
    """Owns the adapter pool, the host cache (pinned CPU memory on GPU) and the background loader."""

    def __init__(self, store: AdapterStore, layout: LoRALayout, slots: int, host_capacity: int,
                 backend: str, device: torch.device, dtype: torch.dtype, pinned: Sequence[str] = ()) -> None:
        self.store, self.layout, self.device, self.dtype = store, layout, device, dtype
        self.pool = AdapterPool(layout, slots, device, dtype)
        self.set_backend(backend)
        self.merge_state = MergeState()  # the adapter folded into the base weights (the orchestrator's)
        self.host: OrderedDict[str, HostAdapter] = OrderedDict()
        self.host_capacity = max(host_capacity, len(pinned))
        self._loading: dict[str, Future[HostAdapter]] = {}
        self._vision: dict[str, VisionLoRA | None] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load")
        for name in pinned:
            self.pool.pin(name, self._load_now(name))

    def set_backend(self, backend: str) -> None:
        """Use the multi-LoRA backend ``backend`` ('auto', 'torch', 'triton', 'punica') from now on."""
        self.op: AddLoRAOp = resolve_lora_op(backend, self.device)
        self.graph_safe = graph_safe(self.op)

    def add_adapter(self, spec: AdapterSpec, host: HostAdapter, pin: bool = False) -> None:
        """Serve an adapter built in memory (benchmarks, training loops) under ``spec.name``.

        A pinned one goes straight into a device slot for good; otherwise it joins the host cache, from which
        it loads like any other (it cannot be re-read from disk once the cache drops it).
        """
        self.store.add(spec)
        if pin:
            self.pool.pin(spec.name, host)
        else:
            self._remember(host)

    def spec(self, name: str) -> AdapterSpec:
        """The adapter's spec; AdapterError for an unknown or malformed adapter."""
        spec = self.store.get(name)
        if spec.rank > self.layout.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {spec.rank}, over max_lora_rank {self.layout.max_rank}")
        return spec

    def prefetch(self, name: str) -> None:
        """Start reading ``name`` into host memory unless it is there, resident or on its way."""
        if name in self.host or name in self.pool.slot_of or name in self._loading:
            return
        spec = self.spec(name)
        pin = self.device.type == "cuda"
        self._loading[name] = self._executor.submit(read_host_adapter, spec, self.layout, self.dtype, pin)

    def prefetch_to_device(self, name: str) -> None:
        """Copy a queued request's adapter into an empty slot ahead of its admission (never evicts another)."""
        if name in self.pool.slot_of or not self.pool.has_empty_slot():
            return
        try:
            host = self._host_copy(name)
        except AdapterError:
            return  # surfaces, with its message, when the request is admitted
        if host is not None:
            self.pool.acquire(name, host)
            self.pool.release(name)

    def acquire(self, name: str) -> SlotStatus:
        """Hold a device slot for one more sequence of ``name``; AdapterError if its files turned out bad."""
        host = None if name in self.pool.slot_of else self._host_copy(name)
        if name not in self.pool.slot_of and host is None:
            return SlotStatus.LOADING
        return SlotStatus.READY if self.pool.acquire(name, host) is not None else SlotStatus.NO_SLOT

    def release(self, name: str) -> None:
        self.pool.release(name)

    def slot(self, name: str) -> int:
        return self.pool.slot_of[name]

    def loads_in_flight(self) -> bool:
        return bool(self._loading)

    def wait_for_load(self, timeout: float = 5.0) -> None:
        """Block until one background read finishes (used when nothing else can run)."""
        wait(list(self._loading.values()), timeout=timeout, return_when="FIRST_COMPLETED")

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
        batch = build_lora_batch(rows, self.pool, num_tokens, self.device, self.merge_state.slot)
        return None if batch is None else MultiLoRADelta(self.pool, self.op, batch)

    def stats(self) -> dict[str, Any]:
        return {"lora_backend": getattr(self.op, "name", type(self.op).__name__), "lora_slots": self.pool.num_slots,
                "adapters_resident": self.pool.resident(), "adapters_pinned": sorted(self.pool.pinned),
                "adapters_in_host_cache": list(self.host), "adapter_loads": self.pool.loads,
                "adapter_evictions": self.pool.evictions}

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _load_now(self, name: str) -> HostAdapter:
        self.prefetch(name)
        host = self._host_copy(name, block=True)
        if host is None:
            raise AdapterError(f"adapter {name!r} did not load")
        return host

    def _host_copy(self, name: str, block: bool = False) -> HostAdapter | None:
        """The host copy, collecting a finished background read; None while it is still being read."""
        if name in self.host:
            self.host.move_to_end(name)
            return self.host[name]
        future = self._loading.get(name)
        if future is None:
            self.prefetch(name)
            future = self._loading[name]
        if not (block or future.done()):
            return None
        del self._loading[name]
        host = future.result()  # raises the reader's AdapterError for a bad adapter
        self._remember(host)
        return host

    def _remember(self, host: HostAdapter) -> None:
        self.host[host.name] = host
        if host.name not in self._vision:
            vis = host.vision
            self._vision[host.name] = None if vis is None else VisionLoRA(vis.name, {
                path: (a.to(self.device, self.dtype), b.to(self.device, self.dtype), s)
                for path, (a, b, s) in vis.modules.items()})
        while len(self.host) > self.host_capacity:
            evicted, _ = self.host.popitem(last=False)
            logger.debug("dropped host copy of adapter %s", evicted)
