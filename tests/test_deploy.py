"""Deployment files: every docker-compose service runs a real `valora` sub-command with valid arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def compose_services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_compose_has_the_edge_box_services():
    services = compose_services()
    assert {"redis", "engine", "ingest", "workers", "ui"} <= set(services)
    assert services["redis"]["healthcheck"]["test"]
    gpu = services["engine"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["ui"]["ports"] == ["8501:8501"]
    for name, svc in services.items():
        assert svc.get("restart"), f"service {name} has no restart policy"


@pytest.mark.parametrize("name", [n for n, s in compose_services().items() if n != "redis"])
def test_service_command_is_a_valora_subcommand(name):
    service = compose_services()[name]
    # ${VAR:-default} is substituted by compose; parse with the default.
    argv = [re.sub(r"\$\{[^:}]+:-([^}]*)\}", r"\1", arg) for arg in service["command"]]
    args = build_parser().parse_args(argv)
    assert callable(args.handler)
    assert service["environment"]["REDIS_URL"].startswith("redis://redis:")


def test_engine_keeps_its_compiled_kernels_in_a_volume():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    engine = compose["services"]["engine"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in engine["volumes"]}
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        path = engine["environment"][var]
        mount = next(m for m in mounts if path.startswith(m + "/"))
        assert mounts[mount] in compose["volumes"], f"{var} is not on a named volume"


def test_dockerfile_runs_valora():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["valora"]' in text
    for package in ("kernels", "engine", "apps", "pipeline", "ui"):
        assert f"COPY {package} {package}" in text
