"""MoE-LoRA as an engine adapter type (CPU, fp32): requests against the HF reference, mixed batches, path choice."""

from __future__ import annotations

import pytest
import torch

from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.conftest import HiddenHead
from tests.engine.moe_fixtures import reference_model, save_moe_adapters
from tests.engine.reference import hf_greedy, hf_inputs, jpeg

PICTURE = jpeg(17, (112, 140))


@pytest.fixture(scope="module")
def moe_root(tiny_checkpoint):
    return save_moe_adapters(tiny_checkpoint / "base", tiny_checkpoint / "adapters")


@torch.no_grad()
def moe_reference(root, adapter: str, prompt: str, images: list[bytes], steps: int = 0):
    """(prefill logits [prompt_len, V], greedy ids) of the HF MoE-LoRA reference, with the engine's prompt."""
    model = reference_model(root / "base", root / "adapters" / adapter)
    input_ids, kwargs = hf_inputs(root / "base", prompt, images)
    logits = model(input_ids=input_ids, **kwargs).logits[0].float()
    if not steps:
        return logits, []
    out = model.generate(input_ids=input_ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                         pad_token_id=0, **kwargs)
    return logits, out[0, input_ids.shape[1]:].tolist()


def request(adapter, prompt, images=(), tokens=16, head=None):
    return EngineRequest(prompt=prompt, adapter=adapter, head=head, sampling=SamplingParams(max_tokens=tokens),
                         images=[ImageRef(id=f"moe-{i}-{len(b)}", jpeg=b) for i, b in enumerate(images)])


@pytest.mark.parametrize("adapter", ["moe_pre", "moe_layer", "moe_block"])
def test_prefill_logits_with_a_picture_match_reference(make_engine, tiny_checkpoint, moe_root, adapter):
    engine = make_engine(moe={"max_rank": 16})
    prompt = "how many cars are there?"
    ref, _ = moe_reference(tiny_checkpoint, adapter, prompt, [PICTURE])
    n = ref.shape[0]
    engine.register_head(f"hidden{n}", HiddenHead(n))
    (res,) = engine.generate([request(adapter, prompt, [PICTURE], head=f"hidden{n}")])
    assert res.ok, res.error
    ours = engine.model.compute_logits(res.head_output["hidden"].to(next(engine.model.parameters())))
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_greedy_matches_reference_on_both_paths(make_engine, tiny_checkpoint, moe_root):
    """A lone pre-gated request decodes by merge-switch; with it off, routed; both give the reference's tokens."""
    prompt = "describe the road"
    _, want = moe_reference(tiny_checkpoint, "moe_pre", prompt, [PICTURE], steps=24)
    for merge_switch, path in ((True, "switch"), (False, "routed")):
        engine = make_engine(moe={"max_rank": 16, "merge_switch": merge_switch})
        (res,) = engine.generate([request("moe_pre", prompt, [PICTURE], tokens=24)])
        assert res.ok, res.error
        assert res.token_ids == want[:len(res.token_ids)] and len(res.token_ids) >= 8, (merge_switch, res.token_ids)
        stats = engine.health()
        assert stats[f"moe_{path}_steps"] >= len(res.token_ids) - 1
        assert stats["moe_merged"] is None, "the backbone is restored when nothing is left to serve"


def test_mixed_batch_gives_each_request_its_tokens_alone(make_engine, tiny_checkpoint, moe_root):
    """MoE-LoRA requests of each scheme share one continuous batch with plain-LoRA and base requests."""
    engine = make_engine(moe={"max_rank": 16, "slots": 4, "merge_switch": True})
    cases = [request("moe_pre", "how many cars?", [jpeg(1)], 24), request("ad8", "what color is the car?", [], 24),
             request("moe_layer", "count the buses", [jpeg(2)], 24), request(None, "describe the road", [], 24),
             request("moe_block", "the leftmost person is", [], 24), request("moe_pre3", "what is there?", [], 24),
             request("ad16", "how many people?", [jpeg(3)], 24)]
    alone = [engine.generate([r.model_copy(update={"request_id": f"alone-{i}"})])[0] for i, r in enumerate(cases)]
    together = engine.generate(cases)
    for a, b in zip(alone, together, strict=True):
        assert a.ok and b.ok, (a.error, b.error)
        assert b.token_ids == a.token_ids, f"adapter {b.adapter}: {b.token_ids} != {a.token_ids}"
    assert sum(r.output_tokens for r in together) >= 80
    stats = engine.health()
    assert stats["moe_routed_steps"] > 0 and stats["moe_switch_steps"] > 0  # alone: switch; together: routed
    plain = hf_greedy(tiny_checkpoint, "ad8", "what color is the car?", [], 24)
    assert together[1].token_ids == plain


def test_one_slot_serves_adapters_in_turn_and_bad_names_fail_alone(make_engine, tiny_checkpoint, moe_root):
    engine = make_engine(moe={"max_rank": 16, "slots": 1})
    reqs = [request("moe_pre", "how many cars?", [], 8), request("moe_layer", "how many cars?", [], 8),
            request("moe_nope", "how many cars?", [], 8), request("moe_block", "how many cars?", [], 8)]
    results = engine.generate(reqs)
    assert [r.ok for r in results] == [True, True, False, True]
    assert "unknown adapter" in results[2].error
    assert engine.health()["moe_adapter_loads"] >= 3


def test_pool_limits_are_clear_errors(make_engine, tiny_checkpoint, moe_root):
    engine = make_engine(moe={"max_rank": 4, "max_top_k": 2})
    (res,) = engine.generate([request("moe_block", "hi", [], 4)])  # rank 8 experts
    assert not res.ok and "moe.max_rank=4" in res.error


def test_moe_rows_in_mixture_mode_and_weights_claimed_by_turns(make_engine, tiny_checkpoint, moe_root):
    """While a plain adapter is merged (mixture), MoE rows get -ΔM like base rows and run routed; a lone MoE
    decode later claims the weights for merge-switch, and the clean copies restore them bit-exactly."""
    from tests.engine.test_modes import force

    cases = [request("moe_pre", "how many cars?", [jpeg(1)], 16), request("ad8", "what color is the car?", [], 16),
             request("moe_layer", "count the buses", [], 16), request(None, "describe the road", [], 16)]
    want = [r.token_ids for r in make_engine(policy="slora", moe={"max_rank": 16}).generate(cases)]
    engine = make_engine(policy="valora", pinned_adapters=["ad8"], moe={"max_rank": 16, "merge_switch": True})
    clean = {k: m.weight.clone() for k, m in engine.model.adapted_linears().items()}
    force(engine, "mixture", "ad8")
    got = engine.generate(cases)
    assert [r.token_ids for r in got] == want and {r.mode for r in got} == {"mixture"}
    (lone,) = engine.generate([request("moe_pre", "describe the road", [], 8)])
    assert engine.health()["moe_switch_steps"] == 0, "no merge-switch while a plain adapter holds the weights"
    force(engine, "unmerged", None)
    (again,) = engine.generate([request("moe_pre", "describe the road", [], 8)])
    stats = engine.health()
    assert again.token_ids == lone.token_ids and stats["moe_switch_steps"] >= 6
    assert engine.merge_state.claimed_by is None and stats["moe_merged"] is None
    assert all(torch.equal(m.weight, clean[k]) for k, m in engine.model.adapted_linears().items())
