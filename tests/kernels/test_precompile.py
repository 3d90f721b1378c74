"""Ahead-of-serving compilation: the planned variants cover the batches a server builds, compile_ahead's two
passes, and (GPU) nothing compiles after precompile, with its variants compiled in threads or one at a time."""

from __future__ import annotations

import logging
import random

import pytest
import torch

from kernels.atmm import PDL_MAX_ROWS, atmm_add, shape_key
from kernels.fused_linear import routed_linear
from kernels.launch import compile_ahead, compiling_ahead, launch
from kernels.lora_batch import LoRABatch, LoRAWeights
from kernels.precompile import (
    plan_routed_variants,
    plan_variants,
    precompile,
    precompile_linears,
    precompile_routed_pools,
    routed_cases,
    variant_key,
)
from kernels.routed import routed_add
from kernels.routing import Routing
from kernels.tile_config import ShapeKey, TileTable, table_path

SLOTS, POOL_RANK, BUDGET, SEGMENTS = 33, 64, 2048, 33
LAYOUTS = {"qkv": (3584, [3584, 512, 512]), "o": (3584, [3584]), "gate_up": (3584, [18944, 18944]),
           "down": (18944, [3584])}  # Qwen2.5-VL-7B
TABLES = {"h200": lambda: TileTable.load(table_path("nvidia_h200")), "heuristic": lambda: TileTable("none")}


def pool(in_dim: int, widths: list[int], device: str = "meta", dtype=torch.bfloat16, slots: int = SLOTS,
         rank: int = POOL_RANK) -> LoRAWeights:
    bounds = [0]
    for w in widths:
        bounds.append(bounds[-1] + w)
    return LoRAWeights(torch.zeros(slots, len(widths), rank, in_dim, dtype=dtype, device=device),
                       torch.zeros(slots, bounds[-1], rank, dtype=dtype, device=device), tuple(bounds))


def random_batches(rng: random.Random, n: int, max_tokens: int, max_adapters: int) -> list[LoRABatch]:
    """Batches as a server builds them: any token count, adapters of mixed ranks in any order, base rows, and
    mixture mode (one adapter merged)."""
    out = []
    while len(out) < n:
        tokens = max(1, int(2 ** rng.uniform(0, max_tokens.bit_length() - 1)))
        adapters = rng.randint(1, min(max_adapters, tokens))
        slots = [rng.randrange(-1, adapters) for _ in range(tokens)]
        ranks = [rng.choice([8, 16, 24, 32, 48, 64]) for _ in range(SLOTS)]
        batch = LoRABatch.from_token_slots(slots, ranks, [0.5] * SLOTS, merged_slot=rng.choice([None, None, 0]))
        if batch.num_segments and batch.max_rank:
            out.append(batch)
    return out


@pytest.mark.parametrize("pdl", [True, False], ids=["chained", "unchained"])
@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_planned_variants_cover_the_batches_a_server_builds(layout, table, pdl):
    """Chained (PDL) launches use other variants than unchained ones, and only up to ``PDL_MAX_ROWS`` rows: the plan
    follows what the launches ask for."""
    weights, tiles = pool(*LAYOUTS[layout]), TABLES[table]()
    planned = plan_variants(weights, max_tokens=BUDGET, max_segments=SEGMENTS, table=tiles, pdl=pdl)
    assert 0 < len(planned) < 300
    chained = [key for key, (_, _, on) in planned.items() if on]
    assert bool(chained) == pdl and all(dict(key[0])["USE_PDL"] for key in chained)
    batches = random_batches(random.Random(layout + table), 300, BUDGET, SEGMENTS - 1)
    assert any(b.num_lora_tokens > PDL_MAX_ROWS for b in batches) and any(b.num_lora_tokens <= 16 for b in batches)
    for batch in batches:
        config = tiles.lookup(shape_key(batch, weights))[0]
        key = variant_key(batch, weights, config, pdl)
        assert key in planned, (batch.num_segments, batch.num_lora_tokens, batch.max_rank, batch.num_terms)
        assert dict(key[0])["USE_PDL"] == (pdl and batch.num_lora_tokens <= PDL_MAX_ROWS)


def test_static_graph_batches_are_planned():
    """CUDA-graph buckets report their size as segments and the pool's rank; wide buckets scan more segments."""
    weights, tiles = pool(*LAYOUTS["o"]), TABLES["h200"]()
    planned = plan_variants(weights, max_tokens=256, max_segments=SEGMENTS, table=tiles,
                            static=[(size, POOL_RANK) for size in (1, 2, 4, 8, 16, 32, 64, 128, 256)])
    for size in (128, 256):
        batch = LoRABatch.from_token_slots([0] * size, [POOL_RANK] * SLOTS, [1.0] * SLOTS, pad_segments_to=size,
                                           max_seg_len=size, max_rank=POOL_RANK)
        assert variant_key(batch, weights, tiles.lookup(shape_key(batch, weights))[0]) in planned
    without = plan_variants(weights, max_tokens=256, max_segments=SEGMENTS, table=tiles)
    assert len(planned) > len(without)


