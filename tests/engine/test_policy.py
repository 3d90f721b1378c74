"""Mode policies in virtual time (tests/engine/policy_sim.py): deadlines, merging, thresholds, fairness."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.orchestrator.cost import CostModel, Load
from engine.orchestrator.state import MergedAdapter, MergeState
from engine.policy import PolicyContext, QueueView, create_policy
from tests.engine.policy_sim import SimRequest, Simulator, make_sequence

RANKS = {f"a{i}": (8, 16, 32, 64)[i % 4] for i in range(8)} | {"moe": 16}


def costs(**kw) -> CostModel:
    """H200-like 7B costs with a multi-LoRA op that costs two thirds of a decode step (seconds)."""
    base = dict(switch_s=0.027, lora_launch_s=0.004, lora_segment_rank_s=1.7e-6, lora_token_rank_s=2.5e-8,
                decode_step_s=0.006, prefill_token_s=3e-5)
    return CostModel(**{**base, **kw})


def adversarial_trace(seed: int = 0, duration: float = 20.0) -> list[SimRequest]:
    """A flood of one adapter's long generations (which makes merged iterations pay and holding others
    tempting) and sparse requests of other adapters, base and task heads, many with deadlines barely above
    their own service time."""
    rng = np.random.default_rng(seed)
    trace = []
    t = 0.0
    while t < duration:
        t += rng.exponential(1 / 40)
        trace.append(SimRequest(t, "a0", int(rng.integers(40, 120)), int(rng.integers(64, 160))))
    t = 0.0
    while t < duration:
        t += rng.exponential(1 / 3)
        adapter = [None, "a1", "a2", "a3", "a5"][int(rng.integers(0, 5))]
        out = 0 if rng.random() < 0.3 else int(rng.integers(4, 48))
        service = out * 0.011 + 0.01  # its own decode at a loaded step, plus a prefill
        trace.append(SimRequest(t, adapter, int(rng.integers(20, 80)), out,
                                deadline=t + service * float(rng.uniform(1.3, 6.0)) + 0.05))
    return trace


def late_starts(outcomes) -> list:
    return [o for o in outcomes if o.started > o.deadline + 1e-9]


def test_valora_never_holds_a_request_past_its_deadline():
    trace = adversarial_trace()
    sim = Simulator("valora", costs(), RANKS, max_num_seqs=512, max_tokens=4096)
    outcomes = sim.run(trace)
    assert len(outcomes) == len(trace)
    others = [o for o in outcomes if o.request.adapter != "a0"]
    waited = [o.started - o.request.arrival for o in others]
    assert sim.modes.count("merged") > 0.2 * len(sim.modes), "valora never ran merged: nothing was tested"
    assert max(waited) > 0.1, "no request was ever held: the deadlines were never at stake"
    assert not late_starts(outcomes), f"{len(late_starts(outcomes))} requests started after their deadline"
    roomy = [o for o in others if o.deadline - o.request.arrival >= 3 * (o.request.output_tokens * 0.011 + 0.01)]
    assert all(o.finished <= o.deadline for o in roomy), "a request with room to spare finished late"


@pytest.mark.parametrize("policy", ["dlora", "merged-only"])
def test_deadline_blind_policies_fail_the_same_trace(policy):
    """The check above can fail: policies that hold requests without looking at deadlines do miss them."""
    outcomes = Simulator(policy, costs(), RANKS, max_num_seqs=512, max_tokens=4096).run(adversarial_trace())
    assert late_starts(outcomes)


def test_valora_merges_a_lone_adapter_and_runs_merged():
    trace = [SimRequest(i * 0.01, "a3", 30, 40) for i in range(200)]
    sim = Simulator("valora", costs(), RANKS)
    sim.run(trace)
    assert sim.state.merged == "a3" and sim.state.switches == 1
    assert sim.modes.count("merged") > 0.9 * len(sim.modes)


def test_valora_stays_unmerged_when_no_adapter_dominates():
    rng = np.random.default_rng(1)
    trace = [SimRequest(i * 0.01, f"a{int(rng.integers(0, 8))}", 30, 32) for i in range(600)]
    sim = Simulator("valora", costs(), RANKS)
    outcomes = sim.run(trace)
    busy = sim.modes[: len(sim.modes) * 9 // 10]  # the tail, with a handful of requests left, may merge
    assert busy.count("unmerged") > 0.95 * len(busy), "valora left the weights merged under a uniform load"
    assert len(outcomes) == len(trace)


def test_valora_never_merges_a_non_mergeable_adapter():
    """MoE-LoRA requests are not plain-LoRA rows: even when they dominate, they are never the merged adapter."""
    trace = [SimRequest(i * 0.01, "moe" if i % 10 else "a1", 30, 32) for i in range(300)]
    sim = Simulator("valora", costs(), RANKS, non_mergeable={"moe"})
    sim.run(trace)
    assert sim.state.merged != "moe"


def context(state: MergeState, **kw) -> PolicyContext:
    return PolicyContext(state=state, cost=costs(**kw), rank_of=lambda n: RANKS.get(n, 0), max_num_seqs=64)


def seqs(adapters: list[str | None], arrival: float = 0.0, decoding: bool = True) -> list:
    out = []
    for a in adapters:
        seq = make_sequence(SimRequest(arrival, a, 20, 50))
        if decoding:
            seq.num_computed = seq.prompt_len
            seq.token_ids.append(0)
        out.append(seq)
    return out


def test_dlora_threshold_merges_the_dominant_adapter_and_pauses_the_rest():
    state = MergeState()
    policy = create_policy("dlora", context(state), dwell=1)
    running = seqs(["a1"] * 9 + ["a2"])
    decision = policy.decide(QueueView(running, [], None, now=0.0))
    assert decision.mode == "merged" and decision.merged_adapter == "a1"
    assert decision.held == {running[-1].seq_id}
    state.current = MergedAdapter("a1", 0, 16, 1.0)
    even = seqs(["a1"] * 5 + ["a2"] * 5)
    assert policy.decide(QueueView(even, [], "a1", now=0.1)).mode == "unmerged", "share under the threshold"


def test_dlora_unmerges_for_a_starving_request():
    state = MergeState(current=MergedAdapter("a1", 0, 16, 1.0))
    policy = create_policy("dlora", context(state), starvation_s=0.5)
    running, waiting = seqs(["a1"] * 20), seqs(["a2"], arrival=0.0, decoding=False)
    assert policy.decide(QueueView(running, waiting, "a1", now=0.2)).mode == "merged"
    assert policy.decide(QueueView(running, waiting, "a1", now=0.6)).mode == "unmerged"


def test_merged_only_serves_groups_in_arrival_order():
    trace = [SimRequest(0.0, "a1", 20, 30), SimRequest(0.001, "a2", 20, 30), SimRequest(0.002, "a1", 20, 30),
             SimRequest(0.003, None, 20, 30)]
    sim = Simulator("merged-only", costs(), RANKS)
    outcomes = sorted(sim.run(trace), key=lambda o: o.started)
    assert [o.request.adapter for o in outcomes] == ["a1", "a2", "a1", None]
    assert set(sim.modes) == {"merged"}


def test_one_pass_helper_agrees_with_the_named_ones():
    from engine.orchestrator import demand

    states = seqs(["a1", None]) + seqs(["a2"], decoding=False)
    head = make_sequence(SimRequest(0.0, "a3", 12, 0))
    chunked = make_sequence(SimRequest(0.0, "a3", 40, 9))
    chunked.num_computed = 25
    for seq in [*states, head, chunked]:
        for budget in (8, 2048):
            assert demand.rows_and_iterations(seq, budget) == (demand.rows_next(seq, budget),
                                                               demand.iterations_left(seq))


def test_an_eager_iteration_pays_at_least_the_eager_lora_cost():
    """A prefill iteration runs eagerly: its LoRA share is at least ``eager_lora_s``, so the base costs fitted from
    it do not absorb the host's launch overhead; decode iterations keep the (graph-timed) estimate."""
    cost = costs(eager_lora_s=0.03, smoothing=1.0)
    cost.observe(decode_rows=0, prefill_tokens=500, lora_s=0.005, elapsed_s=0.045)
    assert cost.prefill_token_s == pytest.approx((0.045 - 0.03) / 500)
    cost.observe(decode_rows=8, prefill_tokens=0, lora_s=0.005, elapsed_s=0.011)
    assert cost.decode_step_s == pytest.approx(0.006)
    cost.observe(decode_rows=0, prefill_tokens=500, lora_s=0.0, elapsed_s=0.02)  # no adapter rows: no LoRA share
    assert cost.prefill_token_s == pytest.approx(0.02 / 500)


