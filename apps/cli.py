"""Sub-commands of the apps package: `valora dataset synth`."""

from __future__ import annotations

import argparse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    dataset = subparsers.add_parser("dataset", help="Make or inspect datasets.")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    synth = dataset_sub.add_parser(
        "synth",
        help="Write a synthetic traffic clip (H.264 MP4) and its JSONL ground truth.",
        description="Write DIR/traffic-SEED.mp4 and DIR/traffic-SEED.jsonl (one ground-truth line per frame).",
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="Output directory (created if missing).")
    synth.add_argument("--seconds", type=_positive_float, default=10.0, help="Clip length in seconds.")
    synth.add_argument("--seed", type=_seed, default=0, help="Scene seed; the same seed gives the same clip.")
    synth.add_argument("--fps", type=_positive_float, default=10.0, help="Frames per second.")
    synth.add_argument("--size", default="224", help="Frame size: N (square) or WxH, even numbers.")
    synth.set_defaults(handler=_synth)


def _synth(args: argparse.Namespace) -> int:
    from apps.datasets.synth import write_clip

    video, sidecar = write_clip(args.out, args.seconds, args.seed, fps=args.fps, size=args.size)
    print(f"wrote {video} and {sidecar}")
    return 0