EXPERTS, TOP_K = 4 * 8, 2  # an expert pool of 4 MoE-LoRA adapters x 8 experts, top-2


def random_routing(rng: random.Random, rows: int, device: str = "cpu") -> Routing:
    ids = torch.tensor([[rng.randrange(-1, EXPERTS) for _ in range(TOP_K)] for _ in range(rows)], dtype=torch.int32)
    return Routing(torch.arange(EXPERTS, dtype=torch.int32, device=device),
                   torch.tensor([rng.choice([8, 16, 64]) for _ in range(EXPERTS)], dtype=torch.int32, device=device),
                   torch.full((EXPERTS,), 0.5, device=device), ids.to(device),
                   torch.rand(rows, TOP_K, generator=torch.Generator().manual_seed(rows)).to(device), POOL_RANK)


@pytest.mark.parametrize("table", sorted(TABLES))
def test_planned_routed_variants_cover_any_row_count(table):
    weights, tiles = pool(*LAYOUTS["gate_up"], slots=EXPERTS), TABLES[table]()
    planned = plan_routed_variants(weights, max_tokens=BUDGET, experts=EXPERTS, top_k=TOP_K, max_rank=POOL_RANK,
                                   table=tiles)
    rng = random.Random(table)
    for rows in [1, 2, 3, 7, 16, 17, 100, 333, 1000, BUDGET] + [rng.randint(1, BUDGET) for _ in range(40)]:
        routing = random_routing(rng, rows)
        key = ShapeKey(EXPERTS, rows * TOP_K, weights.in_dim, weights.out_dim, POOL_RANK)
        assert variant_key(routing, weights, tiles.lookup_routed(key)[0]) in planned, rows


def test_lookup_many_answers_as_lookup():
    table, fresh = TABLES["h200"](), TABLES["h200"]()
    rng = random.Random(3)
    keys = [ShapeKey(rng.randint(1, 64), rng.randint(1, 9000), *rng.choice([(3584, 4608), (3584, 3584),
                                                                             (3584, 37888), (18944, 3584)]),
                     rng.choice([1, 8, 16, 24, 64, 128])) for _ in range(500)]
    keys += [ShapeKey(32, 2 ** k, 3584, 3584, 64) for k in range(14)]  # grid points and exact entries
    assert table.lookup_many(keys) == [fresh.lookup(k)[0] for k in keys]


def test_precompile_does_nothing_off_cuda():
    assert precompile(pool(64, [32, 16], device="cpu", dtype=torch.float32), max_tokens=64, max_segments=4) == 0
    weights = pool(64, [32, 16], device="cpu", dtype=torch.float32)
    linear = (torch.zeros(48, 64), torch.zeros(48), weights)
    assert precompile_linears([linear], routed_cases(4, 4, 2, POOL_RANK))[0] == 0


class _Kernel:
    """Records how it was launched: ``kernel[grid](...)`` or ``kernel.warmup(..., grid=grid)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append(("launch", grid, args, meta))

    def warmup(self, *args, grid, **meta):
        self.calls.append(("warmup", grid, args, meta))


def test_compile_ahead_compiles_in_a_first_pass_then_launches(monkeypatch):
    """The walk runs twice: first with launches turned into warmups (compiles only), then as is; the second
    pass's result is returned."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel, passes = _Kernel(), []

    def walk():
        passes.append(compiling_ahead())
        launch(kernel, (3,))(1, 2, BLOCK=16)
        return len(passes)

    assert compile_ahead(walk, workers=2) == 2
    assert passes == [True, False]
    assert kernel.calls == [("warmup", (3,), (1, 2), {"BLOCK": 16}), ("launch", (3,), (1, 2), {"BLOCK": 16})]
    assert not compiling_ahead()


@pytest.mark.parametrize("interpret, workers", [("1", 8), ("0", 1)], ids=["interpreter", "one-worker"])
def test_compile_ahead_only_launches_where_it_cannot_compile_ahead(monkeypatch, interpret, workers):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    kernel = _Kernel()
    assert compile_ahead(lambda: launch(kernel, (1,))() or "done", workers=workers) == "done"
    assert [c[0] for c in kernel.calls] == ["launch"]


