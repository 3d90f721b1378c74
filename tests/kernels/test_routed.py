"""The routed (LoRA-Switch) operator against the float64 oracle: kernel under the interpreter, pairwise subset;
the pure-torch reference on the full cross product of experts x top-k x tokens x rank."""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import reference
from kernels.atmm import workspace_shape
from kernels.routed import routed_add, routed_plan
from kernels.tile_config import AtmmConfig, ExpandConfig, ShapeKey, ShrinkConfig, heuristic_config
from tests.kernels.sweep import DIMS, RANKS, TOKENS, assert_matches, covering_rows, make_routed_problem

EXPERTS = (1, 3, 8)  # LoRA-Switch adapters have a handful of experts per layer
TOP_K = (1, 2, 3)
AXES = {"rank": RANKS, "experts": EXPERTS, "top_k": TOP_K, "tokens": TOKENS, "dims": DIMS,
        "dtype": (torch.float16, torch.float32), "split_k": (False, True)}
SPLIT = AtmmConfig(ShrinkConfig(32, 32, 64, 2, 4, 1), ExpandConfig(32, 64, 32, 4, 1, 2))
# The interpreter's cost grows with rank x experts x tokens; every pair still appears (see covering_rows).
CASES = covering_rows(AXES, seed=1, allowed=lambda c: c["rank"] * c["experts"] * c["tokens"] <= 128 * 3 * 300)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v if not isinstance(v, tuple) else v[0])
                                                               for v in c.values()))
def test_routed_sweep(interpreted, case):
    p = make_routed_problem(case["rank"], case["experts"], case["top_k"], case["tokens"], case["dims"],
                            case["dtype"], seed=len(str(case)))
    r = p.routing
    config = SPLIT if case["split_k"] else heuristic_config(
        ShapeKey(r.num_experts, r.num_tokens * r.top_k, p.weights.in_dim, p.weights.out_dim, r.max_rank))
    workspace = torch.full(workspace_shape(routed_plan(r), p.weights, config), float("nan"))
    y = p.y0.clone()
    routed_add(y, p.x, p.weights, r, config, workspace=workspace)
    assert_matches(y, p.expected, p.y0, p.touched)


@pytest.mark.parametrize(("rank", "experts", "top_k", "tokens"), list(itertools.product(RANKS, EXPERTS, TOP_K, TOKENS)))
def test_reference_add_routed(rank, experts, top_k, tokens):
    p = make_routed_problem(rank, experts, top_k, tokens, DIMS[2], torch.float32, seed=rank * experts + tokens)
    y = p.y0.clone()
    reference.add_routed(y, p.x, p.weights, p.routing)
    assert_matches(y, p.expected, p.y0, p.touched)


def test_routing_from_logits_picks_top_k():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 0.0, 4.0]])
    slots = torch.tensor([4, 5, 6, 7], dtype=torch.int32)
    ones = torch.ones(4)
    from kernels.routing import Routing

    r = Routing.from_router_logits(logits, 2, slots, torch.full((4,), 8, dtype=torch.int32), ones, 8)
    assert r.topk_ids.tolist() == [[1, 2], [0, 3]]
    torch.testing.assert_close(r.topk_gates.sum(dim=1), torch.ones(2))
    assert r.topk_gates[0, 0] > r.topk_gates[0, 1]
    terms = r.token_terms(1)
    assert terms.slots.tolist() == [[4, 7]] and terms.ranks.tolist() == [[8, 8]]
    torch.testing.assert_close(terms.scales, r.topk_gates[1:2])


def test_routed_rejects_bad_routing():
    p = make_routed_problem(8, 3, 2, 7, DIMS[0], torch.float32)
    from dataclasses import replace

    with pytest.raises(ValueError, match="int32"):
        routed_add(p.y0, p.x, p.weights, replace(p.routing, topk_ids=p.routing.topk_ids.long()))
    with pytest.raises(ValueError, match="rows"):
        routed_add(p.y0[:-1], p.x[:-1], p.weights, p.routing)


def test_more_experts_than_one_register_block(interpreted):
    """70 experts (an expert pool of several MoE-LoRA slots): the expand walks its terms in blocks of
    MAX_TERMS_BLOCK, so experts past the first block, picked or not, are handled."""
    from kernels.atmm import MAX_TERMS_BLOCK

    p = make_routed_problem(8, 70, 2, 9, DIMS[0], torch.float32, seed=5)
    r = p.routing
    assert r.num_experts > MAX_TERMS_BLOCK and (r.topk_ids >= MAX_TERMS_BLOCK).any()  # the seed picks some
    config = heuristic_config(ShapeKey(r.num_experts, r.num_tokens * r.top_k, p.weights.in_dim, p.weights.out_dim,
                                       r.max_rank))
    workspace = torch.full(workspace_shape(routed_plan(p.routing), p.weights, config), float("nan"))
    y = p.y0.clone()
    routed_add(y, p.x, p.weights, p.routing, config, workspace=workspace)
    assert_matches(y, p.expected, p.y0, p.touched)
