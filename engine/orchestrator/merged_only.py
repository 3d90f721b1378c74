"""The `merged-only` policy (a reference point): one adapter group at a time on merged weights, FIFO across groups."""

from __future__ import annotations

from engine.orchestrator import demand
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, register_policy


@register_policy("merged-only")
class MergedOnlyPolicy(ModePolicy):
    """Never any multi-LoRA work: the weights hold one group's adapter and only that group's requests run.

    Rule: the served group G is that of the oldest running request, or, with none running, of the oldest
    waiting one. G's waiting requests are admitted only if they arrived before the oldest waiting request of
    another group, so G drains and the weights move on in arrival order (no group starves). Base requests
    (and non-mergeable adapters' requests) form the group served on the base weights.
    """

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self._seqs: list = []  # the queue of the last decision

    def decide(self, view: QueueView) -> ModeDecision:
        self._seqs = [*view.running, *view.waiting]
        state = self.ctx.state
        seqs = self._seqs
        if not seqs:
            return ModeDecision("merged", view.merged)
        oldest = min(view.running or view.waiting, key=lambda s: s.clock.arrived)
        served = demand.group(oldest, state)
        cutoff = min((s.clock.arrived for s in view.waiting if demand.group(s, state) != served), default=None)
        held = {s.seq_id for s in seqs if demand.group(s, state) != served}
        if cutoff is not None:
            held |= {s.seq_id for s in view.waiting if s.clock.arrived > cutoff}
        return ModeDecision("merged", served, frozenset(held))

    def keep(self, merged: str | None) -> ModeDecision:
        """The served group's weights are not ready (its adapter is still loading): stay on ``merged`` and run
        only its group, so that no request runs multi-LoRA work meanwhile."""
        state = self.ctx.state
        held = {s.seq_id for s in self._seqs if demand.group(s, state) != merged}
        return ModeDecision("merged", merged, frozenset(held))
