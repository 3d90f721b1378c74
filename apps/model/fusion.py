"""VaLoRA's accuracy-aware adapter generation: pack tasks into as few LoRA adapters as their targets allow."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from apps.model.evaluate import Evaluator, Score
from apps.model.frames import FrameSet
from apps.model.manifest import AdapterEntry, Manifest, TaskEntry, folder_bytes
from apps.model.recipes import AdapterRecipe
from apps.model.train import TRAINING_FILE, load_base, train_adapter
from apps.tasks import get_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusionConfig:
    """The search: task order, targets on the primary metric, ranks to try, and how each candidate trains."""

    tasks: tuple[str, ...]
    targets: dict[str, float]
    ranks: tuple[int, ...] = (8, 16, 32)
    steps_per_task: int = 150
    # Adding a task (at the current rank or a larger one) continues from the current adapter and its heads for
    # 1.5 x steps_per_task, half of each batch on the new task; a new adapter trains from scratch.
    warm_start: bool = True
    template: AdapterRecipe = field(default_factory=lambda: AdapterRecipe(tasks=("counting",)))

    def __post_init__(self) -> None:
        missing = [t for t in self.tasks if t not in self.targets]
        if missing:
            raise ValueError(f"no accuracy target for task(s) {missing}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {list(self.tasks)}")
        if not self.ranks or sorted(self.ranks) != list(self.ranks):
            raise ValueError(f"ranks must be ascending, got {list(self.ranks)}")
        for t in self.tasks:
            get_task(t)


@dataclass
class Candidate:
    """One trained and scored adapter: its recipe, folder and the score of every task it serves."""

    name: str
    recipe: AdapterRecipe
    path: Path
    scores: dict[str, Score]
    seconds: float

    def meets(self, targets: dict[str, float]) -> bool:
        return all(self.scores[t].primary >= targets[t] for t in self.recipe.tasks)


class Fusion:
    """Greedy packing: add the next task to the current adapter and retrain; if a task it serves falls under
    its target, retry at the next larger rank; if no rank holds every target, close the adapter and start a
    new one with the task. Candidates train under ``work``; accepted adapters are copied to ``out``."""

    def __init__(self, base_dir: str | Path, cfg: FusionConfig, train: FrameSet, val: FrameSet,
                 work: str | Path, out: str | Path) -> None:
        self.base_dir, self.cfg, self.train, self.val = Path(base_dir), cfg, train, val
        self.work, self.out = Path(work), Path(out)
        self.base = load_base(base_dir)
        self.trials: list[dict] = []

    def _name(self, index: int) -> str:
        return f"fused-{index}"

    def _try(self, name: str, tasks: tuple[str, ...], rank: int, warm: Candidate | None = None) -> Candidate:
        warm = warm if warm is not None and warm.recipe.rank <= rank and self.cfg.warm_start else None
        steps = int(1.5 * self.cfg.steps_per_task) if warm is not None else self.cfg.steps_per_task * len(tasks)
        recipe = replace(self.cfg.template, tasks=tasks, rank=rank, alpha=2.0 * rank, steps=steps)
        folder = self.work / f"{name}-r{rank}-{'+'.join(tasks)}"
        result, trainer = train_adapter(self.base_dir, recipe, self.train, folder, name, base_parts=self.base,
                                        init=warm.path if warm is not None else None,
                                        focus=tasks[-1] if warm is not None else None)
        evaluator = Evaluator(trainer.model, trainer.encoder)
        scores = {t: evaluator.score(get_task(t), self.val, name, trainer.heads.get(t)) for t in tasks}
        self.base = (trainer.unload(), *self.base[1:])
        candidate = Candidate(name, recipe, folder, scores, result.seconds)
        self.trials.append({"adapter": name, "tasks": list(tasks), "rank": rank, "met": candidate.meets(
            self.cfg.targets), "scores": {t: round(s.primary, 2) for t, s in scores.items()},
            "train_seconds": round(result.seconds, 1), "warm_start": warm is not None})
        logger.info("candidate %s rank %s %s: %s (targets %s)", name, rank, "+".join(tasks),
                    {t: round(s.primary, 1) for t, s in scores.items()}, {t: self.cfg.targets[t] for t in tasks})
        return candidate

    def _fit(self, current: Candidate, task: str, ranks: tuple[int, ...]) -> Candidate | None:
        """The first rank at which ``current`` plus ``task`` meets every target; None if none does."""
        for rank in ranks:
            candidate = self._try(current.name, (*current.recipe.tasks, task), rank, warm=current)
            if candidate.meets(self.cfg.targets):
                return candidate
        return None

    def _alone(self, name: str, task: str) -> Candidate:
        """An adapter for one task: the first rank meeting its target, else the best one tried (target missed)."""
        tried = []
        for rank in self.cfg.ranks:
            candidate = self._try(name, (task,), rank)
            if candidate.meets(self.cfg.targets):
                return candidate
            tried.append(candidate)
        logger.warning("task %s misses its target %.1f even alone at rank %s", task, self.cfg.targets[task],
                       self.cfg.ranks[-1])
        return max(tried, key=lambda c: c.scores[task].primary)

    def run(self) -> Manifest:
        accepted: list[Candidate] = []
        current: Candidate | None = None
        for task in self.cfg.tasks:
            if current is not None and not current.meets(self.cfg.targets):
                accepted.append(current)  # it already misses a target: nothing may join it
                current = None
            if current is not None:
                ranks = tuple(r for r in self.cfg.ranks if r >= current.recipe.rank)
                joined = self._fit(current, task, ranks)
                if joined is not None:
                    current = joined
                    continue
                logger.info("task %s does not fit into %s; starting a new adapter", task, current.name)
                accepted.append(current)
            current = self._alone(self._name(len(accepted)), task)
        if current is not None:
            accepted.append(current)
        return self._write(accepted)

    def _write(self, accepted: list[Candidate]) -> Manifest:
        return write_manifest(accepted, self.base_dir, self.val, self.cfg.targets, self.out, self.trials)


def write_manifest(accepted: list[Candidate], base_dir: Path, val: FrameSet, targets: dict[str, float],
                   out: Path, trials: list[dict], previous: Manifest | None = None) -> Manifest:
    """Copy the accepted adapters to ``out`` and write manifest.json for them. With ``previous`` (a manifest of
    the same split and frames), its adapters that no candidate replaces, and the tasks they serve, are kept."""
    out.mkdir(parents=True, exist_ok=True)
    adapters, tasks = {}, {}
    if previous is not None:
        if (previous.split, previous.frames) != (val.split, len(val)):
            raise ValueError(f"the manifest at {out} was scored on {previous.frames} {previous.split} frames, "
                             f"these adapters on {len(val)} {val.split} frames")
        replaced = {c.name for c in accepted} | {t for c in accepted for t in c.recipe.tasks}
        adapters = {n: e for n, e in previous.adapters.items() if n not in replaced
                    and not replaced & set(e.tasks)}
        tasks = {t: e for t, e in previous.tasks.items() if e.adapter in adapters}
    for cand in accepted:
        target = out / cand.name
        if target.resolve() != cand.path.resolve():  # an adapter already in place is not copied onto itself
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(cand.path, target)
        heads = {t: get_task(t).head for t in cand.recipe.tasks
                 if get_task(t).head and (target / "heads" / f"{get_task(t).head}.json").is_file()}
        adapters[cand.name] = AdapterEntry(
            tasks=list(cand.recipe.tasks), rank=cand.recipe.rank, alpha=cand.recipe.alpha,
            vision=cand.recipe.vision, size_bytes=folder_bytes(target), train_seconds=round(cand.seconds, 1),
            heads=heads)
        for t in cand.recipe.tasks:
            score = cand.scores[t]
            tasks[t] = TaskEntry(adapter=cand.name, head=heads.get(t), metric=get_task(t).primary_metric,
                                 target=targets[t], accuracy=round(score.primary, 2),
                                 metrics={k: round(v, 3) for k, v in score.metrics.items()},
                                 met=score.primary >= targets[t])
    if previous is not None:  # replaced entries keep their place
        adapters = _in_order(adapters, list(previous.adapters))
        tasks = _in_order(tasks, list(previous.tasks))
    manifest = Manifest(base=str(base_dir), split=val.split, frames=len(val), adapters=adapters, tasks=tasks,
                        trials=trials)
    manifest.save(out)
    return manifest


def _in_order(entries: dict, order: list[str]) -> dict:
    """``entries`` with the keys in ``order`` first, in that order, then the others."""
    return {k: entries[k] for k in order if k in entries} | {k: v for k, v in entries.items() if k not in order}


def assemble(base_dir: str | Path, folders: dict[str, Path], targets: dict[str, float], val: FrameSet,
             out: str | Path, trials: list[dict] | None = None, update: bool = False) -> Manifest:
    """A manifest for adapters trained elsewhere (each folder holds recipe.json): every task they serve is
    scored on ``val`` again, and the folders are copied to ``out`` under the given names. ``update``: keep the
    other adapters of the manifest already in ``out``, and its trials, adding one trial per adapter given."""
    import json

    from peft import PeftModel

    from apps.model.encoding import Encoder
    from apps.model.heads import HEADS_DIR, load_head

    model, tokenizer, processor = load_base(base_dir)
    candidates = []
    for name, folder in folders.items():
        recipe = AdapterRecipe(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in json.loads((folder / "recipe.json").read_text()).items()})
        missing = [t for t in recipe.tasks if t not in targets]
        if missing:
            raise ValueError(f"no accuracy target for task(s) {missing} of adapter {folder}")
        model = PeftModel.from_pretrained(model, folder, adapter_name=name).eval()
        evaluator = Evaluator(model, Encoder(tokenizer, processor))
        scores = {}
        for t in recipe.tasks:
            head_file = folder / HEADS_DIR / f"{get_task(t).head}.json"
            head = load_head(head_file)[1] if get_task(t).head and head_file.is_file() else None
            scores[t] = evaluator.score(get_task(t), val, name, head)
        model = model.unload()
        log = folder / TRAINING_FILE
        seconds = json.loads(log.read_text())["seconds"] if log.is_file() else 0.0
        candidates.append(Candidate(name, recipe, Path(folder), scores, seconds))
    previous = Manifest.load(out) if update else None
    trials = list(trials or []) + (previous.trials if previous is not None else [])
    if previous is not None:
        trials += [{"adapter": c.name, "tasks": list(c.recipe.tasks), "rank": c.recipe.rank,
                    "met": c.meets(targets), "scores": {t: round(s.primary, 2) for t, s in c.scores.items()},
                    "train_seconds": round(c.seconds, 1), "warm_start": False} for c in candidates]
    return write_manifest(candidates, Path(base_dir), val, targets, Path(out), trials, previous)
