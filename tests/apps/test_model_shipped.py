"""The shipped base model, adapters, heads and manifest: they load, agree with each other, fit the size budget,
and the adapters beat the base model on a handful of validation frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.model.manifest import Manifest
from apps.tasks import TASKS

MODELS = Path(__file__).resolve().parents[2] / "models"
BASE, ADAPTERS = MODELS / "base", MODELS / "adapters"
BUDGET_BYTES = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.load(ADAPTERS)


def test_everything_fits_the_budget():
    total = sum(f.stat().st_size for f in MODELS.rglob("*") if f.is_file())
    assert total <= BUDGET_BYTES, f"models/ holds {total / 1e6:.1f} MB"


def test_base_loads_in_fp32_and_is_tiny():
    from apps.model.train import load_base

    model, tokenizer, processor = load_base(BASE)
    n = sum(p.numel() for p in model.parameters())
    assert 10e6 <= n <= 30e6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(tokenizer) <= 2048 and processor.size["longest_edge"] == 168 * 168


def test_manifest_serves_every_task_consistently(manifest):
    assert set(manifest.tasks) == set(TASKS)
    for task, entry in manifest.tasks.items():
        adapter = manifest.adapters[entry.adapter]
        assert task in adapter.tasks and entry.metric == TASKS[task].primary_metric
        assert entry.met == (entry.accuracy >= entry.target)
        assert entry.head == adapter.heads.get(task) and entry.head in (None, TASKS[task].head)
    for name, adapter in manifest.adapters.items():
        folder = ADAPTERS / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == adapter.rank and config["lora_alpha"] == adapter.alpha
        assert ("visual" in config["target_modules"]) == adapter.vision
        assert adapter.size_bytes == sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        assert all(manifest.tasks[t].adapter == name for t in adapter.tasks)


def test_heads_load_and_fit_their_prompts(manifest):
    from apps.model.encoding import Encoder
    from apps.model.heads import load_heads
    from apps.model.train import build_head, load_base

    heads = load_heads(ADAPTERS)
    served = {e.head: (t, e.adapter) for t, e in manifest.tasks.items() if e.head}
    assert set(heads) == set(served)
    model, tokenizer, processor = load_base(BASE)
    encoder = Encoder(tokenizer, processor)
    for name, head in heads.items():
        task, adapter = served[name]
        assert head.adapter == adapter
        fresh = build_head(TASKS[task], encoder, model.config.text_config.hidden_size, adapter)
        assert type(fresh) is type(head) and fresh.positions == head.positions


def test_adapters_beat_the_base_on_a_few_val_frames(manifest):
    """Cheap tasks only (heads and one-word answers), on 6 frames."""
    from apps.model.evaluate import Evaluator
    from apps.model.frames import FrameSet
    from apps.model.report import load_served

    model, encoder, heads, _ = load_served(BASE, ADAPTERS)
    evaluator = Evaluator(model, encoder)
    frames = FrameSet("val", 6)
    for task in ("counting", "vqa", "detection", "grounding"):
        adapter, head = manifest.adapter_for(task)
        base = evaluator.score(TASKS[task], frames, None)
        tuned = evaluator.score(TASKS[task], frames, adapter, heads[head] if head else None)
        assert tuned.primary > base.primary, (task, base.metrics, tuned.metrics)
