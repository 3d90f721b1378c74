"""AdapterPool: device slots holding adapters' A/B for every layer, with reference counts, pinning and LRU eviction."""

from __future__ import annotations

import torch

from engine.lora.delta import LayerKey
from engine.lora.host_adapter import HostAdapter
from engine.lora.layout import LoRALayout
from engine.slots import SlotTable
from kernels.lora_batch import LoRAWeights


class AdapterPool(SlotTable[HostAdapter]):
    """``slots`` adapter slots per projection group, padded to the layout's max rank.

    Storage per group: a [layers, slots, n_slices, max_rank, in_dim], b [layers, slots, out_total, max_rank];
    each layer's view is the LoRAWeights the kernels read. A slot in use by a running sequence is never
    evicted; an idle one goes least-recently-used first, unless its adapter is pinned. On GPU, slot writes
    run on a side stream and the forward waits for them on the device, never on the host.
    """

    def __init__(self, layout: LoRALayout, slots: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(slots)
        self.layout, self.device = layout, device
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
        self.rank_in = [0] * slots
        self.scale_in = [0.0] * slots
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, torch.cuda.Event] = {}

    def weights(self, key: LayerKey) -> LoRAWeights:
        return self._weights[key]

    def all_weights(self) -> list[LoRAWeights]:
        """Every layer's view of every projection group."""
        return list(self._weights.values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.a.values(), *self.b.values()])

    def pin(self, name: str, host: HostAdapter) -> None:
        """Load ``name`` (if needed) and keep it resident for good."""
        super().pin(name, host, "lora_slots")

    def wait_ready(self) -> None:
        """Make the current stream wait (on the device) for slot writes still in flight."""
        if self._pending:
            stream = torch.cuda.current_stream(self.device)
            for event in self._pending.values():
                stream.wait_event(event)
            self._pending.clear()

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
        self.rank_in[slot] = host.rank
        self.scale_in[slot] = host.scale
        self._occupy(slot, host.name, host.name)

    def _copy(self, slot: int, host: HostAdapter) -> None:
        r = host.rank
        for group in self.layout.groups:
            a, b = self.a[group][:, slot], self.b[group][:, slot]  # [layers, n_slices, R, in], [layers, out, R]
            a.zero_()
            b.zero_()
            if group in host.a:
                a[:, :, :r].copy_(host.a[group], non_blocking=True)
                b[:, :, :r].copy_(host.b[group], non_blocking=True)
