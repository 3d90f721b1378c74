"""Every ATMM variant a 7B server precompiles with the shipped H200 table, and the fused decode linear's variants
for the 7B's groups, compile for sm_90 (Triton's bundled
ptxas, no GPU) and fits the H200's shared memory per block: GPU-only code paths checked on every CI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

H200_SHARED_BYTES = 232448  # 227 KiB: the most shared memory one block may opt in to on an H200 (sm_90)


def test_h200_variants_compile_and_fit_shared_memory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    kernels = {row["kernel"] for row in rows}
    assert {"shrink", "expand", "shrink+pdl", "expand+pdl", "linear"} <= kernels
    assert any(row["meta"].get("ROUTED") for row in rows) and any(not row["meta"].get("ROUTED") for row in rows)
    assert any(row["kernel"] == "linear" and row["meta"].get("USE_PDL") for row in rows)
    failed = [row for row in rows if "error" in row]
    assert not failed, failed[:3]
    too_big = [row for row in rows if row["shared"] > H200_SHARED_BYTES]
    assert not too_big, too_big[:3]
