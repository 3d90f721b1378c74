"""Shared fixtures: a real redis-server on a free port for the whole session, and CUDA gating."""

from __future__ import annotations

import pytest
import redis
import torch

from pipeline.redis_server import RedisServer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server process for the test session."""
    with RedisServer(tmp_path_factory.mktemp("redis"), persist=False) as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL, with the database emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url
