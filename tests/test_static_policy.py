"""The ``static`` baseline (a model of Mooncake TE) behaves as documented in core/policies.py."""

from __future__ import annotations

from collections import Counter

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import FifoFabric
from tent_async.core import Health, Outcome, Planner, RailInfo, SchedulerConfig, StaticSlices, make_policy

KiB = 1 << 10
MiB = 1 << 20
NO_DEADLINES = SchedulerConfig(deadline_floor=1000.0)


def fifo(
    bws: list[float],
    policy: StaticSlices | None = None,
    *,
    tiers: list[int] | None = None,
    hints: list[float] | None = None,
    config: SchedulerConfig | None = None,
) -> FifoFabric:
    """A FifoFabric whose planner runs ``policy`` over rails with the given tiers."""
    fab = FifoFabric(bws, "eft", config)
    tiers = tiers or [0] * len(bws)
    hints = hints or bws
    fab.planner = Planner(
        [RailInfo(f"r{i}", h, latency=0.0, tier=t) for i, (h, t) in enumerate(zip(hints, tiers, strict=True))],
        config or SchedulerConfig(),
        policy or StaticSlices(),
    )
    return fab


def test_static_is_a_registered_policy() -> None:
    assert isinstance(make_policy("static"), StaticSlices)
    with pytest.raises(ValueError, match="pick must be"):
        StaticSlices(pick="fastest")
    with pytest.raises(ValueError, match="must be positive"):
        StaticSlices(0)


def test_fixed_64k_slices_whatever_the_rails() -> None:
    fab = fifo([1e9, 1e7, 5e9], config=NO_DEADLINES)
    tid = fab.submit(10 * MiB + 1000)
    fab.run()
    assert fab.finished[tid].outcome is Outcome.DONE
    lengths = sorted(a.length for a in fab.posts)
    assert all(n == 64 * KiB for n in lengths[:-1])
    assert 64 * KiB <= lengths[-1] < 96 * KiB  # the tail of 1000 bytes rides along with the last slice


def test_only_the_preferred_set_carries_data() -> None:
    # rails 1 and 3 are the buffer's own NICs (tier 0); the others are across the PCIe switch or NUMA node
    fab = fifo([1e9] * 4, tiers=[1, 0, 2, 0])
    fab.submit(32 * MiB)
    fab.run()
    used = Counter(a.rail for a in fab.delivered)
    assert set(used) == {1, 3}
    assert 0.35 < used[1] / sum(used.values()) < 0.65  # random draws: even on average


def test_round_robin_pick_alternates_exactly() -> None:
    fab = fifo([1e9] * 3, StaticSlices(pick="round_robin"))
    fab.submit(3 * MiB)
    fab.run()
    assert [a.rail for a in fab.posts] == [0, 1, 2] * 16


def test_ignores_telemetry_and_congestion() -> None:
    """Same hints, very different real speeds: the same sequence of (rail, offset, length).

    (One transfer: the draws come from one random stream, so with several transfers their
    interleaving, which follows completions, decides which transfer gets which draw.)
    """
    runs = []
    for bws in ([1e9, 1e9, 1e9], [1e9, 1e7, 5e9]):
        fab = fifo(bws, StaticSlices(seed=7), hints=[1e9] * 3, config=NO_DEADLINES)
        fab.submit(11 * MiB)
        fab.run()
        runs.append(sorted((a.transfer_id, a.rail, a.offset, a.length) for a in fab.posts))
    assert runs[0] == runs[1]
    # and the slow rail carried its full third although the others were idle long before
    assert Counter(r for _t, r, _o, _n in runs[1])[1] > 40


def test_a_slice_waits_for_the_nic_it_was_bound_to() -> None:
    """Early binding: with rail 1 full, the next slice bound to it waits although rail 0 is idle."""
    policy = StaticSlices(pick="round_robin", depth=4)
    fab = fifo([1e9, 1e6], policy, config=NO_DEADLINES)
    fab.submit(4 * MiB)
    for _ in range(60):
        fab.step()
        assert all(len(r.inflight) <= 4 for r in fab.planner.rails)
        # rail 0 is a thousand times faster, but it cannot run ahead of rail 1's queue
        done = Counter(a.rail for a in fab.delivered)
        assert done[0] <= done[1] + 4 + 1
    fab.run()
    per_rail = Counter(a.rail for a in fab.delivered)
    assert per_rail[0] == per_rail[1] == 32