def test_mixture_steps_teach_the_two_term_launch_cost():
    """Served mixture decode steps 1.2 ms slower than the model says: ``mixture_launch_s`` learns the 1.2 ms (so
    mixture is estimated as it runs), and the base decode step is left alone; unmerged steps refit the base."""
    cost = costs(mixture_launch_s=0.0, decode_step_s=0.0048)
    comp = {"a1": Load(2, 16), "a2": Load(3, 64)}
    served = cost.lora_s(comp, "a1", 16) + 0.0012  # what a step's two-term launches take
    for _ in range(60):
        lora = cost.lora_s(comp, "a1", 16)  # the model's estimate, with what it has learned so far
        cost.observe(decode_rows=5, prefill_tokens=0, lora_s=lora, elapsed_s=0.0048 + served, mode="mixture")
    assert cost.mixture_launch_s == pytest.approx(0.0012, rel=1e-3)
    assert cost.decode_step_s == pytest.approx(0.0048)
    cost.observe(decode_rows=5, prefill_tokens=0, lora_s=0.001, elapsed_s=0.0068, mode="unmerged")
    assert cost.decode_step_s > 0.0048 and cost.mixture_launch_s == pytest.approx(0.0012, rel=1e-3)


def test_prefill_cost_separates_the_iteration_base_from_the_per_token_cost():
    """Prefill iterations of 45 ms + 50 us a token (eager host work plus rows): the fit recovers both, so a
    full-budget iteration is not estimated at the per-token average of small ones (4096 x 230 us = 0.94 s)."""
    cost = costs(eager_lora_s=0.0)
    for tokens in [100, 250, 400, 180, 320] * 4:
        cost.observe(decode_rows=0, prefill_tokens=tokens, lora_s=0.0, elapsed_s=0.045 + 50e-6 * tokens)
    assert cost.prefill_base_s == pytest.approx(0.045, rel=1e-3)
    assert cost.prefill_token_s == pytest.approx(50e-6, rel=1e-3)
    assert cost.step_s(0, 4096) == pytest.approx(0.045 + 50e-6 * 4096, rel=1e-3)
    cost.observe(decode_rows=0, prefill_tokens=250, lora_s=0.0, elapsed_s=0.045 + 50e-6 * 250 + 0.01)
    assert 0.045 < cost.step_s(0, 250) < 0.045 + 50e-6 * 250 + 0.01  # a slower one moves the estimate, partly


