"""The fluid fabric on its own: sharing, conservation, capacity, faults, determinism."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tent_async.backends.sim import (
    Bursts,
    ClusterTopology,
    Degrade,
    Errors,
    Flow,
    FlowState,
    FluidFabric,
    Link,
    Outage,
    SimRail,
    SimRailError,
    Stall,
    Trace,
    VirtualClock,
)
from tent_async.errors import ConfigError


class Log:
    """Records what the fabric reports, with the virtual time of each report."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.done: dict[Any, float] = {}
        self.errors: dict[Any, tuple[float, bool]] = {}
        self.withdrawn: dict[Any, float] = {}

    def on_complete(self, flow: Flow) -> None:
        assert flow.token not in self.done
        self.done[flow.token] = self.clock.now

    def on_error(self, flow: Flow, error: SimRailError, rail_down: bool) -> None:
        assert isinstance(error, SimRailError)
        self.errors[flow.token] = (self.clock.now, rail_down)

    def on_withdrawn(self, flow: Flow) -> None:
        self.withdrawn[flow.token] = self.clock.now


def make(rails: list[SimRail], **kw: Any) -> tuple[VirtualClock, FluidFabric, Log]:
    clock = VirtualClock()
    log = Log(clock)
    return clock, FluidFabric(rails, clock, log, **kw), log


def drain(clock: VirtualClock, until: float | None = None) -> None:
    """Run the clock until nothing is scheduled (or until ``until``)."""
    if until is not None:
        clock.run_until(until)
        return
    for _ in range(1_000_000):
        if not clock.step():
            return
    raise AssertionError("the fabric never went quiet")


def test_processor_sharing_on_one_link() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=1000.0, latency=0.0)])
    fabric.start("x", ["a"], 1000)
    fabric.start("y", ["a"], 1000)
    drain(clock)
    # two equal flows share 1000 B/s: both need 2 s
    assert log.done == {"x": pytest.approx(2.0), "y": pytest.approx(2.0)}


def test_late_joiner_slows_the_first_flow_exactly() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.0)])
    fabric.start("first", ["a"], 300)
    clock.call_at(1.0, lambda: fabric.start("second", ["a"], 100))
    drain(clock)
    # 0-1 s: first alone (100 B); then both at 50 B/s: second done at 3 s, first has 100 B left -> 4 s
    assert log.done["second"] == pytest.approx(3.0)
    assert log.done["first"] == pytest.approx(4.0)


def test_latency_and_jitter_delay_the_start() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.5)])
    fabric.start("x", ["a"], 100)
    drain(clock)
    assert log.done["x"] == pytest.approx(1.5)
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.5, jitter=0.1)], seed=3)
    fabric.start("x", ["a"], 100)
    drain(clock)
    assert log.done["x"] > 1.5


def test_max_min_fairness_across_links() -> None:
    # a 2-node, 1-plane cluster: n0->n1 and n1->n0 share the spine; a second n0->n1 flow shares n0.tx0
    topo = ClusterTopology(nodes=3, rails_per_node=1, nic_capacity=100.0, latency=0.0, spine_capacity=150.0)
    clock, fabric, log = make(topo.link_specs(), components=topo.components())
    rates: dict[str, float] = {}

    def snapshot(now: float, link: Link) -> None:
        for f in link.rate_flows.values():
            rates[f.token] = f.rate

    fabric.monitor = snapshot
    fabric.start("a", topo.path(0, 0, 1), 10_000)
    fabric.start("b", topo.path(0, 0, 2), 10_000)
    fabric.start("c", topo.path(1, 0, 2), 10_000)
    clock.step()  # all three join
    # n0.tx0 (100) carries a and b; spine (150) carries all three; n2.rx0 (100) carries b and c.
    # progressive filling: n0.tx0 and n2.rx0 saturate at 50 each, spine then has 0 left over... all 50.
    assert rates == {"a": pytest.approx(50.0), "b": pytest.approx(50.0), "c": pytest.approx(50.0)}
    drain(clock)
    assert set(log.done) == {"a", "b", "c"}


