"""Tile table lookup (exact -> nearest -> heuristic), JSON round trip, the shipped H200 table, and the CLI."""

from __future__ import annotations

import argparse

import pytest
import torch

from kernels.tile_config import (
    CONFIG_DIR,
    FIXED_MERGE_CONFIG,
    AtmmConfig,
    ExpandConfig,
    ShapeKey,
    ShrinkConfig,
    TileTable,
    device_slug,
    heuristic_config,
)
from kernels.tuning import default_grid, expand_candidates, routed_grid, routed_problem, shrink_candidates

A = AtmmConfig(ShrinkConfig(16, 16, 128, 4, 4, 3), ExpandConfig(16, 128, 16, 4, 2))
B = AtmmConfig(ShrinkConfig(64, 64, 64, 1, 8, 3), ExpandConfig(64, 128, 64, 8, 2))
DECODE = ShapeKey(32, 32, 3584, 3584, 64)
PREFILL = ShapeKey(32, 8192, 3584, 3584, 64)


def test_lookup_exact_then_nearest_then_heuristic():
    table = TileTable("test", {DECODE: A, PREFILL: B})
    assert table.lookup(DECODE) == (A, "exact")
    assert table.lookup(ShapeKey(32, 48, 3584, 3584, 64)) == (A, "nearest")
    assert table.lookup(ShapeKey(32, 4096, 3584, 3584, 128)) == (B, "nearest")
    config, source = TileTable("empty").lookup(DECODE)
    assert source == "heuristic" and config == heuristic_config(DECODE)


def test_json_round_trip(tmp_path):
    table = TileTable("test", {DECODE: A, PREFILL: B}, timings_us={DECODE: 12.5})
    table.merge[64] = FIXED_MERGE_CONFIG
    path = tmp_path / "t.json"
    table.save(path)
    loaded = TileTable.load(path)
    assert loaded.entries == table.entries and loaded.timings_us == {DECODE: 12.5}
    assert loaded.merge == table.merge
    assert loaded.routed is None and "routed" not in table.to_json()


ROUTED_KEY = ShapeKey(8, 32, 3584, 37888, 64)  # 16 rows x top-2 over 8 experts


def test_routed_entries_round_trip_and_fall_back_to_segmented_entries(tmp_path):
    table = TileTable("test", {DECODE: A, PREFILL: B})
    assert table.lookup_routed(ROUTED_KEY) == table.lookup(ROUTED_KEY)  # no routed entries yet
    assert table.lookup_many_routed([ROUTED_KEY]) == [table.lookup(ROUTED_KEY)[0]]
    table.routed = TileTable("test", {ROUTED_KEY: B}, timings_us={ROUTED_KEY: 40.0})
    assert table.lookup_routed(ROUTED_KEY) == (B, "exact")
    assert table.lookup_routed(ShapeKey(8, 2, 3584, 37888, 64)) == (B, "nearest")  # its own entries only
    assert table.lookup(ROUTED_KEY)[0] == A  # segmented lookups ignore them
    path = tmp_path / "t.json"
    table.save(path)
    loaded = TileTable.load(path)
    assert loaded.routed.entries == {ROUTED_KEY: B} and loaded.routed.timings_us == {ROUTED_KEY: 40.0}
    assert loaded.entries == table.entries
    assert loaded.lookup_many_routed([ROUTED_KEY, DECODE]) == [B, B]


def test_routed_problem_matches_its_key():
    for key in routed_grid(quick=True):
        x, y, weights, routing = routed_problem(key, top_k=2, device="cpu", dtype=torch.float32)
        assert routing.num_experts == key.segments and routing.num_tokens * routing.top_k == key.tokens
        assert (weights.in_dim, weights.out_dim, weights.pool_rank) == (key.in_dim, key.out_dim, key.max_rank)
        assert x.shape == (routing.num_tokens, key.in_dim) and y.shape == (routing.num_tokens, key.out_dim)
        assert routing.topk_ids.min() >= 0 and routing.topk_ids.max() < key.segments


def test_heuristic_splits_k_for_decode_not_prefill():
    assert heuristic_config(DECODE).shrink.split_k > 1
    assert heuristic_config(PREFILL).shrink.split_k == 1
    assert heuristic_config(PREFILL).shrink.block_m >= 64


def test_device_slug():
    assert device_slug("NVIDIA H200") == "nvidia_h200"
    assert device_slug("NVIDIA GeForce RTX 4090 (laptop)") == "nvidia_geforce_rtx_4090_laptop"


def test_shipped_h200_table_covers_the_bench_grid():
    path = CONFIG_DIR / "nvidia_h200.json"
    if not path.is_file():
        pytest.fail("kernels/configs/nvidia_h200.json is missing (run `valora kernels tune` on an H200)")
    table = TileTable.load(path)
    assert table.device == "nvidia_h200" and table.merge
    for key in (ShapeKey(32, 32, 3584, 3584, 128), ShapeKey(32, 8192, 3584, 18944, 64)):
        assert table.lookup(key)[1] in ("exact", "nearest")


def test_candidates_fit_the_shape():
    for key in default_grid():
        rows = key.tokens // key.segments
        assert all(c.block_m <= max(16, 2 * (1 << (rows - 1).bit_length())) for c in shrink_candidates(key))
        assert all(key.in_dim // c.split_k >= c.block_k for c in shrink_candidates(key))
        assert expand_candidates(key)


def test_cli_registers_kernels_tune():
    from kernels.cli import register

    parser = argparse.ArgumentParser(prog="valora")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["kernels", "tune", "--quick", "--budget-s", "60"])
    assert args.quick and args.budget_s == 60 and callable(args.handler) and not args.routed
    assert parser.parse_args(["kernels", "tune", "--routed"]).routed
    with pytest.raises(SystemExit):
        parser.parse_args(["kernels", "tune", "--help"])


