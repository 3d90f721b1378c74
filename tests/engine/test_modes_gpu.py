"""Inference modes on the GPU (bf16, Triton kernels): accuracy against fp32, CUDA graphs across weight switches."""

from __future__ import annotations

import pytest
import torch

from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import jpeg
from tests.engine.test_modes import ADAPTERS, force, prefill_logits, switch_randomly

pytestmark = pytest.mark.gpu
GPU = {"device": "cuda", "kv_cache_blocks": 512, "compile_ops": False}  # compiling the element-wise ops is not tested


@pytest.fixture(scope="module")
def plain(make_engine):
    return make_engine(policy="slora", **GPU)


@pytest.fixture(scope="module")
def switching(make_engine):
    """A bf16 engine with every tiny adapter resident, whose modes the tests force."""
    return make_engine(policy="valora", pinned_adapters=list(ADAPTERS), **GPU)


@pytest.fixture(scope="module")
def exact(make_engine) -> dict:
    """fp32 CPU logits, unmerged: the truth every bf16 mode is measured against."""
    engine = make_engine(policy="slora")
    return {a: prefill_logits(engine, a, "how many buses are there?").cpu() for a in (None, *ADAPTERS)}


def rel(ours: torch.Tensor, truth: torch.Tensor) -> float:
    return ((ours.float().cpu() - truth).norm() / truth.norm()).item()


@pytest.mark.parametrize("merged", ADAPTERS)
def test_bf16_modes_are_as_accurate_as_unmerged(plain, switching, exact, merged):
    """Merged / mixture bf16 logits stay within twice the unmerged bf16 error (plus 5e-3) of fp32."""
    for adapter in (None, *ADAPTERS):
        force(switching, "merged" if adapter == merged else "mixture", merged)
        ours = rel(prefill_logits(switching, adapter, "how many buses are there?"), exact[adapter])
        unmerged = rel(prefill_logits(plain, adapter, "how many buses are there?"), exact[adapter])
        assert ours <= 2 * unmerged + 5e-3, f"{adapter} with {merged} merged: {ours:.2e} vs unmerged {unmerged:.2e}"


def test_bf16_switches_leave_no_drift(switching):
    engine = switching
    engine.orchestrator.switch_to(None)
    before = {k: lin.weight.detach().clone() for k, lin in engine.model.adapted_linears().items()}
    switch_randomly(engine, 1000)
    engine.orchestrator.switch_to(None)
    for k, lin in engine.model.adapted_linears().items():
        assert torch.equal(lin.weight, before[k]), f"weights {k} drifted"


def decode_requests(adapters: list[str | None]) -> list[EngineRequest]:
    return [EngineRequest(prompt=f"count the cars {i}", adapter=a, sampling=SamplingParams(max_tokens=24),
                          images=[ImageRef(id="g", jpeg=jpeg(3))] if i == 1 else [])
            for i, a in enumerate(adapters)]


def test_merged_mode_under_cuda_graphs(make_engine):
    """merged-only serves ad8, then ad4, then base on graphs captured once: in-place merges keep them valid."""
    adapters = ["ad8", "ad8", "ad4", "ad4", None, "ad8"]
    graphed = make_engine(policy="merged-only", cuda_graphs=True, pinned_adapters=list(ADAPTERS), **GPU)
    eager = make_engine(policy="merged-only", cuda_graphs=False, pinned_adapters=list(ADAPTERS), **GPU)
    with_graphs = graphed.generate(decode_requests(adapters))
    without = eager.generate(decode_requests(adapters))
    assert {r.mode for r in with_graphs} == {"merged"} and graphed.merge_state.switches >= 3
    captured = graphed.runner.graphs.graphs
    assert captured and all(terms == 0 for _, _, terms, _ in captured), f"merged decode ran LoRA graphs: {captured}"
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in without]


@pytest.mark.parametrize("merged", ["ad8", "ad16"])
def test_mixture_mode_under_cuda_graphs(make_engine, merged):
    adapters = ["ad8", None, "ad4", "ad16"]
    graphed = make_engine(policy="valora", cuda_graphs=True, pinned_adapters=list(ADAPTERS), **GPU)
    eager = make_engine(policy="valora", cuda_graphs=False, pinned_adapters=list(ADAPTERS), **GPU)
    for engine in (graphed, eager):
        force(engine, "mixture", merged)
    with_graphs = graphed.generate(decode_requests(adapters))
    without = eager.generate(decode_requests(adapters))
    assert any(terms == 2 for _, _, terms, _ in graphed.runner.graphs.graphs), "no mixture graph was captured"
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in without]
    assert all(r.output_tokens > 0 for r in with_graphs)


def test_mixture_graphs_replay_after_the_merged_adapter_changes(make_engine):
    """A mixture graph captured with ad8 merged replays correctly with ad4 merged (slots and weights in place)."""
    adapters = ["ad8", None, "ad4", "ad16"]
    graphed = make_engine(policy="valora", cuda_graphs=True, pinned_adapters=list(ADAPTERS), **GPU)
    eager = make_engine(policy="valora", cuda_graphs=False, pinned_adapters=list(ADAPTERS), **GPU)
    force(graphed, "mixture", "ad8")
    graphed.generate(decode_requests(adapters))
    keys = set(graphed.runner.graphs.graphs)
    for engine in (graphed, eager):
        force(engine, "mixture", "ad4")
    with_graphs = graphed.generate(decode_requests(adapters))
    mixture = {k for k in keys if k[2] == 2}
    assert mixture, "the first run captured no mixture graph"
    assert {k for k in graphed.runner.graphs.graphs if k[2] == 2} == mixture, "the mixture graphs were re-captured"
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in eager.generate(decode_requests(adapters))]
