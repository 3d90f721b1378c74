"""MoE-LoRA in our decoder against the HF reference (fp32, CPU): routed path of each scheme, merge-switch path."""

from __future__ import annotations

import pytest
import torch

from engine.adapter_store import AdapterError
from engine.moe.config import MoEConfig
from engine.moe.switch import empty_terms
from kernels.fused_linear import MAX_ROWS
from kernels.merge_plan import DeltaTerms
from tests.engine.moe_fixtures import OneSequence, reference_greedy, reference_model, save_moe_adapters

PROMPT = [1, 57, 61, 70, 83, 90, 101, 120, 133, 150, 2, 1, 77]
CONFIG = MoEConfig(slots=2, max_experts=8, max_top_k=2, max_rank=16, merge_switch=True)


@pytest.fixture(scope="module")
def moe_root(tiny_checkpoint):
    return save_moe_adapters(tiny_checkpoint / "base", tiny_checkpoint / "adapters")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("adapter", ["moe_pre", "moe_layer", "moe_block", "moe_pre3"])
def test_routed_prefill_logits_match_reference(tiny_checkpoint, moe_root, adapter):
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}))
    runner.acquire(adapter)
    ours = runner.step(adapter, PROMPT, 0)
    ref_model = reference_model(tiny_checkpoint / "base", moe_root / adapter)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        ref = ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    assert rel(ours, ref) < 1e-5
    plain = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG).step(None, PROMPT, 0)
    assert rel(plain, ref) > 1e-2, "the random MoE adapter barely changes the logits"


@pytest.mark.parametrize("adapter", ["moe_pre", "moe_layer", "moe_block"])
def test_routed_greedy_matches_reference(tiny_checkpoint, moe_root, adapter):
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}))
    runner.acquire(adapter)
    tokens, _ = runner.greedy(adapter, PROMPT, 24)
    assert set(runner.paths) == {"routed"}
    assert tokens == reference_greedy(reference_model(tiny_checkpoint / "base", moe_root / adapter), PROMPT, 24)


def test_merge_switch_equals_routed_and_restores_the_backbone(tiny_checkpoint, moe_root):
    routed = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}))
    switch = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG)
    before = {k: m.weight.clone() for k, m in switch.model.adapted_linears().items()}
    for runner in (routed, switch):
        runner.acquire("moe_pre")
    want, want_logits = routed.greedy("moe_pre", PROMPT, 32)
    got, got_logits = switch.greedy("moe_pre", PROMPT, 32)
    assert switch.paths == ["routed"] + ["switch"] * 31  # prefill routed, every decode token merge-switched
    assert got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel(a, b) < 1e-5
    assert switch.moe.switch.merged == "moe_pre"
    switch.step(None, [5], len(PROMPT) + 32)  # a step without the MoE adapter restores the backbone
    assert switch.moe.switch.merged is None
    for key, linear in switch.model.adapted_linears().items():
        assert (linear.weight - before[key]).abs().max().item() < 1e-6, key


def test_switch_skips_layers_whose_selection_did_not_change(tiny_checkpoint, moe_root):
    """Pre-gating reads layer 0's input, a function of the token alone: the same token twice switches nothing."""
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG)
    runner.acquire("moe_pre")
    runner.step("moe_pre", PROMPT, 0)
    runner.step("moe_pre", [42], len(PROMPT))
    merged = {k: m.weight.clone() for k, m in runner.model.adapted_linears().items()}
    runner.step("moe_pre", [42], len(PROMPT) + 1)
    assert all(torch.equal(m.weight, merged[k]) for k, m in runner.model.adapted_linears().items())
    runner.step("moe_pre", [43], len(PROMPT) + 2)
    assert any(not torch.equal(m.weight, merged[k]) for k, m in runner.model.adapted_linears().items())