def test_depth_not_window_bounds_a_rail() -> None:
    fab = fifo([1e9, 1e9], StaticSlices(depth=8, pick="round_robin"))
    fab.submit(64 * MiB)
    fab.drain()
    assert [len(r.inflight) for r in fab.planner.rails] == [8, 8]  # the planner's window is 2


def test_a_suspect_rail_is_used_as_before() -> None:
    """No rail health: after a failure the rail is suspect (window 1) but static still fills its depth."""
    fab = fifo([1e9, 1e9], StaticSlices(pick="round_robin", depth=4), config=NO_DEADLINES)
    fab.failing.add(1)
    fab.submit(64 * KiB)  # its only slice goes to rail 0
    fab.submit(64 * KiB)  # rail 1: fails once, retried
    fab.run()
    fab.failing.clear()
    assert fab.planner.rails[1].health.state is Health.SUSPECT
    fab.submit(16 * MiB)
    fab.drain()
    assert len(fab.planner.rails[1].inflight) >= 3  # the planner's window for a suspect rail is one


def test_failed_slices_are_retried_in_the_fixed_order() -> None:
    """A failing preferred NIC: its slices go to the next rail of the order; the transfer completes."""
    fab = fifo([1e9] * 3, StaticSlices(pick="round_robin"), tiers=[0, 0, 1])
    fab.failing.add(0)
    tid = fab.submit(4 * MiB)
    fab.run()
    fin = fab.finished[tid]
    assert fin.outcome is Outcome.DONE
    assert fin.reroutes > 0
    assert fin.bytes_per_rail.get("r0", 0) == 0
    # a slice failed once on r0 is retried at position 0 of the order (r0, as TE's retry_cnt=1 does),
    # then at position 1 (r1): r2, outside the preferred set, is not needed
    assert set(fin.bytes_per_rail) == {"r1"}
    # once r0 is quarantined the planner does not post there; static draws again
    assert fab.planner.rails[0].health.state in (Health.QUARANTINED, Health.PROBING)


def test_same_seed_same_slices() -> None:
    def posts(seed: int) -> list[tuple[int, int]]:
        fab = fifo([1e9] * 4, StaticSlices(seed=seed))
        fab.submit(4 * MiB)
        fab.run()
        return [(a.rail, a.offset) for a in fab.posts]

    assert posts(3) == posts(3)
    assert posts(3) != posts(4)


@settings(max_examples=40, deadline=None)
@given(
    bws=st.lists(st.floats(1e8, 1e10), min_size=1, max_size=6),
    sizes=st.lists(st.integers(0, 8 * MiB), min_size=1, max_size=4),
    tiers=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    fail=st.booleans(),
)
def test_every_byte_once_even_with_a_failing_rail(
    bws: list[float], sizes: list[int], tiers: list[int], fail: bool
) -> None:
    fab = fifo(bws, tiers=tiers[: len(bws)])
    if fail and len(bws) > 1:
        fab.failing.add(0)
    tids = [fab.submit(n) for n in sizes]
    fab.run()
    for tid, n in zip(tids, sizes, strict=True):
        fin = fab.finished[tid]
        assert fin.outcome is Outcome.DONE
        spans = sorted((a.offset, a.length) for a in fab.delivered if a.transfer_id == tid)
        pos = 0
        for offset, length in spans:
            assert offset == pos
            pos += length
        assert pos == n
    assert fab.planner.idle


def test_engine_runs_static_byte_exact() -> None:
    import tent_async as tent
    from tent_async.backends.sim import SimRail

    fabric = [SimRail(name=f"nic{i}", capacity="100Gb/s") for i in range(4)]
    src = np.random.default_rng(0).integers(0, 256, 3 * MiB + 123, dtype=np.uint8)
    dst = np.zeros_like(src)

    async def main() -> dict[str, int]:
        async with tent.Engine(backend="sim", fabric=fabric, policy="static", seed=1) as engine:
            a, b = engine.register(src), engine.register(dst)
            result = await engine.transfer(a[:], b[:])
            return dict(result.bytes_per_rail)

    per_rail = anyio.run(main)
    assert np.array_equal(src, dst)
    assert len(per_rail) == 4
