"""LoRA-Switch's fused switch (kernels/switch.py) against float64 oracles; layers whose selection is unchanged stay."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.merge_plan import MergePlan
from kernels.switch import fused_switch, selection_terms
from kernels.tile_config import MergeConfig
from tests.kernels.sweep import make_model, merged_oracle
from tests.kernels.test_swift_merge import assert_close_to

SMALL_TILES = MergeConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, group_n=2)
EXPERT_SLOTS = torch.tensor([4, 1, 3, 2], dtype=torch.int32)  # expert e lives in pool slot EXPERT_SLOTS[e]


def _terms(model, ids, gates):
    return selection_terms(torch.tensor(ids), torch.tensor(gates), EXPERT_SLOTS,
                           model.ranks[EXPERT_SLOTS.long()].to(torch.int32), model.scales[EXPERT_SLOTS.long()],
                           int(model.ranks.max()))


def _expected_terms(model, ids, gates, sign):
    out = []
    for e, g in zip(ids, gates, strict=True):
        if e >= 0:
            slot = int(EXPERT_SLOTS[e])
            out.append((slot, int(model.ranks[slot]), sign * g * float(model.scales[slot])))
    return out


@pytest.mark.parametrize("kind", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fused_switch_all_layers(interpreted, kind, dtype):
    model = make_model(3, dtype, seed=7)
    plan = MergePlan(model.targets)
    prev_ids, prev_g = [[0, 1], [2, 3], [1, -1]], [[0.6, 0.4], [0.5, 0.5], [1.0, 0.0]]
    new_ids, new_g = [[0, 1], [3, 2], [2, 0]], [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]]  # layer 0 unchanged
    before = [t.weight.clone() for t in model.targets]
    prev, new = _terms(model, prev_ids, prev_g), _terms(model, new_ids, new_g)
    if kind == "kernel":
        fused_switch(plan, prev, new, SMALL_TILES)
    else:
        reference.fused_switch(plan, prev, new)
    for t, w0 in zip(model.targets, before, strict=True):
        if t.group == 0:
            assert torch.equal(t.weight, w0), "an unchanged layer was modified"
            continue
        g = t.group
        terms = _expected_terms(model, prev_ids[g], prev_g[g], -1.0) + _expected_terms(model, new_ids[g], new_g[g], 1.0)
        assert_close_to(t.weight, merged_oracle(t, terms, w0))


def test_switch_shared_selection_broadcasts_to_every_layer(interpreted):
    """One selection row (G = 1) applies to every layer: the pre-gated token's experts."""
    model = make_model(2, torch.float32, seed=8)
    plan = MergePlan(model.targets)
    before = [t.weight.clone() for t in model.targets]
    fused_switch(plan, _terms(model, [[0, 2]], [[0.5, 0.5]]), _terms(model, [[3, 2]], [[0.2, 0.8]]), SMALL_TILES)
    terms = _expected_terms(model, [0, 2], [0.5, 0.5], -1.0) + _expected_terms(model, [3, 2], [0.2, 0.8], 1.0)
    for t, w0 in zip(model.targets, before, strict=True):
        assert_close_to(t.weight, merged_oracle(t, terms, w0))


def test_switch_rejects_different_k():
    model = make_model(1, torch.float32, seed=9)
    plan = MergePlan(model.targets)
    with pytest.raises(ValueError, match="experts per layer"):
        fused_switch(plan, _terms(model, [[0, 1]], [[0.5, 0.5]]), _terms(model, [[0]], [[1.0]]))
