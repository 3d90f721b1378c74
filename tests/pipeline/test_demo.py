"""`valora demo` end to end on a short synthetic clip with the tiny checkpoint, and its one-line failures."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import REPO, engine_env

TASKS = ["detection", "captioning", "vqa", "counting", "grounding"]


def demo(args: list[str], env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)


def test_demo_end_to_end(tmp_path, engine_config):
    # A short context caps the random tiny model's decode length (it never emits EOS) to keep the test quick.
    env = engine_env(engine_config, "", VALORA_REDIS__STATE_DIR=str(tmp_path / "state"),
                     VALORA_ENGINE__MAX_MODEL_LEN="128")
    env.pop("REDIS_URL")  # the demo starts its own embedded Redis
    report = tmp_path / "out.json"
    proc = demo(["--seconds", "1.5", "--fps", "1", "--report", str(report)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert list(data["tasks"]) == TASKS and data["frames"] == 2 and data["backend"] == "hf"
    for name, row in data["tasks"].items():
        assert row["results"] == 2 and row["requests"] >= 2 and row["errors"] == 0, (name, row)
        assert row["p95_ms"] >= row["p50_ms"] > 0
        assert row["accuracy"] is not None and 0 <= row["accuracy"] <= 100
    table = proc.stdout.splitlines()
    assert [line.split()[0] for line in table[2:]] == TASKS


def test_demo_missing_video_is_one_line(tmp_path, engine_config):
    env = engine_env(engine_config, "", VALORA_REDIS__STATE_DIR=str(tmp_path / "state"))
    env.pop("REDIS_URL")
    proc = demo(["--video", "missing.mp4"], env, timeout_s=60)
    assert proc.returncode == 1
    assert proc.stderr == "valora demo: error: video not found: missing.mp4\n"


def test_demo_unreachable_redis_is_one_line(tmp_path, engine_config, clip):
    env = engine_env(engine_config, "redis://127.0.0.1:1/0", VALORA_REDIS__STATE_DIR=str(tmp_path / "state"))
    proc = demo(["--video", str(clip)], env, timeout_s=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("valora demo: error: cannot reach Redis at redis://127.0.0.1:1/0")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
