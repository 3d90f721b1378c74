"""Sub-commands of the model package: `valora model pretrain`, `valora adapters train|generate`, `valora eval`."""

from __future__ import annotations

import argparse
import logging
import time

logger = logging.getLogger(__name__)


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2,
                        help="Torch CPU threads (1 is faster on a machine other jobs keep busy).")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_model(subparsers)


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
    _common(pre)
    pre.set_defaults(handler=_pretrain)


def _pretrain(args: argparse.Namespace) -> int:
    from apps.model.pretrain import pretrain
    from apps.model.recipes import PretrainConfig

    _threads(args)
    cfg = PretrainConfig(preset=args.preset, vocab_size=args.vocab_size, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, save_every=args.save_every, seed=args.seed)
    start = time.time()
    out = pretrain(args.out, args.work, cfg)
    print(f"wrote the base model to {out} in {time.time() - start:.0f} s")
    return 0
