"""The LoRA backend registry: every backend computes the same ops (against the float64 oracle)."""

from __future__ import annotations

import pytest
import torch

from kernels.backend import LoRABackend, backend_names, get_backend
from kernels.merge_plan import DeltaTerms, MergePlan
from tests.kernels.sweep import DIMS, assert_matches, make_model, make_problem, make_routed_problem, merged_oracle
from tests.kernels.test_swift_merge import assert_close_to


def test_registry():
    assert backend_names() == ["punica", "torch", "triton"]
    assert all(isinstance(get_backend(n), LoRABackend) for n in backend_names())
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        get_backend("cuda")


def _needs_interpreter(name, interpreted_flag):
    if name != "torch" and not interpreted_flag:
        pytest.skip("Triton backends on CPU need the interpreter")


@pytest.mark.parametrize("name", ["torch", "triton", "punica"])
def test_backend_ops(name, request):
    from tests.kernels.conftest import INTERPRETED

    _needs_interpreter(name, INTERPRETED)
    backend = get_backend(name)
    p = make_problem(16, 3, 7, DIMS[2], "mixture", torch.float32, seed=11)
    y = p.y0.clone()
    backend.add_lora(y, p.x, p.weights, p.batch)
    assert_matches(y, p.expected, p.y0, p.touched)

    r = make_routed_problem(8, 3, 2, 7, DIMS[3], torch.float16, seed=12)
    y = r.y0.clone()
    backend.add_routed(y, r.x, r.weights, r.routing)
    assert_matches(y, r.expected, r.y0, r.touched)

    model = make_model(1, torch.float32, seed=13)
    plan = MergePlan(model.targets)
    start = [t.weight.clone() for t in model.targets]
    rank, scale = int(model.ranks[1]), float(model.scales[1])
    backend.swift_merge(plan, add=DeltaTerms.of_adapter(1, rank, scale, "cpu"))
    for t, w0 in zip(model.targets, start, strict=True):
        assert_close_to(t.weight, merged_oracle(t, [(1, rank, scale)], w0))
    same = DeltaTerms.of_adapter(1, rank, scale, "cpu")
    backend.fused_switch(plan, same, same)  # unchanged selection: nothing moves
    for t, w0 in zip(model.targets, start, strict=True):
        assert_close_to(t.weight, merged_oracle(t, [(1, rank, scale)], w0))