def test_drift_after_many_switches(tiny_checkpoint, moe_root):
    """2,000 random selections switched in and out (fp32): the weights and logits stay at rounding level."""
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG)
    runner.acquire("moe_pre")
    reference = runner.step(None, PROMPT, 0)
    before = {k: m.weight.clone() for k, m in runner.model.adapted_linears().items()}
    switch, pool = runner.moe.switch, runner.moe.pool
    switch.begin("moe_pre", ("qkv", "o", "gate_up", "down"))
    gen = torch.Generator().manual_seed(0)
    layers, k = switch.layers, pool.top_k
    for _ in range(2000):
        ids = torch.stack([torch.randperm(4, generator=gen)[:k] for _ in range(layers)]).int()
        gates = torch.softmax(torch.randn(layers, k, generator=gen), -1)
        switch.switch_to(DeltaTerms(ids, pool.expert_ranks[ids.long()], gates * pool.expert_scales[ids.long()],
                                    pool.max_rank))
    switch.unmerge()
    drift = max((m.weight - before[k]).abs().max().item() for k, m in runner.model.adapted_linears().items())
    assert drift < 1e-5
    assert rel(runner.step(None, PROMPT, 0), reference) < 1e-5
    assert torch.equal(switch.current.slots, empty_terms(layers, k, 1, "cpu").slots)


def test_pool_evicts_and_reloads_between_adapters(tiny_checkpoint, moe_root):
    """One slot, two adapters in turn: each still matches its own reference after the other evicted it."""
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"slots": 1}))
    outputs = {}
    for name in ("moe_pre", "moe_layer", "moe_pre"):
        runner.acquire(name)
        outputs.setdefault(name, []).append(runner.step(name, PROMPT, 0))
        runner.moe.release(name)
    assert runner.moe.pool.evictions == 2
    assert torch.equal(outputs["moe_pre"][0], outputs["moe_pre"][1])


def test_bad_adapters_fail_with_clear_errors(tiny_checkpoint, moe_root, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    runner = OneSequence(tiny_checkpoint / "base", tmp_path, CONFIG)
    for name, edit in [("too_many", {"num_experts": 12}), ("bad_routing", {"routing": "random"}),
                       ("block_attn", {"routing": "block"}), ("wrong_layers", {"num_layers": 3})]:
        shutil.copytree(moe_root / "moe_pre", tmp_path / name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(cfg | edit))
    shutil.copytree(moe_root / "moe_pre", tmp_path / "missing")
    tensors = load_file(str(tmp_path / "missing" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.down_proj" not in k},
              str(tmp_path / "missing" / "adapter_model.safetensors"))
    expected = {"too_many": "num_experts", "bad_routing": "routing", "block_attn": "FFN only",
                "wrong_layers": "layers", "missing": "layers.1.mlp.down_proj.experts.lora_A is missing"}
    for name, message in expected.items():
        with pytest.raises(AdapterError, match=message):
            runner.moe.load_now(name)


def test_switch_yields_to_a_merged_plain_adapter_and_restores_exactly(tiny_checkpoint, moe_root):
    """Merge-switch only while the weights are free (merge state); unmerge from clean copies is bit-exact."""
    from engine.moe.switch import OWNER, LocalClaims

    claims = LocalClaims(merged="ad8")
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG)
    linears = runner.model.adapted_linears()
    clean = {k: m.weight.clone() for k, m in linears.items()}
    switch = runner.moe.switch
    switch.claims = claims
    switch.restore = lambda: [m.weight.copy_(clean[k]) for k, m in linears.items()]
    runner.acquire("moe_pre")
    tokens, _ = runner.greedy("moe_pre", PROMPT, 4)
    assert runner.paths == ["routed"] * 4 and claims.claimed_by is None  # a plain adapter holds the weights
    claims.merged = None
    runner.paths.clear()
    runner.greedy("moe_pre", PROMPT, 4)
    assert runner.paths == ["routed", "switch", "switch", "switch"] and claims.claimed_by == OWNER
    assert switch.available()
    runner.step(None, [5], len(PROMPT) + 4)
    assert claims.claimed_by is None
    assert all(torch.equal(m.weight, clean[k]) for k, m in linears.items())


def test_reused_deltas_reread_their_row_slot_buffer(tiny_checkpoint, moe_root):
    """What a CUDA-graph replay does: the same delta objects, new buffer contents; results follow the buffer."""
    from engine.attention import AttentionMetadata
    from engine.forward_context import ForwardContext
    from engine.moe.graphs import StaticMoE
    from engine.moe.manager import MoERows

    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG.model_copy(update={"merge_switch": False}))
    for name in ("moe_pre", "moe_pre3"):
        runner.acquire(name)
    moe, t = runner.moe, len(PROMPT)
    static = StaticMoE(moe, [16], torch.device("cpu"))
    plans = {name: moe.plan([MoERows(name, 0, t)], t, decode=False) for name in ("moe_pre", "moe_pre3")}
    assert plans["moe_pre"].key == plans["moe_pre3"].key  # one captured graph would serve both
    deltas = static.deltas(plans["moe_pre"], 16)
    ids = torch.tensor(PROMPT + [0] * (16 - t))
    attn = AttentionMetadata(slot_mapping=torch.arange(16), block_tables=torch.arange(4, dtype=torch.int32)[None],
                             cu_query_lens=torch.tensor([0, 16], dtype=torch.int32),
                             context_lens=torch.tensor([16], dtype=torch.int32), max_query_len=16,
                             query_lens_host=[16], context_lens_host=[16])
    positions = torch.arange(16)[None].expand(3, 16)
    for name in ("moe_pre", "moe_pre3", "moe_pre"):
        static.fill(plans[name], 16)
        with torch.inference_mode():
            got = runner.model.compute_logits(runner.model(ids, positions, ForwardContext(attn, deltas)))[:t]
        want = runner.step(name, PROMPT, 0)
        assert rel(got, want) < 1e-6, name


