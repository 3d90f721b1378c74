"""MoEManager: MoE-LoRA adapters by name -> host copies (read in a thread) -> pool slots -> each step's deltas.

Serving-path choice, per iteration:
  merge-switch  when the whole batch is one decode token of one pre-gated MoE sequence, no plain adapter is
                merged into the backbone and no other claim holds the weights (the orchestrator's merge state),
                and ``merge_switch`` is on: its experts are merged into the weights (claiming them) and swapped
                token by token with the fused switch kernel;
  routed        otherwise: every MoE row adds its top-k experts through the routed multi-LoRA operator, one
                delta per routing scheme present, next to the plain multi-LoRA delta of the other rows.
Whenever the merge-switch path is not chosen, the backbone is restored first (``unmerge``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.adapter_store import AdapterError
from engine.lora.delta import LayerDelta, LayerKey
from engine.lora.layout import LoRALayout
from engine.moe.config import MoEConfig
from engine.moe.delta import FIRST_KEY, RoutedMoEDelta, SwitchMoEDelta
from engine.moe.host import HostMoE, read_host_moe
from engine.moe.pool import MoEPool
from engine.moe.spec import MoESpec, is_moe_folder, read_moe_spec
from engine.moe.switch import MergeSwitch, WeightClaims
from engine.slots import HostLoader
from kernels.backend import LoRABackend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoERows:
    """A run of consecutive input rows (one sequence's tokens this step) of one MoE-LoRA adapter."""

    adapter: str
    start: int
    count: int


@dataclass(frozen=True)
class MoEPlan:
    """How this step's MoE rows are served: ``path`` is "none", "switch" or "routed"."""

    path: str
    row_slot: np.ndarray  # [T] int64 pool slot per row, -1 elsewhere
    schemes: tuple[str, ...] = ()  # routing schemes present (routed path)
    adapter: str | None = None  # the merged adapter (switch path)
    groups: tuple[str, ...] = ()  # its adapted groups (switch path)

    @property
    def key(self) -> tuple:
        """What a captured CUDA graph of this plan depends on (row slots are filled per replay)."""
        if self.path == "switch":
            return ("switch", self.groups)
        return (self.path, self.schemes)


class MoEStore:
    """MoE-LoRA adapter folders under the adapters directory, by name; re-scanned on a miss."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._specs: dict[str, MoESpec] = {}
        self._kind: dict[str, bool] = {}  # name -> is a MoE folder (asked per request: no disk read each time)
        self.rescan()

    def rescan(self) -> None:
        self._specs = {}
        if not self.root.is_dir():
            return
        for folder in sorted(p for p in self.root.iterdir() if is_moe_folder(p)):
            try:
                self._specs[folder.name] = read_moe_spec(folder)
            except AdapterError as exc:
                logger.warning("skipping MoE adapter: %s", exc)

    def is_moe(self, name: str) -> bool:
        if name in self._specs:
            return True
        if name not in self._kind:
            folder = self.root / name
            if not folder.is_dir():
                return False  # not cached: the folder may appear later
            self._kind[name] = is_moe_folder(folder)
        return self._kind[name]

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> MoESpec:
        if name not in self._specs:
            self.rescan()
        if name not in self._specs:
            return read_moe_spec(self.root / name)  # raises the folder's real problem
        return self._specs[name]


class MoEManager(HostLoader[HostMoE]):
    """Owns the expert pool, the host cache, the background reader and the merge switch."""

    kind = "MoE adapter"

    def __init__(self, root: str | Path, layout: LoRALayout, config: MoEConfig, hidden_size: int,
                 linears: dict[LayerKey, torch.nn.Module], op: LoRABackend | None, device: torch.device,
                 dtype: torch.dtype, host_capacity: int = 8, claims: WeightClaims | None = None,
                 restore: Callable[[], None] | None = None) -> None:
        super().__init__(host_capacity, "moe-load", pin_memory=device.type == "cuda")
        self.store, self.layout, self.config = MoEStore(root), layout, config
        self.hidden_size, self.device, self.dtype, self.op = hidden_size, device, dtype, op
        self.pool = MoEPool(layout, config, hidden_size, device, dtype)
        if self.store.names():  # reserve the pool before the engine sizes its KV cache from free memory
            self.pool.allocate()
        self.switch = MergeSwitch(self.pool, linears, op, claims, restore)
        self.first = linears[FIRST_KEY]
        self.steps = {"switch": 0, "routed": 0}

    def is_moe(self, name: str | None) -> bool:
        return name is not None and self.store.is_moe(name)

    def spec(self, name: str) -> MoESpec:
        """The adapter's spec; AdapterError for a malformed one or one the pool cannot hold."""
        spec = self.store.get(name)
        for what, value, limit, setting in (("num_experts", spec.num_experts, self.pool.experts, "max_experts"),
                                            ("top_k", spec.top_k, self.pool.top_k, "max_top_k"),
                                            ("r", spec.rank, self.pool.max_rank, "max_rank")):
            if value > limit:
                raise AdapterError(f"MoE adapter {name!r} has {what}={value}, over the engine's MoE pool limit "
                                   f"moe.{setting}={limit}")
        return spec

    def _read(self, spec: MoESpec, pin_memory: bool) -> HostMoE:
        return read_host_moe(spec, self.layout, self.hidden_size, self.dtype, pin_memory)

    def release(self, name: str) -> None:
        """One sequence of ``name`` is done with its slot; the last one out takes its merged experts out too."""
        self.pool.release(name)
        if self.switch.merged == name and self.pool.refs[self.pool.slot_of[name]] == 1:  # only the switch's hold
            self.switch.unmerge()

    def set_op(self, op: LoRABackend) -> None:
        """Run the routed operator and the fused switch on ``op`` from now on (restores the backbone first)."""
        if self.switch.op is not None:
            self.switch.unmerge()
        self.op = self.switch.op = op

    def plan(self, rows: Sequence[MoERows], num_tokens: int, decode: bool) -> MoEPlan:
        """Pick this step's path (see the module docstring); host-side only."""
        row_slot = np.full(num_tokens, -1, dtype=np.int64)
        for run in rows:
            row_slot[run.start:run.start + run.count] = self.pool.slot_of[run.adapter]
        if not rows:
            return MoEPlan("none", row_slot)
        slots = [self.pool.slot_of[r.adapter] for r in rows]
        spec = self.pool.occupant[slots[0]].spec
        lone = decode and num_tokens == 1 and len(rows) == 1
        if self.config.merge_switch and lone and spec.routing == "pregated" and self.switch.available():
            return MoEPlan("switch", row_slot, adapter=spec.name, groups=spec.groups)
        schemes = tuple(sorted({self.pool.routing_of(s) for s in slots}))
        return MoEPlan("routed", row_slot, schemes=schemes)

    def prepare(self, plan: MoEPlan) -> None:
        """Put the weights in the state ``plan`` runs on: experts merged (switch) or the backbone restored."""
        if plan.path == "switch":
            self.switch.begin(plan.adapter, plan.groups)
        else:
            self.switch.unmerge()
        if plan.path != "none":
            self.steps[plan.path] += 1

    def deltas(self, plan: MoEPlan, row_slots: dict[str, torch.Tensor]) -> list[LayerDelta]:
        """The plan's deltas over given row-slot tensors (``row_slots[scheme]``, or ["switch"]): [T] long each."""
        if plan.path == "switch":
            return [SwitchMoEDelta(self.switch, row_slots["switch"], self.first)]
        return [RoutedMoEDelta(self.pool, self.op, scheme, row_slots[scheme]) for scheme in plan.schemes]

    def row_slots(self, plan: MoEPlan) -> dict[str, np.ndarray]:
        """Host row-slot arrays the plan's deltas read, by scheme (or "switch")."""
        if plan.path == "switch":
            return {"switch": plan.row_slot}
        if len(plan.schemes) == 1:
            return {plan.schemes[0]: plan.row_slot}
        return {scheme: self.rows_of(plan, scheme) for scheme in plan.schemes}

    def build_deltas(self, plan: MoEPlan) -> list[LayerDelta]:
        """The step's MoE deltas (eager), after ``prepare``."""
        self.prepare(plan)
        if plan.path == "none":
            return []
        slots = {k: torch.from_numpy(v).to(self.device) for k, v in self.row_slots(plan).items()}
        return self.deltas(plan, slots)

    def rows_of(self, plan: MoEPlan, scheme: str) -> np.ndarray:
        """plan.row_slot with the rows of other routing schemes set to -1."""
        own = plan.row_slot.copy()
        for slot in np.unique(own[own >= 0]):
            if self.pool.routing_of(int(slot)) != scheme:
                own[own == slot] = -1
        return own

    def stats(self) -> dict[str, Any]:
        return {"moe_adapters_resident": self.pool.resident(), "moe_merged": self.switch.merged,
                "moe_pool_bytes": self.pool.nbytes,
                "moe_switch_steps": self.steps["switch"], "moe_routed_steps": self.steps["routed"],
                "moe_unmerges": self.switch.unmerges, "moe_adapter_loads": self.pool.loads}

    def close(self) -> None:
        self.switch.unmerge()
        super().close()

    def _remember(self, name: str, host: HostMoE) -> None:
        problem = self.pool.fits(host)
        if problem is not None:
            raise AdapterError(f"MoE adapter {name!r} {problem}")
        super()._remember(name, host)

    def pin(self, name: str) -> None:
        """Load ``name`` into a slot and keep it resident for good."""
        self.pool.pin(name, self.load_now(name), "moe.slots")
