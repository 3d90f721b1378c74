"""The pure-torch references (kernels/reference.py, the "torch" backend) against the float64 per-token oracle.

These are cheap, so they run the full cross product of the sweep axes in fp16 and fp32.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import reference
from tests.kernels.sweep import ADAPTERS, DIMS, MODES, RANKS, TOKENS, assert_matches, make_problem

FULL = list(itertools.product(RANKS, ADAPTERS, TOKENS, range(len(DIMS)), MODES))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize(("rank", "adapters", "tokens", "dims", "mode"), FULL)
def test_reference_add_lora(rank, adapters, tokens, dims, mode, dtype):
    problem = make_problem(rank, adapters, tokens, DIMS[dims], mode, dtype, seed=rank + adapters + tokens + dims)
    y = problem.y0.clone()
    reference.add_lora(y, problem.x, problem.weights, problem.batch)
    assert_matches(y, problem.expected, problem.y0, problem.touched)