def test_compile_ahead_falls_back_when_its_first_pass_fails(monkeypatch, caplog):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    passes = []

    def walk():
        passes.append(compiling_ahead())
        if compiling_ahead():
            raise RuntimeError("compile failed in a thread")
        return "served"

    with caplog.at_level(logging.WARNING, logger="kernels.launch"):
        assert compile_ahead(walk, workers=2) == "served"
    assert passes == [True, False] and not compiling_ahead()
    assert "one variant at a time" in caplog.text


def _variants() -> int:
    from kernels import atmm, fused_linear

    return sum(len(cache[0]) for kernel in (atmm._shrink_kernel, atmm._expand_kernel, fused_linear._linear_kernel)
               for cache in kernel.device_caches.values())


@pytest.mark.gpu
def test_nothing_compiles_after_precompile():
    """After precompile, a server's batches (random shapes, mixture included) run on compiled variants only."""
    weights = pool(*LAYOUTS["qkv"], device="cuda", slots=SLOTS)
    torch.nn.init.normal_(weights.a)
    launched = precompile(weights, max_tokens=BUDGET, max_segments=SEGMENTS)
    before = _variants()
    assert launched > 0 and before >= launched
    for batch in random_batches(random.Random(7), 60, BUDGET, SEGMENTS - 1):
        x = torch.randn(batch.num_tokens, weights.in_dim, dtype=weights.a.dtype, device="cuda")
        y = torch.zeros(batch.num_tokens, weights.out_dim, dtype=weights.a.dtype, device="cuda")
        atmm_add(y, x, weights, batch.to("cuda"))
    torch.cuda.synchronize()
    assert _variants() == before
    assert precompile(weights, max_tokens=BUDGET, max_segments=SEGMENTS) == 0  # launched once per process


@pytest.mark.gpu
def test_precompile_compiled_ahead_in_threads():
    """compile_ahead's first pass compiles every variant precompile launches (none launched, none recorded); the
    second launches each once and compiles nothing. A layout no other test uses, so its variants are new here."""
    weights = pool(1000, [700, 300], device="cuda", slots=9)
    limits = dict(max_tokens=300, max_segments=9)
    passes = []

    def walk():
        at_start = _variants()  # the second pass starts once the first pass's compiles have finished
        passes.append((compiling_ahead(), at_start, precompile(weights, **limits), _variants()))
        return passes[-1][2]

    before = _variants()
    launched = compile_ahead(walk, workers=4)
    (first, _, warmed, _), (second, compiled, _, after) = passes
    assert first and not second
    assert launched == warmed == len(plan_variants(weights, **limits)) > 0
    assert compiled > before and after == compiled
    assert precompile(weights, **limits) == 0


@pytest.mark.gpu
def test_nothing_compiles_after_routed_precompile():
    weights = pool(*LAYOUTS["down"], device="cuda", slots=EXPERTS)
    launched, _ = precompile_routed_pools([weights], max_tokens=BUDGET, experts=EXPERTS, top_k=TOP_K,
                                          max_rank=POOL_RANK)
    before = _variants()
    assert launched > 0
    rng = random.Random(11)
    for rows in [1, 5, 16, 100, 700, BUDGET]:
        x = torch.randn(rows, weights.in_dim, dtype=weights.a.dtype, device="cuda")
        y = torch.zeros(rows, weights.out_dim, dtype=weights.a.dtype, device="cuda")
        routed_add(y, x, weights, random_routing(rng, rows, "cuda"))
    torch.cuda.synchronize()
    assert _variants() == before


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["qkv", "down"])
def test_nothing_compiles_after_linear_precompile(layout):
    """After precompile_linears, the fused decode linear runs on compiled variants only: the base linear at any row
    count up to MAX_ROWS, and the routed form for any row count up to the backend's fused rows."""
    weights = pool(*LAYOUTS[layout], device="cuda", slots=EXPERTS)
    weight = torch.randn(weights.out_dim, weights.in_dim, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(weights.out_dim, dtype=torch.bfloat16, device="cuda") if layout == "qkv" else None
    cases = routed_cases(16, EXPERTS, TOP_K, POOL_RANK)
    launched = precompile_linears([(weight, bias, None)])[0] + precompile_linears([(weight, bias, weights)], cases)[0]
    before = _variants()
    assert launched == 18
    rng = random.Random(5)
    for rows in [1, 5, 16]:
        routed_linear(torch.randn(rows, weights.in_dim, dtype=torch.bfloat16, device="cuda"), weight, bias)
    for rows in [1, 3, 9, 16]:
        x = torch.randn(rows, weights.in_dim, dtype=torch.bfloat16, device="cuda")
        routed_linear(x, weight, bias, weights, random_routing(rng, rows, "cuda"))
    torch.cuda.synchronize()
    assert _variants() == before
    assert precompile_linears([(weight, bias, weights)], cases)[0] == 0
