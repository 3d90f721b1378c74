"""`valora kernels ...`: the kernel sub-commands (tune the tile table of this GPU, show a lookup)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `kernels` command and its sub-commands to the `valora` parser."""
    parser = subparsers.add_parser("kernels", help="GPU kernels: tune tile tables, inspect lookups.",
                                   description="Multi-LoRA kernels (ATMM, swift merge, LoRA-Switch).")
    sub = parser.add_subparsers(dest="kernels_command", metavar="SUBCOMMAND", required=True)

    tune = sub.add_parser("tune", help="Profile tile configs on this GPU and write kernels/configs/<device>.json.",
                          description="Profile ATMM shrink/expand and merge tiles over a grid of batch shapes "
                                      "(7B projection dims x tokens x segments x max rank) on the current GPU.")
    tune.add_argument("--quick", action="store_true", help="Profile a small corner grid instead of the full one.")
    tune.add_argument("--out", type=Path, default=None, help="Table path (default: kernels/configs/<device>.json).")
    tune.add_argument("--budget-s", type=float, default=None,
                      help="Stop profiling new shapes after this many seconds (the rest use the nearest shape).")
    tune.add_argument("--merge-only", action="store_true",
                      help="Keep the table's ATMM entries; profile only the swift-merge tiles.")
    tune.add_argument("--routed", action="store_true",
                      help="Keep the table's ATMM and merge entries; profile the routed (MoE-LoRA) operator's tiles.")
    tune.add_argument("--trace", type=Path, default=None, help="Also write every candidate's time to this JSON.")
    tune.set_defaults(handler=_tune)

    show = sub.add_parser("show", help="Print the tile config the table picks for one batch shape.")
    show.add_argument("--segments", type=int, required=True)
    show.add_argument("--tokens", type=int, required=True)
    show.add_argument("--in-dim", type=int, required=True)
    show.add_argument("--out-dim", type=int, required=True)
    show.add_argument("--max-rank", type=int, required=True)
    show.add_argument("--device", default=None, help="Table slug, e.g. nvidia_h200 (default: this GPU's).")
    show.add_argument("--routed", action="store_true",
                      help="The routed operator's pick (segments = experts, tokens = rows x top-k).")
    show.set_defaults(handler=_show)


def _tune(args: argparse.Namespace) -> int:
    from kernels.tuning import default_grid, routed_grid, tune

    grid = routed_grid(quick=args.quick) if args.routed else default_grid(quick=args.quick)
    path = tune(grid, out_path=args.out, budget_s=args.budget_s, trace_path=args.trace,
                merge_only=args.merge_only, routed_only=args.routed)
    print(f"wrote {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from kernels.tile_config import ShapeKey, device_table

    table = device_table(args.device)
    key = ShapeKey(args.segments, args.tokens, args.in_dim, args.out_dim, args.max_rank)
    config, source = table.lookup_routed(key) if args.routed else table.lookup(key)
    print(f"{table.device} {key}: {source}\n  shrink {config.shrink}\n  expand {config.expand}")
    return 0
