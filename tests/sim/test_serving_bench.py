"""``tent-async bench serving``: small versions of its workloads, checked against their physical limits.

No test asserts a speed-up: figures are what the benchmark is for.  These check that each
workload finishes, is deterministic, never beats its physical floor, and that the static
baseline behaves as modelled (a GPU's bytes on its own NIC).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tent_async.bench.serving import (
    HICACHE_CONTEXT,
    KV_PER_TOKEN,
    NIC,
    NICS,
    SETTINGS,
    TENANT_LOAD,
    TENANT_NICS,
    Fleet,
    hicache_floor,
    hicache_slo,
    hicache_split,
    nic_profiles,
    pair,
    percentile,
    prefill_time,
    run_hicache,
    run_micro,
    run_pd,
    run_weights,
    tier,
)
from tent_async.errors import ConfigError

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


def test_hicache_slo_is_derived_from_the_longest_request() -> None:
    """Twice the floor of a 16K-token context: its 85% prefix over 8 NICs, then its prefill."""
    hit, new = hicache_split(HICACHE_CONTEXT[1])
    assert (hit, new) == (13_888, 2_496)  # whole 64-token pages
    floor = hit * KV_PER_TOKEN / (NICS * NIC) + prefill_time(new, hit)
    assert hicache_floor(HICACHE_CONTEXT[1]) == floor
    assert hicache_slo() == 2 * floor
    assert 0.24 < hicache_slo() < 0.26
    assert hicache_floor(HICACHE_CONTEXT[0]) < floor


def test_static_hicache_misses_the_slo_on_the_slow_nics_gpu() -> None:
    """Static loads GPU 3's prefixes through nic3 (a quarter of its speed in ``slow``) only:
    at 90% load GPU 3's queue grows and its requests are the ones that miss the SLO, the
    others' are on time.  At a fixed rate the on-time gain is therefore bounded near 8/7; the
    highest sustained rate (goodput, ``--only goodput``) is not: there nic3 alone bounds static."""
    r = run_hicache("static", "slow", 110.0, 48, 1, 4 * MiB)
    assert len(r["gpus"]) == len(r["ttft"]) == 48
    assert sorted(r["gpus"]) == sorted(i % NICS for i in range(48))
    worst = max(range(48), key=lambda i: r["ttft"][i])
    assert r["gpus"][worst] == 3
    assert r["ttft"][worst] > hicache_slo()
    assert 0 < r["arrivals"] < r["span"]


def test_tenant_setting_takes_half_of_one_numa_nodes_nics() -> None:
    """``tenant``: nic4-nic7 (GPUs 4-7's socket) leave half their capacity to us for the whole run,
    nic0-nic3 all of it; an unknown setting is refused by name."""
    assert TENANT_NICS == (4, 5, 6, 7) and all(tier(4, n) <= 1 for n in TENANT_NICS)
    fleet = Fleet(pair("tenant", 0.02), "eft", seed=1)
    for t0, t1 in ((0.0, 1e-3), (0.0, 10.0), (3.0, 3.5)):
        got = [fleet.fabric.capacity_integral(f"nic{i}", t0, t1) / (t1 - t0) for i in range(NICS)]
        want = [NIC * (1 - TENANT_LOAD) if i in TENANT_NICS else NIC for i in range(NICS)]
        assert got == pytest.approx(want, rel=1e-9)
    assert "tenant" in SETTINGS
    with pytest.raises(ConfigError, match=r"unknown fabric setting 'busy'.*tenant"):
        nic_profiles("busy", 0.02)


def test_static_hicache_in_tenant_is_slower_on_the_tenants_socket() -> None:
    """Static loads GPU g's prefixes through nic{g} only, so in ``tenant`` GPUs 4-7 wait for
    half-speed NICs and GPUs 0-3 do not: the bound on eft's gain is their share, 8/(8-4)."""

    def socket_means(setting: str) -> list[float]:
        r = run_hicache("static", setting, 110.0, 48, 1, 4 * MiB)
        by_socket = [[t for t, g in zip(r["ttft"], r["gpus"], strict=True) if g // 4 == s] for s in (0, 1)]
        return [sum(x) / len(x) for x in by_socket]

    idle, tenant = socket_means("idle"), socket_means("tenant")
    # a mean prefix (1.14 GB) takes 23 ms on a free NIC, 46 ms on a half-taken one
    assert tenant[0] == pytest.approx(idle[0], abs=1e-3)  # socket 0's NICs are untouched
    assert tenant[1] > idle[1] + 0.015


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


def serving_cli(*args: str) -> tuple[list[dict], str]:
    """``tent-async bench serving --smoke ARGS``: its JSON lines, and its text unwrapped."""
    out = subprocess.run(
        [sys.executable, "-m", "tent_async.cli", "bench", "serving", "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout

    def no_constants(name: str) -> None:
        raise AssertionError(f"not strict JSON: {name}")

    lines = [json.loads(line, parse_constant=no_constants) for line in out.splitlines() if line.startswith("{")]
    return lines, " ".join(out.split())


def test_cli_smoke() -> None:
    _, out = serving_cli("--only", "weights", "--settings", "slow", "--policies", "eft,static")
    assert '"workload": "weights"' in out
    assert "weight update: best eft/static" in out
    assert "1.0 GiB model" in out


def test_cli_smoke_hicache_reports_on_time_at_the_slo() -> None:
    lines, text = serving_cli("--only", "hicache", "--settings", "slow", "--policies", "eft,static")
    slo = round(hicache_slo(), 4)
    assert {(x["policy"], round(x["slo"], 4)) for x in lines} == {("eft", slo), ("static", slo)}
    assert all(x["on_time_per_s"] > 0 for x in lines)
    assert "HiCache on time per second at fixed rates: best eft/static" in text
    assert "on time per second at fixed rates, eft/static, best of HiCache at " in text
    assert "goodput: not measured in this run (add goodput to --only)" in text
    assert "(2x the longest request's floor)" in text


def test_cli_smoke_says_which_slo_each_workload_used() -> None:
    """``--hicache-slo`` shows in HiCache's title, and the combined verdict names each workload's SLO."""
    lines, text = serving_cli(
        "--only", "pd,hicache", "--settings", "slow", "--policies", "eft,static", "--slo", "0.4", "--hicache-slo", "0.3"
    )
    assert {round(x["slo"], 4) for x in lines if x["workload"] == "hicache"} == {0.3}
    assert "TTFT SLO 300 ms (--hicache-slo)" in text and "longest" not in text
    assert "PD on time per second at fixed rates: best eft/static" in text and "at the 400 ms SLO" in text
    assert "best of PD at 400 ms and HiCache at 300 ms:" in text


def test_cli_smoke_goodput_sweeps_every_policy_at_each_workloads_slo() -> None:
    """``--only goodput``: one sweep per workload, setting and policy, each at its workload's SLO, and
    a verdict that names the definition and both SLOs."""
    lines, text = serving_cli(
        "--only", "goodput", "--settings", "slow", "--policies", "eft,static,round_robin", "--hicache-slo", "0.3"
    )
    assert {(x["of"], x["policy"]) for x in lines} == {
        (w, p) for w in ("pd", "hicache") for p in ("eft", "static", "round_robin")
    }
    assert {(x["of"], x["slo"]) for x in lines} == {("pd", 0.5), ("hicache", 0.3)}
    for x in lines:
        if x["edge"] != "low":  # the rate found attained the goal, the one above it did not
            assert x["goodput"] > 0 and x["attained"] >= 0.9
        if x["edge"] != "high":
            assert x["above"] > x["goodput"] and x["above_attained"] < 0.9
        else:
            assert x["above"] is None  # strict JSON: no Infinity
    assert {round(x["gpu_rate"], 1) for x in lines} == {49.0, 116.8}  # 8 / the mean prefill time
    assert "highest Poisson arrival rate with >= 90% of requests within the TTFT SLO" in text
    assert "goodput (highest rate with >= 90% within the SLO), eft/static, best of PD at 500 ms and HiCache at " in text


def test_cli_refuses_a_sweep_without_requests_by_name() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tent_async.cli", "bench", "serving", "--only", "goodput", "--sweep-requests", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "--sweep-requests must be >= 1" in out.stderr + out.stdout
