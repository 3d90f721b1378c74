"""Inference modes (fp32, CPU): merged and mixture serve the same greedy tokens and logits as unmerged, and
1,000 weight switches leave no drift."""

from __future__ import annotations

import random

import pytest
import torch

from engine.policy import ModeDecision, ModePolicy, QueueView
from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.conftest import HiddenHead
from tests.engine.reference import jpeg

CASES = [("ad8", "how many cars?", [1]), (None, "what color is the car?", [2]), ("ad4", "the leftmost person is", []),
         ("ad16", "count the buses", [3]), ("ad8", "describe the road", []), (None, "car 12 40 50 80;", [])]
ADAPTERS = ("ad8", "ad4", "ad16")


class Forced(ModePolicy):
    """A fixed decision every iteration: the weights hold ``merged``, nobody is held back."""

    def __init__(self, ctx, mode: str, merged: str | None) -> None:
        super().__init__(ctx)
        self.decision = ModeDecision(mode, merged)

    def decide(self, view: QueueView) -> ModeDecision:
        return self.decision


def requests(max_tokens: int = 24) -> list[EngineRequest]:
    return [EngineRequest(prompt=p, adapter=a, sampling=SamplingParams(max_tokens=max_tokens),
                          images=[ImageRef(id=f"f{i}", jpeg=jpeg(i)) for i in imgs]) for a, p, imgs in CASES]


def force(engine, mode: str, merged: str | None) -> None:
    engine.orchestrator.policy = Forced(engine.orchestrator.policy.ctx, mode, merged)


@pytest.fixture(scope="module")
def unmerged(make_engine) -> list[list[int]]:
    results = make_engine(policy="slora").generate(requests())
    assert all(r.ok and r.mode == "unmerged" for r in results)
    assert len({tuple(r.token_ids) for r in results}) == len(results), "outputs too alike to tell modes apart"
    return [r.token_ids for r in results]


@pytest.mark.parametrize("merged", ADAPTERS)
def test_mixture_gives_the_unmerged_tokens(make_engine, unmerged, merged):
    """One continuous batch: M's rows on the merged weights, others x·ΔW_X − x·ΔW_M, base rows −x·ΔW_M."""
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))  # resident: the switch is immediate
    force(engine, "mixture", merged)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == unmerged
    assert {r.mode for r in results} == {"mixture"}
    assert engine.merge_state.merged == merged and engine.health()["mode_switches"] == 1
    iterations = engine.health()["iterations"]  # every measured iteration, by mode and phase
    assert set(iterations) == {"mixture prefill", "mixture decode"}
    assert sum(v["n"] for v in iterations.values()) == engine.steps
    assert iterations["mixture decode"]["rows"] <= len(results) * iterations["mixture decode"]["n"]


@pytest.mark.parametrize("mode", ["unmerged", "mixture"])
def test_fused_decode_linear_gives_the_unmerged_tokens(make_engine, unmerged, mode):
    """The Triton backend (interpreted on CPU) fuses each decode step's projections with their LoRA update
    (kernels/fused_linear.py, the batch row by row), plain and in mixture mode: the torch backend's tokens. (The
    backend fuses one-row batches only by default; this runs the mechanism on the whole 6-row decode batch.)"""
    engine = make_engine(policy="valora" if mode == "mixture" else "slora", lora_backend="triton",
                         pinned_adapters=list(ADAPTERS))
    engine.lora.op.fused_lora_rows = engine.lora.op.fused_rows
    if mode == "mixture":
        force(engine, "mixture", "ad8")
    calls, fused = [], engine.lora.op.routed_linear
    engine.lora.op.routed_linear = lambda x, *args: calls.append(x.shape[0]) or fused(x, *args)
    results = engine.generate(requests(max_tokens=3))
    assert [r.token_ids for r in results] == [t[:3] for t in unmerged]
    assert {r.mode for r in results} == {mode}
    per_step = 4 * len(engine.model.layers)  # q/k/v, o, gate/up, down
    assert len(calls) >= 2 * per_step and set(calls) <= set(range(1, engine.lora.op.fused_lora_rows + 1))


