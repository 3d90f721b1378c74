"""A real RTSP server (GStreamer) serving the synthetic clip: the ingestor reads it, survives a server restart."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from pipeline.ingest import Ingestor
from pipeline.redis_server import free_port
from pipeline.registry import StreamRegistry

from .conftest import wait_for

SERVER = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    from apps.datasets.synth import write_clip

    mp4, _ = write_clip(tmp_path_factory.mktemp("rtsp-media"), 60.0, seed=5, fps=10.0, size=160)
    return mp4


def start_server(procs, port: int, clip: Path):
    proc = procs.start([SYSTEM_PYTHON, str(SERVER), str(port), str(clip)], name="rtsp")

    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"RTSP server exited: {Path(proc.log_path).read_text()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 15, "the RTSP server to listen")
    return proc


def test_rtsp_reconnects_after_server_restart(transport, procs, long_clip, ingest_cfg):
    port = free_port()
    server = start_server(procs, port, long_clip)
    registry = StreamRegistry(transport, long_clip.parent)
    spec = registry.add({"id": "rtsp-cam", "url": f"rtsp://127.0.0.1:{port}/cam", "fps": 5})
    cfg = ingest_cfg.model_copy(update={"media_dir": long_clip.parent})
    ingestor = Ingestor(spec, transport, registry, cfg).start()
    try:
        wait_for(lambda: ingestor.health.frames_published >= 5, 20, "frames over RTSP")
        assert ingestor.health.state == "running" and ingestor.health.reconnects == 0
        frame = transport.latest_frame("rtsp-cam")
        assert (frame.width, frame.height) == (160, 160) and transport.frame_jpeg(frame)

        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        wait_for(lambda: ingestor.health.state != "running", 15, "the ingestor to notice the server is gone")
        before = ingestor.health.frames_published
        assert transport.health_get("rtsp-cam").last_error

        restarted = time.monotonic()
        start_server(procs, port, long_clip)
        wait_for(lambda: ingestor.health.frames_published >= before + 3, 10, "frames after the server restart")
        resumed_s = time.monotonic() - restarted
        health = transport.health_get("rtsp-cam")
        assert health.state == "running" and health.reconnects >= 1 and health.last_error is None
        assert registry.error("rtsp-cam") is None
        assert resumed_s < 10
    finally:
        ingestor.stop()