def test_water_filling_gives_leftover_to_unconstrained_flows() -> None:
    topo = ClusterTopology(nodes=3, rails_per_node=1, nic_capacity=100.0, latency=0.0, spine_capacity=1000.0)
    clock, fabric, _log = make(topo.link_specs(), components=topo.components())
    fabric.start("a", topo.path(0, 0, 2), 10_000)
    fabric.start("b", topo.path(1, 0, 2), 10_000)
    fabric.start("c", topo.path(1, 0, 0), 10_000)
    clock.step()
    rates = {f.token: f.rate for f in fabric.components[0].active.values()}
    # n2.rx0 splits 100 between a and b (50 each); n1.tx0 gives c what b leaves: 50
    assert rates == {"a": pytest.approx(50.0), "b": pytest.approx(50.0), "c": pytest.approx(50.0)}
    fabric.withdraw(fabric.components[0].active[1])  # a leaves: b takes the receiver, c keeps its share
    rates = {f.token: f.rate for f in fabric.components[0].active.values()}
    assert rates == {"b": pytest.approx(50.0), "c": pytest.approx(50.0)}


_links = st.lists(
    st.tuples(
        st.floats(10.0, 1e4),
        st.sampled_from(["none", "bursts", "degrade", "trace"]),
    ),
    min_size=1,
    max_size=4,
)
_flows = st.lists(
    st.tuples(st.floats(0.0, 5.0), st.integers(0, 20_000), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)


def _profile(kind: str) -> tuple[Any, ...]:
    if kind == "bursts":
        return (Bursts(load=0.7, mean_on=0.3, mean_off=0.4),)
    if kind == "degrade":
        return (Degrade(at=1.0, factor=0.2, until=3.0),)
    if kind == "trace":
        return (Trace(((0.5, 0.5), (1.5, 0.9), (2.5, 0.0))),)
    return ()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(links=_links, flows=_flows, seed=st.integers(0, 1000))
def test_capacity_conservation_and_lower_bound(
    links: list[tuple[float, str]], flows: list[tuple[float, int, int]], seed: int
) -> None:
    rails = [
        SimRail(name=f"l{i}", capacity=cap, latency=0.001, jitter=0.0005, profile=_profile(kind))
        for i, (cap, kind) in enumerate(links)
    ]
    clock, fabric, log = make(rails, seed=seed)
    worst = 0.0

    def check(now: float, link: Link) -> None:
        nonlocal worst
        used = sum(f.rate for f in link.rate_flows.values())
        assert used == pytest.approx(link.used, rel=1e-9, abs=1e-9)
        assert link.capacity == pytest.approx(link.timeline.capacity_at(now))
        worst = max(worst, used - link.capacity * (1 + 1e-9))

    fabric.monitor = check
    sizes: dict[int, tuple[int, int, float]] = {}
    for k, (t, size, which) in enumerate(flows):
        i = which % len(rails)
        sizes[k] = (size, i, t)
        clock.call_at(t, lambda k=k, i=i, size=size: fabric.start(k, [i], size))
    drain(clock)
    assert worst <= 0.0, "a link carried more than its capacity"
    assert set(log.done) == set(sizes)  # every flow completed exactly once (Log asserts no repeats)
    fabric.settle()
    for i, link in enumerate(fabric.links):
        expect = sum(size for size, li, _ in sizes.values() if li == i)
        assert link.delivered == expect
        assert link.carried == pytest.approx(expect, rel=1e-6, abs=1e-3)  # bytes moved == bytes delivered
        for k, (size, li, t) in sizes.items():
            if li == i:
                # never faster than the link at full nominal speed after its latency
                assert log.done[k] - t >= link.spec.latency + size / link.spec.capacity * (1 - 1e-9)


def test_outage_fails_flows_in_flight_and_new_ones_until_recovery() -> None:
    rail = SimRail(name="a", capacity=100.0, latency=0.0, error_delay=0.25, profile=(Outage(at=1.0, until=2.0),))
    clock, fabric, log = make([rail])
    fabric.start("early", ["a"], 1000)  # would need 10 s
    clock.call_at(1.5, lambda: fabric.start("during", ["a"], 10))
    clock.call_at(2.5, lambda: fabric.start("after", ["a"], 10))
    drain(clock)
    assert log.errors["early"] == (pytest.approx(1.25), True)
    assert log.errors["during"] == (pytest.approx(1.75), True)
    assert log.done["after"] == pytest.approx(2.6)
    assert fabric.links[0].delivered == 10
    assert fabric.bytes_wasted == pytest.approx(100.0)  # "early" moved 100 B before the outage


def test_erroring_link_fails_without_rail_down() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.0, profile=(Errors(at=0.0),))])
    fabric.start("x", ["a"], 10)
    drain(clock)
    assert log.errors["x"] == (0.0, False)


