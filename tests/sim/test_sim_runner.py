"""The scenario runner: small versions of the benchmark scenarios, invariants, determinism."""

from __future__ import annotations

import argparse

import pytest

from tent_async.backends.sim import (
    AccountingError,
    ClusterTopology,
    Elephants,
    KVBlocks,
    Link,
    PairTopology,
    Periodic,
    Scenario,
    ScenarioRunner,
    SimRail,
    run_scenario,
)
from tent_async.backends.sim.runner import _Open
from tent_async.backends.sim.scenarios import SCENARIO_NAMES, scenario
from tent_async.backends.sim.timeline import capacity, goodput, recovery
from tent_async.backends.sim.workloads import Arrival
from tent_async.bench import failover

POLICIES = ("eft", "round_robin", "single")
SMALL = 0.04  # of every size and duration


@pytest.mark.parametrize("name", SCENARIO_NAMES)
@pytest.mark.parametrize("policy", POLICIES)
def test_small_scenarios_deliver_every_byte_within_physics(name: str, policy: str) -> None:
    sc = scenario(name, SMALL)
    worst = 0.0

    def check(now: float, link: Link) -> None:
        nonlocal worst
        worst = max(worst, link.used - link.capacity * (1 + 1e-9))

    r = run_scenario(sc, policy, monitor=check)  # check=True: byte ranges verified per flow
    assert worst <= 0.0, "a link carried more than its capacity"
    assert r.flows
    assert r.unfinished == 0
    assert r.bytes_acked == sum(f.size for f in r.flows)
    assert sum(r.bytes_per_rail.values()) == r.bytes_acked
    assert r.stale_completions == 0
    # the physical limit is never beaten, over the run and for every single flow
    assert r.throughput <= r.capacity * (1 + 1e-9)
    for f in r.flows:
        assert f.elapsed >= f.size / sc.topology.nominal_capacity()
    for link, carried in r.carried_per_link.items():
        assert carried >= 0.0, link


def test_small_scenarios_show_the_expected_ordering() -> None:
    het = {p: run_scenario(scenario("heterogeneous", SMALL), p) for p in POLICIES}
    assert het["eft"].throughput > 2 * het["round_robin"].throughput
    assert het["eft"].efficiency > 0.8  # 164 MiB is only a dozen slices: the tail weighs
    deg = {p: run_scenario(scenario("degraded", 0.2), p) for p in ("eft", "round_robin")}
    assert deg["eft"].throughput > 1.33 * deg["round_robin"].throughput


@pytest.mark.parametrize("name", ["congested", "cluster"])
def test_same_seed_is_bit_identical_and_seed_matters(name: str) -> None:
    sc = scenario(name, SMALL)
    a = run_scenario(sc, "eft", record=True)
    b = run_scenario(sc, "eft", record=True)
    assert a == b
    assert a.slices
    assert a.slices == b.slices
    c = run_scenario(sc, "eft", seed=sc.seed + 1)
    assert c.flows != a.flows


def test_cluster_bytes_follow_rail_planes() -> None:
    topo = ClusterTopology(nodes=4, rails_per_node=2, nic_capacity="10Gb/s", spine_ratio=0.5)
    sc = Scenario(
        name="tiny-cluster",
        topology=topo,
        workloads=(KVBlocks(load=0.5, size_min="256KiB", size_max="4MiB", tenants=3),),
        horizon=0.05,
        latency_kind="kv",
    )
    runner = ScenarioRunner(sc, "eft")
    r = runner.run()
    assert r.unfinished == 0
    carried = r.carried_per_link
    for plane in range(2):
        tx = sum(carried[f"n{n}.tx{plane}"] for n in range(4))
        rx = sum(carried[f"n{n}.rx{plane}"] for n in range(4))
        assert tx == pytest.approx(carried[f"spine{plane}"]) == pytest.approx(rx)
    assert {f.tenant for f in r.flows} <= {"tenant0", "tenant1", "tenant2"}
    assert all(f.src != f.dst for f in r.flows)
    # available capacity: the spine (half the NICs) is the narrowest cut of each plane
    assert r.capacity == pytest.approx(2 * 0.5 * 4 * 10e9 / 8)


