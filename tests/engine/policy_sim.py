"""A discrete-event model of the engine loop in virtual time, for testing mode policies against a cost model.

It forms batches the way engine.scheduler does (running first, then waiting in arrival order, under the
sequence and token limits, skipping what the decision holds back), charges each iteration and each weight
switch from a ``CostModel``, and records when every request was first scheduled and when it finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from engine.orchestrator.cost import CostModel, Load
from engine.orchestrator.state import MergedAdapter, MergeState
from engine.policy import PolicyContext, QueueView, create_policy
from engine.request import EngineRequest, SamplingParams
from engine.sequence import Sequence
from tests.engine.conftest import HiddenHead


@dataclass(frozen=True)
class SimRequest:
    arrival: float
    adapter: str | None
    prompt_tokens: int
    output_tokens: int  # 0 with a task head (prefill only)
    deadline: float | None = None


@dataclass
class Outcome:
    request: SimRequest
    started: float
    finished: float
    deadline: float


def make_sequence(req: SimRequest) -> Sequence:
    head = HiddenHead(1) if req.output_tokens == 0 else None
    request = EngineRequest(prompt="", adapter=req.adapter, created_at=req.arrival, deadline=req.deadline,
                            sampling=SamplingParams(max_tokens=req.output_tokens))
    seq = Sequence(request=request, prompt_ids=[0] * req.prompt_tokens,
                   positions=np.zeros((3, req.prompt_tokens), dtype=np.int64), rope_delta=0,
                   max_tokens=req.output_tokens, head=head)
    seq.clock.arrived = req.arrival
    return seq


class Simulator:
    """Serve a trace with policy ``name``; the policy sees ``cost``, the clock charges ``truth`` (default: the same)."""

    def __init__(self, name: str, cost: CostModel, ranks: dict[str, int], max_num_seqs: int = 64,
                 max_tokens: int = 2048, slo_s: float = 10.0, truth: CostModel | None = None,
                 non_mergeable: set[str] | None = None) -> None:
        self.state = MergeState(non_mergeable=set(non_mergeable or ()))
        self.ranks, self.truth = ranks, truth or cost
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_tokens
        ctx = PolicyContext(state=self.state, cost=replace(cost), rank_of=lambda n: ranks.get(n, 0), slo_s=slo_s,
                            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens)
        self.policy = create_policy(name, ctx)
        self.slo_s = slo_s
        self.modes: list[str] = []
        self.prefill_iterations = 0  # iterations with prefill rows (run eagerly on a GPU)

    def run(self, trace: list[SimRequest], horizon: float = 1e9) -> list[Outcome]:
        pending = deque(sorted(trace, key=lambda r: r.arrival))
        running: list[Sequence] = []
        waiting: deque[Sequence] = deque()
        origin: dict[int, SimRequest] = {}
        started: dict[int, float] = {}
        done: list[Outcome] = []
        now = 0.0
        while (pending or running or waiting) and now < horizon:
            while pending and pending[0].arrival <= now:
                req = pending.popleft()
                seq = make_sequence(req)
                origin[seq.seq_id] = req
                waiting.append(seq)
            if not running and not waiting:
                now = pending[0].arrival
                continue
            decision = self.policy.decide(QueueView(running, waiting, self.state.merged, now))
            if decision.merged_adapter != self.state.merged:
                now += self.truth.switch_s
                target = decision.merged_adapter
                self.state.record(None if target is None else MergedAdapter(target, 0, self.ranks[target], 1.0),
                                  self.truth.switch_s)
            chunks = self._batch(running, waiting, decision)
            if not chunks:
                now = pending[0].arrival if pending else now + self.truth.decode_step_s
                continue
            self.modes.append(decision.mode)
            self.prefill_iterations += any(seq.in_prefill for seq, _ in chunks)
            begin = now
            now += self._cost(chunks)
            self._observe(chunks, now - begin)
            for seq, count in chunks:
                started.setdefault(seq.seq_id, begin)
                if self._advance(seq, count):
                    running.remove(seq)
                    req = origin[seq.seq_id]
                    deadline = req.deadline if req.deadline is not None else req.arrival + self.slo_s
                    done.append(Outcome(req, started[seq.seq_id], now, deadline))
        return done

    def _batch(self, running: list[Sequence], waiting: deque[Sequence], decision) -> list[tuple[Sequence, int]]:
        budget, chunks = self.max_tokens, []
        for seq in running:
            if decision.admits(seq) and budget > 0:
                count = min(seq.remaining, budget)
                chunks.append((seq, count))
                budget -= count
        for seq in list(waiting):
            if budget <= 0 or len(running) >= self.max_num_seqs:
                break
            if not decision.admits(seq):
                continue
            count = min(seq.remaining, budget)
            waiting.remove(seq)
            running.append(seq)
            chunks.append((seq, count))
            budget -= count
        return chunks

    def _rows(self, chunks: list[tuple[Sequence, int]]) -> tuple[int, int, dict]:
        rows: dict[str | None, int] = {}
        decode = prefill = 0
        for seq, count in chunks:
            key = seq.adapter if self.state.mergeable(seq.adapter) else None
            rows[key] = rows.get(key, 0) + count
            if seq.in_prefill:
                prefill += count
            else:
                decode += 1
        return decode, prefill, {k: Load(n, self.ranks.get(k, 0) if k is not None else 0) for k, n in rows.items()}

    def _cost(self, chunks: list[tuple[Sequence, int]]) -> float:
        """An iteration's seconds: its base cost and its multi-LoRA cost; one with prefill rows runs eagerly, where
        the multi-LoRA op costs at least ``eager_lora_s`` (its host launch overhead) when it runs at all."""
        decode, prefill, comp = self._rows(chunks)
        merged = self.state.merged
        lora = self.truth.lora_s(comp, merged, self.ranks.get(merged, 0))
        if prefill and lora > 0.0:
            lora = max(lora, self.truth.eager_lora_s)
        return self.truth.step_s(decode, prefill) + lora

    def _observe(self, chunks: list[tuple[Sequence, int]], elapsed: float) -> None:
        """What the engine does after each step: the policy's cost model follows the measured iterations."""
        cost = self.policy.ctx.cost
        if cost is not None:
            decode, prefill, comp = self._rows(chunks)
            merged = self.state.merged
            lora = cost.lora_s(comp, merged, self.ranks.get(merged, 0))
            mode = "unmerged" if merged is None else "mixture" if lora > 0.0 else "merged"
            cost.observe(decode, prefill, lora, elapsed, mode)

    @staticmethod
    def _advance(seq: Sequence, count: int) -> bool:
        """Apply an iteration to ``seq``; True when it finished."""
        seq.num_computed += count
        if seq.num_computed < seq.num_tokens:
            return False
        if seq.head is not None:
            return True
        seq.token_ids.append(0)
        return seq.num_output >= seq.max_tokens