def skewed_trace(skew: float, rate: float = 25.0, duration: float = 20.0, seed: int = 0) -> list[SimRequest]:
    """Poisson arrivals; the hottest adapter's share is ``skew``, the rest spread over seven others and the base."""
    rng = np.random.default_rng(seed)
    trace, t = [], 0.0
    others = [None, *sorted(RANKS)[1:8]]
    while t < duration:
        t += rng.exponential(1 / rate)
        adapter = "a0" if rng.random() < skew else others[int(rng.integers(0, len(others)))]
        trace.append(SimRequest(t, adapter, int(rng.integers(30, 300)), int(rng.integers(8, 40))))
    return trace


def mean_latency(outcomes) -> float:
    return float(np.mean([o.finished - o.request.arrival for o in outcomes]))


@pytest.mark.parametrize("skew", [0.5, 0.9])
def test_valora_runs_merged_prefills_without_the_eager_lora_overhead(skew):
    """Prefill iterations run eagerly, where the multi-LoRA op costs its launch overhead whatever its rows (on an
    H200, 20-28 ms for a 7B against a ~4.5 ms decode step). With M merged, valora gives M's prefills an M-only
    iteration (others held for it), which launches no LoRA op: lower average latency than the same policy
    unaware of the overhead, and than slora, with no request kept past its deadline."""
    truth = costs(eager_lora_s=0.025, decode_step_s=0.0045, lora_launch_s=0.0009)
    trace = skewed_trace(skew)
    aware = Simulator("valora", truth, RANKS, max_num_seqs=64, max_tokens=4096)
    blind = Simulator("valora", replace(truth, eager_lora_s=0.0), RANKS, max_num_seqs=64, max_tokens=4096,
                      truth=truth)
    slora = Simulator("slora", truth, RANKS, max_num_seqs=64, max_tokens=4096)
    ours = aware.run(trace)
    assert len(ours) == len(trace) and not late_starts(ours)
    assert mean_latency(ours) < 0.95 * mean_latency(blind.run(trace))
    assert mean_latency(ours) < 0.9 * mean_latency(slora.run(trace))


def test_valora_admits_new_requests_in_batches_when_eager_iterations_are_dear():
    """Step 5: with the eager overhead far above a decode step, new requests wait while the running ones decode and
    are admitted together: fewer eager iterations and lower average latency than slora, deadlines kept. At skew
    0.1 nothing is worth merging, so the gain is the batching alone."""
    truth = costs(eager_lora_s=0.025, decode_step_s=0.0045, lora_launch_s=0.0009)
    trace = skewed_trace(0.1)
    ours = Simulator("valora", truth, RANKS, max_num_seqs=64, max_tokens=4096)
    base = Simulator("slora", truth, RANKS, max_num_seqs=64, max_tokens=4096)
    done, ref = ours.run(trace), base.run(trace)
    assert len(done) == len(trace) and not late_starts(done)
    assert ours.prefill_iterations < 0.7 * base.prefill_iterations
    assert mean_latency(done) < 0.9 * mean_latency(ref)
