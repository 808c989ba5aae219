"""The serving examples, small: two processes over the ucx backend on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import requires_ucxx

EXAMPLES = Path(__file__).parents[2] / "examples"
# The suite runs on a shared 2-core machine: a thread hop there can take longer than the
# default 20 ms deadline floor, and a single shm rail taken for failing fails the transfer.
LOADED = ["--deadline-floor", "1s"]


@requires_ucxx
def test_pd_disagg_delivers_each_requests_kv_to_its_pages() -> None:
    """Decode checks, when the notification arrives, that every block landed byte-exact in its pages."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pd_disagg.py"), "--model", "tiny", "--requests", "3",
         "--min-tokens", "64", "--max-tokens", "256", "--json", *LOADED],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["request"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["exact"] is True
        pages = r["tokens"] // 16
        assert r["blocks"] == 2 * 4 * pages  # K and V of 4 layers, one block per page each
        assert r["kv_bytes"] == r["blocks"] * 4096
        assert r["ttft_s"] > r["transfer_s"] > 0


@requires_ucxx
def test_weight_update_leaves_every_worker_with_the_trainers_weights() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "weight_update.py"), "--workers", "2", "--layers", "1", "--hidden", "256",
         "--vocab", "1024", "--bucket", "512KiB", "--steps", "2", "--json", *LOADED],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    r = json.loads(out.strip().splitlines()[-1])
    assert r["equal"] == [True, True]  # compared tensor by tensor by each worker, after the second update
    assert r["buckets"] > 1
    assert len(r["per_worker_s"]) == 2
    assert r["update_s"] == max(r["per_worker_s"])


@requires_ucxx
def test_hicache_loads_every_prefix_byte_exact_under_offload() -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "hicache.py"), "--servers", "2", "--requests", "4", "--concurrency", "2",
         "--prefix-pages", "8", "--json", *LOADED],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["index"] for r in rows) == [0, 1]
    for r in rows:
        assert r["exact"] == [True] * 4  # each load compared with the prefix's content in the serving process
        assert len(r["latencies"]) == 4
