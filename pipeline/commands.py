"""Sub-commands of the pipeline package: demo, redis."""

from __future__ import annotations

import argparse
import contextlib


def register(subparsers: argparse._SubParsersAction) -> None:
    redis_cmd = subparsers.add_parser("redis", help="Run the embedded Redis in the foreground.")
    redis_cmd.add_argument("--port", type=int, default=6379, help="Port to listen on (127.0.0.1).")
    redis_cmd.set_defaults(handler=_redis)


def _redis(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pipeline.config import load_settings
    from pipeline.redis_server import RedisServer

    settings = load_settings(args.config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with RedisServer(settings.redis.state_dir / "redis", port=args.port) as server:
        print(f"redis listening at {server.url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0
