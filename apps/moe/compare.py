"""Train one MoE-LoRA adapter per routing scheme and score each on held-out frames (resumable, one scheme a time).

Each scheme's work folder keeps its training state (``state.pt``) and, once done, ``result.json``; a rerun
skips finished schemes and resumes an interrupted one from its last saved step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from apps.moe.data import Encoder, Frames
from apps.moe.evaluate import score
from apps.moe.model import MoELoRAModel
from apps.moe.train import MoERecipe, MoETrainer, load_base
from apps.tasks import get_task

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def _eval_frames(split: str, n: int, base, processor, seed: int = 0) -> Frames:
    frames = Frames(split, n, seed=seed)
    frames.encode(base, processor)
    return frames


def run_scheme(base_dir: Path, recipe: MoERecipe, work: Path, out: Path, split: str, n_eval: int) -> dict:
    """Train (or resume) one scheme's adapter, save it to ``out``, score it; cached in work/result.json."""
    done = work / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    base, tokenizer, processor = load_base(base_dir)
    frames = Frames("train", recipe.train_frames, seed=recipe.seed)
    start = time.time()
    trainer = MoETrainer(base, tokenizer, processor, recipe, frames, out.name, work)
    trainer.train()
    trained = time.time() - start
    trainer.save(out)
    start = time.time()
    metrics = score(trainer.model, trainer.encoder, _eval_frames(split, n_eval, base, processor), recipe.tasks)
    result = {"routing": recipe.routing, "adapter": str(out), "recipe": asdict(recipe), "metrics": metrics,
              "train_s": round(trained, 1), "eval_s": round(time.time() - start, 1),
              "params": sum(p.numel() for p in trainer.model.trainable()),
              "final_loss": trainer.history[-1]["loss"] if trainer.history else None}
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_base(base_dir: Path, tasks: tuple[str, ...], work: Path, split: str, n_eval: int) -> dict:
    done = work / RESULT_FILE
    if done.is_file():
        return json.loads(done.read_text())
    base, tokenizer, processor = load_base(base_dir)
    start = time.time()
    encoder = Encoder(tokenizer, base.config.vision_config.spatial_merge_size)
    metrics = score(base, encoder, _eval_frames(split, n_eval, base, processor), tasks)
    result = {"routing": "none (base model)", "metrics": metrics, "eval_s": round(time.time() - start, 1),
              "params": 0}
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare(base_dir: Path, routings: list[str], recipe: MoERecipe, work: Path, out: Path, split: str,
            n_eval: int, with_base: bool = True) -> list[dict]:
    """One result per scheme (and the base model first when asked)."""
    results = [run_base(base_dir, recipe.tasks, work / "base", split, n_eval)] if with_base else []
    for routing in routings:
        results.append(run_scheme(base_dir, replace(recipe, routing=routing), work / routing, out / f"moe-{routing}",
                                  split, n_eval))
    return results


def table(results: list[dict], tasks: tuple[str, ...]) -> str:
    """Markdown: one row per scheme, each task's primary metric, the mean of them and the cost."""
    heads = [f"{t} ({get_task(t).primary_metric})" for t in tasks]
    lines = ["| routing | " + " | ".join(heads) + " | mean | trainable params | train s | eval s |",
             "|---|" + "---:|" * (len(tasks) + 4)]
    for res in results:
        prims = [next(iter(res["metrics"][t].values())) for t in tasks]
        cells = [f"{v:.1f}" for v in prims] + [f"{sum(prims) / len(prims):.2f}", f"{res.get('params', 0):,}",
                                                str(res.get("train_s", "-")), str(res.get("eval_s", "-"))]
        lines.append(f"| {res['routing']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_adapter(base_dir: Path, folder: Path, tasks: tuple[str, ...], split: str, n_eval: int,
                  seed: int = 0) -> dict:
    """A saved adapter on a fresh base model, scored on ``n_eval`` stills of ``split`` drawn with ``seed``."""
    base, tokenizer, processor = load_base(base_dir)
    frames = _eval_frames(split, n_eval, base, processor, seed)
    model = MoELoRAModel.from_folder(base, folder).eval()
    start = time.time()
    metrics = score(model, Encoder(tokenizer, base.config.vision_config.spatial_merge_size), frames, tasks)
    return {"routing": model.spec.routing, "adapter": str(folder), "metrics": metrics, "eval_frames": n_eval,
            "eval_seed": seed, "eval_s": round(time.time() - start, 1),
            "params": sum(p.numel() for p in model.trainable())}
