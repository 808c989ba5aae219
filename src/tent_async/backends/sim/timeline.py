"""Throughput over time and recovery after a fault, from a recorded run.

Goodput counts only bytes that reached the destination for their transfer:
each delivered slice contributes its fluid rate over time as the fabric
recorded it (``record=True``), so the timeline is exact, not an
approximation; a slice without a rate history (recorded elsewhere) is spread
evenly over its time on the wire.  Bytes of slices that failed, were
withdrawn or completed stale count as nothing.

Recovery after a fault at ``at`` on ``rail``:

* the *affected* slices are the ones that were on the rail when the fault
  hit, or were sent to it afterwards before the scheduler heard of a problem
  there (its first failure event on the rail after ``at``), health probes
  excepted; on a rail that only slowed down, the ones in flight at ``at``;
* ``resolved_at`` is when the last of them was rerouted (failed, withdrawn)
  or, on a rail that only slowed down, delivered;
* ``recovered_at`` is the start of the first ``window`` (on a grid of
  ``resolution``), no earlier than ``resolved_at``, over which goodput
  averaged at least ``threshold`` of the capacity that survived (the sum of
  every rail's available capacity then: a failed or stalled rail counts
  zero, a degraded one its reduced capacity).  ``None`` if that never
  happened before the transfer ended (a policy that cannot use the surviving
  rails never gets there).

Slices the scheduler sends to the rail *after* it heard of the problem (a
suspect rail still gets one slice at a time until it is quarantined) are
not "affected"; they are counted as ``retries_lost`` and their cost shows
in the goodput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from ...core import EventKind
from .fabric import FluidFabric
from .runner import RunResult, SliceRecord


def goodput(slices: Sequence[SliceRecord], t0: float, t1: float, bucket: float) -> list[float]:
    """Delivered bytes/s in consecutive buckets of ``bucket`` seconds from ``t0`` to ``t1``."""
    if not bucket > 0:
        raise ValueError(f"bucket must be positive, got {bucket}")
    n = max(0, math.ceil((t1 - t0) / bucket - 1e-9))
    acc = [0.0] * n
    for s in slices:
        if s.outcome != "done" or s.length == 0:
            continue
        if s.rates:
            segments = zip(s.rates, [*s.rates[1:], (s.ended, 0.0)], strict=True)
            for (a, rate), (b, _) in segments:
                if rate > 0.0:
                    _spread(acc, t0, bucket, max(a, t0), min(b, t1), rate)
            continue
        span = s.ended - s.started
        if span <= 0:  # delivered in an instant: all its bytes in one bucket
            if t0 <= s.ended < t1:
                acc[min(n - 1, int((s.ended - t0) / bucket))] += s.length
            continue
        _spread(acc, t0, bucket, max(s.started, t0), min(s.ended, t1), s.length / span)
    return [x / bucket for x in acc]


def _spread(acc: list[float], t0: float, bucket: float, a: float, b: float, rate: float) -> None:
    """Add ``rate`` bytes/s over ``[a, b)`` to the buckets it overlaps."""
    n = len(acc)
    if b <= a:
        return
    i = max(0, int((a - t0) / bucket))
    while i < n:
        lo = t0 + i * bucket
        hi = lo + bucket
        overlap = min(b, hi) - max(a, lo)
        if overlap > 0:
            acc[i] += rate * overlap
        if hi >= b:
            break
        i += 1


def capacity(fabric: FluidFabric, t0: float, t1: float, bucket: float) -> list[float]:
    """Available capacity (bytes/s, all links summed) in the same buckets as :func:`goodput`."""
    n = max(0, math.ceil((t1 - t0) / bucket - 1e-9))
    out = []
    for i in range(n):
        lo = t0 + i * bucket
        out.append(sum(fabric.capacity_integral(k, lo, lo + bucket) for k in range(len(fabric.links))) / bucket)
    return out


@attrs.frozen
class Recovery:
    """How a run got over one fault (times in virtual seconds)."""

    rail: str
    fault: str
    at: float
    affected: int
    retries_lost: int
    resolved_at: float
    recovered_at: float | None

    @property
    def rerouted_ms(self) -> float:
        """Milliseconds until every affected slice was rerouted (or delivered)."""
        return (self.resolved_at - self.at) * 1e3

    @property
    def recovery_ms(self) -> float | None:
        """Milliseconds until rerouted *and* goodput back at the threshold; ``None`` if never."""
        return None if self.recovered_at is None else (self.recovered_at - self.at) * 1e3


def recovery(
    result: RunResult,
    fabric: FluidFabric,
    rail: str,
    fault: str,
    at: float,
    *,
    resolution: float = 1e-3,
    window: float = 5e-3,
    threshold: float = 0.9,
) -> Recovery:
    """Measure recovery from the fault ``fault`` that hit ``rail`` at ``at`` (see the module docstring)."""
    if not result.slices:
        raise ValueError("recovery needs a run recorded with record=True")
    noticed = min(
        (e.time for e in result.events if e.rail == rail and e.kind is EventKind.FAILURE and e.time >= at),
        default=math.inf,
    )
    mine = [s for s in result.slices if s.rail == rail and not s.probe and s.ended >= at]
    if fault == "degrade":
        affected = [s for s in mine if s.posted <= at]
    else:
        affected = [s for s in mine if s.posted <= at or s.posted < noticed]
    retries = [s for s in mine if s.posted >= noticed and s.outcome in ("failed", "withdrawn")]
    resolved = max((s.ended for s in affected), default=at)
    start = max(at, resolved)
    steps = max(1, round(window / resolution))
    buckets = int((result.end - start) / resolution + 1e-9)
    got = goodput(result.slices, start, start + buckets * resolution, resolution)
    cap = capacity(fabric, start, start + buckets * resolution, resolution)
    recovered: float | None = None
    for i in range(buckets - steps + 1):
        avail = sum(cap[i : i + steps])
        if avail > 0 and sum(got[i : i + steps]) >= threshold * avail:
            recovered = start + i * resolution
            break
    return Recovery(
        rail=rail,
        fault=fault,
        at=at,
        affected=len(affected),
        retries_lost=len(retries),
        resolved_at=resolved,
        recovered_at=recovered,
    )
