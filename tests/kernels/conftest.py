"""Kernel tests: without a CUDA GPU, Triton runs under its CPU interpreter (set before any kernel module is built)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py sets this before any kernel module is imported; kept for runs rooted in this folder.
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted():
    """Skip unless Triton runs under the CPU interpreter (the fp16/fp32 CPU sweep)."""
    if not INTERPRETED:
        pytest.skip("CPU sweep runs under TRITON_INTERPRET=1 (this machine has a GPU: run -m gpu)")
