"""Task heads: the counting head, save/load, and zero decode tokens through both engines."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from apps.model.grid_heads import GridBoxHead, GroundingHead
from apps.model.heads import CountingHead, load_heads, save_head
from apps.tasks import get_task


def test_counting_head_shapes_decode_and_loss():
    head = CountingHead(32, max_count=4)
    out = head(torch.randn(3, 1, 32))
    assert out.shape == (3, 5, 5)
    answer = head.decode(out[0])
    assert set(answer["counts"]) == {"car", "bus", "truck", "bicycle", "person"}
    parsed = get_task("counting").parse_head(answer)
    assert not parsed.parse_error
    target = head.target({"counts": {"car": 2, "person": 9}})
    assert target.tolist() == [2, 0, 0, 0, 4]  # clamped to max_count
    loss = head.loss(out, [target] * 3)
    assert loss.item() > 0 and torch.isfinite(loss)


def test_heads_save_and_load(tmp_path):
    heads = {"counting-head": CountingHead(16, adapter="a"), "detection-head": GridBoxHead(16, 2, 2, 2, adapter="a"),
             "grounding-head": GroundingHead(16, 2, 2, 2, slack=1, adapter="a")}
    heads["grounding-head"].calibrate(torch.randn(16))
    for name, head in heads.items():
        save_head(tmp_path / "a", name, head)
    loaded = load_heads(tmp_path)
    assert set(loaded) == set(heads)
    hidden = torch.randn(8, 16)
    hidden[1] = heads["grounding-head"].anchor  # the grounding window's <|vision_start|>
    for name, head in heads.items():
        assert loaded[name].adapter == "a" and loaded[name].positions == head.positions
        assert torch.allclose(loaded[name](hidden[-head.positions :]), head(hidden[-head.positions :]), atol=1e-2)
    assert loaded["grounding-head"](hidden[1:])[0, 5] == 1  # the anchor survives saving
    save_head(tmp_path / "b", "counting-head", CountingHead(16, adapter="b"))
    with pytest.raises(ValueError, match="two adapters"):
        load_heads(tmp_path)


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A random tiny base with one adapter ("tiny": counting, detection, grounding) trained a few steps with its
    heads."""
    from apps.model import tiny
    from apps.model.frames import FrameSet
    from apps.model.recipes import AdapterRecipe
    from apps.model.train import train_adapter

    root = tmp_path_factory.mktemp("heads")
    tiny.small_base(root / "base", frames=50)
    recipe = AdapterRecipe(tasks=("counting", "detection", "grounding"), rank=4, steps=3, batch_size=4)
    train_adapter(root / "base", recipe, FrameSet("train", 8), root / "adapters" / "tiny", "tiny")
    return root


@pytest.mark.parametrize("backend", ["hf", "valora"])
def test_heads_decode_zero_tokens_through_the_engine(trained_tiny, backend):
    """The engine's head path answers after one prefill, exactly as the batched evaluator does."""
    from peft import PeftModel

    from apps.model.encoding import Encoder
    from apps.model.evaluate import Evaluator, task_items
    from apps.model.frames import FrameSet
    from apps.model.train import load_base
    from engine.base import create_engine
    from engine.config import EngineConfig
    from engine.request import ImageRef

    root = trained_tiny
    heads = load_heads(root / "adapters")
    box = heads["detection-head"]
    assert set(heads) == {"counting-head", "detection-head", "grounding-head"}
    assert (box.rows, box.cols) == (4, 4) and heads["grounding-head"].cells == 16  # 112 px: 4 x 4
    engine = create_engine(EngineConfig(backend=backend, model=str(root / "base"), adapters=str(root / "adapters"),
                                        device="cpu", kv_cache_blocks=64), heads=heads)
    model, tokenizer, processor = load_base(root / "base")
    model = PeftModel.from_pretrained(model, root / "adapters" / "tiny", adapter_name="tiny").eval()
    evaluator = Evaluator(model, Encoder(tokenizer, processor))
    frames = FrameSet("val", 2)
    for task_name in ("counting", "detection", "grounding"):
        task = get_task(task_name)
        params = {"adapter": "tiny", "use_head": True}
        requests = [r for i in range(2) for r in task.requests(
            ImageRef(id=f"f{i}", jpeg=_jpeg(frames.images[i])), params, frames.truths[i])]
        results = engine.generate(requests)
        for res in results:
            assert res.ok, res.error
            assert res.output_tokens == 0 and res.finish_reason == "head" and res.text == ""
            # The grounding head serves expressions of a bounded length (this test tokenizer spends more tokens
            # on them than the shipped one): a longer one is answered with no box, which parses as an error.
            unserved = task_name == "grounding" and res.head_output["box"] is None
            assert task.parse(res).parse_error == unserved
        if task_name == "grounding":
            assert any(r.head_output["box"] is not None for r in results)
        direct = evaluator.heads(task_items(task, frames), frames, heads[task.head])
        assert len(direct) == len(results) > 0
        for res, ans in zip(results, direct, strict=True):
            if task_name == "counting":
                assert res.head_output == ans
            elif task_name == "grounding":
                assert (res.head_output["box"] is None) == (ans["box"] is None)
                assert ans["box"] is None or np.allclose(res.head_output["box"], ans["box"], atol=1e-3)
                assert res.head_output["score"] == pytest.approx(ans["score"], abs=1e-3)
            else:
                # An untrained head scores its cells almost alike, so compare them in box order.
                got, want = (sorted(r["detections"], key=lambda d: d["box"]) for r in (res.head_output, ans))
                assert [d["cls"] for d in got] == [d["cls"] for d in want]
                assert np.allclose([d["box"] for d in got], [d["box"] for d in want], atol=1e-3)
                assert np.allclose([d["score"] for d in got], [d["score"] for d in want], atol=1e-3)
    engine.close()