def test_triton_kernels_serve_both_paths(tiny_checkpoint, moe_root):
    """The Triton routed operator and fused switch (interpreted on CPU) give the torch backend's results."""
    short = PROMPT[:6]
    reference = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG)
    reference.acquire("moe_pre")
    want, want_logits = reference.greedy("moe_pre", short, 3)
    runner = OneSequence(tiny_checkpoint / "base", moe_root, CONFIG, backend="triton")
    runner.acquire("moe_pre")
    got, got_logits = runner.greedy("moe_pre", short, 3)
    assert runner.paths == ["routed", "switch", "switch"] and got == want
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel(a, b) < 1e-5


def test_fused_routed_linear_serves_prefill_and_decode(tiny_checkpoint, moe_root):
    """The routed path through the fused linear (kernels/fused_linear.py, Triton interpreted on CPU): a 6-row
    prefill (dot tiles) and 1-row decode steps give the torch backend's tokens and logits, and every adapted
    projection of those steps went through it."""
    short, config = PROMPT[:6], CONFIG.model_copy(update={"merge_switch": False})
    reference = OneSequence(tiny_checkpoint / "base", moe_root, config)
    reference.acquire("moe_pre")
    want, want_logits = reference.greedy("moe_pre", short, 3)
    runner = OneSequence(tiny_checkpoint / "base", moe_root, config, backend="triton")
    op, calls = runner.moe.op, []
    assert op.fused_rows == MAX_ROWS  # the prefill's 6 rows too
    fused = op.routed_linear
    op.routed_linear = lambda x, *args: calls.append(x.shape[0]) or fused(x, *args)
    runner.acquire("moe_pre")
    got, got_logits = runner.greedy("moe_pre", short, 3)
    assert runner.paths == ["routed"] * 3 and got == want
    per_step = 4 * len(runner.model.layers)
    assert calls == [len(short)] * per_step + [1] * (2 * per_step)
    for a, b in zip(got_logits, want_logits, strict=True):
        assert rel(a, b) < 1e-5
