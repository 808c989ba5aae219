"""``tent-async bench serving``: small versions of its workloads, checked against their physical limits.

No test asserts a speed-up: figures are what the benchmark is for.  These check that each
workload finishes, is deterministic, never beats its physical floor, and that the static
baseline behaves as modelled (a GPU's bytes on its own NIC).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tent_async.bench.serving import (
    KV_PER_TOKEN,
    NIC,
    NICS,
    percentile,
    prefill_time,
    run_hicache,
    run_micro,
    run_pd,
    run_weights,
    tier,
)

MiB = 1 << 20


def test_workload_arithmetic() -> None:
    assert KV_PER_TOKEN == 131_072  # Llama-3-8B: 2 x 32 layers x 8 heads x 128 x 2 bytes
    kv_4k = 4096 * KV_PER_TOKEN
    assert kv_4k == 512 * MiB  # a 4K prompt's KV, as issue 12 states
    assert 0.12 < prefill_time(4096) < 0.16
    assert [tier(1, n) for n in range(8)] == [1, 0, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("policy", ["eft", "static", "round_robin"])
def test_pd_never_beats_its_floor_and_replays(policy: str) -> None:
    rate = 0.7 * NICS / prefill_time(4608)
    a = run_pd(policy, "slow", rate, 10, 3, 4 * MiB)
    b = run_pd(policy, "slow", rate, 10, 3, 4 * MiB)
    assert a == b
    assert len(a["ttft"]) == 10
    assert min(a["ttft"]) >= min(a["floors"]) * 0.999
    assert percentile(a["ttft"], 50) >= percentile(a["floors"], 50) * 0.999


def test_hicache_completes_every_request_above_its_floor() -> None:
    for policy in ("eft", "static"):
        r = run_hicache(policy, "bursty", 60.0, 12, 2, 4 * MiB)
        assert len(r["ttft"]) == 12
        assert sorted(r["ttft"])[0] >= sorted(r["floors"])[0] * 0.999


def test_static_weight_update_on_an_idle_aligned_fabric_is_at_the_floor() -> None:
    """Each trainer rank on its own NIC and rail plane: nothing is shared, so static meets the floor."""
    model = 256 * MiB
    r = run_weights("static", "idle", 16, 1, 4 * MiB, model)
    floor = 2 * model / (NICS * NIC)
    assert floor <= r["update"] < 1.05 * floor + 1e-4


def test_a_slow_trainer_nic_holds_static_back() -> None:
    model = 256 * MiB
    idle = run_weights("static", "idle", 8, 1, 4 * MiB, model)["update"]
    slow = run_weights("static", "slow", 8, 1, 4 * MiB, model)["update"]
    assert slow > 1.8 * idle  # rank 3 sends its whole shard through its half-speed NIC


def test_micro_throughput_within_the_available_capacity() -> None:
    for policy in ("eft", "static"):
        r = run_micro(policy, "bursty", 0.0005, 1, 64 * 1024, concurrency=8)
        assert r["bytes"] > 0 and r["lat"]
        assert r["bytes"] / r["time"] <= r["capacity"] * 1.001


def test_cli_smoke() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tent_async.cli",
            "bench",
            "serving",
            "--smoke",
            "--only",
            "weights",
            "--settings",
            "slow",
            "--policies",
            "eft,static",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert '"workload": "weights"' in out
    assert "weight update: best eft/static" in out
    assert "1.0 GiB model" in out
