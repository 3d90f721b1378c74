"""Task heads vs decoding on the `hf` engine (CPU): latency and accuracy of counting, detection and grounding.

    python bench/heads.py [--frames 30] [--split test] [--threads 2] [--json PATH]

Both paths use the same shipped adapter, one request at a time (grounding: one per expression), so the latency
is that of one request at batch 1. The physical floor of the head path is one prefill. An adapter trained with
`--no-text` learned only its head: its text path is then not a trained path, and says only what decoding costs.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.model.frames import FrameSet  # noqa: E402
from apps.model.heads import load_heads  # noqa: E402
from apps.model.manifest import Manifest  # noqa: E402
from apps.tasks import get_task  # noqa: E402
from engine.base import create_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.request import ImageRef  # noqa: E402


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def run_path(engine, task, adapter: str, frames: FrameSet, use_head: bool) -> dict:
    """One request per item of every frame (grounding: one per expression), one at a time."""
    latencies, outputs, truths, tokens = [], [], [], []
    for i, truth in enumerate(frames.truths):
        image = ImageRef(id=f"{frames.split}:{i}", jpeg=png(frames.images[i]))
        for request in task.requests(image, {"adapter": adapter, "use_head": use_head}, truth):
            start = time.perf_counter()
            (result,) = engine.generate([request])
            latencies.append((time.perf_counter() - start) * 1000.0)
            if not result.ok:
                raise RuntimeError(f"{task.name} request failed: {result.error}")
            outputs.append(task.parse(result, request))
            truths.append(truth)
            tokens.append(result.output_tokens)
    metrics = task.evaluate(outputs, truths)
    return {"path": "head" if use_head else "text", "p50_ms": statistics.median(latencies),
            "mean_ms": statistics.fmean(latencies), "accuracy": next(iter(metrics.values())),
            "metric": task.primary_metric, "output_tokens": statistics.fmean(tokens), "metrics": metrics}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--split", default="test")
    parser.add_argument("--base", default="models/base")
    parser.add_argument("--adapters", default="models/adapters")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    manifest = Manifest.load(args.adapters)
    engine = create_engine(EngineConfig(backend="hf", model=args.base, adapters=args.adapters, device="cpu"),
                           heads=load_heads(args.adapters))
    frames = FrameSet(args.split, args.frames)
    rows = {}
    for name in ("counting", "detection", "grounding"):
        task = get_task(name)
        adapter, head = manifest.adapter_for(name)
        if head is None:
            raise SystemExit(f"the manifest serves {name} without a head")
        run_path(engine, task, adapter, FrameSet(args.split, 2), False)  # warm-up: loads the adapter
        text = run_path(engine, task, adapter, frames, use_head=False)
        heads = run_path(engine, task, adapter, frames, use_head=True)
        rows[name] = {"adapter": adapter, "text": text, "head": heads,
                      "speedup_p50": text["p50_ms"] / heads["p50_ms"]}

    print(f"task heads vs decoding: hf engine, CPU ({torch.get_num_threads()} threads), {args.frames} "
          f"{args.split} frames, batch 1")
    print(f"{'task':<10} {'path':<5} {'p50 ms':>8} {'mean ms':>8} {'tokens':>7} {'metric':<9} {'accuracy':>9}")
    for name, row in rows.items():
        for path in ("text", "head"):
            r = row[path]
            print(f"{name:<10} {path:<5} {r['p50_ms']:>8.1f} {r['mean_ms']:>8.1f} {r['output_tokens']:>7.1f} "
                  f"{r['metric']:<9} {r['accuracy']:>9.2f}")
        print(f"{name:<10} ratio (text/head p50 latency): {row['speedup_p50']:.2f}x; floor of the head path: "
              "one prefill (it decodes 0 tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": args.frames, "split": args.split,
                                               "threads": torch.get_num_threads(), "tasks": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
