"""The `valora` policy: credit-based, starvation- and deadline-aware choice of merged / mixture / unmerged."""

from __future__ import annotations

import logging
import math
from collections import deque

from engine.orchestrator import demand
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, register_policy
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


@register_policy("valora")
class ValoraPolicy(ModePolicy):
    """Lowest average latency from measured costs, without letting a request miss its deadline when avoidable.

    Costs are rates of latency lost to LoRA work: request-seconds per second, over the n requests in the engine
    (every iteration's multi-LoRA seconds delay all of them). T is the measured typical iteration time; Δ the
    estimated multi-LoRA seconds of an iteration on given weights (CostModel.lora_s over the queue's rows).

    1. Weights. Candidates: unmerged, the current adapter M, and the most requested mergeable adapter.
       Unmerged loses n·Δ_unmerged/T. With M merged, M's rows are free and the others' rows pay their terms
       plus -M (Δ_M); the others can run beside M all the time (mixture: n·Δ_M/T), or be held and served in
       batches so that the iterations in between run merged: with the others arriving at rate λ and a batch
       of them needing L iterations (its longest), a cycle of length C costs λC/2 (waiting) + n·Δ_M·L/C (one
       mixture phase), at best sqrt(2·n·Δ_M·L·λ) (C = sqrt(2·n·Δ_M·L/λ), no shorter than the phase L·T).
       M's rate is the cheaper of the two; batching only counts while M's requests arrive faster than the
       others (a held request must be outnumbered by those its wait speeds up). Each iteration, every
       candidate earns credit = (current rate - its rate) x T; when a credit reaches the measured switch cost
       x n (everyone waits for the switch), the weights switch to it (rent-or-buy).
    2. With M merged and nobody else in the engine, the iteration runs merged (no LoRA work). Others already
       running keep running (mixture). If batching pays (cycle cheaper than mixture), waiting others are held,
       and all of them are admitted (a mixture phase) once the time they have spent waiting reaches what the
       phase costs everyone else, n·Δ_M·(iterations it adds): the economic-order-quantity trigger of step 1's
       cycle. A held request that ends within the phase already running joins at once (it costs nothing).
       Batching also pays, whatever step 1's estimate, while the engine is saturated with M's requests (M's
       waiting requests alone fill the batch's free room): merged iterations then serve as many requests, faster.
       Otherwise everyone runs (mixture).
    3. Deadlines (starvation). A held request is admitted regardless once it has waited ``hold_share`` of its
       latency budget (deadline, or created_at + slo_s, minus created_at), or once its slack - deadline minus now
       minus its estimated service time - falls under two of the longest iterations the current batch can take;
       so no request waits past its deadline when the engine has room for it.
    """

    needs_cost = True

    def __init__(self, ctx: PolicyContext, window_s: float = 2.0, hold_share: float = 0.25) -> None:
        super().__init__(ctx)
        self.window_s, self.hold_share = window_s, hold_share
        self.credit: dict[str | None, float] = {}
        self.arrivals: deque[tuple[float, str | None]] = deque()  # (arrival, group) of the requests seen lately
        self.seen: set[int] = set()
        self.started: float | None = None

    def decide(self, view: QueueView) -> ModeDecision:
        seqs = [*view.running, *view.waiting]
        self._track(view, seqs)
        if not seqs:
            return self.keep(view.merged)
        target = self._weights(view, seqs)
        if target is None:
            return ModeDecision()
        return self._phase(view, target, seqs)

    # -- what the queue looks like
    def _track(self, view: QueueView, seqs: list[Sequence]) -> None:
        if self.started is None:
            self.started = view.now
        live = {s.seq_id for s in seqs}
        for seq in view.waiting:
            if seq.seq_id not in self.seen:
                self.arrivals.append((seq.clock.arrived, demand.group(seq, self.ctx.state)))
        self.seen = live | (self.seen & live)
        while self.arrivals and self.arrivals[0][0] < view.now - self.window_s:
            self.arrivals.popleft()

    def _arrival_rates(self, merged: str, now: float) -> tuple[float, float]:
        """Arrivals per second lately of M's requests and of the requests M's weights do not serve."""
        span = max(min(self.window_s, now - (self.started or now)), 1e-3)
        ours = sum(1 for _, g in self.arrivals if g == merged)
        return ours / span, (len(self.arrivals) - ours) / span

    def _rates(self, view: QueueView, seqs: list[Sequence], merged: str | None) -> tuple[float, float]:
        """(always-serve rate, batched-cycle rate) of latency lost per second with ``merged`` in the weights."""
        ctx, cost = self.ctx, self.ctx.cost
        comp = demand.composition(seqs, ctx.state, ctx.rank_of, ctx.max_num_batched_tokens)
        n, step = len(seqs), max(cost.typical_iteration_s, 1e-6)
        lora = cost.lora_s(comp, merged, ctx.rank_of(merged) if merged else 0)
        always = n * lora / step
        if merged is None or lora == 0.0:
            return always, always
        others = [s for s in seqs if demand.group(s, ctx.state) != merged]
        length = max((demand.iterations_left(s) for s in others), default=32)  # a phase lasts its longest
        ours, rate = self._arrival_rates(merged, view.now)
        if rate == 0.0:
            return always, 0.0
        if rate >= ours:  # a held request must be outnumbered by those its wait speeds up
            return always, always
        cycle = max(math.sqrt(2 * n * lora * length / rate), length * step)
        return always, rate * cycle / 2 + n * lora * length / cycle

    # -- step 1: which adapter the weights hold
    def _weights(self, view: QueueView, seqs: list[Sequence]) -> str | None:
        ctx, cur = self.ctx, view.merged
        counts = demand.counts(seqs, ctx.state)
        top = max((g for g in counts if g is not None), key=lambda g: (counts[g], g == cur), default=None)
        candidates = {None, cur, top}
        rate = {c: min(self._rates(view, seqs, c)) for c in candidates}
        step = ctx.cost.typical_iteration_s
        self.credit = {c: max(0.0, self.credit.get(c, 0.0) + (rate[cur] - rate[c]) * step)
                       for c in candidates if c != cur}
        if not self.credit:
            return cur
        best = max(self.credit, key=self.credit.__getitem__)
        if self.credit[best] > 0 and self.credit[best] >= ctx.cost.switch_s * len(seqs):
            logger.debug("valora: weights %s -> %s (credit %.4f request-s)", cur, best, self.credit[best])
            self.credit = {}
            return best
        return cur

    # -- steps 2 and 3: who runs with M merged
    def _phase(self, view: QueueView, merged: str, seqs: list[Sequence]) -> ModeDecision:
        ctx, cost, state = self.ctx, self.ctx.cost, self.ctx.state
        others_running = [s for s in view.running if demand.group(s, state) != merged]
        others_waiting = [s for s in view.waiting if demand.group(s, state) != merged]
        if not others_running and not others_waiting:
            return ModeDecision("merged", merged)
        always, batched = self._rates(view, seqs, merged)
        ours_waiting = sum(1 for s in view.waiting if demand.group(s, state) == merged)
        saturated = ours_waiting >= max(1, ctx.max_num_seqs - len(view.running))
        if not others_waiting or (always <= batched and not saturated):
            return ModeDecision("mixture", merged)
        budget = ctx.max_num_batched_tokens
        lora = cost.lora_s(demand.composition([*others_running, *others_waiting], state, ctx.rank_of, budget),
                           merged, ctx.rank_of(merged))
        longest = cost.step_s(len(view.running) + len(others_waiting), budget) + cost.lora_launch_s + lora
        admit = {s.seq_id for s in others_waiting if self._urgent(s, view.now, lora, 2 * longest)
                 or view.now - s.clock.arrived >= self.hold_share * self._budget(s)}
        phase_left = max((demand.iterations_left(s) for s in [*others_running, *others_waiting]
                          if s.seq_id in admit or s in others_running), default=0)
        rest = [s for s in others_waiting if s.seq_id not in admit]
        if rest:
            adds = max(demand.iterations_left(s) for s in rest) - phase_left
            waited = sum(max(view.now - s.clock.arrived, 0.0) for s in rest)
            if waited >= len(seqs) * lora * adds:
                admit |= {s.seq_id for s in rest}
            else:
                admit |= {s.seq_id for s in rest if demand.iterations_left(s) <= phase_left}
        held = frozenset(s.seq_id for s in others_waiting if s.seq_id not in admit)
        return ModeDecision("mixture" if others_running or admit else "merged", merged, held)

    def _budget(self, seq: Sequence) -> float:
        """The request's whole latency budget: deadline (or created_at + slo_s) minus created_at."""
        return max(demand.deadline(seq, self.ctx.slo_s) - seq.request.created_at, 0.0)

    def _urgent(self, seq: Sequence, now: float, lora_step_s: float, guard_s: float) -> bool:
        slack = demand.deadline(seq, self.ctx.slo_s) - now - demand.service_s(seq, self.ctx.cost, lora_step_s)
        return slack <= guard_s
