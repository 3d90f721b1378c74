"""Orchestrator: runs the mode policy each iteration and keeps the base weights in the state it names."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from engine.adapter_store import AdapterError
from engine.lora.manager import LoRAManager, SlotStatus
from engine.model.layers import AdaptedLinear
from engine.orchestrator import demand
from engine.orchestrator.cost import CostModel, Load, calibrate
from engine.orchestrator.state import MergedAdapter, MergeState
from engine.orchestrator.switcher import WeightSwitcher
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, policy_class
from engine.sequence import Sequence as Seq

logger = logging.getLogger(__name__)


class Orchestrator:
    """Owns the policy, the swift-merge switcher and the cost model; the scheduler asks it for each decision.

    Guards applied over any policy's decision:
    - while another adapter type claims the weights (``MergeState.claim``), plain adapters stay unmerged;
    - an adapter with no request in the engine is never merged, and the merged adapter's slot is held while
      merged, so an idle merged adapter is unmerged when a waiting request needs a slot and none is free;
    - a decision that would hold back every request is served without holds (the engine never stalls);
    - if the merged adapter's slot cannot be had yet (its weights are still loading), the weights stay as they
      are and the policy says who runs meanwhile (``while_loading``: everyone, except under `merged-only`, which
      runs only the current group while the load is in flight).
    """

    def __init__(self, policy: str, lora: LoRAManager, linears: dict[tuple[int, str], AdaptedLinear],
                 switcher: WeightSwitcher, slo_s: float, max_num_seqs: int, max_num_batched_tokens: int,
                 clock: Callable[[], float] = time.time, graphs: bool = True, prefill_graphs: bool = False) -> None:
        self.lora, self.linears, self.switcher, self.clock = lora, linears, switcher, clock
        self.graphs = graphs  # decode steps run as CUDA-graph replays on GPU (the cost model times them so)
        self.prefill_graphs = prefill_graphs  # and prefill iterations too (engine/prefill_graph.py)
        self.state: MergeState = lora.merge_state
        self.cost: CostModel | None = None
        self.limits = (slo_s, max_num_seqs, max_num_batched_tokens)
        self.policy: ModePolicy = self._make(policy)
        self.decisions: Counter[str] = Counter()  # decisions made, by mode ("+held" when someone sat one out)
        # measured iterations by "<mode> decode|prefill": count, seconds, rows (where the time goes, per mode)
        self.iterations: dict[str, Counter[str]] = {}

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def set_policy(self, name: str) -> None:
        """Swap the policy (the weights keep their state; the new policy decides from there)."""
        self.policy = self._make(name)

    def _make(self, name: str) -> ModePolicy:
        cls = policy_class(name)
        if cls.needs_cost and self.cost is None:
            self.calibrate()
        slo_s, seqs, tokens = self.limits
        ctx = PolicyContext(state=self.state, cost=self.cost, rank_of=self._rank_of, slo_s=slo_s,
                            max_num_seqs=seqs, max_num_batched_tokens=tokens)
        return cls(ctx)

    def calibrate(self) -> CostModel:
        """Measure the switch cost (a merge + unmerge at the pool's max rank) and the multi-LoRA op's costs."""
        self.switcher.op = self.lora.op
        self.cost = calibrate(self.linears, self.lora.pool, self.lora.op, self.switcher.measure(),
                              graphs=self.graphs, prefill_graphs=self.prefill_graphs)
        return self.cost

    def _rank_of(self, name: str) -> int:
        pool = self.lora.pool
        slot = pool.slot_of.get(name)
        if slot is not None:
            return pool.rank_in[slot]
        try:
            return self.lora.spec(name).rank
        except AdapterError:
            return 0

    def decide(self, running: Sequence[Seq], waiting: Sequence[Seq]) -> ModeDecision:
        view = QueueView(running, waiting, self.state.merged, self.clock())
        decision = self._guard(self.policy.decide(view), running, waiting)
        if decision.merged_adapter != self.state.merged and not self.switch_to(decision.merged_adapter):
            decision = self.policy.while_loading(view)
            if (decision.held and not self.lora.loads_in_flight()
                    and not any(decision.admits(s) for s in [*running, *waiting])):
                decision = self.policy.keep(self.state.merged)  # nothing to wait for: never stall
        self.decisions[decision.mode + ("+held" if decision.held else "")] += 1
        return decision

    def _guard(self, decision: ModeDecision, running: Sequence[Seq], waiting: Sequence[Seq]) -> ModeDecision:
        target, current = decision.merged_adapter, self.state.merged
        asked = {s.adapter for s in [*running, *waiting]}
        if self.state.claimed_by is not None and decision.mode != "unmerged":
            # Another adapter type holds the weights: no merge, and no group held back for a merged turn either
            # (a base group's "merged" turn on the base weights would only serialise the others).
            return ModeDecision()
        if current is not None and current not in asked and self._blocks_a_slot(waiting):
            return ModeDecision()
        if target is not None and target != current and target not in asked:
            return self.policy.keep(current)  # merging an adapter nobody asks for only costs a switch and a slot
        if decision.held and not any(decision.admits(s) for s in [*running, *waiting]):
            return self.policy.keep(target)
        return decision

    def _blocks_a_slot(self, waiting: Sequence[Seq]) -> bool:
        """The (idle) merged adapter's held slot is the one a waiting request needs."""
        pool = self.lora.pool
        if pool.has_empty_slot() or any(name not in pool.pinned for name in pool.lru):
            return False
        return any(s.adapter is not None and s.adapter not in pool.slot_of for s in waiting)

    def switch_to(self, target: str | None) -> bool:
        """Fold ``target`` into the weights (None: restore the base); False if its slot is not available yet."""
        new = None
        if target is not None:
            try:
                status = self.lora.acquire(target)
            except AdapterError:
                return False
            if status is not SlotStatus.READY:
                return False
            slot = self.lora.slot(target)
            pool = self.lora.pool
            new = MergedAdapter(target, slot, pool.rank_in[slot], pool.scale_in[slot])
        old = self.state.current
        self.switcher.op = self.lora.op
        seconds = self.switcher.switch(old, new)
        self.state.record(new, seconds)
        if old is not None:
            self.lora.release(old.name)
        logger.debug("weights %s -> %s in %.2f ms", old and old.name, target, seconds * 1e3)
        return True

    def observe(self, chunks: Sequence, elapsed_s: float, mode: str = "unmerged") -> None:
        """Fold a measured iteration (its ScheduledChunks, seconds and mode) into the cost model's base costs and
        the per-mode iteration counts."""
        if not chunks:
            return
        decode = sum(1 for c in chunks if c.count == 1 and c.start >= c.seq.prompt_len)
        prefill = sum(c.count for c in chunks) - decode
        tally = self.iterations.setdefault(f"{mode} {'prefill' if prefill else 'decode'}", Counter())
        tally.update(n=1, seconds=elapsed_s, rows=decode + prefill)
        if self.cost is None:
            return
        rows: Counter[str | None] = Counter()
        for c in chunks:
            rows[demand.group(c.seq, self.state)] += c.count
        comp = {g: Load(n, self._rank_of(g) if g is not None else 0) for g, n in rows.items()}
        merged = self.state.merged
        lora = self.cost.lora_s(comp, merged, self._rank_of(merged) if merged else 0)
        self.cost.observe(decode, prefill, lora, elapsed_s, mode)

    def stats(self) -> dict[str, Any]:
        s = self.state
        return {"policy": self.policy_name, "merged_adapter": s.merged, "mode_switches": s.switches,
                "switch_ms_total": s.switch_s_total * 1e3, "switch_ms_last": s.last_switch_s * 1e3,
                "switch_cost_ms": None if self.cost is None else self.cost.switch_s * 1e3,
                "merge_base_copy": self.switcher.base_copy, "weights_claimed_by": s.claimed_by,
                "decisions": dict(self.decisions),
                "iterations": {k: dict(v) for k, v in sorted(self.iterations.items())}}
