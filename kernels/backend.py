"""LoRA backends: one small interface for the engine's multi-LoRA layers, with implementations keyed by a string.

- "torch":  the pure-torch reference path (``kernels/reference.py``), vectorised per segment; the CPU default.
- "triton": ATMM with the device's tuned tile table (exact shape, then nearest shape, then heuristic).
- "punica": the same kernels with one fixed tile config for every shape (the Punica-SGMV-style policy baseline).

Usage: ``backend = get_backend("triton")``; then per layer ``backend.add_lora(y, x, weights, batch)``, and for mode
switches ``backend.swift_merge(plan, add=..., sub=...)``. Every method updates its output in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from kernels import reference
from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.merge_plan import DeltaTerms, MergePlan
from kernels.routing import Routing
from kernels.tile_config import FIXED_CONFIG, FIXED_MERGE_CONFIG, AtmmConfig, MergeConfig


class LoRABackend(ABC):
    """The multi-LoRA operators the engine calls; see each op's module for semantics and shapes."""

    name: str = ""
    fused_rows: int = 0  # most rows ``routed_linear`` takes; 0: not offered (callers run F.linear + add_routed)
    fused_lora_rows: int = 0  # most rows of a plain multi-LoRA batch the engine runs through ``routed_linear``

    @abstractmethod
    def add_lora(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, batch: LoRABatch) -> None:
        """y[t, out_i] += sum_k scale[s, k] * (x[t] @ A[slot, i, :r].T) @ B[slot, out_i, :r].T (kernels/atmm.py)."""

    @abstractmethod
    def add_routed(self, y: torch.Tensor, x: torch.Tensor, weights: LoRAWeights, routing: Routing) -> None:
        """y[t] += sum_j gate[t, j] * scale[e] * (x[t] @ A[e].T) @ B[e].T (kernels/routed.py)."""

    def routed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weights: LoRAWeights,
                      routing: Routing) -> torch.Tensor:
        """x @ W.T + b with add_routed's update in one fp32 sum (kernels/fused_linear.py's semantics); callers use
        it for x of at most ``fused_rows`` rows. By default the pure-torch reference."""
        return reference.routed_linear(x, weight, bias, weights, routing)

    @abstractmethod
    def swift_merge(
        self, plan: MergePlan, add: DeltaTerms | None = None, sub: DeltaTerms | None = None
    ) -> None:
        """W = round(W + sum add.s * B A - sum sub.s * B A) for every target (kernels/swift_merge.py)."""

    @abstractmethod
    def fused_switch(self, plan: MergePlan, prev: DeltaTerms, new: DeltaTerms) -> None:
        """Per layer whose selection changed: W += [-G_prev D_prev || G_new D_new] @ [U_prev; U_new]."""

    def precompile(self, pools: Sequence[LoRAWeights], **limits) -> tuple[int, float]:
        """Compile ahead of serving the kernel variants ``add_lora`` can need within ``limits``
        (kernels/precompile.py); returns (variants launched, seconds). Nothing to compile by default."""
        return 0, 0.0

    def precompile_routed(self, pools: Sequence[LoRAWeights], **shape) -> tuple[int, float]:
        """The same for ``add_routed`` over MoE expert pools (``plan_routed_variants``' arguments)."""
        return 0, 0.0

    def precompile_linears(self, linears: Sequence[tuple[torch.Tensor, torch.Tensor | None, LoRAWeights | None]],
                           cases: Sequence[tuple[int, int, int, int]] = ()) -> tuple[int, float]:
        """The same for the fused decode linear (``kernels.precompile.precompile_linears``' arguments)."""
        return 0, 0.0


_REGISTRY: dict[str, Callable[[], LoRABackend]] = {}


