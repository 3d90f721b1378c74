"""Swift merge (kernels/swift_merge.py) against float64 oracles, in place and from a clean copy, and its drift bound."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.merge_plan import DeltaTerms, MergePlan, MergeTarget
from kernels.swift_merge import swift_merge
from kernels.tile_config import MergeConfig
from tests.kernels.sweep import make_model, merged_oracle

# |W - oracle| <= RTOL * |oracle| + ATOL: one rounding of the merged weight, plus fp32 accumulation.
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-4)}
SMALL_TILES = MergeConfig(block_m=16, block_n=32, num_warps=4, num_stages=1, group_n=3)


def assert_close_to(w: torch.Tensor, oracle: torch.Tensor) -> None:
    rtol, atol = TOL[w.dtype]
    excess = ((w.double().cpu() - oracle).abs() - (rtol * oracle.abs() + atol)).max().item()
    assert excess <= 0, f"merged weight off by {excess:.3g} beyond tolerance"


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each |value| (normal range)."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(values.abs().double().clamp(min=tiny)))
    return torch.pow(2.0, exponent - mantissa)


def merge_fn(kind: str):
    return {"kernel": lambda plan, **kw: swift_merge(plan, config=SMALL_TILES, **kw),
            "kernel_default": swift_merge,
            "reference": reference.swift_merge}[kind]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["kernel", "kernel_default", "reference"])
def test_merge_then_switch_adapter_in_place(interpreted, kind, dtype):
    model = make_model(2, dtype, seed=1)
    plan = MergePlan(model.targets)
    start = [t.weight.clone() for t in model.targets]
    r, s = model.ranks.tolist(), model.scales.tolist()
    merge = merge_fn(kind)
    merge(plan, add=DeltaTerms.of_adapter(2, r[2], s[2], "cpu"))
    for t, w0 in zip(model.targets, start, strict=True):
        assert_close_to(t.weight, merged_oracle(t, [(2, r[2], s[2])], w0))
    # One launch removes adapter 2 and adds adapter 0 (the orchestrator's M1 -> M2 switch).
    mid = [t.weight.clone() for t in model.targets]
    merge(plan, add=DeltaTerms.of_adapter(0, r[0], s[0], "cpu"), sub=DeltaTerms.of_adapter(2, r[2], s[2], "cpu"))
    for t, w1 in zip(model.targets, mid, strict=True):
        assert_close_to(t.weight, merged_oracle(t, [(2, r[2], -s[2]), (0, r[0], s[0])], w1))


@pytest.mark.parametrize("kind", ["kernel", "reference"])
def test_merge_from_clean_copy_overwrites_everything(interpreted, kind):
    model = make_model(2, torch.float16, seed=2, with_base=True)
    for t in model.targets:
        t.weight.fill_(float("nan"))  # poisoned: every element must be written from the base copy
    plan = MergePlan(model.targets)
    r, s = model.ranks.tolist(), model.scales.tolist()
    merge_fn(kind)(plan, add=DeltaTerms.of_adapter(3, r[3], s[3], "cpu"))
    for t in model.targets:
        assert_close_to(t.weight, merged_oracle(t, [(3, r[3], s[3])], t.base))
    merge_fn(kind)(plan)  # no terms: restore the base bit-exactly
    for t in model.targets:
        assert torch.equal(t.weight, t.base)


@pytest.mark.parametrize("kind", ["kernel", "reference"])
def test_per_group_terms(interpreted, kind):
    """G rows of terms: each layer gets its own adapters (two terms, one slot unused in layer 1)."""
    model = make_model(2, torch.float32, seed=3)
    plan = MergePlan(model.targets)
    start = [t.weight.clone() for t in model.targets]
    r, s = model.ranks.tolist(), model.scales.tolist()
    terms = DeltaTerms(
        slots=torch.tensor([[1, 4], [3, -1]], dtype=torch.int32),
        ranks=torch.tensor([[r[1], r[4]], [r[3], 0]], dtype=torch.int32),
        scales=torch.tensor([[s[1], -0.5], [s[3], 0.0]]),
        max_rank=max(r),
    )
    merge_fn(kind)(plan, add=terms)
    for t, w0 in zip(model.targets, start, strict=True):
        expected = [(1, r[1], s[1]), (4, r[4], -0.5)] if t.group == 0 else [(3, r[3], s[3])]
        assert_close_to(t.weight, merged_oracle(t, expected, w0))


def _cycles(plan: MergePlan, terms: DeltaTerms, n: int, merge) -> list[list[torch.Tensor]]:
    history = []
    for _ in range(n):
        merge(plan, add=terms)
        merge(plan, sub=terms)
        history.append([t.weight.clone() for t in plan.targets])
    return history


def _assert_drift_bounded(model, start, history, slot):
    """W_n == W_1 for every n (no accumulation), and |W_1 - W_0| <= ulp(max(|W_0|, |W_0 + delta|))."""
    r, s = model.ranks.tolist(), model.scales.tolist()
    for n, weights in enumerate(history):
        for w, w1 in zip(weights, history[0], strict=True):
            assert torch.equal(w, w1), f"drift grew at cycle {n + 1}"
    for t, w0, w1 in zip(model.targets, start, history[0], strict=True):
        merged = merged_oracle(t, [(slot, r[slot], s[slot])], w0)
        bound = ulp(torch.maximum(w0.double().abs(), merged.abs()), w0.dtype)
        assert ((w1.double() - w0.double()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_drift_bound_over_1000_cycles_reference(dtype):
    model = make_model(1, dtype, seed=4)
    start = [t.weight.clone() for t in model.targets]
    plan = MergePlan(model.targets)
    terms = DeltaTerms.of_adapter(0, int(model.ranks[0]), 40.0, "cpu")  # a large delta: many roundings move
    model.scales[0] = 40.0
    history = _cycles(plan, terms, 1000, reference.swift_merge)
    _assert_drift_bounded(model, start, history, 0)


def test_drift_bound_kernel_interpreted(interpreted):
    """The interpreter is slow: 10 cycles here; test_gpu.py runs the kernel for 1000 cycles in bf16."""
    model = make_model(1, torch.float16, seed=5)
    start = [t.weight.clone() for t in model.targets]
    plan = MergePlan(model.targets)
    model.scales[1] = 40.0
    terms = DeltaTerms.of_adapter(1, int(model.ranks[1]), 40.0, "cpu")
    history = _cycles(plan, terms, 10, lambda p, **kw: swift_merge(p, config=SMALL_TILES, **kw))
    _assert_drift_bounded(model, start, history, 1)


def test_plan_validation():
    model = make_model(1, torch.float16, seed=6)
    t = model.targets[0]
    with pytest.raises(ValueError, match="does not match its pool"):
        MergePlan([MergeTarget(t.weight[:, :-1], t.lora)])
    with pytest.raises(ValueError, match="share dtype"):
        MergePlan([t, MergeTarget(t.weight.float(), t.lora)])
    with pytest.raises(ValueError, match="at least one"):
        MergePlan([])
    plan = MergePlan(model.targets)
    two_groups = DeltaTerms(torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1, dtype=torch.int32),
                            torch.ones(2, 1), 1)
    with pytest.raises(ValueError, match="groups"):
        swift_merge(plan, add=two_groups)
    with pytest.raises(ValueError, match="skip_unchanged"):
        swift_merge(plan, add=DeltaTerms.of_adapter(0, 1, 1.0, "cpu"), skip_unchanged=True)
