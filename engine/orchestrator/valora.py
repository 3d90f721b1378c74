"""The `valora` policy: credit-based, starvation- and deadline-aware choice of merged / mixture / unmerged."""

from __future__ import annotations

import logging

from engine.orchestrator import demand
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, register_policy
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


@register_policy("valora")
class ValoraPolicy(ModePolicy):
    """Lowest average latency from measured costs, without letting a request miss its deadline when avoidable.

    Rule, each iteration (all costs from the measured CostModel; "n" is the number of requests in the engine):

    1. Weights. Candidates: the current state, unmerged, and the adapter M with the most requests if it holds at
       least ``min_share`` of them. A candidate's estimated LoRA seconds per iteration is the multi-LoRA work of the
       queue's rows on its weights: unmerged pays every adapter row; M merged pays only the rows of others (their
       own terms plus -M), and only for the share (1 - share_M) of iterations that step 2 lets them run in.
       Every iteration, each candidate earns credit = (estimate of the current state - its estimate); when a
       credit reaches the measured switch cost, the weights switch to it (rent-or-buy: a switch is bought once
       staying has cost as much as the switch; every request pays both alike, so n cancels).
    2. With M merged: if only M's requests are present, the iteration runs merged (no LoRA work at all). Other
       requests (other adapters, base, non-mergeable) already running keep running, in mixture mode. Waiting
       ones are held while merged iterations pay off, and admitted together (a mixture "phase") as soon as
       the latency they have accumulated waiting reaches what the phase costs everyone else: extra LoRA seconds
       per iteration x the iterations it adds x n. A held request whose phase would end within the phase
       already running joins at once (it costs nothing).
    3. Deadlines (starvation). A held request is admitted regardless once its slack - deadline (or created_at
       + slo_s) minus now minus its estimated service time - falls under two of the longest iterations the
       current batch can take: so no request waits past its deadline when the engine has room for it.
    """

    needs_cost = True

    def __init__(self, ctx: PolicyContext, min_share: float = 0.5) -> None:
        super().__init__(ctx)
        self.min_share = min_share
        self.credit: dict[str | None, float] = {}

    def decide(self, view: QueueView) -> ModeDecision:
        seqs = [*view.running, *view.waiting]
        if not seqs:
            return self.keep(view.merged)
        target = self._weights(view, seqs)
        if target is None:
            return ModeDecision()
        return self._phase(view, target, seqs)

    # -- step 1: which adapter the weights hold
    def _weights(self, view: QueueView, seqs: list[Sequence]) -> str | None:
        ctx, cost, cur = self.ctx, self.ctx.cost, view.merged
        counts = demand.counts(seqs, ctx.state)
        comp = demand.composition(seqs, ctx.state, ctx.rank_of, ctx.max_num_batched_tokens)
        share = {g: n / len(seqs) for g, n in counts.items()}

        def estimate(weights: str | None) -> float:
            if weights is None:
                return cost.lora_s(comp, None)
            mixture = cost.lora_s(comp, weights, ctx.rank_of(weights))
            return (1.0 - share.get(weights, 0.0)) * mixture if share.get(weights, 0.0) >= self.min_share \
                else mixture

        top = max((g for g in counts if g is not None), key=lambda g: (counts[g], g == cur), default=None)
        candidates = {None} | ({top} if top is not None and share[top] >= self.min_share else set())
        candidates.discard(cur)
        here = estimate(cur)
        self.credit = {c: max(0.0, self.credit.get(c, 0.0) + here - estimate(c)) for c in candidates}
        best = max(self.credit, key=self.credit.__getitem__, default=None)
        if best is not None and self.credit[best] >= cost.switch_s and self.credit[best] > 0:
            logger.debug("valora: switching weights %s -> %s (credit %.4f s)", cur, best, self.credit[best])
            self.credit = {}
            return best
        return cur

    # -- steps 2 and 3: who runs with M merged
    def _phase(self, view: QueueView, merged: str, seqs: list[Sequence]) -> ModeDecision:
        ctx, cost = self.ctx, self.ctx.cost
        state, rank_m = ctx.state, ctx.rank_of(merged)
        others_running = [s for s in view.running if demand.group(s, state) != merged]
        others_waiting = [s for s in view.waiting if demand.group(s, state) != merged]
        if not others_running and not others_waiting:
            return ModeDecision("merged", merged)
        budget = ctx.max_num_batched_tokens
        extra = cost.lora_s(demand.composition([*others_running, *others_waiting], state, ctx.rank_of, budget),
                            merged, rank_m)  # LoRA seconds per iteration while others run
        longest = (cost.step_s(len(view.running) + len(others_waiting), budget) + cost.lora_launch_s + extra)
        admit = [s for s in others_waiting if self._urgent(s, view.now, extra, 2 * longest)]
        phase_left = max((demand.iterations_left(s) for s in [*others_running, *admit]), default=0)
        rest = [s for s in others_waiting if s not in admit]
        if rest:
            free = [s for s in rest if demand.iterations_left(s) <= phase_left]
            adds = max(demand.iterations_left(s) for s in rest) - phase_left
            waited = sum(max(view.now - s.clock.arrived, 0.0) for s in rest)
            admit += rest if waited >= extra * adds * len(seqs) else free
        held = frozenset(s.seq_id for s in others_waiting if s not in admit)
        mode = "mixture" if others_running or admit else "merged"
        return ModeDecision(mode, merged, held)

    def _urgent(self, seq: Sequence, now: float, lora_step_s: float, guard_s: float) -> bool:
        slack = demand.deadline(seq, self.ctx.slo_s) - now - demand.service_s(seq, self.ctx.cost, lora_step_s)
        return slack <= guard_s
