"""Shared fixtures: a real redis-server for the session, a tiny Qwen2.5-VL checkpoint with adapters, CUDA gating."""

from __future__ import annotations

import os
import time

import torch

# Without a CUDA GPU every Triton kernel runs under the CPU interpreter. This must be set before any test
# package imports a kernel module, or that module is built for a GPU and fails when the interpreter calls it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import redis  # noqa: E402

from pipeline.redis_server import RedisServer

TOKENIZER_CORPUS = [
    "a red car and a blue bus on the road",
    "how many cars are there? 3",
    "the leftmost person is green",
    "car 12 40 50 80; bus 1 2 3 4",
    "what color is the truck? yellow",
] * 20

# Adapters of the tiny checkpoint: name -> (rank, alpha, rslora, seed).
TINY_ADAPTERS = {"ad8": (8, 16, False, 1), "ad4": (4, 4, False, 2), "ad16": (16, 8, True, 3)}


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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Qwen2.5-VL checkpoint (models/base layout) with three PEFT adapters of mixed ranks.

    Returns the root: ``root/base`` is the checkpoint, ``root/adapters/<name>`` the adapters.
    """
    from apps.model import tiny

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny.train_tokenizer(TOKENIZER_CORPUS, vocab_size=320)
    model = tiny.build_model("test", tokenizer, seed=0)
    tiny.save_checkpoint(root / "base", model, tokenizer, tiny.image_processor("test"))
    for name, (rank, alpha, rslora, seed) in TINY_ADAPTERS.items():
        tiny.save_random_adapter(model, root / "adapters" / name, rank, alpha, seed=seed, use_rslora=rslora)
    return root


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
