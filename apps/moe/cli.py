"""Sub-commands of the MoE-LoRA package: `valora moe train`, `valora moe compare` and `valora moe eval`."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

logger = logging.getLogger(__name__)


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    from apps.moe.train import MoERecipe

    d = MoERecipe()
    parser.add_argument("--base", default="models/base", help="Base model checkpoint directory.")
    parser.add_argument("--experts", type=int, default=d.num_experts, help="Experts per adapted linear.")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="Experts each token uses.")
    parser.add_argument("--rank", type=int, default=d.rank, help="Rank of every expert.")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha of every expert.")
    parser.add_argument("--steps", type=int, default=d.steps, help="Optimizer steps.")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="Examples per step (tasks mixed).")
    parser.add_argument("--lr", type=float, default=d.lr, help="Peak learning rate.")
    parser.add_argument("--balance", type=float, default=d.balance, help="Weight of the load-balancing loss.")
    parser.add_argument("--train-frames", type=int, default=d.train_frames, help="Training stills drawn.")
    parser.add_argument("--tasks", default=",".join(d.tasks), help="Comma-separated tasks the adapter serves.")
    parser.add_argument("--eval-frames", type=int, default=200, help="Held-out stills scored per task.")
    parser.add_argument("--split", default="test", help="Held-out split to score on.")
    parser.add_argument("--seed", type=int, default=d.seed, help="Initialisation and sampling seed.")
    parser.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")


def _recipe(args: argparse.Namespace, routing: str):
    from apps.moe.train import MoERecipe

    return replace(MoERecipe(), routing=routing, num_experts=args.experts, top_k=args.top_k, rank=args.rank,
                   alpha=args.alpha, steps=args.steps, batch_size=args.batch_size, lr=args.lr, balance=args.balance,
                   train_frames=args.train_frames, tasks=tuple(t for t in args.tasks.split(",") if t),
                   seed=args.seed)


def register(subparsers: argparse._SubParsersAction) -> None:
    moe = subparsers.add_parser("moe", help="Train and compare MoE-LoRA adapters (LoRA-Switch pre-gating).")
    sub = moe.add_subparsers(dest="moe_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="Train one MoE-LoRA adapter and score it on held-out frames.",
                           description="Resumable: rerunning with the same --work continues from its last state.")
    train.add_argument("--routing", default="pregated", choices=["pregated", "per_layer", "block"],
                       help="pregated (LoRA-Switch), per_layer (MoLA/MixLoRA) or block (PESC, FFN only).")
    train.add_argument("--out", required=True, help="Adapter folder to write (engine MoE-LoRA format).")
    train.add_argument("--work", default=".state/moe", help="Work directory (resumable state, result.json).")
    _recipe_args(train)
    train.set_defaults(handler=_train)
    comp = sub.add_parser("compare", help="Train one adapter per routing scheme and print the accuracy table.",
                          description="Resumable per scheme; finished schemes are read from their result.json.")
    comp.add_argument("--routings", default="pregated,per_layer,block", help="Comma-separated schemes.")
    comp.add_argument("--out", default="models/moe", help="Folder for the adapters (moe-<routing> each).")
    comp.add_argument("--work", default=".state/moe", help="Work directory (one sub-folder per scheme).")
    comp.add_argument("--json", type=Path, help="Write every result here.")
    comp.add_argument("--no-base", action="store_true", help="Skip scoring the base model.")
    _recipe_args(comp)
    comp.set_defaults(handler=_compare)
    ev = sub.add_parser("eval", help="Score saved MoE-LoRA adapters on held-out frames (HF reference forward).")
    ev.add_argument("adapters", nargs="+", help="Adapter folders (engine MoE-LoRA format).")
    ev.add_argument("--base", default="models/base", help="Base model checkpoint directory.")
    ev.add_argument("--tasks", default="detection,captioning,vqa,counting,grounding", help="Comma-separated tasks.")
    ev.add_argument("--eval-frames", type=int, default=200, help="Held-out stills scored per task.")
    ev.add_argument("--eval-seed", type=int, default=0, help="Seed of the held-out stills (another seed: new ones).")
    ev.add_argument("--split", default="test", help="Held-out split to score on.")
    ev.add_argument("--json", type=Path, help="Write the results here.")
    ev.add_argument("--threads", type=int, default=1, help="Torch CPU threads.")
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    import torch

    from apps.moe.compare import run_scheme

    torch.set_num_threads(args.threads)
    result = run_scheme(Path(args.base), _recipe(args, args.routing), Path(args.work), Path(args.out), args.split,
                        args.eval_frames)
    print(json.dumps(result["metrics"], indent=2))
    return 0


def _compare(args: argparse.Namespace) -> int:
    import torch

    from apps.moe.compare import compare, table

    torch.set_num_threads(args.threads)
    routings = [r for r in args.routings.split(",") if r]
    recipe = _recipe(args, routings[0])
    results = compare(Path(args.base), routings, recipe, Path(args.work), Path(args.out), args.split,
                      args.eval_frames, with_base=not args.no_base)
    print(table(results, recipe.tasks))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from apps.moe.compare import score_adapter, table

    torch.set_num_threads(args.threads)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    results = [score_adapter(Path(args.base), Path(folder), tasks, args.split, args.eval_frames, args.eval_seed)
               for folder in args.adapters]
    print(table(results, tasks))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
