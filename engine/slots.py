"""What the LoRA and MoE-LoRA adapter stores share: device slots with LRU eviction, and host copies read ahead.

``SlotTable`` keeps which adapter each device slot holds, how many running sequences hold it, which adapters are
pinned, and the idle ones in least-recently-used order. ``HostLoader`` keeps host copies (read by one background
thread) in a bounded LRU cache and moves them into a ``SlotTable``. Subclasses say how a copy is read and written.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from enum import Enum
from typing import Any, Generic, TypeVar

from engine.adapter_store import AdapterError

logger = logging.getLogger(__name__)

Host = TypeVar("Host")


class SlotStatus(Enum):
    """Whether a sequence's adapter can run this iteration."""

    READY = "ready"  # resident in a device slot, now held for the sequence
    LOADING = "loading"  # its host copy is still being read
    NO_SLOT = "no_slot"  # every slot is held by running sequences or pinned


class SlotTable(ABC, Generic[Host]):
    """Slot bookkeeping: a slot in use by a running sequence is never evicted; an idle one goes least recently
    used first, unless its adapter is pinned. Subclasses implement ``_write`` (copy a host adapter into a slot),
    which ends with ``_occupy``."""

    kind = "adapter"

    def __init__(self, slots: int) -> None:
        self.num_slots = slots
        self.slot_of: dict[str, int] = {}
        self.occupant: list[Any | None] = [None] * slots  # what ``_occupy`` recorded for the slot, None if empty
        self.refs = [0] * slots
        self.pinned: set[str] = set()
        self.lru: OrderedDict[str, None] = OrderedDict()  # idle resident adapters, least recent first
        self.loads = 0
        self.evictions = 0

    def has_empty_slot(self) -> bool:
        return None in self.occupant

    def resident(self) -> list[str]:
        return sorted(self.slot_of)

    def acquire(self, name: str, host: Host | None) -> int | None:
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

    def pin(self, name: str, host: Host, setting: str) -> None:
        """Load ``name`` (if needed) and keep it resident for good; ``setting`` names the slot count in errors."""
        if self.acquire(name, host) is None:
            raise ValueError(f"no free {self.kind} slot to pin {name!r} ({setting}={self.num_slots})")
        self.pinned.add(name)
        self.release(name)

    def _occupy(self, slot: int, name: str, occupant: Any) -> None:
        self.slot_of[name] = slot
        self.occupant[slot] = occupant
        self.loads += 1

    def _free_slot(self) -> int | None:
        if None in self.occupant:
            return self.occupant.index(None)
        for name in self.lru:
            if name not in self.pinned:
                slot = self.slot_of.pop(name)
                del self.lru[name]
                self.occupant[slot] = None
                self.evictions += 1
                logger.debug("evicted %s %s from slot %d", self.kind, name, slot)
                return slot
        return None

    @abstractmethod
    def _write(self, slot: int, host: Host) -> None:
        """Copy ``host`` into ``slot`` and record it with ``_occupy``."""


class HostLoader(ABC, Generic[Host]):
    """Host copies of adapters, read ahead by one background thread, kept in an LRU cache of ``host_capacity``.

    Subclasses set ``pool`` (a SlotTable) and implement ``spec`` (AdapterError for a bad name) and ``_read``
    (spec, pin_memory) -> host copy, which runs on the loader thread.
    """

    kind = "adapter"
    pool: SlotTable

    def __init__(self, host_capacity: int, thread_name: str, pin_memory: bool) -> None:
        self.host: OrderedDict[str, Host] = OrderedDict()
        self.host_capacity = host_capacity
        self.pin_memory = pin_memory
        self._loading: dict[str, Future[Host]] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    @abstractmethod
    def spec(self, name: str) -> Any:
        """The adapter's spec; AdapterError for an unknown or malformed one."""

    @abstractmethod
    def _read(self, spec: Any, pin_memory: bool) -> Host:
        """Read the adapter into host memory (runs on the loader thread)."""

    def prefetch(self, name: str) -> None:
        """Start reading ``name`` into host memory unless it is there, resident or on its way."""
        if name in self.host or name in self.pool.slot_of or name in self._loading:
            return
        self._loading[name] = self._executor.submit(self._read, self.spec(name), self.pin_memory)

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

    def loads_in_flight(self) -> bool:
        return bool(self._loading)

    def wait_for_load(self, timeout: float = 5.0) -> None:
        """Block until one background read finishes (used when nothing else can run)."""
        wait(list(self._loading.values()), timeout=timeout, return_when="FIRST_COMPLETED")

    def load_now(self, name: str) -> Host:
        """Read ``name`` synchronously (pinning, tests, benchmarks)."""
        self.prefetch(name)
        host = self._host_copy(name, block=True)
        if host is None:
            raise AdapterError(f"{self.kind} {name!r} did not load")
        return host

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _host_copy(self, name: str, block: bool = False) -> Host | None:
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
        self._remember(name, host)
        return host

    def _remember(self, name: str, host: Host) -> None:
        """Keep ``host`` in the cache, dropping the least recently used copies past the capacity."""
        self.host[name] = host
        while len(self.host) > self.host_capacity:
            evicted, _ = self.host.popitem(last=False)
            logger.debug("dropped host copy of %s %s", self.kind, evicted)
