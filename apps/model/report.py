"""`valora eval`: the base model and the shipped adapters scored on every task, as a table and as JSON."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from apps.model.encoding import Encoder
from apps.model.evaluate import Evaluator
from apps.model.frames import FrameSet
from apps.model.heads import load_heads
from apps.model.manifest import Manifest
from apps.model.train import load_base
from apps.tasks import get_task

logger = logging.getLogger(__name__)


def load_served(base_dir: str | Path, adapters_dir: str | Path, names: list[str] | None = None):
    """(peft model with every adapter of the manifest loaded, encoder, heads, manifest)."""
    from peft import PeftModel

    manifest = Manifest.load(adapters_dir)
    model, tokenizer, processor = load_base(base_dir)
    names = names or list(manifest.adapters)
    for i, name in enumerate(names):
        folder = Path(adapters_dir) / name
        if i == 0:
            model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    model.eval()
    encoder = Encoder(tokenizer, processor, model.config.vision_config.spatial_merge_size)
    return model, encoder, load_heads(adapters_dir), manifest


def evaluate_all(base_dir: str | Path, adapters_dir: str | Path, split: str = "test", frames: int = 100,
                 tasks: list[str] | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Scores of base and adapter per task (served path: the manifest's head, else decoded text)."""
    start = time.time()
    model, encoder, heads, manifest = load_served(base_dir, adapters_dir)
    data = FrameSet(split, frames)
    evaluator = Evaluator(model, encoder, batch_size)
    report: dict[str, Any] = {"split": split, "frames": frames, "tasks": {}}
    for name in tasks or list(manifest.tasks):
        task = get_task(name)
        adapter, head_name = manifest.adapter_for(name)
        base = evaluator.score(task, data, None)
        served = evaluator.score(task, data, adapter, heads[head_name] if head_name else None)
        entry = manifest.tasks[name]
        report["tasks"][name] = {
            "metric": task.primary_metric,
            "base": round(base.primary, 2),
            "adapter": round(served.primary, 2),
            "target": entry.target,
            "adapter_name": adapter,
            "path": served.path,
            "gain": round(served.primary - base.primary, 2),
            "met": served.primary >= entry.target,
            "items": served.items,
            "metrics": {"base": _rounded(base.metrics), "adapter": _rounded(served.metrics)},
            "seconds": {"base": round(base.seconds, 1), "adapter": round(served.seconds, 1)},
        }
    report["seconds"] = round(time.time() - start, 1)
    return report


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in metrics.items()}


def table(report: dict[str, Any]) -> str:
    """The report as a fixed-width table, one task per row."""
    header = f"{'task':<11} {'metric':<12} {'base':>7} {'adapter':>8} {'gain':>7} {'target':>7}  {'met':<4} path"
    rows = [header, "-" * len(header)]
    for name, r in report["tasks"].items():
        rows.append(f"{name:<11} {r['metric']:<12} {r['base']:>7.2f} {r['adapter']:>8.2f} {r['gain']:>7.2f} "
                    f"{r['target']:>7.1f}  {'yes' if r['met'] else 'NO':<4} {r['adapter_name']} ({r['path']})")
    rows.append(f"{report['split']} split, {report['frames']} frames, {report['seconds']:.0f} s")
    return "\n".join(rows)
