"""The `valora` command line: one sub-command per job; each module registers its own and imports lazily."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

logger = logging.getLogger(__name__)

# Modules that each expose `register(subparsers)`; their heavy imports happen inside the handlers.
COMMAND_MODULES = [
    "pipeline.commands",
    "pipeline.stream_commands",
    "apps.cli",
    "apps.model.cli",
    "apps.moe.cli",
    "kernels.cli",
    "ui.commands",
]


class CommandError(Exception):
    """An expected failure (bad input, missing file, unreachable service); printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valora",
        description="Edge video analytics on one multimodal model with many LoRA adapters.",
    )
    parser.add_argument("--config", metavar="YAML", help="Settings file; environment (VALORA_*) and flags win.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def expected_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or an unreachable service, not a bug."""
    errors: list[type[BaseException]] = [CommandError, ValueError, FileNotFoundError, ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        errors += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:
        pass
    from pipeline.redis_server import RedisServerError

    errors.append(RedisServerError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except expected_errors() as exc:
        print(f"valora {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
