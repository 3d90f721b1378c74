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
                         [(1, [None]), (1, ["ad8"]), (4, [None] * 4), (4, [None, "ad8", None, "ad4"]),
                          (12, [None, "ad8", "ad4"] * 4)])  # 12 rows: past the fused linear, the side stream
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


@pytest.mark.parametrize("rows", [3, 12])
def test_side_stream_update_matches_in_place(rows):
    """An adapted projection with its multi-LoRA update on the side stream (``FusedOps.linear_beside``) tracks the
    in-place order within one bf16 rounding of the update, and a CUDA graph of it replays the eager result exactly."""
    from engine.lora.batch import LoRARows, build_lora_batch
    from engine.lora.delta import LayerDelta
    from engine.model.layers import AdaptedLinear, FusedOps
    from kernels.backend import get_backend
    from kernels.lora_batch import LoRAWeights
    from tests.engine.test_lora_ops import FakePool

    gen = torch.Generator(device="cuda").manual_seed(rows)
    dev, dt, in_dim, outs = "cuda", torch.bfloat16, 256, (256, 64, 64)
    pool = FakePool([8, 16, 0, 4], [2.0, 0.5, 1.0, -1.25])
    w = LoRAWeights((torch.randn(4, 3, 16, in_dim, generator=gen, device=dev) / 16).to(dt),
                    (torch.randn(4, sum(outs), 16, generator=gen, device=dev) / 4).to(dt), (0, 256, 320, 384))
    batch, _ = build_lora_batch([LoRARows(i % 4, i, 1) for i in range(rows)], pool, rows, torch.device(dev))
    op = get_backend("triton")

    class Delta(LayerDelta):
        def apply(self, key, x, y):
            op.add_lora(y, x, w, batch)

    x = torch.randn(rows, in_dim, generator=gen, device=dev).to(dt)
    layers = {}
    for side in (0, 16):
        layer = AdaptedLinear(in_dim, outs, True, (0, "qkv"), FusedOps(False, row_linear=True, side_stream_rows=side))
        layers[side] = layer.to(dev, dt)
        layer.weight.data = (torch.randn(sum(outs), in_dim, generator=gen, device=dev) / 16).to(dt)
        layer.bias.data = torch.randn(sum(outs), generator=gen, device=dev).to(dt)
    layers[16].load_state_dict(layers[0].state_dict())
    assert layers[16].ops.beside(x) and not layers[0].ops.beside(x)
    with torch.inference_mode():
        in_place, beside = layers[0](x, [Delta()]), layers[16](x, [Delta()])
        torch.cuda.synchronize()
    want = x.double() @ layers[0].weight.double().T + layers[0].bias.double()  # fp64, then each row's update
    bounds = w.slice_bounds
    for t in range(rows):
        slot = t % 4
        r = pool.rank_in[slot]
        for i in range(w.n_slices):
            a, b = w.a[slot, i, :r].double(), w.b[slot, bounds[i]:bounds[i + 1], :r].double()
            want[t, bounds[i]:bounds[i + 1]] += pool.scale_in[slot] * (b @ (a @ x[t].double()))
    err = lambda y: ((y.double() - want).norm() / want.norm()).item()  # noqa: E731
    assert err(beside) < 1e-2 and err(beside) <= err(in_place) + 2e-3, (err(beside), err(in_place))
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    with torch.inference_mode():
        layers[16](static_x, [Delta()])  # warm-up outside the capture (Triton compiles)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            replayed = layers[16](static_x, [Delta()])
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(replayed, beside)
