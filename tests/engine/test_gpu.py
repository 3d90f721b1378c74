"""GPU behaviour (bf16): prefill logits against transformers, and CUDA-graph decode against eager decode."""

from __future__ import annotations

import pytest
import torch

from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import hf_logits, jpeg
from tests.engine.test_equivalence import engine_logits

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("adapter", [None, "ad16"])
def test_bf16_prefill_logits_track_transformers(make_engine, tiny_checkpoint, adapter):
    """Our bf16 error against fp32 transformers stays within twice transformers' own bf16 error."""
    engine = make_engine(device="cuda", kv_cache_blocks=512, policy="slora")  # modes: tests/engine/test_modes_gpu.py
    prompt, images = "how many cars are on the road?", [jpeg(7, (112, 140))]
    ours = engine_logits(engine, tiny_checkpoint, adapter, prompt, images).cpu()
    exact = hf_logits(tiny_checkpoint, adapter, prompt, images)
    theirs = hf_logits(tiny_checkpoint, adapter, prompt, images, device="cuda", dtype=torch.bfloat16).cpu()
    rel = lambda a: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert rel(ours) <= 2 * rel(theirs) + 5e-3, (rel(ours), rel(theirs))


@pytest.mark.parametrize(("batch", "adapters"),
                         [(1, [None]), (1, ["ad8"]), (4, [None] * 4), (4, [None, "ad8", None, "ad4"])])
def test_cuda_graph_decode_matches_eager(make_engine, batch, adapters):
    """At a bucket size the graph replays exactly the eager kernels: identical greedy tokens."""
    reqs = lambda: [EngineRequest(prompt=f"count the cars {i}", adapter=adapters[i],  # noqa: E731
                                  images=[ImageRef(id="g", jpeg=jpeg(3))] if i == 1 else [],
                                  sampling=SamplingParams(max_tokens=24)) for i in range(batch)]
    # The same batches in both engines: one fixed mode (a merging policy could time its switches differently in
    # each), and the adapters resident from the start (an on-demand load reads the files on a background thread,
    # and a request waits for it while the others run, so load timing could batch the requests differently).
    # Prefill eagerly in both (piecewise prefill graphs pad the rows, which changes bf16 GEMM tiles; their own test
    # is below).
    same = {"device": "cuda", "kv_cache_blocks": 512, "policy": "slora", "prefill_graph_tokens": 0,
            "pinned_adapters": sorted({a for a in adapters if a is not None})}
    graphed = make_engine(cuda_graphs=True, **same)
    eager = make_engine(cuda_graphs=False, **same)
    with_graphs = graphed.generate(reqs())
    without = eager.generate(reqs())
    captured = graphed.runner.graphs.graphs
    assert any(not lora for _, _, lora, _ in captured) or any(adapters), "no base decode graph was captured"
    if any(adapters) and graphed.lora.graph_safe:
        assert any(lora for _, _, lora, _ in captured), "the LoRA backend is graph-safe, yet no LoRA graph was captured"
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in without]
    assert all(r.output_tokens > 0 for r in with_graphs)


@pytest.mark.parametrize("mode", ["unmerged", "mixture"])
def test_prefill_graphs_replay_the_pieces(make_engine, mode):
    """Captured prefill pieces replay what the same pieces run directly compute (identical greedy tokens), and
    their prefill hidden states track the unpadded eager forward's (bf16)."""
    from engine.prefill_graph import PrefillGraphs
    from tests.engine.conftest import HiddenHead
    from tests.engine.test_modes import force

    adapters = [None, "ad8", "ad4", "ad8"]
    reqs = lambda head=None: [EngineRequest(  # noqa: E731
        prompt=f"count the cars near gate {i}", adapter=adapters[i], head=head,
        images=[ImageRef(id=f"p{i}", jpeg=jpeg(i))] if i % 2 else [],
        sampling=SamplingParams(max_tokens=1 if head else 16)) for i in range(len(adapters))]
    same = {"device": "cuda", "kv_cache_blocks": 512, "policy": "valora" if mode == "mixture" else "slora",
            "pinned_adapters": ["ad4", "ad8"]}
    graphed, direct, eager = (make_engine(**same), make_engine(**same), make_engine(prefill_graph_tokens=0, **same))
    direct.runner.prefill_graphs = PrefillGraphs(direct.model, direct.lora, direct.config.prefill_graph_tokens,
                                                 direct.config.max_num_seqs, direct.device, use_triton=True,
                                                 capture_graphs=False)
    for engine in (graphed, direct, eager):
        engine.register_head("hidden", HiddenHead(4))
        if mode == "mixture":
            force(engine, "mixture", "ad8")
    with_graphs, pieces = graphed.generate(reqs()), direct.generate(reqs())
    assert graphed.runner.prefill_graphs.graphs, "no prefill graph was captured"
    assert {r.mode for r in with_graphs} == {mode}
    assert [r.token_ids for r in with_graphs] == [r.token_ids for r in pieces]
    hidden = [[r.head_output["hidden"] for r in e.generate(reqs("hidden"))] for e in (graphed, eager)]
    for ours, plain in zip(*hidden, strict=True):
        rel = ((ours - plain).norm() / plain.norm()).item()
        assert rel < 2e-2, rel