@pytest.mark.parametrize("mode", ["unmerged", "mixture"])
def test_lone_request_decodes_through_the_one_row_fused_linear(make_engine, monkeypatch, mode):
    """An adapter request left decoding alone on the Triton backend (interpreted on CPU) with its default fusion:
    each of its one-row decode projections is the fused linear with the row's terms loaded before the W stream
    (ROW_DIRECT), plain (+x·ΔW_X) and in mixture mode (+x·ΔW_X − x·ΔW_M, M merged for a request that finished
    after one token): the torch backend's tokens."""
    from kernels import fused_linear

    def pair() -> list[EngineRequest]:  # ad8 with a picture decodes 5 tokens; ad4 stops after its first
        first, _, other = requests(max_tokens=5)[:3]
        other.sampling = SamplingParams(max_tokens=1)
        return [first, other]

    want = [r.token_ids for r in make_engine(policy="slora").generate(pair())]
    engine = make_engine(policy="valora" if mode == "mixture" else "slora", lora_backend="triton",
                         pinned_adapters=list(ADAPTERS))
    if mode == "mixture":
        force(engine, "mixture", "ad4")
    direct, meta = [], fused_linear.linear_meta
    monkeypatch.setattr(fused_linear, "linear_meta", lambda *a, **k: (lambda m: direct.append(m["ROW_DIRECT"])
                                                                      or m)(meta(*a, **k)))
    results = engine.generate(pair())
    assert all(r.ok and r.mode == mode for r in results)
    assert [r.token_ids for r in results] == want
    per_step = 4 * len(engine.model.layers)  # q/k/v, o, gate/up, down
    assert direct.count(True) >= 3 * per_step  # ad8's decode steps after ad4 left


def test_merged_mode_gives_the_unmerged_tokens(make_engine, unmerged):
    """merged-only serves one group at a time on its merged weights: no multi-LoRA work at all."""
    engine = make_engine(policy="merged-only")
    calls, add_lora = [], engine.lora.op.add_lora
    engine.lora.op.add_lora = lambda *args: calls.append(args) or add_lora(*args)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == unmerged
    assert {r.mode for r in results} == {"merged"}
    assert not calls, "merged mode ran the multi-LoRA op"
    assert engine.health()["mode_switches"] >= len(ADAPTERS)


def test_merged_only_runs_no_lora_while_adapters_load(make_engine, unmerged):
    """Slow adapter reads: while the served group's adapter loads, other groups wait instead of running unmerged."""
    import time

    engine = make_engine(policy="merged-only")
    read = engine.lora._read
    engine.lora._read = lambda *args: time.sleep(0.3) or read(*args)
    calls, add_lora = [], engine.lora.op.add_lora
    engine.lora.op.add_lora = lambda *args: calls.append(args) or add_lora(*args)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == unmerged
    assert {r.mode for r in results} == {"merged"} and not calls


@pytest.mark.parametrize("policy", ["valora", "dlora"])
def test_policies_give_the_unmerged_tokens(make_engine, unmerged, policy):
    results = make_engine(policy=policy).generate(requests())
    assert [r.token_ids for r in results] == unmerged


def prefill_logits(engine, adapter: str | None, prompt: str, n: int = 6) -> torch.Tensor:
    name = f"hidden{n}"
    if name not in engine.heads:
        engine.register_head(name, HiddenHead(n))
    (res,) = engine.generate([EngineRequest(prompt=prompt, adapter=adapter, head=name,
                                            images=[ImageRef(id="p", jpeg=jpeg(9))])])
    assert res.ok, res.error
    return engine.model.compute_logits(res.head_output["hidden"].to(next(engine.model.parameters())))


