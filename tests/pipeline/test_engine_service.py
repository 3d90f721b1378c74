"""`valora engine serve` replicas on one Redis: every request answered exactly once, none lost to a crash."""

from __future__ import annotations

import io
import os
import signal
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from engine.base import create_engine
from engine.request import EngineRequest, EngineResult, ImageRef, SamplingParams
from pipeline.engine_client import ServiceClient
from pipeline.engine_service import wait_for_engines
from pipeline.transport import Keys

from .conftest import engine_env, wait_for


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def replies_per_request(transport, client: ServiceClient) -> Counter:
    """How many replies each request id got on the client's reply stream."""
    entries = transport.client.xrange(Keys.replies(client.client_id))
    return Counter(EngineResult.model_validate_json(fields[b"json"]).request_id for _, fields in entries)


def start_replica(procs, cfg, redis_url, engine_id: str, **env):
    extra = {"VALORA_ENGINE__ENGINE_ID": engine_id, "VALORA_ENGINE__MAX_NUM_SEQS": "1",
             "VALORA_SERVICE__CLAIM_IDLE_MS": "1500", **env}
    return procs.valora(["engine", "serve"], engine_env(cfg, redis_url, **extra), name=engine_id)


@pytest.fixture(params=["hf", "valora"])
def served(request, engine_config):
    """(config, extra env) of the replicas: the `hf` backend, and ours with policy `slora` (overlapped decode)."""
    if request.param == "hf":
        return engine_config, {}
    return engine_config.model_copy(update={"backend": "valora", "policy": "slora"}), {"VALORA_ENGINE__POLICY": "slora"}


@pytest.fixture
def client(transport):
    c = ServiceClient(transport)
    yield c
    c.close()


def long_request() -> EngineRequest:
    # About 100 decode steps of the tiny model: long enough to kill a replica in the middle of it.
    return EngineRequest(prompt="count the cars", adapter="counting", sampling=SamplingParams(max_tokens=100))


def test_two_replicas_share_the_load_and_answer_once(transport, procs, served, redis_url, client):
    engine_config, env = served
    replicas = {name: start_replica(procs, engine_config, redis_url, name, **env) for name in ("r1", "r2")}
    wait_for_engines(transport, 2, timeout_s=90)

    requests = [EngineRequest(prompt=f"what color is car {i}?", adapter=["vqa", "counting", None][i % 3],
                              images=[ImageRef(id=f"img{i}", jpeg=jpeg(i))] if i % 2 else [],
                              sampling=SamplingParams(max_tokens=4)) for i in range(10)]
    results = [f.result(timeout=120) for f in [client.submit(r) for r in requests]]
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert {r.engine_id for r in results} == {"r1", "r2"}

    # The service returns what the engine computes: same greedy text as an in-process engine.
    reference = create_engine(engine_config).generate(requests)
    assert [r.text for r in results] == [r.text for r in reference]

    # A replica killed mid-request: the other one takes it over once it has been idle for claim_idle_ms.
    future = client.submit(long_request())
    holder = wait_for(lambda: transport.pending_requests(), 30, "a replica to take the long request")[0]["consumer"]
    survivor = "r2" if holder == "r1" else "r1"
    os.killpg(replicas[holder].pid, signal.SIGKILL)
    replicas[holder].wait()
    assert not future.done()
    result = future.result(timeout=120)
    assert result.ok and result.engine_id == survivor and result.output_tokens > 0

    counts = replies_per_request(transport, client)
    assert len(counts) == 11 and set(counts.values()) == {1}
    assert transport.pending_requests() == [] and transport.client.xlen(Keys.ENGINE_REQUESTS) == 0


def test_killed_replica_answers_after_restart(transport, procs, served, redis_url, client):
    engine_config, env = served
    replica = start_replica(procs, engine_config, redis_url, "solo", VALORA_SERVICE__CLAIM_IDLE_MS="600000", **env)
    wait_for_engines(transport, 1, timeout_s=90)
    future = client.submit(long_request())
    wait_for(lambda: transport.pending_requests(), 30, "the replica to accept the request")
    os.killpg(replica.pid, signal.SIGKILL)
    replica.wait()
    (pending,) = transport.pending_requests()
    assert pending["consumer"] == "solo" and not future.done()

    start_replica(procs, engine_config, redis_url, "solo", VALORA_SERVICE__CLAIM_IDLE_MS="600000", **env)
    result = future.result(timeout=120)
    assert result.ok and result.engine_id == "solo" and result.output_tokens > 0
    assert set(replies_per_request(transport, client).values()) == {1}
    assert transport.pending_requests() == []
