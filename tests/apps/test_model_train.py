"""The tiny model's training pieces: descriptions, tokenizer, batch encoding against unbatched transformers runs,
and adapters saved in PEFT format that reproduce the trained model."""

from __future__ import annotations

import json

import pytest
import torch

from apps.datasets.schema import FrameTruth, ObjectTruth
from apps.model import tiny
from apps.model.describe import describe
from apps.model.encoding import IGNORE, Encoder, Example
from apps.model.frames import FrameSet


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    tiny.small_base(root, frames=50)
    from apps.model.train import load_base

    return root, *load_base(root)


def test_description_names_every_object_by_band_and_place():
    truth = FrameTruth(frame=0, width=200, height=200, objects=[
        ObjectTruth(track_id=1, cls="person", color="red", box=[150, 24, 160, 50]),
        ObjectTruth(track_id=2, cls="bus", color="blue", box=[0, 120, 60, 144]),
        ObjectTruth(track_id=3, cls="car", color="white", box=[90, 120, 110, 143])])
    text = describe(truth)
    assert text == ("a street scene. on the far sidewalk, a person in red on the right. in the third lane, a blue "
                    "bus on the far left, partly out of view and a white car in the middle.")
    assert describe(FrameTruth(frame=0, width=10, height=10)) == "a street scene with nobody on it."


def test_tokenizer_keeps_special_and_query_tokens_whole(base):
    _, _, tokenizer, _ = base
    for token in tiny.SPECIAL_TOKENS + tiny.QUERY_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 5


def test_batches_match_unbatched_runs_and_label_only_answers(base):
    _, model, tokenizer, processor = base
    encoder = Encoder(tokenizer, processor)
    frames = FrameSet("train", 2)
    examples = [Example("vqa", "question: is there a car?", None, "yes", frame=0),
                Example("counting", "count objects in this long prompt", None, "car 1, bus 0", frame=1)]
    right = encoder.batch(examples, frames)
    left = encoder.batch(examples, frames, left_pad=True)
    frames.encode(model, encoder)
    cached = encoder.batch(examples, frames, cached=True)
    with torch.no_grad():
        ref = model(**encoder.batch(examples[:1], frames).model_inputs()).logits[0]  # [seq, vocab]
        n = ref.shape[0]
        assert torch.allclose(model(**right.model_inputs()).logits[0, :n], ref, atol=1e-4)
        assert torch.allclose(model(**left.model_inputs()).logits[0, -n:], ref, atol=1e-4)
        assert torch.allclose(model(**cached.model_inputs()).logits[0, :n], ref, atol=1e-4)
    answer = tokenizer("yes", add_special_tokens=False)["input_ids"] + [encoder.eos_id]
    labels = right.labels[0][right.labels[0] != IGNORE].tolist()
    assert labels == answer and int(right.prompt_lens[0]) == n - len(answer)


def test_saved_adapter_reproduces_the_trained_model(base, tmp_path):
    from peft import PeftModel

    from apps.model.recipes import AdapterRecipe
    from apps.model.train import AdapterTrainer, load_base, train_adapter

    root, model, tokenizer, processor = base
    frames = FrameSet("train", 4)
    recipe = AdapterRecipe(tasks=("vqa",), rank=4, steps=3, batch_size=4, lr=1e-2)
    _, trainer = train_adapter(root, recipe, frames, tmp_path / "a", "a", base_parts=(model, tokenizer, processor))
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "recipe.json", "training.json"]
    assert json.loads((tmp_path / "a" / "training.json").read_text())["seconds"] > 0
    batch = trainer.encoder.batch([Example("vqa", "question: is there a bus?", None, frame=0)], frames)
    with torch.no_grad():
        trained = trainer.model(**batch.model_inputs()).logits
    loaded = PeftModel.from_pretrained(load_base(root)[0], tmp_path / "a").eval()
    with torch.no_grad():
        again = loaded(**batch.model_inputs()).logits
        plain = load_base(root)[0](**batch.model_inputs()).logits
    assert (trained - plain).abs().max() > 1e-3  # training changed the model
    assert torch.allclose(again, trained, atol=2e-3)  # fp16 storage of A and B
    trainer.unload()
    from dataclasses import replace

    for grown in (recipe, replace(recipe, rank=8, alpha=64.0)):  # same rank, and a larger one at equal alpha / r
        warm = AdapterTrainer(model, tokenizer, processor, grown, frames, "b", init=tmp_path / "a")
        with torch.no_grad():
            assert torch.allclose(warm.model(**batch.model_inputs()).logits, again, atol=1e-4)
        warm.model.unload()
    with pytest.raises(ValueError, match="cannot seed"):
        AdapterTrainer(model, tokenizer, processor, replace(recipe, rank=2, alpha=16.0), frames, "c",
                       init=tmp_path / "a")
