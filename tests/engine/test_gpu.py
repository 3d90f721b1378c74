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


@pytest.mark.parametrize(("batch", "adapters"), [(1, [None]), (4, [None] * 4), (4, [None, "ad8", None, "ad4"])])
def test_cuda_graph_decode_matches_eager(make_engine, batch, adapters):
    """At a bucket size the graph replays exactly the eager kernels: identical greedy tokens."""
    reqs = lambda: [EngineRequest(prompt=f"count the cars {i}", adapter=adapters[i],  # noqa: E731
                                  images=[ImageRef(id="g", jpeg=jpeg(3))] if i == 1 else [],
                                  sampling=SamplingParams(max_tokens=24)) for i in range(batch)]
    # The same batches in both engines: one fixed mode (a merging policy could time its switches differently in
    # each), and the adapters resident from the start (an on-demand load reads the files on a background thread,
    # and a request waits for it while the others run, so load timing could batch the requests differently).
    same = {"device": "cuda", "kv_cache_blocks": 512, "policy": "slora",
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
