"""The goodput sweep (``bench/goodput.py``): the highest rate whose SLO attainment meets the goal."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tent_async.bench.goodput import ATTAINMENT, Sweep, attainment, highest_rate, judge, ratio_bounds


def test_attainment_counts_the_share_within_the_slo() -> None:
    assert attainment([0.1, 0.2, 0.3, 0.4], 0.25) == 0.5
    assert attainment([0.25], 0.25) == 1.0  # on the SLO is on time
    assert attainment([], 1.0) == 0.0


@given(knee=st.floats(min_value=1.0, max_value=99.0), steps=st.integers(min_value=0, max_value=12))
def test_bisection_brackets_the_knee_of_a_falling_attainment(knee: float, steps: int) -> None:
    """Attainment 1.0 up to ``knee`` req/s and 0.5 above: the result attains, the rate above it
    does not, and the two are within the bisection's resolution of each other."""
    calls: list[float] = []

    def attain(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= knee else 0.5

    sw = highest_rate(attain, 0.5, 100.0, steps)
    assert sw.edge == "" and sw.runs == len(calls) == steps + 2
    assert sw.rate <= knee < sw.above
    assert sw.above - sw.rate == pytest.approx(99.5 / 2**steps)
    assert sw.attained >= ATTAINMENT > sw.above_attained


def test_edges_say_which_way_the_range_was_too_narrow() -> None:
    always = highest_rate(lambda r: 1.0, 1.0, 10.0, 5)
    assert (always.edge, always.rate, always.runs) == ("high", 10.0, 1) and math.isinf(always.above)
    never = highest_rate(lambda r: 0.2, 1.0, 10.0, 5)
    assert (never.edge, never.rate, never.above, never.above_attained) == ("low", 0.0, 1.0, 0.2)


def test_the_goal_is_inclusive_and_configurable() -> None:
    sw = highest_rate(lambda r: 0.9 if r <= 4.0 else 0.89, 2.0, 6.0, 2)  # tries 6, 2, 4, 5
    assert (sw.rate, sw.attained, sw.above, sw.above_attained) == (4.0, 0.9, 5.0, 0.89)
    strict = highest_rate(lambda r: 0.9 if r <= 4.0 else 0.89, 2.0, 6.0, 2, goal=0.95)
    assert strict.edge == "low"


@pytest.mark.parametrize(("lo", "hi", "steps"), [(0.0, 1.0, 3), (2.0, 1.0, 3), (1.0, 2.0, -1)])
def test_bad_ranges_are_refused(lo: float, hi: float, steps: int) -> None:
    with pytest.raises(ValueError, match=r"need 0 < lo < hi|steps must be"):
        highest_rate(lambda r: 1.0, lo, hi, steps)


def test_ratio_bounds_follow_the_brackets_and_the_edges() -> None:
    """Each goodput lies in [rate, above): the ratio's range is low/high of the two brackets; an
    edge opens its side (a policy that missed at the lowest rate has a goodput anywhere below it)."""
    a = Sweep(rate=116.8, attained=0.9, above=117.2, above_attained=0.89, runs=10)
    b = Sweep(rate=85.6, attained=0.9, above=86.1, above_attained=0.89, runs=10)
    assert a.bounds == (116.8, 117.2)
    assert ratio_bounds(a, b) == pytest.approx((116.8 / 86.1, 117.2 / 85.6))
    missed = Sweep(rate=0.0, attained=math.nan, above=30.0, above_attained=0.5, runs=2, edge="low")
    assert missed.bounds == (0.0, 30.0)
    assert ratio_bounds(a, missed) == (116.8 / 30.0, math.inf)  # at least 3.9x: a win, not a NaN
    open_top = Sweep(rate=146.0, attained=1.0, above=math.inf, above_attained=math.nan, runs=1, edge="high")
    assert ratio_bounds(open_top, b) == (146.0 / 86.1, math.inf)
    assert ratio_bounds(b, open_top) == (0.0, 86.1 / 146.0)


def test_the_verdict_needs_one_setting_wholly_above_and_misses_only_when_every_one_is_below() -> None:
    assert judge([(1.0, 1.1), (1.37, 1.40)], 1.36) == "met"
    assert judge([(1.36, 1.37)], 1.36) == "met"  # the floor on the target is enough
    assert judge([(1.25, 1.28), (1.0, 1.36)], 1.36) == "MISSED"  # a range's top is never reached
    # review: the setting with the highest floor is below, but another's range reaches past it
    assert judge([(1.25, 1.28), (1.0, 1.5)], 1.36).startswith("not settled")
    assert judge([(1.352, 1.366)], 1.36).startswith("not settled")
