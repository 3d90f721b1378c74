"""AdapterPool: device slots holding adapters' A/B for every layer, with reference counts, pinning and LRU eviction."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from engine.lora.delta import LayerKey
from engine.lora.host_adapter import HostAdapter
from engine.lora.layout import LoRALayout
from kernels.lora_batch import LoRAWeights

logger = logging.getLogger(__name__)


class AdapterPool:
    """``slots`` adapter slots per projection group, padded to the layout's max rank.

    Storage per group: a [layers, slots, n_slices, max_rank, in_dim], b [layers, slots, out_total, max_rank];
    each layer's view is the LoRAWeights the kernels read. A slot in use by a running sequence is never
    evicted; an idle one goes least-recently-used first, unless its adapter is pinned. On GPU, slot writes
    run on a side stream and the forward waits for them on the device, never on the host.
    """

    def __init__(self, layout: LoRALayout, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        self.layout, self.num_slots, self.device = layout, slots, device
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for group, (in_dim, widths) in layout.groups.items():
            self.a[group] = torch.zeros(layout.num_layers, slots, len(widths), layout.max_rank, in_dim,
                                        dtype=dtype, device=device)
            self.b[group] = torch.zeros(layout.num_layers, slots, sum(widths), layout.max_rank,
                                        dtype=dtype, device=device)
        self._weights = {(layer, group): LoRAWeights(self.a[group][layer], self.b[group][layer],
                                                     layout.slice_bounds(group))
                         for group in layout.groups for layer in range(layout.num_layers)}
        self.slot_of: dict[str, int] = {}
        self.name_in: list[str | None] = [None] * slots
        self.rank_in = [0] * slots
        self.scale_in = [0.0] * slots
        self.refs = [0] * slots
        self.pinned: set[str] = set()
        self.lru: OrderedDict[str, None] = OrderedDict()  # idle resident adapters, least recent first
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, torch.cuda.Event] = {}
        self.loads = 0
        self.evictions = 0

    def weights(self, key: LayerKey) -> LoRAWeights:
        return self._weights[key]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])

    def has_empty_slot(self) -> bool:
        return None in self.name_in

    def resident(self) -> list[str]:
        return sorted(self.slot_of)

    def acquire(self, name: str, host: HostAdapter | None) -> int | None:
        """The slot holding ``name`` with one more user; loads ``host`` into a free or evicted slot if needed.

        Returns None when the adapter is not resident and either no host copy is given or every slot is busy.
        """
        slot = self.slot_of.get(name)
        if slot is None:
            if host is None:
                return None
            slot = self._free_slot()
            if slot is None:
                return None
            self._write(slot, host)
        self.refs[slot] += 1
        self.lru.pop(name, None)
        return slot

    def release(self, name: str) -> None:
        slot = self.slot_of[name]
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            self.lru[name] = None

    def pin(self, name: str, host: HostAdapter) -> None:
        """Load ``name`` (if needed) and keep it resident for good."""
        slot = self.acquire(name, host)
        if slot is None:
            raise ValueError(f"no free adapter slot to pin {name!r} (lora_slots={self.num_slots})")
        self.pinned.add(name)
        self.release(name)

    def wait_ready(self) -> None:
        """Make the current stream wait (on the device) for slot writes still in flight."""
        if self._pending:
            stream = torch.cuda.current_stream(self.device)
            for event in self._pending.values():
                stream.wait_event(event)
            self._pending.clear()

    def _free_slot(self) -> int | None:
        for slot, name in enumerate(self.name_in):
            if name is None:
                return slot
        for name in self.lru:
            if name not in self.pinned:
                slot = self.slot_of.pop(name)
                del self.lru[name]
                self.name_in[slot] = None
                self.evictions += 1
                logger.debug("evicted adapter %s from slot %d", name, slot)
                return slot
        return None

    def _write(self, slot: int, host: HostAdapter) -> None:
        if self.copy_stream is None:
            self._copy(slot, host)
        else:
            # The evicted adapter may still be read by queued kernels: copy only after them.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self._copy(slot, host)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self._pending[slot] = event
        self.slot_of[host.name] = slot
        self.name_in[slot] = host.name
        self.rank_in[slot] = host.rank
        self.scale_in[slot] = host.scale
        self.loads += 1

    def _copy(self, slot: int, host: HostAdapter) -> None:
        r = host.rank
        for group in self.layout.groups:
            a, b = self.a[group][:, slot], self.b[group][:, slot]  # [layers, n_slices, R, in], [layers, out, R]
            a.zero_()
            b.zero_()
            if group in host.a:
                a[:, :, :r].copy_(host.a[group], non_blocking=True)
                b[:, :, :r].copy_(host.b[group], non_blocking=True)
