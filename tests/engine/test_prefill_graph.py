"""Piecewise prefill (CPU, fp32): the padded, piece-by-piece forward that CUDA graphs capture on GPU gives the plain
forward's hidden states and greedy tokens, with adapters, pictures, chunked prefill and mixture mode."""

from __future__ import annotations

import pytest
import torch

from engine.prefill_graph import PrefillGraphs, prefill_buckets
from engine.request import EngineRequest, SamplingParams
from tests.engine.conftest import HiddenHead
from tests.engine.test_modes import ADAPTERS, force, requests


def piecewise(engine, max_tokens: int = 512) -> list[int]:
    """Serve ``engine``'s prefill iterations of up to ``max_tokens`` rows piecewise; returns the row counts run so."""
    runner = engine.runner
    graphs = PrefillGraphs(engine.model, engine.lora, max_tokens, engine.config.max_num_seqs, engine.device,
                           use_triton=False)
    seen, run = [], graphs.run
    graphs.run = lambda inp, *args: seen.append(inp.num_tokens) or run(inp, *args)
    runner.prefill_graphs = graphs
    return seen


def test_buckets_cover_every_row_count():
    sizes = prefill_buckets(1000)
    assert sizes[:5] == [16, 32, 64, 128, 256] and sizes[-1] == 1000 and sizes == sorted(set(sizes))
    assert all(b - a <= 128 for a, b in zip(sizes[4:], sizes[5:], strict=False))
    assert prefill_buckets(20) == [16, 20]


@pytest.mark.parametrize("budget", [2048, 24])  # 24: prompts prefilled in chunks, next to other rows' decode
def test_piecewise_prefill_gives_the_plain_tokens(make_engine, budget):
    plain = make_engine(policy="slora", max_num_batched_tokens=budget).generate(requests())
    engine = make_engine(policy="slora", max_num_batched_tokens=budget)
    seen = piecewise(engine)
    results = engine.generate(requests())
    assert all(r.ok for r in results)
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert seen, "the piecewise path did not serve the prefills"
    assert budget > 100 or len(seen) > 1


def test_piecewise_prefill_in_mixture_mode(make_engine):
    """Two-term rows (+X -M), base rows (-M alone) and M's rows (none) in one padded static batch."""
    plain = make_engine(policy="slora").generate(requests())
    engine = make_engine(policy="valora", pinned_adapters=list(ADAPTERS))
    force(engine, "mixture", "ad8")
    seen = piecewise(engine)
    results = engine.generate(requests())
    assert {r.mode for r in results} == {"mixture"} and seen
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]


def test_piecewise_hidden_states_match(make_engine):
    """The final-norm hidden states of every prompt position, with and without pieces (padding included), over
    several prefill iterations (a 32-token budget), so that later piecewise prefills reuse the static buffer an
    earlier head read."""
    prompts = [("ad8", "count the cars on the left"), (None, "what is the car"), ("ad16", "a bus")]

    def hidden(engine) -> tuple[list[torch.Tensor], int]:
        engine.register_head("hidden", HiddenHead(3))  # the last three prompt positions
        reqs = [EngineRequest(prompt=p, adapter=a, head="hidden", sampling=SamplingParams(max_tokens=1))
                for a, p in prompts]
        results = engine.generate(reqs)
        assert all(r.ok for r in results), [r.error for r in results]
        return [r.head_output["hidden"] for r in results], sum(r.prompt_tokens for r in results)

    expected, rows = hidden(make_engine(policy="slora", max_num_batched_tokens=32))
    engine = make_engine(policy="slora", max_num_batched_tokens=32)
    seen = piecewise(engine, max_tokens=32)
    got, _ = hidden(engine)
    assert len(seen) >= 2 and sum(seen) == rows, (seen, rows)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_oversized_iterations_run_eagerly(make_engine):
    engine = make_engine(policy="slora")
    seen = piecewise(engine, max_tokens=16)
    results = engine.generate(requests(max_tokens=4))
    assert all(r.ok for r in results)
    assert all(n <= 16 for n in seen)


def test_a_failed_capture_falls_back_to_eager(make_engine):
    """A bucket whose capture fails (out of memory, say) is served eagerly, and so is every later iteration."""
    plain = make_engine(policy="slora").generate(requests(max_tokens=4))
    engine = make_engine(policy="slora")
    seen = piecewise(engine)
    graphs = engine.runner.prefill_graphs

    def fail(size, terms):
        raise RuntimeError("CUDA out of memory (simulated)")

    graphs._make = fail
    results = engine.generate(requests(max_tokens=4))
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert graphs.failed and len(seen) == 1  # tried once, then never again


def test_capture_all_makes_every_bucket_and_skips_what_the_backend_cannot_capture(make_engine):
    engine = make_engine(policy="slora")
    graphs = PrefillGraphs(engine.model, engine.lora, 64, engine.config.max_num_seqs, engine.device,
                           use_triton=False)
    pieces = len(engine.model.layers) + 1
    # the CPU's torch LoRA path reads the host: only the no-LoRA pieces could be captured
    assert graphs.capture_all((0, 1)) == len(prefill_buckets(64)) * pieces
    assert {key[1:] for key in graphs.graphs} == {(size, 0) for size in prefill_buckets(64)}
