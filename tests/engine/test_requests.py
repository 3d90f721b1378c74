"""Request-level behaviour: bad input fails only its request, vision cache, heads, sampling, stops, streaming."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.heads import TaskHead
from engine.request import EngineRequest, ImageRef, SamplingParams
from tests.engine.reference import hf_inputs, hf_model, jpeg


@pytest.fixture(scope="module")
def adapters_with_bad_ones(tiny_checkpoint, tmp_path_factory):
    """The tiny adapters plus 'wide' (lora_A one column too wide), 'corrupt' (garbage weights), 'big' (r=32)."""
    root = tmp_path_factory.mktemp("adapters")
    for name in ("ad8", "ad4", "ad16"):
        shutil.copytree(tiny_checkpoint / "adapters" / name, root / name)
    for bad in ("wide", "corrupt", "big"):
        shutil.copytree(tiny_checkpoint / "adapters" / "ad8", root / bad)
    weights = root / "wide" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: torch.cat([v, v[:, :1]], 1) if "lora_A" in k else v for k, v in tensors.items()}, weights)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    cfg = root / "big" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 8', '"r": 32'))
    return root


def test_bad_input_fails_only_its_request(make_engine, adapters_with_bad_ones):
    engine = make_engine(adapters=adapters_with_bad_ones, max_model_len=128, max_lora_rank=16)
    good = [EngineRequest(prompt="how many cars?", adapter=a, sampling=SamplingParams(max_tokens=6))
            for a in ("ad8", None, "ad16")]
    bad = {
        "unknown adapter 'nope'": EngineRequest(prompt="hi", adapter="nope"),
        "context holds": EngineRequest(prompt="car " * 200),
        "does not decode": EngineRequest(prompt="hi", images=[ImageRef(id="bad", jpeg=b"not a jpeg")]),
        "the model needs [r,": EngineRequest(prompt="hi", adapter="wide"),
        "corrupt or unreadable": EngineRequest(prompt="hi", adapter="corrupt"),
        "over max_lora_rank": EngineRequest(prompt="hi", adapter="big"),
        "unknown task head": EngineRequest(prompt="hi", head="nohead"),
    }
    reference = [r.token_ids for r in engine.generate(good)]
    results = engine.generate([good[0], *bad.values(), good[1], good[2]])
    for (message, _), res in zip(bad.items(), results[1:-2], strict=True):
        assert res.finish_reason == "error" and message in res.error, (message, res.error)
    assert [r.token_ids for r in (results[0], *results[-2:])] == reference
    assert engine.health()["running"] == engine.health()["waiting"] == 0


def test_five_tasks_on_one_frame_encode_it_once(make_engine):
    engine = make_engine()
    frame = ImageRef(id="cam1:42", jpeg=jpeg(42))
    reqs = [EngineRequest(prompt=p, adapter=a, images=[frame], sampling=SamplingParams(max_tokens=3))
            for p, a in [("count cars", "ad8"), ("caption", None), ("vqa: color?", "ad4"), ("detect", "ad16"),
                         ("ground the bus", "ad8")]]
    assert all(r.ok for r in engine.generate(reqs))
    stats = engine.health()
    assert stats["images_encoded"] == 1 and stats["vision_cache_hits"] == 4
    engine.generate([EngineRequest(prompt="again", images=[frame], sampling=SamplingParams(max_tokens=1)),
                     EngineRequest(prompt="new", images=[ImageRef(id="cam1:43", jpeg=jpeg(43))],
                                   sampling=SamplingParams(max_tokens=1))])
    assert engine.health()["images_encoded"] == 2


class ColorHead(TaskHead):
    """A linear classifier on the last prompt position, trained (here: random) with adapter ad4."""

    adapter = "ad4"
    labels = ("red", "green", "blue")

    def __init__(self, hidden: int) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.proj = nn.Linear(hidden, len(self.labels))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden[-1])

    def decode(self, output: torch.Tensor) -> dict:
        return {"label": self.labels[int(output.argmax())], "scores": output.tolist()}


def test_task_head_answers_from_prefill(make_engine, tiny_checkpoint):
    engine = make_engine()
    head = ColorHead(64)
    engine.register_head("color", head)
    req = EngineRequest(prompt="what color is the truck?", head="color", images=[ImageRef(id="t", jpeg=jpeg(9))])
    (res,) = engine.generate([req])
    assert res.finish_reason == "head" and res.output_tokens == 0 and res.adapter == "ad4"
    model = hf_model(tiny_checkpoint / "base", tiny_checkpoint / "adapters" / "ad4")
    input_ids, kwargs = hf_inputs(tiny_checkpoint / "base", req.prompt, [jpeg(9)])
    with torch.no_grad():
        hidden = model(input_ids=input_ids, output_hidden_states=True, **kwargs).hidden_states[-1][0]
    expected = head.answer(hidden[-1:])
    assert res.head_output["label"] == expected["label"]
    assert torch.allclose(torch.tensor(res.head_output["scores"]), torch.tensor(expected["scores"]), atol=1e-5)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(make_engine):
    engine = make_engine()
    sp = lambda **kw: SamplingParams(max_tokens=12, **kw)  # noqa: E731
    greedy, s1, s2, s3, nucleus = engine.generate([
        EngineRequest(prompt="a red car", sampling=sp()),
        EngineRequest(prompt="a red car", sampling=sp(temperature=1.5, seed=3)),
        EngineRequest(prompt="a red car", sampling=sp(temperature=1.5, seed=3)),
        EngineRequest(prompt="a red car", sampling=sp(temperature=1.5, seed=4)),
        EngineRequest(prompt="a red car", sampling=sp(temperature=1.5, top_p=1e-6, seed=5)),
    ])
    assert s1.token_ids == s2.token_ids != s3.token_ids
    assert s1.token_ids != greedy.token_ids
    assert nucleus.token_ids == greedy.token_ids


def test_stop_strings_and_streaming(make_engine):
    engine = make_engine()
    prompt, stop = "a red car", " bus"
    req = lambda **kw: EngineRequest(prompt=prompt, adapter="ad8", sampling=SamplingParams(max_tokens=24, **kw))  # noqa: E731
    (full,) = engine.generate([req()])
    cut = full.text.find(stop)
    assert cut > 3, f"the greedy text {full.text!r} must contain the stop string"
    pieces: list[str] = []
    engine.add_request(req(stop=[stop, "never appears"]), on_token=lambda rid, delta: pieces.append(delta))
    results = []
    while engine.has_unfinished():
        results += engine.step()
    (stopped,) = results
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:cut]
    assert "".join(pieces) == stopped.text
    streamed: list[str] = []
    engine.add_request(req(), on_token=lambda rid, delta: streamed.append(delta))
    while engine.has_unfinished():
        engine.step()
    assert "".join(streamed) == full.text and len(streamed) > 1


def test_zero_max_tokens_and_timings(make_engine):
    engine = make_engine()
    none, some = engine.generate([EngineRequest(prompt="hi", sampling=SamplingParams(max_tokens=0)),
                                  EngineRequest(prompt="hi", images=[ImageRef(id="z", jpeg=jpeg(11))],
                                                sampling=SamplingParams(max_tokens=4))])
    assert none.ok and none.output_tokens == 0 and none.finish_reason == "length"
    t = some.timings
    assert some.mode == "unmerged" and t.vision_ms > 0 and t.prefill_ms > 0 and t.decode_ms > 0
    assert t.e2e_ms >= t.queue_ms + t.vision_ms + t.prefill_ms
    health = engine.health()
    assert health["mode"] == "unmerged" and health["merged_adapter"] is None
