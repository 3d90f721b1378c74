"""Paged cache and scheduler: preemption, chunked prefill, adapter-slot pressure; outputs never change."""

from __future__ import annotations

import pytest

from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import jpeg

CASES = [("ad8", "how many cars are there?", 1), (None, "what color is the truck?", 2),
         ("ad4", "the leftmost person is", 0), ("ad16", "car 12 40 50 80; bus", 3),
         ("ad8", "a red car and a blue bus", 0), ("ad4", "count the buses", 4)]


def requests(max_tokens: int = 24) -> list[EngineRequest]:
    return [EngineRequest(prompt=p, adapter=a, sampling=SamplingParams(max_tokens=max_tokens),
                          images=[ImageRef(id=f"frame{img}", jpeg=jpeg(img))] if img else [])
            for a, p, img in CASES]


@pytest.fixture(scope="module")
def expected(make_engine) -> list[list[int]]:
    """Token ids from an engine with room for everything (no preemption, no chunking, a slot per adapter)."""
    results = make_engine().generate(requests())
    assert all(r.ok for r in results)
    return [r.token_ids for r in results]


def record_schedules(engine) -> list:
    """Keep every ScheduleOutput the engine's scheduler hands to the runner."""
    seen = []
    launch = engine.runner.launch

    def spy(sched, feed=None):
        seen.append(sched)
        return launch(sched, feed)

    engine.runner.launch = spy
    return seen


@pytest.mark.parametrize("policy", ["valora", "slora"])  # slora: decode steps overlapped
def test_preemption_recomputes_to_the_same_tokens(make_engine, expected, policy):
    # 12 usable blocks of 16 tokens: the six sequences outgrow them while decoding.
    engine = make_engine(kv_cache_blocks=13, policy=policy)
    results = engine.generate(requests())
    assert engine.health()["preemptions"] > 0
    assert [r.token_ids for r in results] == expected
    assert engine.scheduler.blocks.num_free == 12, "every block comes back"


@pytest.mark.parametrize("policy", ["valora", "slora"])
def test_chunked_prefill_interleaves_with_decode(make_engine, expected, policy):
    engine = make_engine(max_num_batched_tokens=16, policy=policy)
    seen = record_schedules(engine)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == expected
    assert all(s.num_tokens <= 16 for s in seen)
    assert any(c.count < c.seq.prompt_len and c.start == 0 for s in seen for c in s.chunks), "no prompt was split"
    assert any(len({c.count > 1 or c.start < c.seq.prompt_len for c in s.chunks}) == 2 for s in seen), \
        "no iteration mixed a prefill chunk with decodes"


def test_more_adapters_than_slots(make_engine, expected):
    engine = make_engine(lora_slots=1)
    results = engine.generate(requests())
    assert [r.token_ids for r in results] == expected
    health = engine.health()
    assert health["adapter_evictions"] >= 2 and len(health["adapters_resident"]) == 1


def test_adapter_swapped_out_and_back_in(make_engine):
    """ad8 is evicted by ad4 and re-read from disk (host cache of one), then gives the same tokens again."""
    engine = make_engine(lora_slots=1, cpu_adapter_cache=1)
    req = lambda a: EngineRequest(prompt="what color is the car?", adapter=a,  # noqa: E731
                                  sampling=SamplingParams(max_tokens=16))
    first = engine.generate([req("ad8")])[0]
    other = engine.generate([req("ad4")])[0]
    again = engine.generate([req("ad8")])[0]
    assert first.ok and other.ok and again.ok
    assert again.token_ids == first.token_ids != other.token_ids
    health = engine.health()
    assert health["adapter_loads"] == 3 and health["adapter_evictions"] == 2


def test_pinned_adapter_stays_resident(make_engine):
    engine = make_engine(lora_slots=2, pinned_adapters=["ad16"])
    results = engine.generate([EngineRequest(prompt="hi", adapter=a, sampling=SamplingParams(max_tokens=4))
                               for a in ("ad8", "ad4", "ad8", "ad4")])
    assert all(r.ok for r in results)
    health = engine.health()
    assert "ad16" in health["adapters_resident"] and health["adapters_pinned"] == ["ad16"]
    assert health["adapter_evictions"] >= 1


def test_unschedulable_adapter_fails_instead_of_hanging(make_engine):
    engine = make_engine(lora_slots=1, pinned_adapters=["ad16"])
    bad, good = engine.generate([EngineRequest(prompt="hi", adapter="ad8"),
                                 EngineRequest(prompt="hi", adapter="ad16", sampling=SamplingParams(max_tokens=2))])
    assert "pinned" in bad.error and good.ok


def test_queued_adapter_is_prefetched_into_a_free_slot(make_engine):
    engine = make_engine(max_num_seqs=1, lora_slots=4)
    first = EngineRequest(prompt="hi", adapter="ad8", sampling=SamplingParams(max_tokens=6))
    queued = EngineRequest(prompt="hi", adapter="ad4", sampling=SamplingParams(max_tokens=2))
    engine.add_request(first)
    engine.add_request(queued)
    engine.step()
    engine.lora.wait_for_load()
    engine.step()
    assert [s.request.request_id for s in engine.scheduler.waiting] == [queued.request_id]
    assert "ad4" in engine.health()["adapters_resident"], "the waiting request's adapter was not prefetched"
    while engine.has_unfinished():
        engine.step()


def test_overlapped_decode_matches_step_by_step(make_engine):
    """The next decode step is queued before the current one's tokens are read; outputs are unchanged.

    The batch mixes adapters and none, greedy and seeded sampling, different output budgets, and a stop string
    (so a sequence stops with one overlapped step already queued, whose token must be dropped).
    """
    def batch(stop: str | None = None) -> list[EngineRequest]:
        out = requests(12)
        out[0].sampling = SamplingParams(max_tokens=12, stop=[stop] if stop else [])
        out[1] = EngineRequest(prompt="what color is the truck?", sampling=SamplingParams(max_tokens=9))
        out[2].sampling = SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=3)
        return out

    stop = make_engine(policy="slora", overlap_decode=False).generate(batch())[0].text[4:7]
    assert len(stop.strip()) == 3, "the greedy text must have room for a stop string"
    plain = make_engine(policy="slora", overlap_decode=False).generate(batch(stop))
    engine = make_engine(policy="slora")
    seen = record_schedules(engine)
    launches = []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, feed=None: launches.append(feed is not None) or launch(sched, feed)
    overlapped = engine.generate(batch(stop))
    assert sum(launches) >= 5, "no decode step was overlapped"
    assert [r.token_ids for r in overlapped] == [r.token_ids for r in plain]
    assert [r.text for r in overlapped] == [r.text for r in plain]
    assert [r.finish_reason for r in overlapped] == [r.finish_reason for r in plain]
    assert overlapped[0].finish_reason == "stop" and len(overlapped[0].token_ids) < 12
    assert all(len(r.token_ids) == r.output_tokens for r in overlapped)
    assert engine.scheduler.blocks.num_free == engine.runner.kv.num_blocks - 1, "cache blocks leaked"
    assert len(seen) == len(launches)