def test_stall_swallows_flows_until_withdrawn() -> None:
    rail = SimRail(name="a", capacity=100.0, latency=0.0, profile=(Stall(at=1.0, until=2.0),))
    clock, fabric, log = make([rail])
    stuck = fabric.start("stuck", ["a"], 1000)
    clock.call_at(1.5, lambda: fabric.start("into-stall", ["a"], 10))
    clock.call_at(3.0, lambda: fabric.start("after", ["a"], 10))
    drain(clock, 100.0)
    assert "stuck" not in log.done
    assert "into-stall" not in log.done
    assert not log.errors
    assert log.done["after"] == pytest.approx(3.1)
    assert stuck.state is FlowState.STALLED
    fabric.withdraw(stuck)
    drain(clock, 101.0)
    assert log.withdrawn == {"stuck": pytest.approx(100.0)}
    assert fabric.links[0].flows.keys() == {2}  # only "into-stall" is still lost in the link


def test_withdraw_confirms_once_and_ignores_finished_flows() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.0)], withdraw_delay=0.5)
    f = fabric.start("x", ["a"], 100)
    clock.run_until(0.5)
    fabric.withdraw(f)
    fabric.withdraw(f)
    drain(clock)
    assert log.withdrawn == {"x": pytest.approx(1.0)}
    assert not log.done
    g = fabric.start("y", ["a"], 100)
    drain(clock)
    fabric.withdraw(g)  # already completed: nothing happens
    drain(clock)
    assert "y" in log.done
    assert "y" not in log.withdrawn


def test_override_degrades_and_heals() -> None:
    clock, fabric, log = make([SimRail(name="a", capacity=100.0, latency=0.0)])
    fabric.start("x", ["a"], 200)
    clock.run_until(1.0)
    fabric.set_override("a", None, 0.5)
    drain(clock)
    assert log.done["x"] == pytest.approx(3.0)  # 100 B at 100 B/s, then 100 B at 50 B/s


def test_same_seed_same_timeline_different_seed_differs() -> None:
    def run(seed: int) -> list[float]:
        rail = SimRail(name="a", capacity=1e3, latency=0.001, jitter=0.002, profile=(Bursts(0.8, 0.05, 0.05),))
        clock, fabric, log = make([rail], seed=seed)
        r = random.Random(0)
        for k in range(50):
            clock.call_at(r.random(), lambda k=k: fabric.start(k, ["a"], 50))
        drain(clock)
        return [log.done[k] for k in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        make([SimRail(name="a", capacity=1.0), SimRail(name="a", capacity=2.0)])
    with pytest.raises(ConfigError, match="at least one"):
        make([])
    _clock, fabric, _ = make([SimRail(name="a", capacity=1.0)])
    with pytest.raises(ConfigError, match="unknown link"):
        fabric.start("x", ["zz"], 1)
    with pytest.raises(ValueError, match="negative"):
        fabric.start("x", ["a"], -1)
    with pytest.raises(ConfigError, match="factor"):
        fabric.set_override("a", None, 0.0)
    topo = ClusterTopology(nodes=2, rails_per_node=2)
    _, cfab, _ = make(topo.link_specs(), components=topo.components())
    with pytest.raises(ValueError, match="crosses components"):
        cfab.start("x", [0, 1], 1)
    with pytest.raises(ConfigError, match="no component"):
        make([SimRail(name="a", capacity=1.0), SimRail(name="b", capacity=1.0)], components=[[0]])
    with pytest.raises(ValueError, match=r"capacity|bandwidth"):
        SimRail(name="a", capacity="fast")
    with pytest.raises(ValueError, match="profile"):
        SimRail(name="a", capacity=1.0, profile=("later",))
