"""The orchestrator's state leaves the engine: EngineHealth in Redis and the Prometheus series."""

from __future__ import annotations

import urllib.request

from engine.base import create_engine
from engine.request import EngineRequest, SamplingParams
from pipeline.engine_client import ServiceClient
from pipeline.engine_service import EngineService
from pipeline.metrics import METRICS, start_exporter
from pipeline.redis_server import free_port
from pipeline.schema import EngineHealth

from .conftest import wait_for


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_engine_service_publishes_mode_merged_adapter_and_switches(transport, engine_config, service_cfg, threads):
    cfg = engine_config.model_copy(update={"backend": "valora", "policy": "merged-only", "engine_id": "orch"})
    engine = create_engine(cfg)
    threads.run(EngineService(transport, engine, service_cfg).run)
    client = ServiceClient(transport)
    try:
        requests = [EngineRequest(prompt=f"count the cars {i}", adapter=("vqa", "counting")[i % 2],
                                  sampling=SamplingParams(max_tokens=3)) for i in range(4)]
        assert all(f.result(timeout=120).ok for f in [client.submit(r) for r in requests])
    finally:
        client.close()
    health = wait_for(lambda: [h for h in transport.engine_health_all()
                               if h.engine_id == "orch" and h.mode_switches >= 2], 30, "a health refresh")[0]
    assert health.mode == "merged" and health.merged_adapter in ("vqa", "counting")
    assert health.switch_ms_total > 0 and health.detail["policy"] == "merged-only"
    port = free_port()
    start_exporter(port)
    text = scrape(port)
    assert 'valora_engine_mode{engine="orch",mode="merged"} 1.0' in text
    assert f'valora_engine_merged_adapter{{adapter="{health.merged_adapter}",engine="orch"}} 1.0' in text
    assert 'valora_engine_mode_switches_total{engine="orch"}' in text
    assert health.detail["decisions"] and set(health.detail["decisions"]) <= {"merged", "merged+held"}
    assert 'valora_engine_mode_decisions_total{decision="merged' in text
    engine.close()


def test_prometheus_switch_counters_follow_health():
    port = free_port()
    start_exporter(port)
    states = [("mixture", "ad8", 1, 30.0), ("merged", "ad4", 3, 90.0), ("unmerged", None, 4, 120.0)]
    for mode, merged, switches, ms in states:
        METRICS.observe_engine(EngineHealth(engine_id="e1", ready=True, mode=mode, merged_adapter=merged,
                                            mode_switches=switches, switch_ms_total=ms))
        text = scrape(port)
        assert f'valora_engine_mode{{engine="e1",mode="{mode}"}} 1.0' in text
        assert f'valora_engine_mode_switches_total{{engine="e1"}} {float(switches)}' in text
        assert f'valora_engine_switch_seconds_total{{engine="e1"}} {ms / 1000.0}' in text
    assert 'valora_engine_merged_adapter{adapter="ad8",engine="e1"}' not in text, "an unmerged adapter's series stays"
    assert 'valora_engine_merged_adapter{adapter="ad4",engine="e1"}' not in text
    METRICS.observe_engine(EngineHealth(engine_id="e1", ready=True, mode="unmerged", mode_switches=1))  # restarted
    METRICS.observe_engine(EngineHealth(engine_id="e1", ready=True, mode="merged", merged_adapter="ad4",
                                        mode_switches=2, switch_ms_total=10.0))
    assert 'valora_engine_mode_switches_total{engine="e1"} 5.0' in scrape(port)


def test_prometheus_decision_counters_follow_health():
    port = free_port()
    start_exporter(port)
    for decided, total in (({"merged": 3}, {"merged": 3.0}), ({"merged": 5, "mixture+held": 2},
                                                              {"merged": 5.0, "mixture+held": 2.0}),
                           ({"merged": 1}, {"merged": 6.0, "mixture+held": 2.0})):  # the last: a restarted replica
        METRICS.observe_engine(EngineHealth(engine_id="d1", ready=True, mode="merged", detail={"decisions": decided}))
        text = scrape(port)
        for decision, value in total.items():
            assert f'valora_engine_mode_decisions_total{{decision="{decision}",engine="d1"}} {value}' in text