@pytest.mark.parametrize("merged", ADAPTERS)
def test_merged_and_mixture_logits_match_unmerged(make_engine, merged):
    plain = make_engine(policy="slora")
    engine = make_engine(policy="valora")
    for adapter in (None, *ADAPTERS):
        force(engine, "merged" if adapter == merged else "mixture", merged)
        ours = prefill_logits(engine, adapter, "how many buses are there?")
        ref = prefill_logits(plain, adapter, "how many buses are there?")
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, f"{adapter} with {merged} merged: relative logit error {rel:.2e}"


def switch_randomly(engine, count: int, seed: int = 0) -> None:
    rng, current = random.Random(seed), engine.merge_state.merged
    for _ in range(count):
        current = rng.choice([n for n in (*ADAPTERS, None) if n != current])
        assert engine.orchestrator.switch_to(current)


def test_a_thousand_switches_leave_no_drift(make_engine):
    """Merges from the clean copy: after 1,000 switches (merge, unmerge, M1 -> M2) everything is bit-identical."""
    never = make_engine(policy="slora")
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    before = {k: lin.weight.detach().clone() for k, lin in engine.model.adapted_linears().items()}
    switch_randomly(engine, 1000)
    assert engine.merge_state.switches == 1000
    with_m = {m: None for m in ADAPTERS}
    for merged in ADAPTERS:  # each adapter merged once more: the weights equal a single merge from scratch
        engine.orchestrator.switch_to(merged)
        with_m[merged] = {k: lin.weight.detach().clone() for k, lin in engine.model.adapted_linears().items()}
    fresh = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    for merged in ADAPTERS:
        fresh.orchestrator.switch_to(merged)
        for k, lin in fresh.model.adapted_linears().items():
            assert torch.equal(lin.weight, with_m[merged][k]), f"{merged} merged after 1,000 switches: {k} differs"
    engine.set_policy("slora")  # back to the base weights, and serving as the never-switched engine does
    for k, lin in engine.model.adapted_linears().items():
        assert torch.equal(lin.weight, before[k]), f"weights {k} drifted"
    for adapter in (None, "ad16"):
        assert torch.equal(prefill_logits(engine, adapter, "what color is the truck?"),
                           prefill_logits(never, adapter, "what color is the truck?"))


def test_in_place_switching_stays_within_its_stated_bound(make_engine):
    """Without the clean copy: |W_n - W_0| <= n/2 ulp(max|W_0| + max|ΔW|), and logits stay within 1e-5."""
    never = make_engine(policy="slora")
    engine = make_engine(policy="valora", exact_unmerge=False, pinned_adapters=list(ADAPTERS))
    assert not engine.switcher.base_copy
    linears = engine.model.adapted_linears()
    before = {k: lin.weight.detach().clone() for k, lin in linears.items()}
    delta = {k: 0.0 for k in linears}
    for merged in ADAPTERS:
        engine.orchestrator.switch_to(merged)
        for k, lin in linears.items():
            delta[k] = max(delta[k], (lin.weight - before[k]).abs().max().item())
    engine.orchestrator.switch_to(None)
    switch_randomly(engine, 1000 - len(ADAPTERS) - 1, seed=1)
    engine.orchestrator.switch_to(None)
    n = engine.merge_state.switches
    for k, lin in linears.items():
        bound = n / 2 * torch.finfo(torch.float32).eps * (before[k].abs().max().item() + delta[k])
        drift = (lin.weight - before[k]).abs().max().item()
        assert drift <= bound, f"{k}: drift {drift:.3g} over the bound {bound:.3g}"
    engine.set_policy("slora")
    ours, ref = (prefill_logits(e, "ad8", "what color is the truck?") for e in (engine, never))
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5


def test_a_new_decision_applies_from_the_next_iteration(make_engine):
    """After the policy changes between runs, every iteration of the next run follows it (no decision made for
    an overlapped decode step of the previous run is carried over)."""
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    launched = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, feed=None: launched.append(sched.merged_adapter) or launch(sched, feed)
    force(engine, "mixture", "ad8")
    engine.generate(requests(6))
    assert set(launched) == {"ad8"}
    launched.clear()
    force(engine, "mixture", "ad4")
    results = engine.generate(requests(6))
    assert launched and set(launched) == {"ad4"}
    assert all(r.ok for r in results)


