"""What happens to a link over time: background load, degradation, failures, stalls.

A link's *profile* is a tuple of the descriptions below.  Each is a frozen
value (so a scenario is a plain, comparable, printable object); at run time it
becomes a piecewise-constant signal of time, generated lazily from a seeded
``random.Random`` so that a 10-second run does not pre-draw anything it never
reaches and the same seed always gives the same timeline.

Capacity effects multiply: a link of nominal capacity ``C`` delivers
``C * prod(Degrade factors) * (1 - min(1, sum(background loads)))`` to our
traffic.  Background load is modelled as capacity taken by other tenants (their
traffic has its own congestion control and we only see what is left), which is
also exactly the "available capacity" a benchmark should compare against.

Modes do not multiply, they rank: a link is ``down`` (in-flight slices error
out and the backend reports the rail down) if any :class:`Outage` covers the
instant, else ``stalled`` (slices vanish silently) if any :class:`Stall` does,
else ``erroring`` (each slice fails, the rail is not declared down) if any
:class:`Errors` does, else ``up``.  All times are seconds from the start of the
fabric (the scenario, or the engine's start).
"""

from __future__ import annotations

import bisect
import enum
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from ...errors import ConfigError
from ...units import parse_duration

INF = math.inf


class Mode(enum.Enum):
    """What a link does to the slices sent into it."""

    UP = "up"
    ERRORING = "erroring"  # each slice fails with an error; the rail is not declared down
    STALLED = "stalled"  # slices never complete and raise nothing (a hung peer)
    DOWN = "down"  # slices fail and the backend reports the rail down (link lost)


_MODE_RANK = {Mode.UP: 0, Mode.ERRORING: 1, Mode.STALLED: 2, Mode.DOWN: 3}


def _time(value: Any) -> float:
    return parse_duration(value)


def _opt_time(value: Any) -> float | None:
    return None if value is None else parse_duration(value)


def _points(value: Any) -> tuple[tuple[float, float], ...]:
    return tuple((parse_duration(t), float(v)) for t, v in value)


def _load(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{attribute.name} must be a fraction in [0, 1], got {value!r}")


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _check_window(at: float, until: float | None, what: str) -> None:
    if until is not None and until <= at:
        raise ConfigError(f"{what}: until ({until}) must be later than at ({at})")


@attrs.frozen
class Bursts:
    """Cross-tenant background traffic in on/off bursts.

    While a burst is on, the other tenant takes ``load`` of the link's
    capacity.  On and off periods have exponentially distributed lengths with
    means ``mean_on`` and ``mean_off`` (so the long-run duty cycle is
    ``mean_on / (mean_on + mean_off)``); the first period is on with that
    probability.  Bursts run from ``start`` until ``until`` (default forever).
    """

    load: float = attrs.field(validator=_load)
    mean_on: float = attrs.field(converter=_time, validator=_positive)
    mean_off: float = attrs.field(converter=_time, validator=_positive)
    start: float = attrs.field(default=0.0, converter=_time)
    until: float | None = attrs.field(default=None, converter=_opt_time)

    def __attrs_post_init__(self) -> None:
        _check_window(self.start, self.until, "Bursts")

    @property
    def duty(self) -> float:
        return self.mean_on / (self.mean_on + self.mean_off)


@attrs.frozen
class Trace:
    """Background load given as ``(time, load)`` breakpoints, held until the next one.

    Before the first breakpoint the load is zero.
    """

    points: tuple[tuple[float, float], ...] = attrs.field(converter=_points)

    def __attrs_post_init__(self) -> None:
        times = [t for t, _ in self.points]
        if times != sorted(times) or len(set(times)) != len(times):
            raise ConfigError(f"Trace times must be strictly increasing, got {times}")
        for _, v in self.points:
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"Trace loads must be fractions in [0, 1], got {v!r}")


@attrs.frozen
class Degrade:
    """The link delivers ``factor`` of its capacity from ``at`` (until ``until``), without errors."""

    at: float = attrs.field(converter=_time)
    factor: float = attrs.field()
    until: float | None = attrs.field(default=None, converter=_opt_time)

    @factor.validator
    def _factor(self, _attribute: attrs.Attribute[Any], value: float) -> None:
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"Degrade factor must be in (0, 1] (use Stall or Outage for 0), got {value!r}")

    def __attrs_post_init__(self) -> None:
        _check_window(self.at, self.until, "Degrade")


@attrs.frozen
class Outage:
    """Hard failure from ``at`` until ``until`` (default: never recovers).

    Slices in flight error out; the backend reports the rail down.
    """

    at: float = attrs.field(converter=_time)
    until: float | None = attrs.field(default=None, converter=_opt_time)

    def __attrs_post_init__(self) -> None:
        _check_window(self.at, self.until, "Outage")


@attrs.frozen
class Stall:
    """Silent stall from ``at`` until ``until``: slices sent in never complete and raise nothing.

    Slices caught in the stall stay lost after it ends (like messages to a peer
    that hung); only the scheduler's deadlines notice them, and withdrawing
    them releases them.
    """

    at: float = attrs.field(converter=_time)
    until: float | None = attrs.field(default=None, converter=_opt_time)

    def __attrs_post_init__(self) -> None:
        _check_window(self.at, self.until, "Stall")


@attrs.frozen
class Errors:
    """From ``at`` until ``until`` every slice on the link fails with an error (rail not declared down)."""

    at: float = attrs.field(converter=_time)
    until: float | None = attrs.field(default=None, converter=_opt_time)

    def __attrs_post_init__(self) -> None:
        _check_window(self.at, self.until, "Errors")


