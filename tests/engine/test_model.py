"""Model loading and positions: M-RoPE vs transformers, sharded checkpoints, dummy weights, presets."""

from __future__ import annotations

import json

import pytest
import torch

from engine.model.rope import mrope_positions
from engine.model.spec import load_spec
from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import hf_inputs, hf_model, jpeg
from tests.engine.test_equivalence import engine_logits


def test_mrope_positions_match_get_rope_index(tiny_checkpoint):
    base = tiny_checkpoint / "base"
    images = [jpeg(1, (112, 168)), jpeg(2, (140, 84)), jpeg(3)]
    input_ids, kwargs = hf_inputs(base, "compare these pictures", images)
    expected, delta = hf_model(base, None).model.get_rope_index(
        input_ids, kwargs["mm_token_type_ids"], image_grid_thw=kwargs["image_grid_thw"])
    ours, our_delta = mrope_positions(input_ids[0].tolist(), kwargs["image_grid_thw"].tolist(), 5, 2)
    assert torch.equal(ours, expected[:, 0]) and our_delta == int(delta)
    assert not torch.equal(ours[1], ours[2]), "the pictures must exercise distinct height and width axes"


def test_sharded_checkpoint_loads_the_same(make_engine, tiny_checkpoint, tmp_path):
    model = hf_model(tiny_checkpoint / "base", None)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        (tmp_path / name).write_bytes((tiny_checkpoint / "base" / name).read_bytes())
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompt, images = "a red car", [jpeg(5)]
    ours = engine_logits(make_engine(model=str(tmp_path)), tiny_checkpoint, None, prompt, images)
    ref = engine_logits(make_engine(), tiny_checkpoint, None, prompt, images)
    assert torch.equal(ours, ref)


def test_dummy_from_config_json(make_engine, tiny_checkpoint):
    engine = make_engine(model=f"dummy:{tiny_checkpoint / 'base' / 'config.json'}", seed=3)
    frame = ImageRef(id="f", jpeg=jpeg(1))
    a, b = engine.generate([EngineRequest(prompt="hello", images=[frame], sampling=SamplingParams(max_tokens=5)),
                            EngineRequest(prompt="hello", adapter="ad8", sampling=SamplingParams(max_tokens=5))])
    assert a.ok and b.ok and a.output_tokens + b.output_tokens > 0
    again = make_engine(model=f"dummy:{tiny_checkpoint / 'base' / 'config.json'}", seed=3)
    assert again.generate([EngineRequest(prompt="hello", images=[frame],
                                         sampling=SamplingParams(max_tokens=5))])[0].token_ids == a.token_ids


@pytest.mark.parametrize(("preset", "dims"), [
    ("qwen2.5-vl-7b", (3584, 18944, 28, 28, 4, 128, False, 152064)),
    ("qwen2.5-vl-3b", (2048, 11008, 36, 16, 2, 128, True, 151936)),
])
def test_presets_have_the_published_dims(preset, dims):
    spec = load_spec(f"dummy:{preset}")
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads, spec.num_kv_heads,
            spec.head_dim, spec.tie_word_embeddings, spec.vocab_size) == dims
    assert spec.mrope_section == (16, 24, 24) and spec.has_vision


def test_plain_qwen2_config_parses(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 1e6,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_spec(f"dummy:{tmp_path / 'config.json'}")
    assert spec.mrope_section == (8, 0, 0) and not spec.has_vision and spec.tie_word_embeddings
    with pytest.raises(ValueError, match="not a Qwen2"):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
        load_spec(f"dummy:{tmp_path / 'config.json'}")


def test_text_only_qwen2_checkpoint_with_tied_head(make_engine, tiny_checkpoint, tmp_path):
    """A Qwen2ForCausalLM checkpoint (1-D RoPE, tied embeddings) against transformers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.request import EngineRequest
    from tests.engine.conftest import HiddenHead
    from tests.engine.reference import processors

    tokenizer = processors(tiny_checkpoint / "base")[0]
    torch.manual_seed(4)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                         tie_word_embeddings=True, rope_theta=5000.0)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = make_engine(model=str(tmp_path))
    prompt = "the leftmost person is green"
    ids = engine.intake.prompts.build(prompt, [])
    engine.register_head("all", HiddenHead(len(ids)))
    (res,) = engine.generate([EngineRequest(prompt=prompt, head="all")])
    ours = engine.model.compute_logits(res.head_output["hidden"])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0]
    assert engine.model.lm_head is None
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4
