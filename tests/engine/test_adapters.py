"""PEFT adapter features against peft itself: rank/alpha patterns, and LoRA on the vision tower and merger."""

from __future__ import annotations

import pytest
import torch

from apps.model.tiny import lm_target_regex
from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import hf_greedy, hf_logits, jpeg
from tests.engine.test_equivalence import engine_logits

VISION_TARGETS = r".*visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj)$|.*visual\.merger\.mlp\.(0|2)$"


def save_adapter(base, out, seed: int, **lora_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05)
    peft_model.save_pretrained(out)


@pytest.fixture(scope="module")
def extra_adapters(tiny_checkpoint):
    """Two more adapters beside the tiny ones: 'patterned' (rank/alpha patterns) and 'seeing' (vision too)."""
    root = tiny_checkpoint / "adapters"
    if not (root / "patterned").is_dir():
        save_adapter(tiny_checkpoint / "base", root / "patterned", 11, r=8, lora_alpha=16,
                     target_modules=lm_target_regex(), rank_pattern={"q_proj": 4, "down_proj": 12},
                     alpha_pattern={"v_proj": 3, "gate_proj": 40})
        save_adapter(tiny_checkpoint / "base", root / "seeing", 12, r=6, lora_alpha=12, use_rslora=True,
                     target_modules=lm_target_regex() + "|" + VISION_TARGETS)
    return root


@pytest.mark.parametrize("adapter", ["patterned", "seeing"])
def test_logits_match_peft(make_engine, tiny_checkpoint, extra_adapters, adapter):
    engine = make_engine()
    prompt, images = "how many buses?", [jpeg(21)]
    ours = engine_logits(engine, tiny_checkpoint, adapter, prompt, images)
    ref = hf_logits(tiny_checkpoint, adapter, prompt, images)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


def test_vision_adapter_has_its_own_cache_entry(make_engine, tiny_checkpoint, extra_adapters):
    engine = make_engine()
    frame = ImageRef(id="cam:7", jpeg=jpeg(22))
    reqs = [EngineRequest(prompt="what is it?", adapter=a, images=[frame], sampling=SamplingParams(max_tokens=8))
            for a in ("seeing", "ad8", None, "seeing")]
    results = engine.generate(reqs)
    assert engine.health()["images_encoded"] == 2  # once plain, once through the vision LoRA
    for req, res in zip(reqs[:2], results[:2], strict=True):
        assert res.token_ids == hf_greedy(tiny_checkpoint, req.adapter, req.prompt, [jpeg(22)], 8)
