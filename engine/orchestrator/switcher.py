"""WeightSwitcher: folds a pool adapter into (or out of) every adapted base weight, all layers in one launch."""

from __future__ import annotations

import logging
import statistics
import time

import torch

from engine.device import synchronize
from engine.lora.pool import AdapterPool
from engine.model.layers import AdaptedLinear
from engine.orchestrator.state import MergedAdapter
from kernels.backend import LoRABackend
from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget

logger = logging.getLogger(__name__)


class WeightSwitcher:
    """One MergePlan over all layers x projection groups, built once (weights and pool never move).

    Merges write the weights in place, so their addresses never change and captured CUDA graphs stay valid.
    Every DeltaTerms carries the pool's max rank as its rank bound, so the kernel's compile-time shape is the
    same for every adapter (no compilation when serving meets a new rank).

    Drift. With ``base_copy`` (one more copy of the adapted weights), every switch writes W = base + ΔW_new:
    the weights after any number of switches are bit-identical to those after one, and unmerged weights are
    the checkpoint's exactly. Without it, a switch updates W in place (W - ΔW_old + ΔW_new, rounded once), so
    each switch adds at most half an ulp of |W ± ΔW| per element: after n switches
    |W_n - W_0| <= n/2 * ulp(max |W_0| + max |ΔW|) (in practice a random walk, about sqrt(n) of that); cycles of
    one adapter alone are exact after the first (the kernel's merge/unmerge idempotence).
    """

    def __init__(self, linears: dict[tuple[int, str], AdaptedLinear], pool: AdapterPool, op: LoRABackend,
                 base_copy: bool) -> None:
        self.pool, self.op = pool, op
        self.device = pool.device
        self.max_rank = pool.layout.max_rank
        targets = []
        for key in sorted(linears):
            weight = linears[key].weight.detach()
            base = weight.clone() if base_copy else None
            targets.append(MergeTarget(weight=weight, lora=pool.weights(key), base=base))
        self.plan = MergePlan(targets)

    @property
    def base_copy(self) -> bool:
        return self.plan.from_base

    @property
    def nbytes(self) -> int:
        """Device memory of the clean copies (0 without them)."""
        return sum(t.base.numel() * t.base.element_size() for t in self.plan.targets if t.base is not None)

    def _terms(self, adapter: MergedAdapter) -> DeltaTerms:
        return DeltaTerms(
            slots=torch.tensor([[adapter.slot]], dtype=torch.int32).to(self.device),
            ranks=torch.tensor([[adapter.rank]], dtype=torch.int32).to(self.device),
            scales=torch.tensor([[adapter.scale]], dtype=torch.float32).to(self.device),
            max_rank=self.max_rank,
        )

    @torch.inference_mode()
    def switch(self, old: MergedAdapter | None, new: MergedAdapter | None) -> float:
        """Weights holding ``old`` -> holding ``new`` in one launch; returns its wall time (device synchronised).

        Semantics: W = round(W - s_old B_old A_old + s_new B_new A_new) for every adapted weight.
        """
        if old == new:
            return 0.0
        self.pool.wait_ready()
        synchronize(self.device)
        start = time.perf_counter()
        add = None if new is None else self._terms(new)
        sub = None if old is None or self.base_copy else self._terms(old)  # from the copy: base + ΔW_new
        self.op.swift_merge(self.plan, add=add, sub=sub)
        synchronize(self.device)
        return time.perf_counter() - start

    def measure(self, reps: int = 3) -> float:
        """Seconds of one switch launch: a merge + unmerge of a pool-max-rank adapter, timed, halved.

        It uses scale 0, so the deltas are exactly zero and the weights stay bit-identical, while the launch
        reads and writes every weight and the adapter's A/B like a real switch. The first round (untimed) also
        compiles the one-term (merge, unmerge) and two-term (M1 -> M2) kernels serving will use.
        """
        probe = MergedAdapter("<probe>", 0, self.max_rank, 0.0)
        other = MergedAdapter("<probe2>", min(1, self.pool.num_slots - 1), self.max_rank, 0.0)
        self.switch(None, probe)
        self.switch(probe, other)
        self.switch(other, None)
        times = [self.switch(None, probe) + self.switch(probe, None) for _ in range(reps)]
        seconds = statistics.median(times) / 2
        logger.info("swift switch: %.2f ms per launch (%d weights, pool rank %d)", seconds * 1e3,
                    len(self.plan.targets), self.max_rank)
        return seconds
