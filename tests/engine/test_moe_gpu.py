"""MoE-LoRA on the GPU (bf16, Triton routed operator and fused switch): reference, paths, CUDA graphs, drift."""

from __future__ import annotations

import pytest
import torch

from engine.moe.config import MoEConfig
from engine.request import EngineRequest, ImageRef, SamplingParams
from kernels.merge_plan import DeltaTerms
from tests.engine.moe_fixtures import OneSequence, reference_model, save_moe_adapters
from tests.engine.reference import jpeg

pytestmark = pytest.mark.gpu
PROMPT = [1, 57, 61, 70, 83, 90, 101, 120, 133, 150, 2, 1, 77]
CONFIG = MoEConfig(slots=2, max_experts=8, max_top_k=2, max_rank=16, merge_switch=True)
BF16 = dict(device="cuda", dtype=torch.bfloat16, backend="triton")


@pytest.fixture(scope="module")
def moe_root(tiny_checkpoint):
    return save_moe_adapters(tiny_checkpoint / "base", tiny_checkpoint / "adapters")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


@pytest.mark.parametrize("adapter", ["moe_pre", "moe_layer"])
def test_routed_bf16_matches_fp32_reference(tiny_checkpoint, moe_root, adapter):
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}), **BF16)
    runner.acquire(adapter)
    ours = runner.step(adapter, PROMPT, 0)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        ref = reference_model(tiny_checkpoint / "base", moe_root / adapter)(
            input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    # Per-layer routing picks experts in every layer from bf16 hidden states, so near-tied router scores can pick
    # other experts than fp32 does (0.062 measured on an H200); the pre-gated router runs once, on the input.
    assert rel(ours, ref) < (3e-2 if adapter == "moe_pre" else 0.1)


def test_merge_switch_tracks_routed_bf16(tiny_checkpoint, moe_root):
    """Teacher-forced decode: merge-switch logits stay within bf16 noise of the routed path's, token by token."""
    routed = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}), **BF16)
    switch = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG, **BF16)
    for runner in (routed, switch):
        runner.acquire("moe_pre")
    tokens, want = routed.greedy("moe_pre", PROMPT, 24)
    switch.step("moe_pre", PROMPT, 0)
    agree = 0
    for i, tok in enumerate(tokens[:-1]):
        got = switch.step("moe_pre", [tok], len(PROMPT) + i)[0]
        assert rel(got, want[i + 1]) < 3e-2
        agree += int(got.argmax() == want[i + 1].argmax())
    assert switch.paths[1:] == ["switch"] * (len(tokens) - 1)
    assert agree >= len(tokens) - 3


def test_engine_cuda_graphs_match_eager(make_engine, tiny_checkpoint, moe_root):
    """Lone MoE request (merge-switch) and a mixed batch (routed + plain LoRA + base) under CUDA graphs give the
    tokens the eager engine gives."""
    def run(graphs: bool):
        engine = make_engine(device="cuda", cuda_graphs=graphs, compile_ops=False, policy="slora", kv_cache_blocks=512,
                             moe={"max_rank": 16, "slots": 4, "merge_switch": True})
        lone = engine.generate([EngineRequest(prompt="describe the road", adapter="moe_pre",
                                              sampling=SamplingParams(max_tokens=16))])
        mixed = engine.generate([
            EngineRequest(prompt=p, adapter=a, sampling=SamplingParams(max_tokens=16),
                          images=[ImageRef(id=f"g{i}", jpeg=jpeg(i))] if i % 2 else [])
            for i, (a, p) in enumerate([("moe_pre", "how many cars?"), ("ad8", "what color?"),
                                        ("moe_layer", "count the buses"), (None, "describe"),
                                        ("moe_block", "where is it?")])])
        stats = engine.health()
        assert all(r.ok for r in lone + mixed), [r.error for r in lone + mixed]
        assert stats["moe_switch_steps"] > 0 and stats["moe_routed_steps"] > 0
        return [r.token_ids for r in lone + mixed]

    assert run(True) == run(False)


def test_bf16_drift_after_2000_switches(tiny_checkpoint, moe_root):
    """In-place switches in bf16 accumulate rounding; restoring from clean copies makes the unmerge exact."""
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG, **BF16)
    runner.acquire("moe_pre")
    linears = runner.model.adapted_linears()
    clean = {k: m.weight.clone() for k, m in linears.items()}
    reference = runner.step(None, PROMPT, 0)
    switch, pool = runner.moe.switch, runner.moe.pool
    gen = torch.Generator().manual_seed(0)
    switch.begin("moe_pre", ("qkv", "o", "gate_up", "down"))
    for _ in range(2000):
        ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(switch.layers)]).int().cuda()
        gates = torch.softmax(torch.randn(switch.layers, 2, generator=gen), -1).cuda()
        switch.switch_to(DeltaTerms(ids, pool.expert_ranks[ids.long()], gates * pool.expert_scales[ids.long()],
                                    pool.max_rank))
    switch.unmerge()
    drifted = runner.step(None, PROMPT, 0)
    # Bounded noise, not divergence: 0.13 measured on an H200 (2000 random switches of 4 layers x 4 targets).
    assert rel(drifted, reference) < 0.25
    switch.restore = lambda: [m.weight.copy_(clean[k]) for k, m in linears.items()]
    switch.begin("moe_pre", ("qkv", "o", "gate_up", "down"))
    switch.unmerge()
    assert all(torch.equal(m.weight, clean[k]) for k, m in linears.items())