class Alternating(ModePolicy):
    """Decisions that alternate every other call between merged ``merged`` (every other group held) and mixture."""

    def __init__(self, ctx, merged: str) -> None:
        super().__init__(ctx)
        self.merged, self.calls = merged, 0

    def decide(self, view: QueueView) -> ModeDecision:
        self.calls += 1
        if self.calls // 2 % 2:
            return ModeDecision("mixture", self.merged)
        others = frozenset(s.seq_id for s in [*view.running, *view.waiting] if s.adapter != self.merged)
        return ModeDecision("merged", self.merged, others)


def test_overlapped_steps_remake_a_decision_when_a_request_arrives(make_engine, unmerged):
    """A decision made while an overlapped step ran is kept for the next schedule, unless a request arrived in
    between: a merged decision must then be made again, so that it holds the newcomer of another group."""
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    assert engine.overlap
    engine.orchestrator.policy = Alternating(engine.orchestrator.policy.ctx, "ad8")
    seen = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, feed=None: seen.append(sched) or launch(sched, feed)
    reqs = requests()
    late = reqs.pop(2)  # ad4
    for req in reqs:
        engine.add_request(req)
    results = []
    while engine._decision is None or engine._decision[0].mode != "merged":  # a kept merged decision
        results += engine.step()
        assert engine.has_unfinished(), "the run ended before a merged decision was kept"
    engine.add_request(late)
    while engine.has_unfinished():
        results += engine.step()
    assert {s.mode for s in seen} == {"merged", "mixture"}
    for sched in seen:
        if sched.mode == "merged":
            assert all(c.seq.adapter == "ad8" for c in sched.chunks), "a merged iteration ran another group's rows"
    by_id = {r.request_id: r.token_ids for r in results}
    order = [*reqs[:2], late, *reqs[2:]]
    assert [by_id[r.request_id] for r in order] == unmerged


def test_valora_isolates_merged_prefills_and_keeps_the_unmerged_tokens(make_engine, unmerged):
    """With an eager LoRA cost above a decode step, valora runs M's prefill in a merged iteration that holds
    every other request (running or waiting) for it; the tokens stay those of the unmerged engine."""
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    engine.orchestrator.cost.eager_lora_s = 0.5  # far above a decode step of the tiny model: isolation pays
    seen = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, feed=None: seen.append(
        (sched.mode, sched.merged_adapter, {c.seq.adapter for c in sched.chunks},
         any(c.count > 1 for c in sched.chunks))) or launch(sched, feed)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == unmerged
    isolated = [s for s in seen if s[0] == "merged" and s[3]]
    assert isolated, f"no merged prefill iteration: {seen[:6]}"
    assert all(adapters == {merged} for _, merged, adapters, _ in isolated)
    assert any(mode == "mixture" for mode, *_ in seen), "the other requests never ran beside the merged adapter"


def test_valora_batches_new_prefills_and_keeps_the_unmerged_tokens(make_engine, unmerged):
    """With an eager LoRA cost above a decode step, requests that arrive while others decode wait and are
    admitted together (step 5); every request still gets the unmerged engine's tokens."""
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    engine.orchestrator.cost.eager_lora_s = 0.05
    held_steps = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, feed=None: held_steps.append(
        bool(engine.scheduler.waiting) and all(c.count == 1 for c in sched.chunks)) or launch(sched, feed)
    reqs = requests()
    results = []
    for req in reqs[:2]:
        engine.add_request(req)
    for _ in range(3):
        results += engine.step()
    for req in reqs[2:]:
        engine.add_request(req)
    while engine.has_unfinished():
        results += engine.step()
    by_id = {r.request_id: r.token_ids for r in results}
    assert [by_id[r.request_id] for r in reqs] == unmerged
    assert any(held_steps), "no decode step ran while new requests waited"