def test_a_tile_that_faults_on_the_gpu_stops_the_tune(monkeypatch):
    """A candidate that fails to compile or launch is skipped; one that faulted on the device (the CUDA context is
    lost, so every later candidate would fail too) stops the tune, naming the tile. The device is simulated: a
    fault is what makes the next synchronise raise."""
    from kernels import tuning

    faulted, ran = [], []

    def synchronize(*_):
        if faulted:
            raise RuntimeError("CUDA error: misaligned address")

    def run(cfg):
        ran.append(cfg)
        if cfg == "too big":
            raise RuntimeError("out of resource: shared memory")
        if cfg == "faults":
            faulted.append(cfg)
            raise RuntimeError("CUDA error: misaligned address")

    class Timer:
        def graph_time_us(self, fn):
            fn()
            return 1.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert tuning._best(Timer(), ["too big", "fits"], run) == ("fits", 1.0)
    with pytest.raises(RuntimeError, match="tile faults faulted on the GPU"):
        tuning._best(Timer(), ["fits", "faults", "never run"], run)
    assert "never run" not in ran


@pytest.mark.parametrize("rows", [2, 20])
def test_routed_tuning_picks_the_shrink_by_the_path_that_runs(interpreted, monkeypatch, rows):
    """Up to the fused linear's rows the routed entry's shrink is the one fastest under the fused linear (the path
    the engine runs there), not the one fastest before the routed expand; past them, the pair's pick. The timer is
    simulated: the pair timing favours the first shrink candidate, the fused timing the last."""
    from kernels import atmm, fused_linear, reference, tuning

    key = ShapeKey(segments=3, tokens=2 * rows, in_dim=512, out_dim=24, max_rank=8)
    candidates = tuning.shrink_candidates(key, rows)
    assert len(candidates) > 1
    ran: list[tuple[str, ShrinkConfig]] = []

    def recorder(path, launch):
        def run(x, weights, plan, tmp, cfg, *args):
            ran.append((path, cfg))
            return launch(x, weights, plan, tmp, cfg, *args)
        return run

    monkeypatch.setattr(atmm, "launch_shrink", recorder("pair", atmm.launch_shrink))
    monkeypatch.setattr(fused_linear, "launch_shrink", recorder("fused", fused_linear.launch_shrink))

    class Timer:
        device = torch.device("cpu")

        def graph_time_us(self, fn):
            ran.clear()
            fn()
            if not ran:  # an expand alone
                return 1.0
            path, cfg = ran[-1]
            rank = candidates.index(cfg)
            return float(rank if path == "pair" else len(candidates) - rank)

    config, _ = tuning.profile_routed_shape(Timer(), key)
    fused = rows <= fused_linear.MAX_ROWS
    assert config.shrink == (candidates[-1] if fused else candidates[0])

    # The fused linear with an explicit shrink tile still computes the routed projection.
    x, _, weights, routing = tuning.routed_problem(key, 2, "cpu", torch.float32)
    weight = torch.randn(key.out_dim, key.in_dim)
    want = reference.routed_linear(x, weight, None, weights, routing)
    if fused:
        for cfg in (candidates[0], candidates[-1]):
            got = fused_linear.routed_linear(x, weight, None, weights, routing, shrink=cfg)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chained", [False, True])
def test_decode_tuning_picks_the_pair_by_how_it_runs(monkeypatch, chained):
    """Unchained, the entry is the fastest shrink alone with the fastest expand after it; chained (PDL), the few
    fastest of each are timed as chained pairs and the fastest pair wins, even one neither alone would pick. The
    launches and the timer are simulated: alone, the candidates' order is their speed; chained, only the second
    shrink with the third expand is fast."""
    from kernels import atmm, tuning

    key = ShapeKey(segments=32, tokens=32, in_dim=3584, out_dim=3584, max_rank=64)
    shrinks, expands = tuning.shrink_candidates(key), tuning.expand_candidates(key)
    split = max({c.split_k for c in shrinks}, key=lambda k: sum(c.split_k == k for c in shrinks))
    ours = [c for c in shrinks if c.split_k == split]
    assert len(ours) >= 2 and len(expands) >= 3
    ran: list[tuple[str, object]] = []
    monkeypatch.setattr(atmm, "launch_shrink", lambda x, w, plan, tmp, cfg, *a: ran.append(("shrink", cfg)))
    monkeypatch.setattr(atmm, "launch_expand", lambda y, w, plan, tmp, cfg, *a: ran.append(("expand", cfg)))
    fast_pair = (ours[1], expands[2])

    class Timer:
        device = torch.device("cpu")

        def graph_time_us(self, fn):
            ran.clear()
            fn()
            kinds = dict(ran)
            if len(kinds) == 2:  # a pair
                return 1.0 if (kinds["shrink"], kinds["expand"]) == fast_pair else 50.0
            if "shrink" in kinds:
                return 10.0 + (ours.index(kinds["shrink"]) if kinds["shrink"] in ours else 20)
            return 10.0 + expands.index(kinds["expand"])

    config, us = tuning.profile_shape(Timer(), key, chained=chained)
    if chained:
        assert (config.shrink, config.expand) == fast_pair and us == 1.0
    else:  # other splits' shrinks time 30 us alone
        assert (config.shrink, config.expand) == (ours[0], expands[0]) and us == 20.0
