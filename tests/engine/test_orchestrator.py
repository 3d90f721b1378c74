"""The orchestrator inside the engine (CPU): start-up costs, guards over policies, runtime policy changes, health."""

from __future__ import annotations

import pytest

from engine.orchestrator.cost import Load, calibrate
from engine.policy import ModeDecision, ModePolicy, QueueView
from engine.request import EngineRequest, SamplingParams
from tests.engine.test_modes import ADAPTERS, force, requests


def test_switch_cost_and_lora_costs_are_measured_at_start_up(make_engine):
    engine = make_engine(policy="valora")
    cost = engine.orchestrator.cost
    assert cost is not None and cost.switch_s > 0 and cost.decode_step_s > 0
    assert cost.lora_launch_s >= 0 and cost.lora_segment_rank_s >= 0 and cost.lora_token_rank_s >= 0
    health = engine.health()
    assert health["switch_cost_ms"] == pytest.approx(cost.switch_s * 1e3)
    assert health["policy"] == "valora" and health["mode_switches"] == 0 and health["merged_adapter"] is None
    assert make_engine(policy="slora").orchestrator.cost is None, "a policy that never merges measures nothing"


def test_calibration_recovers_a_known_two_term_launch_cost(make_engine, monkeypatch):
    """An op whose launch costs 2 ms, and 3 ms more with two terms per segment (a virtual clock: each call adds
    its cost, and the calibration's timer reads the clock): the fit finds both, per layer and projection scaled to
    the model, and only a mixture iteration is charged the second."""
    from engine.orchestrator import cost as cost_module

    engine = make_engine(policy="valora")
    clock = [0.0]

    class Timed(type(engine.lora.op)):
        def add_lora(self, y, x, weights, batch):
            clock[0] += 0.002 + (0.003 if batch.num_terms == 2 else 0.0)

    def virtual_time(fn, device, reps=10, warmup=1):
        start = clock[0]
        fn()
        return clock[0] - start

    monkeypatch.setattr(cost_module, "median_time", virtual_time)
    linears = engine.model.adapted_linears()
    calls = sum(1 for key in linears if key[0] == 0) * (1 + max(key[0] for key in linears))  # per iteration
    cost = calibrate(linears, engine.lora.pool, Timed(), switch_s=0.01, graphs=False)
    assert cost.lora_launch_s == pytest.approx(0.002 * calls)
    assert cost.mixture_launch_s == pytest.approx(0.003 * calls)
    assert cost.lora_segment_rank_s == pytest.approx(0.0, abs=1e-12)
    comp = {"ad8": Load(4, 8), None: Load(2, 0)}
    assert cost.lora_s(comp, "ad4", 4) - cost.lora_s(comp, None) == pytest.approx(cost.mixture_launch_s)


def test_measuring_the_switch_leaves_the_weights_untouched(make_engine):
    engine = make_engine(policy="slora")
    before = {k: lin.weight.detach().clone() for k, lin in engine.model.adapted_linears().items()}
    assert engine.switcher.measure() > 0
    assert all((lin.weight == before[k]).all() for k, lin in engine.model.adapted_linears().items())


def test_health_reports_mode_merged_adapter_and_switches(make_engine):
    engine = make_engine(policy="merged-only", pinned_adapters=list(ADAPTERS))
    engine.generate([EngineRequest(prompt="count the cars", adapter="ad4", sampling=SamplingParams(max_tokens=4))])
    health = engine.health()
    assert health["mode"] == "merged" and health["merged_adapter"] == "ad4"
    assert health["mode_switches"] == 1 and health["switch_ms_total"] > 0 and health["merge_base_copy"]


def test_claimed_weights_turn_every_decision_unmerged(make_engine):
    """While another adapter type holds the weights, a policy's merged turn for the base group (no switch, other
    groups held back) runs as unmerged too: every group runs, none waits for a turn (this once depended on which
    request was oldest when a decision was taken)."""
    engine = make_engine(policy="merged-only")
    assert engine.merge_state.claim("moe")
    force(engine, "merged", None)
    decision = engine.orchestrator.decide([], [])
    assert decision.mode == "unmerged" and decision.merged_adapter is None and not decision.held
    engine.merge_state.release("moe")
    assert engine.orchestrator.decide([], []).mode == "merged"


def test_claimed_weights_keep_plain_adapters_unmerged(make_engine):
    """Another adapter type (LoRA-Switch's merge-switch path) holding the weights blocks every merge."""
    engine = make_engine(policy="merged-only")
    assert engine.merge_state.claim("moe")
    assert not engine.merge_state.claim("other"), "a second owner must not get the weights"
    results = engine.generate(requests(8))
    assert all(r.ok for r in results) and {r.mode for r in results} == {"unmerged"}
    assert engine.merge_state.switches == 0
    engine.merge_state.release("moe")
    engine.generate(requests(2))
    assert engine.merge_state.switches > 0
    assert engine.orchestrator.switch_to("ad8")
    assert not engine.merge_state.claim("moe"), "no claim while a plain adapter is merged"


def bounded_generate(engine, reqs: list[EngineRequest], max_steps: int = 500) -> list:
    """generate(), but a livelocked engine fails the test instead of hanging it."""
    for req in reqs:
        engine.add_request(req)
    results = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        results += engine.step()
    return results


class Hoarder(ModePolicy):
    """Keeps ``adapter`` merged forever and holds back nobody (a policy bug the orchestrator must survive)."""

    def __init__(self, ctx, adapter: str) -> None:
        super().__init__(ctx)
        self.adapter = adapter

    def decide(self, view: QueueView) -> ModeDecision:
        return ModeDecision("mixture", self.adapter)


def test_an_idle_merged_adapter_gives_up_its_slot(make_engine):
    """One slot, held by the merged (idle) adapter: without the guard no other adapter could ever load."""
    engine = make_engine(policy="valora", lora_slots=1)
    engine.orchestrator.policy = Hoarder(engine.orchestrator.policy.ctx, "ad16")
    engine.generate([EngineRequest(prompt="x", adapter="ad16", sampling=SamplingParams(max_tokens=2))])
    assert engine.merge_state.merged == "ad16"
    results = bounded_generate(engine, [EngineRequest(prompt=p, adapter=a, sampling=SamplingParams(max_tokens=6))
                                        for a, p in (("ad8", "a"), ("ad4", "b"), ("ad8", "c"))])
    assert len(results) == 3 and all(r.ok for r in results), [r.error for r in results]


class HoldAll(ModePolicy):
    def decide(self, view: QueueView) -> ModeDecision:
        return ModeDecision("unmerged", None, frozenset(s.seq_id for s in [*view.running, *view.waiting]))


def test_a_decision_that_holds_everyone_is_overridden(make_engine):
    engine = make_engine(policy="slora")
    engine.orchestrator.policy = HoldAll(engine.orchestrator.policy.ctx)
    results = bounded_generate(engine, requests(4))
    assert len(results) == len(requests()) and all(r.ok for r in results)


def test_policy_changes_between_requests(make_engine):
    engine = make_engine(policy="merged-only")
    first = engine.generate(requests(6))
    assert engine.orchestrator.switch_to("ad4")
    engine.set_policy("slora")
    assert engine.merge_state.merged is None and engine.health()["policy"] == "slora"
    again = engine.generate(requests(6))
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert {r.mode for r in again} == {"unmerged"}
    engine.add_request(requests(1)[0])
    with pytest.raises(ValueError, match="no request"):
        engine.set_policy("valora")
    while engine.has_unfinished():
        engine.step()
