"""AdapterManager: the engine's LoRAManager with MoE-LoRA as a second adapter type, dispatched by adapter name.

Scheduler, intake and orchestrator keep talking to one manager: for a name whose folder holds a MOE_LORA config
the slot calls (spec, prefetch, acquire, release, ...) go to the MoE manager and its expert pool; every other
name is a plain PEFT LoRA adapter, as before. MoE requests are "no plain adapter" rows for the plain multi-LoRA
batch (mixture mode gives them the -ΔM correction, like base rows), and their names are marked non-mergeable in
the merge state, so that no policy tries to fold them into the weights as a plain adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.adapter_store import AdapterStore
from engine.lora.layout import LoRALayout
from engine.lora.manager import LoRAManager, SlotStatus
from engine.moe.config import MoEConfig
from engine.moe.manager import MoEManager, MoEPlan, MoERows


class AdapterManager(LoRAManager):
    """LoRAManager + ``moe`` (MoEManager) sharing the adapters directory and the multi-LoRA backend."""

    def __init__(self, store: AdapterStore, layout: LoRALayout, slots: int, host_capacity: int, backend: str,
                 device: torch.device, dtype: torch.dtype, pinned: Sequence[str] = (), *, moe: MoEConfig,
                 hidden_size: int, linears: dict) -> None:
        # Before the base init, which already loads pinned plain adapters through the dispatching methods.
        self.moe = MoEManager(store.root, layout, moe, hidden_size, linears, None, device, dtype)
        super().__init__(store, layout, slots, host_capacity, backend, device, dtype,
                         [n for n in pinned if not self.moe.is_moe(n)])
        self.moe.set_op(self.op)
        claims = getattr(self, "merge_state", None)  # the orchestrator's MergeState, where it exists
        if claims is not None:
            self.moe.switch.claims = claims
        for name in pinned:
            if self.moe.is_moe(name):
                self.moe.pin(name)

    def is_moe(self, name: str | None) -> bool:
        return self.moe.is_moe(name)

    def set_backend(self, backend: str) -> None:
        super().set_backend(backend)  # type: ignore[misc]  (the orchestrator's LoRAManager has it)
        if self.moe.op is not None:
            self.moe.set_op(self.op)

    def spec(self, name: str):
        if not self.moe.is_moe(name):
            return super().spec(name)
        spec = self.moe.spec(name)
        state = getattr(self, "merge_state", None)
        if state is not None:
            state.non_mergeable.add(name)
        return spec

    def prefetch(self, name: str) -> None:
        if self.moe.is_moe(name):
            self.moe.prefetch(name)
        else:
            super().prefetch(name)

    def prefetch_to_device(self, name: str) -> None:
        if self.moe.is_moe(name):
            self.moe.prefetch_to_device(name)
        else:
            super().prefetch_to_device(name)

    def acquire(self, name: str) -> SlotStatus:
        return self.moe.acquire(name) if self.moe.is_moe(name) else super().acquire(name)

    def release(self, name: str) -> None:
        if self.moe.is_moe(name):
            self.moe.release(name)
        else:
            super().release(name)

    def loads_in_flight(self) -> bool:
        return super().loads_in_flight() or self.moe.loads_in_flight()

    def wait_for_load(self, timeout: float = 5.0) -> None:
        if super().loads_in_flight():
            super().wait_for_load(timeout)
        else:
            self.moe.wait_for_load(timeout)

    def moe_plan(self, chunks: Sequence, num_tokens: int, decode: bool) -> MoEPlan:
        """This iteration's MoE plan from the schedule's chunks (their rows are consecutive, in chunk order)."""
        rows, row = [], 0
        for chunk in chunks:
            adapter = chunk.seq.adapter
            if adapter is not None and self.moe.is_moe(adapter):
                rows.append(MoERows(adapter, row, chunk.count))
            row += chunk.count
        return self.moe.plan(rows, num_tokens, decode)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self.moe.stats()}

    def close(self) -> None:
        self.moe.close()
        super().close()
