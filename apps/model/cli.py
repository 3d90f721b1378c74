"""Sub-commands of the model package: `valora model pretrain`, `valora adapters train|generate`, `valora eval`."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2,
                        help="Torch CPU threads (1 is faster on a machine other jobs keep busy).")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_model(subparsers)
    _register_adapters(subparsers)
    _register_eval(subparsers)


def _register_model(subparsers: argparse._SubParsersAction) -> None:
    from apps.model.recipes import PretrainConfig

    defaults = PretrainConfig()
    model = subparsers.add_parser("model", help="Build the tiny base model.")
    sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pre = sub.add_parser(
        "pretrain",
        help="Train the tokenizer and pretrain the base model on generic scene descriptions.",
        description="Resumable: rerunning with the same --work continues from its last saved step.",
    )
    pre.add_argument("--out", default="models/base", help="Where the Hugging Face checkpoint is written.")
    pre.add_argument("--work", default=".state/pretrain", help="Work directory (tokenizer, resumable state).")
    pre.add_argument("--preset", default=defaults.preset, help="Architecture preset (apps.model.tiny.PRESETS).")
    pre.add_argument("--steps", type=int, default=defaults.steps, help="Optimizer steps.")
    pre.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Pictures per step.")
    pre.add_argument("--lr", type=float, default=defaults.lr, help="Peak learning rate.")
    pre.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="Tokenizer vocabulary size.")
    pre.add_argument("--save-every", type=int, default=defaults.save_every, help="Steps between saved states.")
    pre.add_argument("--seed", type=int, default=defaults.seed, help="Initialisation seed.")
    pre.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="Where to train; auto: the GPU when one is present (--threads then only sets CPU work).")
    _common(pre)
    pre.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from apps.model.pretrain import pretrain
    from apps.model.recipes import PretrainConfig

    _threads(args)
    cfg = PretrainConfig(preset=args.preset, vocab_size=args.vocab_size, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, save_every=args.save_every, seed=args.seed)
    start = time.time()
    out = pretrain(args.out, args.work, cfg, args.device)
    print(f"wrote the base model to {out} in {time.time() - start:.0f} s")
    return 0


def _targets(text: str) -> dict[str, float]:
    """'detection=60,counting=90' -> {'detection': 60.0, 'counting': 90.0}."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not name.strip() or not 0 <= number <= 100:
            raise argparse.ArgumentTypeError(f"targets are task=score pairs with scores in 0..100, got {part!r}")
        out[name.strip()] = number
    return out


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _training_args(parser: argparse.ArgumentParser, targets_flag: str = "--targets") -> None:
    from apps.model.recipes import AdapterRecipe

    defaults = AdapterRecipe(tasks=("counting",))
    parser.add_argument("--base", default="models/base", help="Base checkpoint directory.")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank).")
    parser.add_argument(targets_flag, dest="lora_targets", type=_csv, default=defaults.targets,
                        help="Comma-separated language-model projections to adapt.")
    parser.add_argument("--vision", action="store_true", help="Adapt the vision tower and merger too.")
    parser.add_argument("--no-heads", action="store_true", help="Do not train the tasks' heads with the adapter.")
    parser.add_argument("--no-text", action="store_true",
                        help="Tasks with a head learn only their head's answers, not the text format.")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="LoRA learning rate.")
    parser.add_argument("--head-lr", type=float, default=defaults.head_lr, help="Task heads' learning rate.")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="Examples per step.")
    parser.add_argument("--train-frames", type=int, default=1500, help="Training frames (train split).")
    parser.add_argument("--val-frames", type=int, default=60, help="Held-out frames (val split) for scoring.")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="Seed of initialisation and sampling.")
    _common(parser)


def _recipe(args: argparse.Namespace, tasks: tuple[str, ...], rank: int, steps: int):
    from apps.model.recipes import AdapterRecipe

    return AdapterRecipe(tasks=tasks, rank=rank, alpha=args.alpha or 2.0 * rank, targets=args.lora_targets,
                         vision=args.vision, heads=not args.no_heads, text=not args.no_text, steps=steps,
                         batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, seed=args.seed)


