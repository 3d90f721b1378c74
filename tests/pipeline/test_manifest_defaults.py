"""Workers take each task's adapter (and head) from the adapter manifest; StreamSpec params still win."""

from __future__ import annotations

from apps.model.manifest import Manifest, TaskEntry
from apps.tasks import get_task
from engine.request import ImageRef
from pipeline.worker import manifest_defaults


def test_manifest_maps_tasks_to_adapters_and_heads(tmp_path):
    manifest = Manifest(base="models/base", tasks={
        "counting": TaskEntry(adapter="fused-1", head="counting-head", metric="accuracy", target=55, accuracy=60,
                              met=True),
        "vqa": TaskEntry(adapter="fused-2", metric="exact_match", target=30, accuracy=40, met=True),
    })
    manifest.save(tmp_path)
    defaults = manifest_defaults(tmp_path)
    assert defaults == {"counting": {"adapter": "fused-1", "use_head": True}, "vqa": {"adapter": "fused-2"}}
    image = ImageRef(id="s:1", jpeg=b"x")
    (req,) = get_task("counting").requests(image, defaults["counting"])
    assert req.adapter == "fused-1" and req.head == "counting-head" and req.sampling.max_tokens == 0
    (req,) = get_task("vqa").requests(image, {**defaults["vqa"], "questions": ["is there a bus?"]})
    assert req.adapter == "fused-2" and req.head is None
    (req,) = get_task("counting").requests(image, {**defaults["counting"], "use_head": False, "adapter": "mine"})
    assert req.adapter == "mine" and req.head is None


def test_no_manifest_keeps_task_defaults(tmp_path):
    assert manifest_defaults(tmp_path) == {}
