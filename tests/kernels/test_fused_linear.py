"""The fused decode linear (base matmul + routed expand in one launch) against the float64 oracle and the torch
reference, under the interpreter: a pairwise sweep of rank x experts x top-k x rows x dims x dtype x bias x tiles."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.model.layers import ROW_LINEAR_ROWS
from kernels import reference, tuning
from kernels.fused_linear import MAX_ROWS, SPLIT_PROGRAMS, LinearConfig, linear_config, routed_linear, split_scratch
from kernels.routed import routed_add
from kernels.tile_config import ShapeKey
from tests.kernels.sweep import DIMS, TOLERANCE, covering_rows, make_routed_problem, poison_padding

AXES = {"rank": (1, 8, 16, 64, 128), "experts": (1, 3, 8), "top_k": (1, 2), "rows": (1, 7, 16), "dims": DIMS,
        "dtype": (torch.float16, torch.float32), "bias": (False, True), "tiles": ("default", "small", "split")}
SMALL = LinearConfig(block_n=8, block_k=32, num_warps=4, num_stages=1)  # several programs per slice, ragged K
TILES = {"default": None, "small": SMALL, "split": LinearConfig(8, 32, 4, 1, split_k=3)}  # split: 3 programs a block
CASES = covering_rows(AXES, seed=3, allowed=lambda c: c["rank"] * c["experts"] <= 128 * 8)


def base_problem(case: dict, seed: int):
    """A routed problem plus a base weight and bias, and the float64 expectation of the whole fused output."""
    p = make_routed_problem(case["rank"], case["experts"], case["top_k"], case["rows"], case["dims"], case["dtype"],
                            seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    out_dim, in_dim = p.weights.out_dim, p.weights.in_dim
    weight = (torch.randn(out_dim, in_dim, generator=gen) / in_dim ** 0.5).to(case["dtype"])
    bias = torch.randn(out_dim, generator=gen).to(case["dtype"]) if case["bias"] else None
    update = p.expected - p.y0.double()  # the oracle's routed update alone
    want = p.x.double() @ weight.double().T + update
    if bias is not None:
        want += bias.double()
    return p, weight, bias, want, update


def assert_close(got: torch.Tensor, want: torch.Tensor, update: torch.Tensor) -> None:
    rtol, atol = TOLERANCE[got.dtype]
    scale = max(update.abs().max().item(), want.abs().max().item() * 0.1, 1e-6)
    excess = ((got.double() - want).abs() - (rtol * want.abs() + atol * scale)).max().item()
    assert torch.isfinite(got).all() and excess <= 0, f"max excess error {excess:.3g} ({got.dtype})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v if not isinstance(v, tuple) else v[0])
                                                               for v in c.values()))
def test_fused_linear_sweep(interpreted, case):
    p, weight, bias, want, update = base_problem(case, seed=len(str(case)))
    config = TILES[case["tiles"]]
    got = routed_linear(p.x, weight, bias, p.weights, p.routing, config)
    assert got.shape == want.shape and got.dtype == p.x.dtype
    assert_close(got, want, update)
    ref = reference.routed_linear(p.x, weight, bias, p.weights, p.routing)
    assert_close(ref, want, update)


@pytest.mark.parametrize("rows", [1, 5])
def test_base_linear_alone(interpreted, rows):
    """Without a pool and routing it is x Wᵀ + b, the linear of the base model."""
    gen = torch.Generator().manual_seed(rows)
    x, weight, bias = torch.randn(rows, 129, generator=gen), torch.randn(70, 129, generator=gen), torch.randn(70)
    got = routed_linear(x, weight, bias)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_many_experts_past_one_term_block(interpreted):
    """70 experts: the epilogue walks them in blocks of MAX_TERMS_BLOCK, picked ones past the first included."""
    case = dict(rank=8, experts=70, top_k=2, rows=9, dims=DIMS[0], dtype=torch.float32, bias=True)
    p, weight, bias, want, update = base_problem(case, seed=5)
    assert (p.routing.topk_ids >= 64).any()
    assert_close(routed_linear(p.x, weight, bias, p.weights, p.routing), want, update)


def test_rejects_bad_input():
    case = dict(rank=8, experts=3, top_k=2, rows=4, dims=DIMS[0], dtype=torch.float32, bias=False)
    p, weight, _, _, _ = base_problem(case, seed=2)
    too_many = torch.zeros(MAX_ROWS + 1, p.x.shape[1])
    with pytest.raises(ValueError, match="rows"):
        routed_linear(too_many, weight, None)
    with pytest.raises(ValueError, match="must be"):
        routed_linear(p.x, weight[:, :-1], None)
    with pytest.raises(ValueError, match="dtype"):
        routed_linear(p.x.half(), weight, None)
    with pytest.raises(ValueError, match="bias"):
        routed_linear(p.x, weight, torch.zeros(3))
    with pytest.raises(ValueError, match="routing"):
        routed_linear(p.x[:2], weight, None, p.weights, p.routing)


def test_config_by_shape():
    """The H200 sweep's picks for the 7B's groups: one row streams W in many narrow programs, 4 or 8 output rows
    each (512-wide chunks with the experts' epilogue); decode batches use 64-column dot tiles, with 128-wide K chunks
    on gate/up, and the narrow outputs (o, down) split K in two."""
    assert linear_config(1, 4608, 3584) == LinearConfig(8, 512, 8, 2)
    assert linear_config(1, 3584, 3584) == LinearConfig(4, 512, 8, 2)
    assert linear_config(1, 37888, 3584) == LinearConfig(8, 512, 4, 2)
    assert linear_config(1, 3584, 18944) == LinearConfig(4, 1024, 4, 2)
    assert linear_config(1, 3584, 18944, lora=True) == LinearConfig(4, 512, 4, 2)
    assert linear_config(8, 3584, 3584) == LinearConfig(64, 256, 4, 4, split_k=2)
    assert linear_config(16, 3584, 18944) == LinearConfig(64, 256, 4, 4, split_k=2)
    assert linear_config(16, 4608, 3584) == LinearConfig(64, 256, 4, 4)
    assert linear_config(16, 37888, 3584) == LinearConfig(64, 128, 4, 4)
    assert ROW_LINEAR_ROWS == MAX_ROWS  # the engine's base projections take the Triton linear up to its rows


@pytest.mark.parametrize("split", [2, 4, 8])
def test_split_k_sums_every_share_once(interpreted, split):
    """Each output block split over K and the expert terms into ``split`` programs (8: more than K has chunks of
    32, so some programs stream nothing): the float64 oracle with and without experts, the bias added once,
    every arrival counter back at zero afterwards, and the same bits on a second launch."""
    case = dict(rank=16, experts=8, top_k=2, rows=9, dims=DIMS[3], dtype=torch.float32, bias=True)
    p, weight, bias, want, update = base_problem(case, seed=split)
    config = LinearConfig(16, 32, 4, 1, split_k=split)
    got = routed_linear(p.x, weight, bias, p.weights, p.routing, config)
    assert_close(got, want, update)
    assert torch.equal(got, routed_linear(p.x, weight, bias, p.weights, p.routing, config))
    base = routed_linear(p.x, weight, bias, config=config)
    torch.testing.assert_close(base, torch.nn.functional.linear(p.x, weight, bias), rtol=1e-5, atol=1e-4)
    assert not split_scratch(p.x.device)[1].any()


def test_split_k_bounded_by_its_scratch():
    """More programs x splits than the shared scratch holds: a clear error before any launch."""
    x, weight = torch.zeros(2, 64), torch.zeros(8 * (SPLIT_PROGRAMS // 2 + 1), 64)
    with pytest.raises(ValueError, match="split_k"):
        routed_linear(x, weight, None, config=LinearConfig(8, 32, 4, 1, split_k=2))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(rank=r, experts=e, top_k=k, rows=t, dims=d, dtype=torch.bfloat16, bias=b)
                                  for r in (1, 64, 128) for e in (1, 8) for k in (2,) for t in (1, 7, 16)
                                  for d in DIMS for b in (False, True)],
                         ids=str)
def test_fused_linear_bf16(case):
    p, weight, bias, want, update = base_problem(case, seed=case["rank"] + case["rows"])
    dev = "cuda"
    routing = p.routing.to(dev)
    weights = type(p.weights)(p.weights.a.to(dev), p.weights.b.to(dev), p.weights.slice_bounds)
    got = routed_linear(p.x.to(dev), weight.to(dev), None if bias is None else bias.to(dev), weights, routing)
    assert_close(got.cpu(), want, update)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("group", [("qkv", 3584, (3584, 512, 512)), ("o", 3584, (3584,)),
                                   ("gate_up", 3584, (18944, 18944)), ("down", 18944, (3584,))], ids=lambda g: g[0])
def test_fused_linear_7b_shapes_and_graph(group, rows):
    """The 7B's projection groups (8 experts of rank 64, top-2) against the torch reference, then as a CUDA graph
    replayed with another routing: bit-identical to an eager call with that routing."""
    _, in_dim, widths = group
    p = make_routed_problem(64, 8, 2, rows, (in_dim, widths), torch.bfloat16, device="cuda", seed=rows)
    q = make_routed_problem(64, 8, 2, rows, (in_dim, widths), torch.bfloat16, device="cuda", seed=rows + 1)
    weight = torch.randn(sum(widths), in_dim, device="cuda", dtype=torch.bfloat16) / in_dim ** 0.5
    bias = torch.randn(sum(widths), device="cuda", dtype=torch.bfloat16) if group[0] == "qkv" else None
    got = routed_linear(p.x, weight, bias, p.weights, p.routing)
    want = reference.routed_linear(p.x, weight, bias, p.weights, p.routing)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    graph, routing = torch.cuda.CUDAGraph(), p.routing
    with torch.cuda.graph(graph):
        out = routed_linear(p.x, weight, bias, p.weights, routing)
    routing.topk_ids.copy_(q.routing.topk_ids)
    routing.topk_gates.copy_(q.routing.topk_gates)
    graph.replay()
    assert torch.equal(out, routed_linear(p.x, weight, bias, p.weights, routing))


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [64, 128, 256])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("group", [("qkv", 3584, (3584, 512, 512)), ("gate_up", 3584, (18944, 18944)),
                                   ("down", 18944, (3584,))], ids=lambda g: g[0])
def test_fused_linear_7b_aligned_pool(group, rows, rank):
    """As the engine's pool stores experts (every rank a multiple of 16, so the compiler vectorises the rank loads,
    which the padded pools above never let it do): the fused linear and the routed pair on the 7B's groups against
    the torch reference, up to the largest rank an adapter may have."""
    _, in_dim, widths = group
    key = ShapeKey(8, 2 * rows, in_dim, sum(widths), rank)
    x, _, weights, routing = tuning.routed_problem(key, 2, "cuda")
    weights = type(weights)(weights.a.expand(-1, len(widths), -1, -1).contiguous(), weights.b,
                            tuple(itertools.accumulate(widths, initial=0)))
    weight = torch.randn(sum(widths), in_dim, device="cuda", dtype=torch.bfloat16) / in_dim ** 0.5
    want = reference.routed_linear(x, weight, None, weights, routing).float()
    torch.testing.assert_close(routed_linear(x, weight, None, weights, routing).float(), want, rtol=2e-2, atol=2e-2)
    y = x @ weight.T
    routed_add(y, x, weights, routing)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("ids", [[3, 1], [2, 2], [-1, 0], [-1, -1]], ids=str)
def test_one_row_experts_loaded_before_the_w_stream(interpreted, ids):
    """One row's direct epilogue (experts loaded before the W stream) against the term walk and the float64
    oracle, with an expert picked twice (counted once, with both gates), an unused pair and no expert at all."""
    case = dict(rank=16, experts=5, top_k=2, rows=1, dims=DIMS[1], dtype=torch.float32, bias=True)
    p, weight, bias, _, _ = base_problem(case, seed=4)
    p.routing.topk_ids.copy_(torch.tensor([ids], dtype=torch.int32))
    update = reference.routed_linear(p.x.double(), torch.zeros_like(weight, dtype=torch.float64), None,
                                     type(p.weights)(p.weights.a.double(), p.weights.b.double(),
                                                     p.weights.slice_bounds),
                                     p.routing)
    want = p.x.double() @ weight.double().T + bias.double() + update
    direct = routed_linear(p.x, weight, bias, p.weights, p.routing, row_direct=True)
    walked = routed_linear(p.x, weight, bias, p.weights, p.routing, row_direct=False)
    assert_close(direct, want, update)
    torch.testing.assert_close(direct, walked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7])
def test_pool_padding_past_each_rank_is_never_used(interpreted, rows):
    """NaN in the expert pool past every expert's true rank (not multiples of 8: B and the shrink output are
    fetched 8 rank columns at a time) and in unused slots: the fused linear, through one row's direct epilogue
    and several rows' term walk, and the routed pair still match the float64 oracle."""
    case = dict(rank=21, experts=5, top_k=2, rows=rows, dims=DIMS[1], dtype=torch.float32, bias=True)
    p, weight, bias, want, update = base_problem(case, seed=7)
    assert (p.routing.expert_ranks % 8 != 0).any()
    poison_padding(p.weights, p.routing.expert_slots, p.routing.expert_ranks)
    assert_close(routed_linear(p.x, weight, bias, p.weights, p.routing), want, update)
    y = p.x @ weight.T + bias
    routed_add(y, p.x, p.weights, p.routing)
    assert_close(y, want, update)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("group", [("gate_up", 3584, (18944, 18944)), ("down", 18944, (3584,))], ids=lambda g: g[0])
