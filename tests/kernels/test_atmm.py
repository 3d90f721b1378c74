"""ATMM (kernels/atmm.py) against the float64 per-token oracle, under the CPU interpreter in fp16 and fp32.

The interpreter runs every Triton program in Python, so the full cross product (rank x adapters x tokens x hidden
sizes x dtype x mode x config = 1440 cases) would take hours on 2 cores. The kernel sweep runs a pairwise covering
subset instead: every value of every axis appears, and every pair of values of any two axes appears in at least
one case (about 25 cases). The full cross product of the axes runs against the pure-torch reference in
test_reference.py, and in bf16 on the GPU in test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from kernels import atmm
from kernels.atmm import RowPlan, atmm_add, expand_meta, pdl_supported, shrink_meta, workspace_shape
from kernels.lora_batch import LoRABatch
from kernels.tile_config import FIXED_CONFIG, AtmmConfig, ExpandConfig, ShapeKey, ShrinkConfig, device_table
from tests.kernels.sweep import (
    ADAPTERS,
    CONFIGS,
    DIMS,
    MODES,
    RANKS,
    TOKENS,
    assert_matches,
    covering_rows,
    make_problem,
    poison_padding,
)

AXES = {"rank": RANKS, "adapters": ADAPTERS, "tokens": TOKENS, "dims": DIMS, "mode": MODES,
        "dtype": (torch.float16, torch.float32), "config": tuple(CONFIGS)}
CASES = covering_rows(AXES)


def _run(problem, config_name):
    config = CONFIGS[config_name]
    batch, weights = problem.batch, problem.weights
    resolved = config or device_table().lookup(ShapeKey(batch.num_segments, batch.num_lora_tokens,
                                                        weights.in_dim, weights.out_dim, batch.max_rank))[0]
    # The workspace is poisoned with NaN: any element the expand reads but the shrink did not write shows up.
    workspace = torch.full(workspace_shape(RowPlan.from_batch(batch), weights, resolved), float("nan"))
    y = problem.y0.clone()
    atmm_add(y, problem.x, weights, batch, resolved, workspace=workspace if batch.max_rank else None)
    return y


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v if not isinstance(v, tuple) else v[0])
                                                               for v in c.values()))
def test_atmm_sweep(interpreted, case):
    problem = make_problem(case["rank"], case["adapters"], case["tokens"], case["dims"], case["mode"],
                           case["dtype"], seed=hash(str(case)) % 1000)
    y = _run(problem, case["config"])
    assert_matches(y, problem.expected, problem.y0, problem.touched)


def test_covering_subset_covers_every_pair():
    import itertools

    for a, b in itertools.combinations(AXES, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert len(seen) == len(AXES[a]) * len(AXES[b]), (a, b)


def test_no_adapter_batch_is_a_no_op(interpreted):
    problem = make_problem(8, 3, 7, DIMS[0], "plain", torch.float32)
    empty = LoRABatch.from_token_slots([-1] * 7, [8] * 5, [1.0] * 5)
    y = problem.y0.clone()
    atmm_add(y, problem.x, problem.weights, empty)
    assert torch.equal(y, problem.y0)


def test_strided_rows_of_a_larger_buffer(interpreted):
    """x and y may be row-strided views (e.g. a column block of a fused activation buffer)."""
    problem = make_problem(16, 3, 7, DIMS[1], "plain", torch.float32, seed=3)
    x_buf = torch.randn(7, problem.x.shape[1] + 5)
    x_buf[:, 2 : 2 + problem.x.shape[1]] = problem.x
    y_buf = torch.randn(7, problem.y0.shape[1] + 9)
    y_buf[:, 4 : 4 + problem.y0.shape[1]] = problem.y0
    y_view = y_buf[:, 4 : 4 + problem.y0.shape[1]]
    atmm_add(y_view, x_buf[:, 2 : 2 + problem.x.shape[1]], problem.weights, problem.batch, FIXED_CONFIG)
    assert_matches(y_view, problem.expected, problem.y0, problem.touched)


def test_rejects_mismatched_shapes():
    problem = make_problem(8, 1, 7, DIMS[0], "plain", torch.float32)
    with pytest.raises(ValueError, match="in_dim"):
        atmm_add(problem.y0, problem.x[:, :-1], problem.weights, problem.batch)
    with pytest.raises(ValueError, match="dtype"):
        atmm_add(problem.y0, problem.x.double(), problem.weights, problem.batch)
    with pytest.raises(ValueError, match="rows"):
        atmm_add(problem.y0[:-1], problem.x[:-1], problem.weights, problem.batch)


WIDE = AtmmConfig(ShrinkConfig(16, 32, 64, 4, 4, 2), ExpandConfig(128, 32, 32, 4, 2, 2))  # K split 4, tall expand


@pytest.mark.parametrize("mode", MODES)
def test_term_walk_expand_with_split_partials(interpreted, mode):
    """Two wide-rank terms in 128-row tiles do not fit the preloaded path: the expand walks (live term, rank chunk)
    and sums the shrink's four K-split partials; no-adapter rows and mixed ranks included."""
    problem = make_problem(128, 3, 7, DIMS[2], mode, torch.float32, seed=11)
    plan = RowPlan.from_batch(problem.batch)
    assert expand_meta(plan, problem.weights.n_slices, WIDE.expand, WIDE.shrink.split_k, True)["PRELOAD_TERMS"] == 0
    workspace = torch.full(workspace_shape(plan, problem.weights, WIDE), float("nan"))
    y = problem.y0.clone()
    atmm_add(y, problem.x, problem.weights, problem.batch, WIDE, workspace=workspace)
    assert_matches(y, problem.expected, problem.y0, problem.touched)


