"""The `dlora` policy: dLoRA's (OSDI '24) merge/unmerge thresholds with credit-based starvation control."""

from __future__ import annotations

from engine.orchestrator import demand
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, register_policy
from engine.sequence import Sequence


@register_policy("dlora")
class DLoRAPolicy(ModePolicy):
    """Two modes only: merged (one adapter, others paused) and unmerged (everyone); no mixture.

    Rule, each iteration, over the requests in the engine (running and waiting), n of them:

    - Threshold: merging adapter M pays when its requests alone, free of LoRA work, out-serve everyone with it:
      share_M >= theta = T / (T + L), with T the measured base iteration time and L the measured multi-LoRA
      time of the queue's rows unmerged (dLoRA tunes its threshold from profiled merged / unmerged throughput).
    - Unmerged -> merged(M) when the most requested adapter M reaches theta, and no request is still owed
      service from the last starvation unmerge. Requests of other adapters are paused (kept in memory,
      not scheduled) while M stays merged.
    - Merged(M) -> unmerged when M's share falls under ``hysteresis`` x theta, or when any paused or queued
      request's credit - the time it has gone without being served - reaches ``starvation_s``; the requests that
      starved then run unmerged until they finish before the next merge.
    - Either way a mode is kept for at least ``dwell`` iterations (starvation aside), so that a share hovering
      at the threshold does not pay a switch per iteration.
    """

    needs_cost = True

    def __init__(self, ctx: PolicyContext, starvation_s: float = 1.0, hysteresis: float = 0.9,
                 dwell: int = 8) -> None:
        super().__init__(ctx)
        self.starvation_s, self.hysteresis, self.dwell = starvation_s, hysteresis, dwell
        self.since_switch = dwell
        self.stalled_since: dict[int, float] = {}  # seq id -> when it last stopped being served
        self.owed: set[int] = set()  # starved sequences to finish before merging again

    def decide(self, view: QueueView) -> ModeDecision:
        seqs = [*view.running, *view.waiting]
        live = {s.seq_id for s in seqs}
        self.owed &= live
        self.stalled_since = {k: v for k, v in self.stalled_since.items() if k in live}
        if not seqs:
            return ModeDecision() if view.merged is None else ModeDecision("merged", view.merged)
        state, cur = self.ctx.state, view.merged
        counts = demand.counts(seqs, state)
        theta = self._threshold(view, seqs)
        self.since_switch += 1
        settled = self.since_switch >= self.dwell
        if cur is not None:
            others = [s for s in seqs if demand.group(s, state) != cur]
            starving = [s for s in others if view.now - self._stalled(s) >= self.starvation_s]
            if starving or (settled and counts[cur] / len(seqs) < self.hysteresis * theta):
                self.owed |= {s.seq_id for s in starving}
                return self._unmerged()
            return self._merged(cur, others, view.now)
        top = max((g for g in counts if g is not None), key=lambda g: counts[g], default=None)
        if settled and top is not None and not self.owed and counts[top] / len(seqs) >= theta:
            return self._merged(top, [s for s in seqs if demand.group(s, state) != top], view.now)
        return self._unmerged()

    def _threshold(self, view: QueueView, seqs: list[Sequence]) -> float:
        ctx, cost = self.ctx, self.ctx.cost
        comp = demand.composition(seqs, ctx.state, ctx.rank_of, ctx.max_num_batched_tokens)
        base = cost.step_s(len(view.running), sum(demand.prefill_left(s) for s in view.waiting))
        lora = cost.lora_s(comp, None)
        return base / (base + lora) if base + lora > 0 else 1.0

    def _stalled(self, seq: Sequence) -> float:
        return self.stalled_since.get(seq.seq_id, seq.clock.arrived)

    def _merged(self, adapter: str, others: list[Sequence], now: float) -> ModeDecision:
        if adapter != self.ctx.state.merged:
            self.since_switch = 0
        for seq in others:
            self.stalled_since.setdefault(seq.seq_id, seq.clock.arrived if seq.num_computed == 0 else now)
        return ModeDecision("merged", adapter, frozenset(s.seq_id for s in others))

    def _unmerged(self) -> ModeDecision:
        if self.ctx.state.merged is not None:
            self.since_switch = 0
        self.stalled_since.clear()
        return ModeDecision()
