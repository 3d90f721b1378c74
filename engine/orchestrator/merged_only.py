"""The `merged-only` policy (a reference point): one adapter group at a time on merged weights, FIFO across groups."""

from __future__ import annotations

from engine.orchestrator import demand
from engine.policy import ModeDecision, ModePolicy, QueueView, register_policy


@register_policy("merged-only")
class MergedOnlyPolicy(ModePolicy):
    """Never any multi-LoRA work: the weights hold one group's adapter and only that group's requests run.

    Rule: the served group G is that of the oldest running request, or, with none running, of the oldest
    waiting one. G's waiting requests are admitted only if they arrived before the oldest waiting request of
    another group, so G drains and the weights move on in arrival order (no group starves). Base requests
    (and non-mergeable adapters' requests) form the group served on the base weights.
    """

    def decide(self, view: QueueView) -> ModeDecision:
        state = self.ctx.state
        seqs = [*view.running, *view.waiting]
        if not seqs:
            return ModeDecision("merged", view.merged)
        oldest = min(view.running or view.waiting, key=lambda s: s.clock.arrived)
        served = demand.group(oldest, state)
        cutoff = min((s.clock.arrived for s in view.waiting if demand.group(s, state) != served), default=None)
        held = {s.seq_id for s in seqs if demand.group(s, state) != served}
        if cutoff is not None:
            held |= {s.seq_id for s in view.waiting if s.clock.arrived > cutoff}
        return ModeDecision("merged", served, frozenset(held))

    def while_loading(self, view: QueueView) -> ModeDecision:
        """Only the merged group runs while the next group's adapter loads, so no request runs multi-LoRA work."""
        state = self.ctx.state
        held = {s.seq_id for s in [*view.running, *view.waiting] if demand.group(s, state) != view.merged}
        return ModeDecision("merged", view.merged, frozenset(held))
