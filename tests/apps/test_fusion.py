"""Accuracy-aware adapter generation at micro scale: packing, the larger-rank retry and the new-adapter branch."""

from __future__ import annotations

import json

import pytest

from apps.model.fusion import Fusion, FusionConfig
from apps.model.manifest import Manifest
from apps.model.recipes import AdapterRecipe


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A random tiny base, 6 train and 2 val frames, and a fusion run over three tasks.

    Targets make the outcome deterministic: 0 is always met; counting's 100 (every class of every frame counted
    exactly) is never met by a barely trained model, so counting cannot join the first adapter at any rank and
    gets one of its own, where it misses its target too.
    """
    from apps.model import tiny
    from apps.model.frames import FrameSet

    root = tmp_path_factory.mktemp("fusion")
    tiny.small_base(root / "base", frames=50)
    cfg = FusionConfig(tasks=("vqa", "grounding", "counting"), targets={"vqa": 0, "grounding": 0, "counting": 100},
                       ranks=(2, 4), steps_per_task=2,
                       template=AdapterRecipe(tasks=("counting",), batch_size=4))
    fusion = Fusion(root / "base", cfg, FrameSet("train", 6), FrameSet("val", 2), root / "work", root / "adapters")
    return root, fusion, fusion.run()


def test_packs_tasks_and_starts_a_new_adapter_for_one_that_does_not_fit(micro):
    root, fusion, manifest = micro
    assert {name: entry.tasks for name, entry in manifest.adapters.items()} == {
        "fused-0": ["vqa", "grounding"], "fused-1": ["counting"]}
    tried = [(t["adapter"], tuple(t["tasks"]), t["rank"], t["met"]) for t in manifest.trials]
    assert tried == [
        ("fused-0", ("vqa",), 2, True),
        ("fused-0", ("vqa", "grounding"), 2, True),
        ("fused-0", ("vqa", "grounding", "counting"), 2, False),  # falls under target ...
        ("fused-0", ("vqa", "grounding", "counting"), 4, False),  # ... and a larger rank does not help
        ("fused-1", ("counting",), 2, False),  # a new adapter (from scratch) ...
        ("fused-1", ("counting",), 4, False),  # ... grown to the larger rank
    ]
    assert [t["warm_start"] for t in manifest.trials] == [False, True, True, True, False, False]
    assert manifest.adapters["fused-0"].rank == 2
    assert manifest.adapters["fused-0"].heads == {"grounding": "grounding-head"}
    assert manifest.adapters["fused-1"].heads == {"counting": "counting-head"}
    assert manifest.tasks["counting"].head == "counting-head" and manifest.tasks["vqa"].head is None
    assert manifest.tasks["counting"].adapter == "fused-1" and not manifest.tasks["counting"].met
    assert manifest.tasks["vqa"].met and manifest.tasks["vqa"].metric == "exact_match"


def test_writes_peft_adapters_heads_and_a_manifest_that_loads(micro):
    from peft import PeftModel

    from apps.model.heads import load_heads
    from apps.model.train import load_base

    root, _, manifest = micro
    assert Manifest.load(root / "adapters") == manifest
    assert manifest.adapter_for("vqa") == ("fused-0", None)
    for name, entry in manifest.adapters.items():
        folder = root / "adapters" / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == entry.rank and config["lora_alpha"] == entry.alpha
        assert entry.size_bytes == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        model = PeftModel.from_pretrained(load_base(root / "base")[0], folder)
        assert any("lora_A" in n for n, _ in model.named_parameters())
    assert set(load_heads(root / "adapters")) == {"counting-head", "grounding-head"}


def test_manifest_update_replaces_one_adapter_and_keeps_the_others(micro, tmp_path):
    import shutil

    from apps.model.frames import FrameSet
    from apps.model.fusion import assemble

    root, _, manifest = micro
    out = tmp_path / "adapters"
    shutil.copytree(root / "adapters", out)
    updated = assemble(root / "base", {"fused-1": root / "adapters" / "fused-1"}, {"counting": 0}, FrameSet("val", 2),
                       out, update=True)
    assert updated.adapters["fused-0"] == manifest.adapters["fused-0"] and updated.tasks["vqa"] == manifest.tasks["vqa"]
    assert updated.tasks["counting"].target == 0 and updated.tasks["counting"].met
    assert updated.trials[:-1] == manifest.trials and updated.trials[-1]["adapter"] == "fused-1"
    assert Manifest.load(out) == updated
    with pytest.raises(ValueError, match="scored on 2 val frames"):
        assemble(root / "base", {"fused-1": root / "adapters" / "fused-1"}, {"counting": 0}, FrameSet("val", 3), out,
                 update=True)


def test_config_is_validated():
    with pytest.raises(ValueError, match="no accuracy target"):
        FusionConfig(tasks=("counting", "vqa"), targets={"counting": 50})
    with pytest.raises(ValueError, match="ascending"):
        FusionConfig(tasks=("vqa",), targets={"vqa": 1}, ranks=(8, 4))
    with pytest.raises(ValueError, match="unknown task"):
        FusionConfig(tasks=("nope",), targets={"nope": 1})
