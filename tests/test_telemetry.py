"""The estimator tells a fixed per-slice cost from a slower rail (core/telemetry.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import FifoFabric
from tent_async.core import SchedulerConfig
from tent_async.core.telemetry import RailEstimator

MiB = 1024 * 1024


def _run(bw: float, cost: float, size: int = 256 * MiB, config: SchedulerConfig | None = None) -> FifoFabric:
    fab = FifoFabric([bw], "eft", config, slice_costs=[cost])
    fab.submit(size)
    fab.run()
    return fab


@pytest.mark.parametrize(("bw", "cost"), [(1e8, 5e-3), (1e8, 1e-3), (2.5e7, 10e-3), (1e9, 2e-3)])
def test_a_fixed_per_slice_cost_does_not_trap_slices_at_min_slice(bw: float, cost: float) -> None:
    """800 Mbit/s with 5 ms per slice (the veth + ucx case): the ratio alone learned ~12 MB/s
    and cut every slice at min_slice.  With the cost split off, slices grow until the cost is
    at most slice_cost_share of their time and the rail's wire bandwidth is learned."""
    cfg = SchedulerConfig()
    fab = _run(bw, cost, config=cfg)
    rail = fab.planner.rails[0]
    est = rail.estimator
    last = [a.length for a in fab.delivered[-10:-1]]  # the very last slice is the transfer's tail
    assert min(last) >= 4 * cfg.min_slice, last
    assert abs(est.wire_bandwidth - bw) <= 0.2 * bw, est.wire_bandwidth
    assert abs(est.cost - cost) <= 0.2 * cost, est.cost
    # The amortised slices run at close to the wire: cost <= share of each slice's time.
    want = (1 - cfg.slice_cost_share) * bw
    assert est.bandwidth >= 0.9 * want, est.bandwidth
    assert fab.now <= 256 * MiB / want * 1.2, fab.now  # the ramp from min_slice included


def test_two_rails_with_a_per_slice_cost_keep_their_bandwidth_split() -> None:
    """800 and 200 Mbit/s, 5 ms per slice on each: the ratio alone put both rails at
    min_slice, where the slow-rail rule gave each a slice in turn (57/43 at 0.16 of the
    aggregate).  Amortised, the split follows the wire bandwidths (80/20) at 0.7 of it."""
    bws = [1e8, 2.5e7]
    fab = FifoFabric(bws, "eft", slice_costs=[5e-3, 5e-3])
    fab.submit(128 * MiB)
    fab.run()
    fast = sum(a.length for a in fab.delivered if a.rail == 0) / (128 * MiB)
    assert 0.75 <= fast <= 0.85, fast
    assert 128 * MiB / sum(bws) / fab.now >= 0.65, fab.now


def test_slice_cost_share_one_keeps_the_old_sizing() -> None:
    """The switch off: sizes from the ratio alone, so the cost traps them at min_slice."""
    cfg = SchedulerConfig(slice_cost_share=1.0)
    fab = _run(1e8, 5e-3, 64 * MiB, cfg)
    assert {a.length for a in fab.delivered[-10:-1]} == {cfg.min_slice}


def test_a_rail_slower_than_its_hint_is_not_taken_for_a_cost() -> None:
    """No per-slice cost, one rail 10x slower than its hint: the same slices as with the
    amortisation off (a guessed cost acts only at min_slice, and sizes soon measure the slope)."""

    def slices(share: float) -> tuple[list[tuple[int, int]], float]:
        fab = FifoFabric([2e9, 1e8], "eft", SchedulerConfig(slice_cost_share=share), hints=[1e9, 1e9])
        fab.submit(256 * MiB)
        fab.run()
        slow = fab.planner.rails[1].estimator
        assert slow.cost < 1e-4, slow.cost
        assert abs(slow.wire_bandwidth - 1e8) <= 0.2e8, slow.wire_bandwidth
        return [(a.rail, a.length) for a in fab.delivered], fab.now

    assert slices(0.25) == slices(1.0)


@settings(max_examples=200, deadline=None)
@given(
    hint=st.floats(1e6, 1e11),
    samples=st.lists(
        st.tuples(st.integers(1, 64 * MiB), st.floats(1e-9, 10.0), st.booleans()), min_size=1, max_size=60
    ),
)
def test_the_fit_never_gives_negative_or_absurd_values(hint: float, samples: list[tuple[int, float, bool]]) -> None:
    est = RailEstimator(bandwidth=hint, latency=0.0)
    for nbytes, seconds, idle in samples:
        est.observe(nbytes, seconds, started_idle=idle)
        assert est.cost >= 0.0
        assert 0.0 < est.wire_bandwidth <= 4.0 * max(hint, est.bandwidth) * (1 + 1e-9)
        assert est.cost <= max(seconds for _, seconds, _ in samples) + 1e-12


def test_one_size_falls_back_to_the_prior_slope() -> None:
    """Slices of one size cannot tell cost from bandwidth: the hint's slope stands, the excess is a cost."""
    est = RailEstimator(bandwidth=1e8, latency=0.0)
    for _ in range(60):
        est.observe(64 * 1024, 64 * 1024 / 1e8 + 5e-3, started_idle=False)
    assert est.wire_bandwidth == pytest.approx(1e8)
    assert est.cost == pytest.approx(5e-3, rel=1e-3)  # a cost rises at 1/8 per slice
    # ... and a rail faster than its hint has no cost: the slices' own ratio.
    est = RailEstimator(bandwidth=1e8, latency=0.0)
    for _ in range(20):
        est.observe(64 * 1024, 64 * 1024 / 2e8, started_idle=False)
    assert est.cost == 0.0
    assert est.wire_bandwidth == pytest.approx(2e8)


def test_a_missed_deadline_bounds_the_rate_of_a_rail_that_finished_nothing_yet() -> None:
    est = RailEstimator(bandwidth=1.25e9, latency=0.0)
    assert not est.at_most(1_400_000, 0.0)  # no time: no bound
    assert not est.at_most(100_000_000, 0.02)  # 5 GB/s: above the start, says nothing
    assert not est.at_most(10_000_000, 0.02)  # 500 MB/s: within 4x of the start (a delay, not a wrong start)
    assert est.at_most(1_400_000, 0.02)  # 70 MB/s at most: start again from there
    assert est.bandwidth == pytest.approx(70e6) and est.wire_bandwidth == pytest.approx(70e6)
    est.observe(262_144, 0.044, started_idle=False)  # a slice that finished: the real rate
    assert est.bandwidth < 70e6
    learned = est.bandwidth
    assert not est.at_most(1_000, 1.0)  # a miss once slices finish says stalled, not slow
    assert est.bandwidth == learned