def _register_adapters(subparsers: argparse._SubParsersAction) -> None:
    adapters = subparsers.add_parser("adapters", help="Train LoRA adapters and task heads.")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="Train one PEFT LoRA adapter (with its tasks' heads) and score it on val.")
    train.add_argument("--task", required=True, type=_csv, help="Task, or comma-separated tasks, it serves.")
    train.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    train.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    train.add_argument("--name", help="Adapter name (default: the task names joined by '+').")
    train.add_argument("--out", default="models/adapters", help="Directory that receives the adapter folder.")
    _training_args(train)
    train.set_defaults(handler=_train)

    gen = sub.add_parser(
        "generate", help="Accuracy-aware generation: pack tasks into as few adapters as their targets allow.",
        description="Adds each task to the current adapter and retrains; if a task it serves falls under its "
                    "target, retries at a larger rank, then starts a new adapter. Writes the adapters and "
                    "manifest.json (tasks per adapter, accuracy per task, rank, size).")
    gen.add_argument("--tasks", required=True, type=_csv, help="Comma-separated tasks, in packing order.")
    gen.add_argument("--targets", dest="accuracy", required=True, type=_targets,
                     help="Accuracy target per task on its primary metric, e.g. detection=60,counting=90.")
    gen.add_argument("--ranks", type=lambda t: tuple(int(v) for v in _csv(t)), default=(8, 16, 32),
                     help="Ranks to try, ascending.")
    gen.add_argument("--steps-per-task", type=int, default=150, help="Optimizer steps per task an adapter serves.")
    gen.add_argument("--out", default="models/adapters", help="Where the adapters and manifest.json go.")
    gen.add_argument("--work", default=".state/fusion", help="Where every candidate adapter is trained.")
    _training_args(gen, targets_flag="--lora-targets")
    gen.set_defaults(handler=_generate)

    man = sub.add_parser("manifest", help="Write manifest.json for adapters trained elsewhere, scored on val again.")
    man.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                     help="An adapter folder (with recipe.json) and the name it is shipped under; repeatable.")
    man.add_argument("--targets", dest="accuracy", required=True, type=_targets,
                     help="Accuracy target per task on its primary metric.")
    man.add_argument("--base", default="models/base", help="Base checkpoint directory.")
    man.add_argument("--val-frames", type=int, default=60, help="Held-out frames (val split) for scoring.")
    man.add_argument("--out", default="models/adapters", help="Where the adapters and manifest.json go.")
    man.add_argument("--update", action="store_true",
                     help="Keep the other adapters of the manifest already in --out (and its trials); the ones "
                          "given replace those of the same name or serving the same tasks.")
    _common(man)
    man.set_defaults(handler=_manifest)


def _train(args: argparse.Namespace) -> int:
    from apps.model.evaluate import Evaluator
    from apps.model.frames import FrameSet
    from apps.model.train import train_adapter
    from apps.tasks import get_task

    _threads(args)
    tasks = tuple(args.task)
    for t in tasks:
        get_task(t)
    name = args.name or "+".join(tasks)
    recipe = _recipe(args, tasks, args.rank, args.steps)
    result, trainer = train_adapter(args.base, recipe, FrameSet("train", args.train_frames), Path(args.out) / name,
                                    name)
    print(f"wrote adapter {name} to {result.path} in {result.seconds:.0f} s")
    evaluator = Evaluator(trainer.model, trainer.encoder)
    val = FrameSet("val", args.val_frames)
    for t in tasks:
        score = evaluator.score(get_task(t), val, name, trainer.heads.get(t))
        print(f"  {t}: {score.path} path, " + ", ".join(f"{k} {v:.2f}" for k, v in score.metrics.items()))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from apps.model.frames import FrameSet
    from apps.model.fusion import Fusion, FusionConfig

    _threads(args)
    template = _recipe(args, tuple(args.tasks), args.ranks[0], args.steps_per_task)
    cfg = FusionConfig(tasks=tuple(args.tasks), targets=args.accuracy, ranks=args.ranks,
                       steps_per_task=args.steps_per_task, template=template)
    start = time.time()
    fusion = Fusion(args.base, cfg, FrameSet("train", args.train_frames), FrameSet("val", args.val_frames),
                    args.work, args.out)
    manifest = fusion.run()
    print(f"{len(manifest.adapters)} adapter(s) for {len(manifest.tasks)} task(s) in {time.time() - start:.0f} s")
    for name, entry in manifest.adapters.items():
        print(f"  {name}: tasks {','.join(entry.tasks)}, rank {entry.rank}, {entry.size_bytes / 1e6:.2f} MB")
    missed = [t for t, e in manifest.tasks.items() if not e.met]
    for task, entry in manifest.tasks.items():
        print(f"  {task}: {entry.metric} {entry.accuracy:.2f} (target {entry.target:.1f}) on {entry.adapter}")
    if missed:
        print(f"target missed for: {', '.join(missed)}")
        return 1
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from apps.model.frames import FrameSet
    from apps.model.fusion import assemble

    _threads(args)
    folders = {}
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not Path(folder).is_dir():
            raise ValueError(f"--adapter takes NAME=DIR with an existing DIR, got {spec!r}")
        folders[name] = Path(folder)
    manifest = assemble(args.base, folders, args.accuracy, FrameSet("val", args.val_frames), args.out,
                        update=args.update)
    for task, entry in manifest.tasks.items():
        print(f"  {task}: {entry.metric} {entry.accuracy:.2f} (target {entry.target:.1f}) on {entry.adapter}")
    return 0


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="Score the base model and the adapters on every task.")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"], help="Synthetic split.")
    ev.add_argument("--frames", type=int, default=100, help="Frames of the split to score.")
    ev.add_argument("--base", default="models/base", help="Base checkpoint directory.")
    ev.add_argument("--adapters", default="models/adapters", help="Adapters directory with manifest.json.")
    ev.add_argument("--tasks", type=_csv, default=None, help="Comma-separated tasks (default: the manifest's).")
    ev.add_argument("--json", metavar="PATH", help="Also write the report as JSON.")
    _common(ev)
    ev.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from apps.model.report import evaluate_all, table

    _threads(args)
    report = evaluate_all(args.base, args.adapters, args.split, args.frames, list(args.tasks) if args.tasks else None)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
