"""Virtual clock ordering and link profiles (capacity and modes over time)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tent_async.backends.sim import (
    Bursts,
    Degrade,
    Errors,
    LinkTimeline,
    Mode,
    Outage,
    Stall,
    Trace,
    VirtualClock,
    flapping,
)


def test_clock_runs_in_time_then_schedule_order() -> None:
    clock = VirtualClock()
    seen: list[str] = []
    clock.call_at(2.0, seen.append, "c")
    clock.call_at(1.0, seen.append, "a")
    clock.call_at(1.0, seen.append, "b")
    dropped = clock.call_at(1.5, seen.append, "dropped")
    dropped.cancel()
    clock.call_at(-5.0, seen.append, "now")  # never in the past
    assert clock.next_time() == 0.0
    clock.run_until(10.0)
    assert seen == ["now", "a", "b", "c"]
    assert clock.now == 10.0
    assert clock.next_time() is None
    assert not clock.step()
    with pytest.raises(ValueError, match="NaN"):
        clock.call_at(math.nan, seen.append, "x")


def test_step_runs_everything_due_at_one_instant() -> None:
    clock = VirtualClock()
    seen: list[float] = []

    def chain() -> None:
        seen.append(clock.now)
        if len(seen) < 3:
            clock.call_later(0.0, chain)

    clock.call_at(1.0, chain)
    clock.call_at(2.0, seen.append, -1.0)
    assert clock.step()
    assert seen == [1.0, 1.0, 1.0]


def _timeline(*profile: object, seed: int = 0) -> LinkTimeline:
    return LinkTimeline(100.0, profile, random.Random(seed))  # type: ignore[arg-type]


def test_degrade_and_modes_rank() -> None:
    tl = _timeline(
        Degrade(at=1.0, factor=0.1, until=3.0),
        Stall(at=2.0, until=4.0),
        Outage(at=3.5, until=5.0),
        Errors(at=4.5, until=6.0),
    )
    assert tl.capacity_at(0.5) == 100.0
    assert tl.mode_at(0.5) is Mode.UP
    assert tl.capacity_at(1.0) == pytest.approx(10.0)
    assert tl.mode_at(2.5) is Mode.STALLED
    assert tl.mode_at(3.7) is Mode.DOWN  # down outranks stalled
    assert tl.mode_at(4.7) is Mode.DOWN  # and erroring
    assert tl.mode_at(5.5) is Mode.ERRORING
    assert tl.mode_at(6.0) is Mode.UP
    assert tl.available_at(2.5) == 0.0
    assert tl.next_change(0.0) == 1.0
    assert tl.next_change(1.0) == 2.0
    # integral: 100 x 1 + 10 x 1 (then stalled/down/erroring 2..6) + 100 x 4 up to 10
    assert tl.integral(0.0, 10.0) == pytest.approx(100 + 10 + 400)


def test_trace_and_bursts() -> None:
    tl = _timeline(Trace(((1.0, 0.5), (2.0, 1.0), (3.0, 0.0))))
    assert [tl.capacity_at(t) for t in (0.5, 1.5, 2.5, 3.5)] == [100.0, 50.0, 0.0, 100.0]
    b = Bursts(load=0.8, mean_on="10ms", mean_off="30ms")
    assert b.duty == pytest.approx(0.25)
    a1, a2, other = _timeline(b, seed=5), _timeline(b, seed=5), _timeline(b, seed=6)
    grid = [i * 1e-3 for i in range(2000)]
    assert [a1.capacity_at(t) for t in grid] == [a2.capacity_at(t) for t in grid]
    assert [a1.capacity_at(t) for t in grid] != [other.capacity_at(t) for t in grid]
    assert sorted({round(a1.capacity_at(t), 9) for t in grid}) == [20.0, 100.0]
    # over a long run the average load approaches load x duty
    mean = _timeline(b, seed=1).integral(0.0, 200.0) / 200.0
    assert mean == pytest.approx(100.0 * (1 - 0.8 * 0.25), rel=0.05)


def test_bursts_end_and_stacked_loads_saturate() -> None:
    tl = _timeline(Bursts(0.7, 0.01, 0.01, start=1.0, until=2.0), Trace(((0.0, 0.6),)))
    assert tl.capacity_at(0.5) == pytest.approx(40.0)
    assert tl.capacity_at(2.5) == pytest.approx(40.0)
    assert min(tl.capacity_at(1.0 + i * 1e-3) for i in range(1000)) == 0.0  # 0.7 + 0.6 caps at 1


@settings(max_examples=40, deadline=None)
@given(
    points=st.lists(st.tuples(st.floats(0.0, 10.0), st.floats(0.0, 1.0)), max_size=8, unique_by=lambda p: p[0]),
    t0=st.floats(0.0, 5.0),
    span=st.floats(1e-3, 6.0),
)
def test_integral_matches_a_fine_sum(points: list[tuple[float, float]], t0: float, span: float) -> None:
    tl = _timeline(Trace(tuple(sorted(points))), Degrade(at=2.0, factor=0.5, until=4.0))
    n = 2000
    dt = span / n
    approx = sum(tl.available_at(t0 + (i + 0.5) * dt) for i in range(n)) * dt
    # each of the (at most 10) breakpoints inside the span can move the midpoint sum by one step
    assert tl.integral(t0, t0 + span) == pytest.approx(approx, abs=100.0 * dt * 10 + 1e-9)


def test_flapping_helper() -> None:
    outages = flapping("1ms", "2ms", "3ms", 3)
    assert [(o.at, o.until) for o in outages] == [
        (pytest.approx(0.001), pytest.approx(0.003)),
        (pytest.approx(0.006), pytest.approx(0.008)),
        (pytest.approx(0.011), pytest.approx(0.013)),
    ]
    with pytest.raises(ValueError, match="at least one"):
        flapping(0, 1, 1, 0)


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        Bursts(load=1.5, mean_on=1, mean_off=1)
    with pytest.raises(ValueError, match="positive"):
        Bursts(load=0.5, mean_on=0, mean_off=1)
    with pytest.raises(ValueError, match="later than"):
        Outage(at=2.0, until=1.0)
    with pytest.raises(ValueError, match="factor"):
        Degrade(at=0.0, factor=0.0)
    with pytest.raises(ValueError, match="increasing"):
        Trace(((1.0, 0.1), (0.5, 0.2)))
    with pytest.raises(ValueError, match="fractions"):
        Trace(((1.0, 2.0),))
    with pytest.raises(TypeError, match="profile"):
        _timeline("soon")