def register_backend(name: str) -> Callable[[type[LoRABackend]], type[LoRABackend]]:
    """Class decorator: make a backend available as ``get_backend(name)``."""

    def wrap(cls: type[LoRABackend]) -> type[LoRABackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> LoRABackend:
    """A new backend instance by config string ('torch', 'triton' or 'punica')."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(backend_names())}")
    return _REGISTRY[name]()


@register_backend("torch")
class TorchBackend(LoRABackend):
    """Pure torch, one matmul pair per segment (or expert); reads batch metadata on the host."""

    def add_lora(self, y, x, weights, batch):
        reference.add_lora(y, x, weights, batch)

    def add_routed(self, y, x, weights, routing):
        reference.add_routed(y, x, weights, routing)

    def swift_merge(self, plan, add=None, sub=None):
        reference.swift_merge(plan, add, sub)

    def fused_switch(self, plan, prev, new):
        reference.fused_switch(plan, prev, new)


@register_backend("triton")
class TritonBackend(LoRABackend):
    """ATMM and the merge kernels with tiles from the device table (``kernels/configs/<device>.json``)."""

    atmm_config: AtmmConfig | None = None  # None: look up per call
    merge_config: MergeConfig | None = None
    # ATMM's shrink -> expand chained by programmatic dependent launch at decode sizes (kernels.atmm.launch_pair):
    # 1.0-1.4 us a pair faster in 7 of 8 decode cases on an H200 (bench/RESULTS.md, Kernels, fourteenth session).
    # The routed pair stays unchained (routed_add's default): up to 2x slower chained at 16 rows (sixth session).
    pdl = True
    # Rows up to which routed projections run as kernels/fused_linear.py (all of its MAX_ROWS): faster than F.linear
    # + the routed pair at batch 1 and 16 on an H200 (bench/RESULTS.md, LoRA-Switch, seventh session).
    fused_rows = 16
    # Plain multi-LoRA through the fused linear up to 8 rows: with 64-column tiles and the shrink chained by PDL the
    # engine's batch-8 multi-LoRA / base rose from 73% to 78% (bench/engine.py --fused-lora-rows; bench/RESULTS.md,
    # Engine, twelfth session); at 16 rows it measured the same as F.linear + ATMM, so those stay unfused. The
    # engine caps this at one row while its side stream is on (LoRAManager.fused_rows; Engine, sixteenth session).
    fused_lora_rows = 8

    def add_lora(self, y, x, weights, batch):
        from kernels.atmm import atmm_add

        atmm_add(y, x, weights, batch, self.atmm_config, pdl=self.pdl)

    def add_routed(self, y, x, weights, routing):
        from kernels.routed import routed_add

        routed_add(y, x, weights, routing, self.atmm_config)

    def routed_linear(self, x, weight, bias, weights, routing):
        from kernels.fused_linear import routed_linear

        return routed_linear(x, weight, bias, weights, routing)

    def swift_merge(self, plan, add=None, sub=None):
        from kernels.swift_merge import swift_merge

        swift_merge(plan, add, sub, self.merge_config)

    def fused_switch(self, plan, prev, new):
        from kernels.switch import fused_switch

        fused_switch(plan, prev, new, self.merge_config)

    def precompile(self, pools, **limits):
        from kernels.precompile import precompile_pools

        return precompile_pools(pools, config=self.atmm_config, pdl=self.pdl, **limits)

    def precompile_routed(self, pools, **shape):
        from kernels.precompile import precompile_routed_pools

        return precompile_routed_pools(pools, config=self.atmm_config, **shape)

    def precompile_linears(self, linears, cases=()):
        from kernels.precompile import precompile_linears

        return precompile_linears(linears, cases)


@register_backend("punica")
class PunicaBackend(TritonBackend):
    """The same kernels with one tile config for every shape (Punica SGMV's policy), the fixed-tile baseline."""

    atmm_config = FIXED_CONFIG
    merge_config = FIXED_MERGE_CONFIG
    fused_rows = fused_lora_rows = 0  # the baseline keeps the separate matmul, shrink and expand at every size
    pdl = False  # and launches them one after the other