def test_workloads_generate_what_they_promise() -> None:
    rails = (SimRail(name="a", capacity="100Gb/s"),)
    sc = Scenario(
        name="w",
        topology=PairTopology(rails=rails),
        workloads=(
            Elephants(size="8MiB", size_max="16MiB", concurrency=2, count=5),
            Periodic(size="1MiB", period="10ms", kind="bulk"),
        ),
        horizon=0.1,
    )
    r = run_scenario(sc, "eft")
    elephants = [f for f in r.flows if f.kind == "elephant"]
    bulk = [f for f in r.flows if f.kind == "bulk"]
    assert len(elephants) == 5
    assert all(8 << 20 <= f.size <= 16 << 20 and f.size % 4096 == 0 for f in elephants)
    assert [round(f.submitted, 9) for f in bulk] == [round(0.01 * i, 9) for i in range(11)]


def test_accounting_catches_overlaps_and_gaps() -> None:
    runner = ScenarioRunner(scenario("homogeneous", SMALL), "eft")
    arrival = Arrival(0.0, 100, 0, 1, "x", "t")
    entry = _Open(7, arrival, None, 0, 1)  # type: ignore[arg-type]
    entry.ranges = [(0, 60), (50, 50)]
    with pytest.raises(AccountingError, match="overlap"):
        runner._verify(entry, 100)
    entry.ranges = [(0, 40), (50, 50)]
    with pytest.raises(AccountingError, match="gap"):
        runner._verify(entry, 100)
    entry.ranges = [(0, 40)]
    with pytest.raises(AccountingError, match="40 of 100"):
        runner._verify(entry, 100)


def test_failover_faults_through_the_runner() -> None:
    parser = argparse.ArgumentParser()
    failover.add_arguments(parser)
    args = parser.parse_args(["--size", "4GiB", "--fail-at", "2ms", "--stall-at", "5ms", "--degrade-at", "30ms"])
    sc, faults = failover._scenario(args)
    for policy in POLICIES:
        runner = ScenarioRunner(sc, policy, record=True)
        r = runner.run()
        flow = r.flows[0]
        assert flow.outcome == "done"
        assert flow.acked == 4 << 30
        assert flow.reroutes > 0
        recs = {fault: recovery(r, runner.fabric, rail, fault, at) for fault, rail, at in faults}
        hard = recs["hard"]
        assert hard.affected >= 1
        assert hard.resolved_at == pytest.approx(0.002 + 0.001)  # errors surface after error_delay
        if policy == "eft":
            assert hard.recovery_ms is not None
            assert hard.recovery_ms < 50
            stall = recs["stall"]
            deadline = sc.config.deadline_floor
            noticed = [e for e in r.events if e.rail == "nic1" and e.kind.value == "failure"]
            assert noticed
            assert "deadline missed" in noticed[0].detail
            assert noticed[0].time >= 0.005
            assert stall.recovery_ms is not None
            assert stall.recovery_ms < 50 + deadline * 1e3
            assert recs["degrade"].recovery_ms is not None
            assert recs["degrade"].recovery_ms < 50
        if policy == "single":
            assert recs["hard"].recovery_ms is None  # one rail can never reach 90% of seven


def test_goodput_and_capacity_series() -> None:
    runner = ScenarioRunner(scenario("homogeneous", SMALL), "eft", record=True)
    r = runner.run()
    series = goodput(r.slices, r.start, r.end, (r.end - r.start) / 10)
    cap = capacity(runner.fabric, r.start, r.end, (r.end - r.start) / 10)
    assert sum(series) * (r.end - r.start) / 10 == pytest.approx(r.bytes_acked, rel=1e-9)
    assert all(g <= c * (1 + 1e-9) for g, c in zip(series, cap, strict=True))
    with pytest.raises(ValueError, match="bucket"):
        goodput(r.slices, 0.0, 1.0, 0.0)


def test_scenario_validation() -> None:
    topo = PairTopology(rails=(SimRail(name="a", capacity=1.0),))
    with pytest.raises(ValueError, match="workload"):
        Scenario(name="x", topology=topo, workloads=(), horizon=1.0)
    with pytest.raises(ValueError, match="topology"):
        Scenario(name="x", topology="pair", workloads=(Elephants(),), horizon=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="horizon"):
        Scenario(name="x", topology=topo, workloads=(Elephants(),), horizon=-1.0)
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario("nope")
    with pytest.raises(ValueError, match="size_max"):
        KVBlocks(load=0.5, size_min="2MiB", size_max="1MiB")
    with pytest.raises(ValueError, match="unique"):
        PairTopology(rails=(SimRail(name="a", capacity=1.0), SimRail(name="a", capacity=1.0)))
    with pytest.raises(ValueError, match="plane"):
        ClusterTopology(rails_per_node=2, spine_profile={5: ()})
    runner = ScenarioRunner(scenario("homogeneous", SMALL), "eft")
    runner.run()
    with pytest.raises(RuntimeError, match="once"):
        runner.run()
