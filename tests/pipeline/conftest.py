"""Pipeline fixtures: transports on the real test Redis, synthetic clips, a tiny engine, and subprocess cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pipeline.config import IngestConfig, ServiceConfig, WorkerConfig
from pipeline.transport import Transport
from tests.conftest import wait_for  # noqa: F401  (the pipeline tests import it from here)

REPO = Path(__file__).resolve().parents[2]
TASK_ADAPTERS = {"detection": "ad8", "captioning": "ad4", "vqa": "ad16", "counting": "ad8", "grounding": "ad4"}


@pytest.fixture
def transport(redis_url):
    t = Transport.connect(redis_url)
    yield t
    t.close()


@pytest.fixture(scope="session")
def clip(tmp_path_factory):
    """A 3 s synthetic traffic clip (10 fps, 224x224) with its JSONL ground truth, inside its own media dir."""
    from apps.datasets.synth import write_clip

    mp4, _ = write_clip(tmp_path_factory.mktemp("media"), 3.0, seed=3, fps=10.0)
    return mp4


@pytest.fixture(scope="session")
def engine_config(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint as an `hf` engine on CPU, with adapters named after the five tasks."""
    adapters = tmp_path_factory.mktemp("task-adapters")
    for task, source in TASK_ADAPTERS.items():
        (adapters / task).symlink_to(tiny_checkpoint / "adapters" / source, target_is_directory=True)
    return EngineConfig(backend="hf", model=str(tiny_checkpoint / "base"), adapters=str(adapters), device="cpu",
                        max_num_seqs=4)


def engine_env(cfg: EngineConfig, redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a `valora` subprocess using this engine config and Redis."""
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONPATH=str(REPO), VALORA_ENGINE__BACKEND=cfg.backend,
               VALORA_ENGINE__MODEL=cfg.model, VALORA_ENGINE__ADAPTERS=cfg.adapters, VALORA_ENGINE__DEVICE=cfg.device)
    env.pop("VALORA_REDIS__URL", None)
    env.update(extra)
    return env


@pytest.fixture
def ingest_cfg(clip) -> IngestConfig:
    return IngestConfig(media_dir=clip.parent, open_timeout_s=2.0, stall_timeout_s=3.0, reconnect_min_s=0.2,
                        reconnect_max_s=1.0)


@pytest.fixture
def worker_cfg() -> WorkerConfig:
    return WorkerConfig(block_ms=100, claim_idle_ms=1000, janitor_interval_s=0.3, request_timeout_s=60)


@pytest.fixture
def service_cfg() -> ServiceConfig:
    return ServiceConfig(claim_idle_ms=2000, health_ttl_s=5)


class Procs:
    """Subprocesses a test starts; all are killed at teardown, pass or fail."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict[str, str] | None = None, name: str = "proc") -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def valora(self, args: list[str], env: dict[str, str], name: str = "valora") -> subprocess.Popen:
        return self.start([sys.executable, "-m", "pipeline.cli", *args], env=env, name=name)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.kill_all()


class Threads:
    """Background loops (engine service, workers) stopped at teardown."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def run(self, target, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=(*args, self.stop_event), daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(30)


@pytest.fixture
def threads():
    t = Threads()
    yield t
    t.stop()