Profile = Bursts | Trace | Degrade | Outage | Stall | Errors
"""One element of a link's profile."""

PROFILE_TYPES = (Bursts, Trace, Degrade, Outage, Stall, Errors)


def flapping(start: float | str, down: float | str, up: float | str, count: int) -> tuple[Outage, ...]:
    """``count`` outages of ``down`` seconds separated by ``up`` seconds of service, from ``start``."""
    if count < 1:
        raise ConfigError(f"flapping needs at least one outage, got count={count}")
    t0, d, u = parse_duration(start), parse_duration(down), parse_duration(up)
    if not d > 0 or not u > 0:
        raise ConfigError("flapping: down and up periods must be positive")
    return tuple(Outage(at=t0 + i * (d + u), until=t0 + i * (d + u) + d) for i in range(count))


# ------------------------------------------------------------------ run time


class Signal:
    """A piecewise-constant function of time, extended lazily from a generator.

    ``times[i]`` is when the value becomes ``values[i]``; before ``times[0]``
    the value is ``initial``.
    """

    __slots__ = ("_gen", "initial", "times", "values")

    def __init__(self, initial: float, changes: Iterator[tuple[float, float]]) -> None:
        self.initial = initial
        self.times: list[float] = []
        self.values: list[float] = []
        self._gen: Iterator[tuple[float, float]] | None = changes

    def _extend_past(self, t: float) -> None:
        gen = self._gen
        while gen is not None and (not self.times or self.times[-1] <= t):
            try:
                when, value = next(gen)
            except StopIteration:
                self._gen = gen = None
                break
            self.times.append(when)
            self.values.append(value)

    def at(self, t: float) -> float:
        self._extend_past(t)
        i = bisect.bisect_right(self.times, t)
        return self.initial if i == 0 else self.values[i - 1]

    def next_change(self, t: float) -> float:
        """The first breakpoint strictly after ``t`` (``inf`` if none)."""
        self._extend_past(t)
        i = bisect.bisect_right(self.times, t)
        return self.times[i] if i < len(self.times) else INF


def _bursts(p: Bursts, rng: random.Random) -> Iterator[tuple[float, float]]:
    until = INF if p.until is None else p.until
    on = rng.random() < p.duty
    t = p.start
    while t < until:
        yield t, (p.load if on else 0.0)
        t += rng.expovariate(1.0 / (p.mean_on if on else p.mean_off))
        on = not on
    yield until, 0.0


def _steps(points: Sequence[tuple[float, float]]) -> Iterator[tuple[float, float]]:
    yield from points


def _window(at: float, until: float | None, inside: float, outside: float) -> Iterator[tuple[float, float]]:
    yield at, inside
    if until is not None:
        yield until, outside


class LinkTimeline:
    """Capacity and mode of one link as functions of time (relative to the fabric's start)."""

    def __init__(self, capacity: float, profile: Sequence[Profile], rng: random.Random) -> None:
        self.capacity = capacity
        self.loads: list[Signal] = []
        self.factors: list[Signal] = []
        self.modes: list[tuple[Mode, Signal]] = []
        for p in profile:
            if isinstance(p, Bursts):
                self.loads.append(Signal(0.0, _bursts(p, random.Random(rng.getrandbits(64)))))
            elif isinstance(p, Trace):
                self.loads.append(Signal(0.0, _steps(p.points)))
            elif isinstance(p, Degrade):
                self.factors.append(Signal(1.0, _window(p.at, p.until, p.factor, 1.0)))
            elif isinstance(p, Outage | Stall | Errors):
                mode = Mode.DOWN if isinstance(p, Outage) else Mode.STALLED if isinstance(p, Stall) else Mode.ERRORING
                self.modes.append((mode, Signal(0.0, _window(p.at, p.until, 1.0, 0.0))))
            else:
                raise TypeError(f"not a link profile element: {p!r}; use one of {[c.__name__ for c in PROFILE_TYPES]}")
        self._signals: list[Signal] = [*self.loads, *self.factors, *(s for _, s in self.modes)]

    @property
    def static(self) -> bool:
        """No profile at all: full capacity forever."""
        return not self._signals

    def capacity_at(self, t: float) -> float:
        """Capacity left to our traffic at ``t`` (bytes/s), whatever the mode."""
        cap = self.capacity
        for f in self.factors:
            cap *= f.at(t)
        if self.loads:
            cap *= 1.0 - min(1.0, sum(s.at(t) for s in self.loads))
        return cap

    def mode_at(self, t: float) -> Mode:
        mode = Mode.UP
        for m, s in self.modes:
            if s.at(t) > 0.0 and _MODE_RANK[m] > _MODE_RANK[mode]:
                mode = m
        return mode

    def available_at(self, t: float) -> float:
        """Capacity our traffic can actually use: zero while the link is not up."""
        return self.capacity_at(t) if self.mode_at(t) is Mode.UP else 0.0

    def next_change(self, t: float) -> float:
        """First instant after ``t`` at which capacity or mode may change (``inf`` if never)."""
        nxt = INF
        for s in self._signals:
            c = s.next_change(t)
            if c < nxt:
                nxt = c
        return nxt

    def integral(self, t0: float, t1: float) -> float:
        """Bytes the link could have carried for us in ``[t0, t1]`` (available capacity integrated)."""
        if t1 <= t0:
            return 0.0
        total = 0.0
        t = t0
        while t < t1:
            nxt = min(self.next_change(t), t1)
            total += self.available_at(t) * (nxt - t)
            t = nxt
        return total
