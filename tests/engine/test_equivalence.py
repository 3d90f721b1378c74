"""The `valora` engine against transformers + peft (fp32, CPU): prefill logits and greedy generations."""

from __future__ import annotations

import pytest
import torch

from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.conftest import HiddenHead
from tests.engine.reference import hf_greedy, hf_inputs, hf_logits, jpeg

ADAPTERS = [None, "ad8", "ad4", "ad16"]
PICTURE = jpeg(7, (112, 140))  # not square: the M-RoPE height and width axes differ


def engine_logits(engine, root, adapter, prompt, images, last: int | None = None) -> torch.Tensor:
    """Prefill logits of the last ``last`` (default: every) prompt position, through a hidden-state head."""
    n = last or hf_inputs(root / "base", prompt, images)[0].shape[1]
    engine.register_head(f"hidden{n}", HiddenHead(n))
    req = EngineRequest(prompt=prompt, adapter=adapter, head=f"hidden{n}",
                        images=[ImageRef(id=f"img{i}", jpeg=b) for i, b in enumerate(images)])
    (res,) = engine.generate([req])
    assert res.ok and res.finish_reason == "head", res.error
    weight = next(engine.model.parameters())
    return engine.model.compute_logits(res.head_output["hidden"].to(weight)).cpu()


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("with_image", [False, True])
def test_prefill_logits_match_peft(make_engine, tiny_checkpoint, adapter, with_image):
    engine = make_engine()
    images = [PICTURE] if with_image else []
    prompt = "how many cars are on the road?"
    ours = engine_logits(engine, tiny_checkpoint, adapter, prompt, images)
    ref = hf_logits(tiny_checkpoint, adapter, prompt, images)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"


def test_chunked_prefill_gives_the_same_logits(make_engine, tiny_checkpoint):
    """A 16-token budget splits the image prompt into chunks, the picture's tokens straddling them."""
    engine = make_engine(max_num_batched_tokens=16)
    prompt = "what color is the truck?"
    ours = engine_logits(engine, tiny_checkpoint, "ad16", prompt, [PICTURE], last=12)
    ref = hf_logits(tiny_checkpoint, "ad16", prompt, [PICTURE])
    assert ref.shape[0] > 32
    assert ((ours - ref[-12:]).norm() / ref[-12:].norm()).item() < 1e-4


def test_mixed_batch_greedy_is_token_identical(make_engine, tiny_checkpoint):
    """Three adapters and the base model in one continuous batch, 32 greedy tokens, with pictures."""
    engine = make_engine()
    cases = [("ad8", "how many cars?", [jpeg(1)]), (None, "what color is the car?", [jpeg(2)]),
             ("ad4", "the leftmost person is", [jpeg(1)]), ("ad16", "count the buses", [jpeg(3), jpeg(4)]),
             ("ad8", "describe the road", [])]
    reqs = [EngineRequest(prompt=p, adapter=a, sampling=SamplingParams(max_tokens=32),
                          images=[ImageRef(id=f"{len(b)}-{i}", jpeg=b) for i, b in enumerate(imgs)])
            for a, p, imgs in cases]
    results = engine.generate(reqs)
    for (adapter, prompt, imgs), res in zip(cases, results, strict=True):
        assert res.ok, res.error
        expected = hf_greedy(tiny_checkpoint, adapter, prompt, imgs, 32)
        assert res.token_ids == expected, f"adapter {adapter}: {res.token_ids} != {expected}"
    assert sum(r.output_tokens for r in results) >= 64, "generations too short for the test to mean much"
    assert len({tuple(r.token_ids) for r in results}) == len(results)
