"""`valora ui`: run the Streamlit dashboard; `valora ui hash-password`: make the hash its sign-in checks."""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
PACKAGE_ROOT = APP.parents[1]  # the folder holding the ui package, for the streamlit child's imports

# Streamlit settings for a server on an edge box: no telemetry, no file watching, no browser to open.
STREAMLIT_FLAGS = [
    "--server.headless", "true",
    "--browser.gatherUsageStats", "false",
    "--server.fileWatcherType", "none",
    "--server.runOnSave", "false",
    "--global.developmentMode", "false",
    "--client.toolbarMode", "minimal",
    "--client.showErrorDetails", "false",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    ui = subparsers.add_parser("ui", help="Run the operator dashboard (Streamlit); needs ui.password_hash.")
    ui.add_argument("--host", default="127.0.0.1", help="Address to bind (0.0.0.0 for every interface).")
    ui.add_argument("--port", dest="cfg:ui.port", type=int, default=argparse.SUPPRESS, metavar="PORT",
                    help="Port to listen on (default: ui.port, 8501).")
    ui.add_argument("--one-time-password", action="store_true",
                    help="Sign in with a random password made for this run and printed here (ignores "
                         "ui.password_hash); `valora demo --ui` uses it when no hash is configured.")
    ui.set_defaults(handler=_serve)
    actions = ui.add_subparsers(dest="ui_command", metavar="ACTION")
    hashing = actions.add_parser(
        "hash-password", help="Print the scrypt hash of a password, for VALORA_UI__PASSWORD_HASH / ui.password_hash.")
    hashing.add_argument("--stdin", action="store_true",
                         help="Read the password from the first line of standard input instead of prompting twice.")
    hashing.set_defaults(handler=_hash_password)


def streamlit_command(host: str, port: int, config: str | None) -> list[str]:
    """The `streamlit run` command line of the dashboard app."""
    command = [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", host,
               "--server.port", str(port), *STREAMLIT_FLAGS]
    if config:
        command += ["--", "--config", str(Path(config).resolve())]
    return command


def _serve(args: argparse.Namespace) -> int:
    from pipeline.commands import DEFAULT_REDIS_URL, connect, settings_from
    from ui.auth import NO_PASSWORD, PasswordHash, hash_password

    settings = settings_from(args)
    connect(settings).close()  # fail now, with one clear line, when Redis is not there
    env = dict(os.environ, REDIS_URL=settings.redis.url or DEFAULT_REDIS_URL, VALORA_UI__PORT=str(settings.ui.port))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    note = ""
    if args.one_time_password:
        password = secrets.token_urlsafe(9)
        env["VALORA_UI__PASSWORD_HASH"] = hash_password(password)
        note = f" (one-time password: {password})"
    elif not settings.ui.password_hash:
        raise ValueError(NO_PASSWORD)
    else:
        PasswordHash.parse(settings.ui.password_hash)
    command = streamlit_command(args.host, settings.ui.port, args.config)
    print(f"dashboard on http://{args.host}:{settings.ui.port}{note}", flush=True)
    sys.stdout.flush()
    os.execve(command[0], command, env)  # streamlit takes over this process, so signals reach it directly
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    from ui.auth import hash_password

    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Dashboard password: ")
        if getpass.getpass("Again: ") != password:
            raise ValueError("the two passwords differ")
    print(hash_password(password))
    return 0
