"""The `valora` policy: credit-based, starvation- and deadline-aware choice of merged / mixture / unmerged."""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from dataclasses import dataclass

from engine.orchestrator import demand
from engine.orchestrator.cost import Composition, Load
from engine.policy import ModeDecision, ModePolicy, PolicyContext, QueueView, register_policy
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Queue:
    """The requests in the engine as one decision reads them (running first, then waiting)."""

    seqs: list[Sequence]
    groups: list[str | None]  # the plain adapter whose weights serve each request (None: none)
    left: list[int]  # iterations each request still needs
    comp: Composition  # rows per group if all of them ran in one iteration
    counts: Counter  # requests per group
    longest: dict[str | None, int]  # per group, the most iterations any of its requests still needs
    rows: int  # the rows of the longest iteration this queue can make: all of the next rows, up to the budget


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
       x n (everyone waits for the switch), the weights switch to it (rent-or-buy). A merged candidate's rate
       also counts step 4's saving: its arrivals' prefills can skip the eager LoRA overhead.
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
    4. Eager iterations. An iteration with prefill rows runs eagerly, where the multi-LoRA op costs its host
       launch overhead (``eager_lora_s``, tens of milliseconds for a 7B on a GPU) whatever its rows; with M
       merged, an iteration of M's rows alone launches no LoRA op at all. So when M's prefill is due and that
       overhead exceeds a decode iteration, the iteration runs merged with every other request held for it (the
       next one, a cheap decode step, takes them back: never two such iterations in a row, and never while one
       of them is urgent). Everyone gains: the others wait for a LoRA-free prefill and a decode step instead of
       one iteration that pays the overhead.
    5. Prefill batches. Admitting new requests makes the running ones wait through an eager iteration, whose
       LoRA overhead beyond a decode step (``extra``) does not grow with the rows. So new requests (other than
       M's, which step 4 serves) wait while the running ones decode, and are admitted together once the time
       they have waited adds up to what their admission costs the running ones (running x extra): the
       economic-order-quantity trigger of step 2 again; at once when nothing runs or one of them is urgent.
    """

    needs_cost = True

    def __init__(self, ctx: PolicyContext, window_s: float = 2.0, hold_share: float = 0.25) -> None:
        super().__init__(ctx)
        self.window_s, self.hold_share = window_s, hold_share
        self.credit: dict[str | None, float] = {}
        self.arrivals: deque[tuple[float, str | None]] = deque()  # (arrival, group) of the requests seen lately
        self.seen: set[int] = set()
        self.started: float | None = None
        self.isolated = False  # the last decision ran M's prefill alone (step 4)

    def decide(self, view: QueueView) -> ModeDecision:
        seqs = [*view.running, *view.waiting]
        self._track(view, seqs)
        if not seqs:
            return self.keep(view.merged)
        queue = self._snapshot(seqs)
        target = self._weights(view, queue)
        if target is None:
            self.isolated = False
            decision = ModeDecision()
        else:
            decision = self._isolate(view, self._phase(view, target, queue), queue)
        return self._gather_prefills(view, decision, queue)

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

    def _snapshot(self, seqs: list[Sequence]) -> _Queue:
        """One pass over the requests: groups, rows of the next iteration, iterations still needed."""
        ctx = self.ctx
        rows: Counter[str | None] = Counter()
        counts: Counter[str | None] = Counter()
        longest: dict[str | None, int] = {}
        groups, left = [], []
        budget, state = ctx.max_num_batched_tokens, ctx.state
        for seq in seqs:
            g = demand.group(seq, state)
            n, it = demand.rows_and_iterations(seq, budget)
            groups.append(g)
            left.append(it)
            counts[g] += 1
            rows[g] += n
            if it > longest.get(g, -1):
                longest[g] = it
        comp = {g: Load(n, ctx.rank_of(g) if g is not None else 0) for g, n in rows.items()}
        return _Queue(seqs, groups, left, comp, counts, longest, min(sum(rows.values()), budget))

    def _arrival_rates(self, merged: str, now: float) -> tuple[float, float]:
        """Arrivals per second lately of M's requests and of the requests M's weights do not serve."""
        span = max(min(self.window_s, now - (self.started or now)), 1e-3)
        ours = sum(1 for _, g in self.arrivals if g == merged)
        return ours / span, (len(self.arrivals) - ours) / span

    def _rates(self, view: QueueView, queue: _Queue, merged: str | None) -> tuple[float, float, float]:
        """(always-serve rate, batched-cycle rate, LoRA seconds per iteration) with ``merged`` in the weights."""
        ctx, cost = self.ctx, self.ctx.cost
        n, step = len(queue.seqs), max(cost.typical_iteration_s, 1e-6)
        lora = cost.lora_s(queue.comp, merged, ctx.rank_of(merged) if merged else 0)
        always = n * lora / step
        if merged is None or lora == 0.0:
            return always, always, lora
        length = max((it for g, it in queue.longest.items() if g != merged), default=32)  # a phase: its longest
        ours, rate = self._arrival_rates(merged, view.now)
        if rate == 0.0:
            return always, 0.0, lora
        if rate >= ours:  # a held request must be outnumbered by those its wait speeds up
            return always, always, lora
        cycle = max(math.sqrt(2 * n * lora * length / rate), length * step)
        return always, rate * cycle / 2 + n * lora * length / cycle, lora

    # -- step 1: which adapter the weights hold
    def _weights(self, view: QueueView, queue: _Queue) -> str | None:
        ctx, cur, counts = self.ctx, view.merged, queue.counts
        top = max((g for g in counts if g is not None), key=lambda g: (counts[g], g == cur), default=None)
        candidates = {None, cur, top}
        rate = {c: min(self._rates(view, queue, c)[:2]) - self._eager_saving(view, queue, c) for c in candidates}
        step = ctx.cost.typical_iteration_s
        self.credit = {c: max(0.0, self.credit.get(c, 0.0) + (rate[cur] - rate[c]) * step)
                       for c in candidates if c != cur}
        if not self.credit:
            return cur
        best = max(self.credit, key=self.credit.__getitem__)
        if self.credit[best] > 0 and self.credit[best] >= ctx.cost.switch_s * len(queue.seqs):
            logger.debug("valora: weights %s -> %s (credit %.4f request-s)", cur, best, self.credit[best])
            self.credit = {}
            return best
        return cur

    def _eager_saving(self, view: QueueView, queue: _Queue, merged: str | None) -> float:
        """Step 4's gain as a rate: with ``merged`` in the weights, each of its arrivals' prefills can run without
        the eager LoRA overhead that every request in the engine would wait through."""
        if merged is None:
            return 0.0
        ours, _ = self._arrival_rates(merged, view.now)
        return ours * len(queue.seqs) * self._eager(queue, merged)[1]

    # -- steps 2 and 3: who runs with M merged
    def _phase(self, view: QueueView, merged: str, queue: _Queue) -> ModeDecision:
        ctx, cost = self.ctx, self.ctx.cost
        n_running = len(view.running)
        others = [i for i, g in enumerate(queue.groups) if g != merged]
        if not others:
            return ModeDecision("merged", merged)
        waiting = [i for i in others if i >= n_running]
        always, batched, lora = self._rates(view, queue, merged)
        ours_waiting = len(queue.seqs) - n_running - len(waiting)
        saturated = ours_waiting >= max(1, ctx.max_num_seqs - n_running)
        if not waiting or (always <= batched and not saturated):
            return ModeDecision("mixture", merged)
        seqs, left, now = queue.seqs, queue.left, view.now
        longest = cost.step_s(n_running + len(waiting), queue.rows) + cost.lora_launch_s + lora
        admit = {i for i in waiting if self._urgent(seqs[i], now, lora, 2 * longest)
                 or now - seqs[i].clock.arrived >= self.hold_share * self._budget(seqs[i])}
        phase_left = max((left[i] for i in others if i < n_running or i in admit), default=0)
        rest = [i for i in waiting if i not in admit]
        if rest:
            adds = max(left[i] for i in rest) - phase_left
            waited = sum(max(now - seqs[i].clock.arrived, 0.0) for i in rest)
            if waited >= len(seqs) * lora * adds:
                admit.update(rest)
            else:
                admit.update(i for i in rest if left[i] <= phase_left)
        held = frozenset(seqs[i].seq_id for i in waiting if i not in admit)
        return ModeDecision("mixture" if len(others) > len(waiting) or admit else "merged", merged, held)

    # -- steps 4 and 5: eager (prefill) iterations
    def _eager(self, queue: _Queue, merged: str | None) -> tuple[float, float, float]:
        """(decode-regime LoRA seconds of an iteration on ``merged``, what an eager iteration's LoRA overhead costs
        beyond a decode iteration, the slack under which a request counts as urgent for steps 4 and 5)."""
        ctx, cost = self.ctx, self.ctx.cost
        lora = cost.lora_s(queue.comp, merged, ctx.rank_of(merged) if merged else 0)
        extra = max(cost.eager_lora_s - cost.step_s(len(queue.seqs), 0) - lora, 0.0)
        guard = 2 * (cost.step_s(len(queue.seqs), queue.rows) + cost.eager_lora_s)
        return lora, extra, guard

    def _isolate(self, view: QueueView, decision: ModeDecision, queue: _Queue) -> ModeDecision:
        """Step 4: M's prefill without anyone else's LoRA rows."""
        merged, isolate = decision.merged_adapter, False
        if not self.isolated:
            lora, extra, guard = self._eager(queue, merged)
            pairs = list(zip(queue.seqs, queue.groups, strict=True))
            others = [s for s, g in pairs if g != merged and decision.admits(s)]
            ours_prefill = any(g == merged and s.in_prefill and decision.admits(s) for s, g in pairs)
            isolate = (extra > 0.0 and bool(others) and ours_prefill
                       and not any(self._urgent(s, view.now, lora, guard) for s in others))
        self.isolated = isolate
        if not isolate:
            return decision
        return ModeDecision("merged", merged, decision.held | {s.seq_id for s in others})

    def _gather_prefills(self, view: QueueView, decision: ModeDecision, queue: _Queue) -> ModeDecision:
        """Step 5: new requests' prefills in batches."""
        merged = decision.merged_adapter
        running = [s for s in view.running if decision.admits(s)]
        if self.isolated or not running:
            return decision
        lora, extra, guard = self._eager(queue, merged)
        waiting = zip(queue.seqs[len(view.running):], queue.groups[len(view.running):], strict=True)
        new = [s for s, g in waiting if decision.admits(s) and (merged is None or g != merged)]
        if (extra == 0.0 or not new
                or sum(max(view.now - s.clock.arrived, 0.0) for s in new) >= len(running) * extra
                or any(self._urgent(s, view.now, lora, guard) for s in new)):
            return decision
        return ModeDecision(decision.mode, merged, decision.held | {s.seq_id for s in new})

    def _budget(self, seq: Sequence) -> float:
        """The request's whole latency budget: deadline (or created_at + slo_s) minus created_at."""
        return max(demand.deadline(seq, self.ctx.slo_s) - seq.request.created_at, 0.0)

    def _urgent(self, seq: Sequence, now: float, lora_step_s: float, guard_s: float) -> bool:
        slack = demand.deadline(seq, self.ctx.slo_s) - now - demand.service_s(seq, self.ctx.cost, lora_step_s)
        return slack <= guard_s
