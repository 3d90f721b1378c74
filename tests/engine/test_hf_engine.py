"""The `hf` reference backend: results, per-request errors, and agreement with a direct transformers+peft run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.base import create_engine
from engine.config import EngineConfig
from engine.request import EngineRequest, ImageRef, SamplingParams


def jpeg(seed: int, size: int = 112) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hf_engine(tiny_checkpoint):
    cfg = EngineConfig(backend="hf", model=str(tiny_checkpoint / "base"),
                       adapters=str(tiny_checkpoint / "adapters"), device="cpu")
    return create_engine(cfg)


def test_generates_and_reports_timings(hf_engine):
    req = EngineRequest(prompt="how many cars?", adapter="ad8", images=[ImageRef(id="f1", jpeg=jpeg(1))],
                        sampling=SamplingParams(max_tokens=6))
    (res,) = hf_engine.generate([req])
    assert res.ok and res.request_id == req.request_id
    assert 1 <= res.output_tokens <= 6 and res.prompt_tokens > 16
    assert res.timings.e2e_ms > 0 and res.adapter == "ad8"


def test_bad_input_fails_only_its_request(hf_engine, tiny_checkpoint):
    good = EngineRequest(prompt="hi", sampling=SamplingParams(max_tokens=2))
    unknown = EngineRequest(prompt="hi", adapter="nope")
    broken = EngineRequest(prompt="hi", images=[ImageRef(id="bad", jpeg=b"not a jpeg")])
    too_long = EngineRequest(prompt="car " * 5000)
    results = hf_engine.generate([unknown, broken, too_long, good])
    assert "unknown adapter 'nope'" in results[0].error
    assert "does not decode" in results[1].error
    assert "context holds" in results[2].error
    assert results[3].ok


def test_matches_direct_peft_greedy(hf_engine, tiny_checkpoint):
    """Adapter switching inside the engine gives what a fresh peft model gives for that adapter alone."""
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    reqs = [EngineRequest(prompt="what color is the car?", adapter=a, sampling=SamplingParams(max_tokens=8))
            for a in ("ad4", None, "ad16")]
    results = hf_engine.generate(reqs)
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint / "base")
    for req, res in zip(reqs, results, strict=True):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint / "base").eval()
        if req.adapter:
            model = PeftModel.from_pretrained(model, tiny_checkpoint / "adapters" / req.adapter).eval()
        text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": req.prompt}]}],
                                       add_generation_prompt=True, tokenize=False)
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        new = out[0, ids.shape[1]:].tolist()
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        new = new[: new.index(eos)] if eos in new else new
        assert res.output_tokens == len(new)
        assert res.text == tok.decode(new, skip_special_tokens=True)
    assert len({r.text for r in results}) == 3, "adapters must change the output for this test to mean anything"