def test_programmatic_dependent_launch_reads_the_finished_shrink(group, rows):
    """The shrink and the fused linear chained by programmatic dependent launch (the W stream overlaps the shrink,
    the shrink output is read after the grid-dependency wait): eagerly and as CUDA-graph replays with a new input
    and routing each time, bit-identical to the plain two-launch form. A read of the shrink output before the wait
    would show as a mismatch on some of the 50 replays."""
    from kernels.atmm import pdl_supported

    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+ and a Triton with grid-dependency control")
    _, in_dim, widths = group
    p = make_routed_problem(64, 8, 2, rows, (in_dim, widths), torch.bfloat16, device="cuda", seed=rows + 5)
    weight = torch.randn(sum(widths), in_dim, device="cuda", dtype=torch.bfloat16) / in_dim ** 0.5
    x, routing = p.x.clone(), p.routing
    assert torch.equal(routed_linear(x, weight, None, p.weights, routing, pdl=True),
                       routed_linear(x, weight, None, p.weights, routing, pdl=False))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routed_linear(x, weight, None, p.weights, routing, pdl=True)
    gen = torch.Generator(device="cuda").manual_seed(rows)
    for _ in range(50):
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen).to(x.dtype))
        logits = torch.randn(rows, 8, device="cuda", generator=gen)
        routing.topk_ids.copy_(logits.topk(2, dim=-1).indices.to(torch.int32))
        graph.replay()
        assert torch.equal(out, routed_linear(x, weight, None, p.weights, routing, pdl=False))