def test_programmatic_dependent_launch_only_where_it_exists(monkeypatch):
    """Chained launches need an NVIDIA sm_90+ device (not the interpreter, not a ROCm build, whose GPUs torch also
    calls ``cuda`` with capabilities of 9 and up) and a decode-sized batch; the kernels' variants follow the flag."""
    from kernels import atmm

    plan = RowPlan.from_batch(make_problem(8, 1, 3, DIMS[0], "plain", torch.float32).batch)
    assert not pdl_supported(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(atmm, "_PDL", {})
    for hip, capability, expected in [(None, (9, 0), True), (None, (8, 0), False), ("6.2", (9, 4), False)]:
        atmm._PDL.clear()
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert pdl_supported(torch.device("cuda", 0)) is expected, (hip, capability)
    assert atmm.chains(atmm.PDL_MAX_ROWS, True) and not atmm.chains(atmm.PDL_MAX_ROWS + 1, True)
    assert not atmm.chains(1, False)
    meta = expand_meta(plan, 1, WIDE.expand, 1, False, pdl=True)
    assert meta["USE_PDL"] and meta["launch_pdl"]
    assert "launch_pdl" not in expand_meta(plan, 1, WIDE.expand, 1, False) and not shrink_meta(plan, 1, WIDE.shrink,
                                                                                              False)["USE_PDL"]


@pytest.mark.parametrize("config", ["table", "wide", "wide-vec"])
@pytest.mark.parametrize("mode", MODES)
def test_pool_padding_past_each_rank_is_never_used(interpreted, mode, config, monkeypatch):
    """NaN in the pool past every adapter's true rank (ranks not multiples of 8 included: the kernels fetch B and
    the shrink output 8 rank columns at a time) and in the workspace: the output matches the oracle, both through
    the expand's preloaded terms (the device table's tiles) and its term walk (WIDE, preloading off; "wide-vec":
    with the walk's 16-byte rank loads, off by default, ``VEC_R_WALK``)."""
    monkeypatch.setattr(atmm, "VEC_R_WALK", config == "wide-vec")
    if config != "table":
        monkeypatch.setattr(atmm, "PRELOAD_ELEMENTS", 0)
    problem = make_problem(24, 3, 7, DIMS[1], mode, torch.float32, seed=12)
    batch = problem.batch
    assert (batch.seg_ranks[batch.seg_slots >= 0] % 8 != 0).any()
    poison_padding(problem.weights, batch.seg_slots, batch.seg_ranks)
    y = _run(problem, "table") if config == "table" else problem.y0.clone()
    if config != "table":
        workspace = torch.full(workspace_shape(RowPlan.from_batch(batch), problem.weights, WIDE), float("nan"))
        atmm_add(y, problem.x, problem.weights, batch, WIDE, workspace=workspace)
    assert_matches(y, problem.expected, problem.y0, problem.touched)
