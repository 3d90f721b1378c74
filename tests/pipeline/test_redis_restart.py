"""Redis killed and restarted under a running pipeline: ingest, engine service and workers all resume."""

from __future__ import annotations

import time

from engine.base import create_engine
from pipeline.config import ServiceConfig
from pipeline.engine_client import ServiceClient
from pipeline.engine_service import EngineService, wait_for_engines
from pipeline.ingest import Ingestor
from pipeline.redis_server import RedisServer
from pipeline.registry import StreamRegistry
from pipeline.transport import Transport
from pipeline.worker import WorkerPool

from .conftest import wait_for


def test_pipeline_resumes_after_redis_restart(tmp_path, clip, ingest_cfg, worker_cfg, engine_config, threads):
    server = RedisServer(tmp_path / "redis", persist=True).start()
    transport = Transport.connect(server.url)
    client = pool = ingestor = None
    try:
        registry = StreamRegistry(transport, clip.parent)
        spec = registry.add({"id": "cam", "url": str(clip), "fps": 2, "loop": True,
                             "tasks": {"counting": {"fps": 1, "params": {"max_tokens": 2}}}})
        threads.run(EngineService(transport, create_engine(engine_config), ServiceConfig(), "engine").run)
        wait_for_engines(transport, 1, timeout_s=30)
        client = ServiceClient(transport)
        pool = WorkerPool(["counting"], transport, registry, client,
                          worker_cfg.model_copy(update={"request_timeout_s": 5.0}), worker_id="w").start()
        for worker in pool.workers:
            worker.prepare()
        ingestor = Ingestor(spec, transport, registry, ingest_cfg).start()
        wait_for(lambda: transport.results_length("cam") >= 2, 60, "results before the restart")

        server.kill()
        time.sleep(1.0)
        server = RedisServer(tmp_path / "redis", port=server.port, persist=True).start()
        restarted_at = time.time()
        assert registry.get("cam").loop  # the registry survived on disk

        def resumed() -> bool:
            results = [r for _, r in transport.results("cam", count=50)]
            return sum(r.frame_ts > restarted_at for r in results) >= 2
        wait_for(resumed, 60, "results of frames published after the restart")
        health = transport.health_get("cam")
        assert health.state == "running" and health.last_frame_at > restarted_at
        assert all(r.ok for r in transport.all_results("cam"))
    finally:
        if ingestor is not None:
            ingestor.stop()
        if pool is not None:
            pool.stop()
        threads.stop()
        if client is not None:
            client.close()
        transport.close()
        server.stop()
