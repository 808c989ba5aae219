"""`tent-async bench ucx` runs end to end: raw ucxx and the engine each complete on both rails.

A smoke test of the benchmark's machinery (it once hung whenever a raw receive was cancelled
while the client's next message was already on its way); the figures themselves belong in
docs/benchmarks.md, never in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import requires_ucxx

pytestmark = [pytest.mark.ucx, requires_ucxx]


def test_the_loopback_benchmark_completes_raw_and_engine_runs_on_both_rails() -> None:
    cmd = [sys.executable, "-m", "tent_async.cli", "bench", "ucx"]
    cmd += ["--iters", "1", "--lat-iters", "5", "--repeat", "1", "--limit", "90"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "left out" not in out.stdout, out.stdout
    rows = {r["rail"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"tcp", "shm"}, out.stdout
    for row in rows.values():
        for key in ("raw_GBps", "engine_write_GBps", "engine_read_GBps", "raw_rtt_us", "engine_write_us"):
            assert row[key] > 0, row
