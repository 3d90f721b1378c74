"""`valora ui` and `valora ui hash-password`: a served dashboard, and one clear line for each refusal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline.redis_server import free_port
from ui.auth import verify_password

from .conftest import PASSWORD_HASH, REPO


def valora_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALORA_")}
    env.update({"REDIS_URL": redis_url, "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


def valora(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_hash_password_prints_a_hash_of_the_password(redis_url):
    proc = valora(["ui", "hash-password", "--stdin"], valora_env(redis_url), stdin="open sesame\n")
    assert proc.returncode == 0, proc.stderr
    stored = proc.stdout.strip()
    assert stored.startswith("scrypt:16384:8:1:") and verify_password("open sesame", stored)
    assert not verify_password("open sesame\n", stored)


def test_hash_password_refuses_an_empty_password(redis_url):
    proc = valora(["ui", "hash-password", "--stdin"], valora_env(redis_url), stdin="\n")
    assert (proc.returncode, proc.stderr) == (1, "valora ui: error: the password is empty\n")


@pytest.mark.parametrize(("extra", "message"), [
    ({}, "No dashboard password is configured. Make a hash with `valora ui hash-password`"),
    ({"VALORA_UI__PASSWORD_HASH": "hunter2"}, "the password hash is not of the form scrypt:N:r:p:salt:key"),
    ({"VALORA_UI__PASSWORD_HASH": PASSWORD_HASH, "REDIS_URL": "redis://127.0.0.1:1/0"},
     "cannot reach Redis at redis://127.0.0.1:1/0"),
])
def test_refusals_are_one_line(redis_url, extra, message):
    proc = valora(["ui", "--port", str(free_port())], valora_env(redis_url, **extra))
    assert proc.returncode == 1
    assert proc.stderr.startswith("valora ui: error: ") and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status, reply.read().decode(errors="replace")


def test_valora_ui_serves_the_dashboard(redis_url, tmp_path):
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port),
                                 "--one-time-password"], env=valora_env(redis_url), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, body = get(f"http://127.0.0.1:{port}/_stcore/health")
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the dashboard did not answer within 90 s"
                time.sleep(0.5)
        assert (status, body) == (200, "ok")
        status, page = get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "<title>Streamlit</title>" in page
        first = log.read_text().splitlines()[0]
        assert re.fullmatch(rf"dashboard on http://127\.0\.0\.1:{port} \(one-time password: [\w-]{{12}}\)", first)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
