"""Kernel tests: without a CUDA GPU, Triton runs under its CPU interpreter (set before any kernel module is built)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # A kernel module imported earlier in this session (by another test package) was built for a GPU: rebuild it.
    for name in ("kernels.switch", "kernels.routed", "kernels.swift_merge", "kernels.atmm"):
        sys.modules.pop(name, None)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted():
    """Skip unless Triton runs under the CPU interpreter (the fp16/fp32 CPU sweep)."""
    if not INTERPRETED:
        pytest.skip("CPU sweep runs under TRITON_INTERPRET=1 (this machine has a GPU: run -m gpu)")
