"""Goodput as serving papers define it: the highest request rate served within the SLO.

DistServe (Zhong et al., OSDI 2024) defines a serving system's goodput as the
maximum request rate at which a required share of requests (its "SLO
attainment", commonly 90%) meets the latency SLO.  A figure counted at one fixed
offered rate (requests on time per second of arrivals) cannot exceed that rate,
so two systems that both keep up look alike however close one of them is to
falling behind; the highest sustained rate shows how much more load one of them
carries before it breaks its SLO.

:func:`highest_rate` finds that rate by bisection, given a function that runs
the workload at a rate and returns its attainment.  It assumes attainment falls
as the rate rises (in the serving benchmarks the same requests arrive at every
rate, only the gaps between them shrink), and reports the bracket it ended
with, so a reader can see the rate that attained and the one just above that
did not.  Pure: no clock, no I/O; the caller decides how runs are executed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

ATTAINMENT = 0.9  # the share of requests that must meet the SLO (a P90 TTFT within it)


def attainment(latencies: Sequence[float], slo: float) -> float:
    """The share of ``latencies`` within ``slo`` (0.0 for no requests)."""
    if not latencies:
        return 0.0
    return sum(1 for x in latencies if x <= slo) / len(latencies)


@attrs.frozen(kw_only=True)
class Sweep:
    """The result of :func:`highest_rate`.

    ``rate`` attained the goal (with ``attained``); ``above`` is the lowest rate
    tried that did not (with ``above_attained``).  ``edge`` is ``"low"`` when
    even the lowest rate tried missed (``rate`` is then 0), ``"high"`` when even
    the highest attained (``above`` is then infinite: the goodput is at least
    ``rate``), else ``""``.
    """

    rate: float
    attained: float
    above: float
    above_attained: float
    runs: int
    edge: str = ""

    @property
    def bounds(self) -> tuple[float, float]:
        """Where the goodput lies, ``[low, high)``, if attainment falls as the rate rises."""
        return (0.0 if self.edge == "low" else self.rate, self.above)


def judge(ranges: Sequence[tuple[float, float]], target: float) -> str:
    """A target met in at least one of several settings, each known as a range ``[low, high)``.

    ``"met"`` when some setting's whole range is at or above the target, ``"MISSED"`` when
    every range lies below it (``high`` itself is never reached), otherwise ``"not settled"``.
    """
    if any(low >= target for low, _ in ranges):
        return "met"
    if all(high <= target for _, high in ranges):
        return "MISSED"
    return "not settled (a range straddles it)"


def ratio_bounds(a: Sweep, b: Sweep) -> tuple[float, float]:
    """The range of ``goodput(a) / goodput(b)`` that the two sweeps' brackets allow."""
    (a_lo, a_hi), (b_lo, b_hi) = a.bounds, b.bounds
    low = a_lo / b_hi if b_hi > 0 else float("nan")  # b_hi > 0 always: highest_rate needs lo > 0
    high = a_hi / b_lo if b_lo > 0 else float("inf")
    return low, high


def highest_rate(
    attain_at: Callable[[float], float], lo: float, hi: float, steps: int, goal: float = ATTAINMENT
) -> Sweep:
    """The highest rate in ``[lo, hi]`` whose attainment is at least ``goal``, to ``(hi - lo) / 2**steps``."""
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    a_hi = attain_at(hi)
    if a_hi >= goal:
        return Sweep(rate=hi, attained=a_hi, above=float("inf"), above_attained=float("nan"), runs=1, edge="high")
    a_lo = attain_at(lo)
    if a_lo < goal:
        return Sweep(rate=0.0, attained=float("nan"), above=lo, above_attained=a_lo, runs=2, edge="low")
    for _ in range(steps):
        mid = (lo + hi) / 2
        a = attain_at(mid)
        if a >= goal:
            lo, a_lo = mid, a
        else:
            hi, a_hi = mid, a
    return Sweep(rate=lo, attained=a_lo, above=hi, above_attained=a_hi, runs=steps + 2)
