"""Traffic: elephant flows, KV-cache blocks, periodic bulk transfers, tenants.

A workload is a frozen description; :meth:`source` turns it into a
:class:`Source` that hands the scenario runner :class:`Arrival` values, either
up front and as earlier ones arrive (open loop: Poisson KV blocks, periodic
elephants) or as earlier flows finish (closed loop: a fixed number of
elephants kept outstanding, like a weight-update job that sends its next
shard when one is done).  Every draw comes from the ``random.Random`` the
runner derives from the scenario seed, so traffic is reproducible.

Sizes are multiples of 4 KiB, as KV blocks and tensor shards are.
"""

from __future__ import annotations

import abc
import math
import random
from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from ...errors import ConfigError
from ...units import parse_duration, parse_size

_ALIGN = 4096


@attrs.frozen
class Arrival:
    """One flow to submit: ``size`` bytes from node ``src`` to node ``dst`` at ``time``."""

    time: float
    size: int
    src: int
    dst: int
    kind: str
    tenant: str


class Placement(Protocol):
    """What a workload needs to know about the topology."""

    def senders(self) -> list[int]: ...

    def receivers(self, src: int) -> list[int]: ...


@attrs.frozen
class WorkloadContext:
    """Run-time facts a workload is generated against.

    ``capacity``: the available capacity of the fabric (bytes/s, averaged over
    the horizon), what an offered ``load`` is a fraction of.  ``horizon``:
    no new flow arrives after it.
    """

    rng: random.Random
    topology: Placement
    capacity: float
    horizon: float


class Source(abc.ABC):
    """Run-time generator of arrivals for one workload."""

    @abc.abstractmethod
    def start(self) -> list[Arrival]:
        """Arrivals known at the start of the run."""

    def arrived(self, arrival: Arrival) -> list[Arrival]:
        """Called when ``arrival`` was submitted (open-loop sources chain here)."""
        return []

    def finished(self, arrival: Arrival, now: float) -> list[Arrival]:
        """Called when the flow of ``arrival`` ended (closed-loop sources refill here)."""
        return []


def _align(n: float) -> int:
    return max(_ALIGN, int(n) // _ALIGN * _ALIGN)


def _pair(ctx: WorkloadContext) -> tuple[int, int]:
    rng = ctx.rng
    senders = ctx.topology.senders()
    src = senders[0] if len(senders) == 1 else senders[rng.randrange(len(senders))]
    dsts = ctx.topology.receivers(src)
    dst = dsts[0] if len(dsts) == 1 else dsts[rng.randrange(len(dsts))]
    return src, dst


def _size(value: Any) -> int:
    return parse_size(value)


def _opt_size(value: Any) -> int | None:
    return None if value is None else parse_size(value)


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _at_least_one(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ConfigError(f"{attribute.name} must be at least 1, got {value!r}")


@attrs.frozen(kw_only=True)
class Elephants:
    """Closed loop of bulk flows: ``concurrency`` outstanding, a new one as soon as one ends.

    Sizes are uniform in ``[size, size_max]`` (fixed when ``size_max`` is
    ``None``).  Stops after ``count`` flows, or at the horizon.
    """

    size: int = attrs.field(default=4 * 1024**3, converter=_size, validator=_positive)
    size_max: int | None = attrs.field(default=None, converter=_opt_size)
    concurrency: int = attrs.field(default=1, validator=_at_least_one)
    count: int | None = None
    start: float = attrs.field(default=0.0, converter=parse_duration)
    kind: str = "elephant"
    tenant: str = "bulk"

    def __attrs_post_init__(self) -> None:
        if self.size_max is not None and self.size_max < self.size:
            raise ConfigError(f"size_max ({self.size_max}) must not be below size ({self.size})")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"count must be at least 1, got {self.count}")

    def source(self, ctx: WorkloadContext) -> Source:
        return _ElephantSource(self, ctx)


class _ElephantSource(Source):
    def __init__(self, spec: Elephants, ctx: WorkloadContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.issued = 0

    def _one(self, t: float) -> list[Arrival]:
        spec = self.spec
        if (spec.count is not None and self.issued >= spec.count) or t > self.ctx.horizon:
            return []
        self.issued += 1
        size = spec.size
        if spec.size_max is not None:
            size = _align(spec.size + self.ctx.rng.random() * (spec.size_max - spec.size))
        src, dst = _pair(self.ctx)
        return [Arrival(t, size, src, dst, spec.kind, spec.tenant)]

    def start(self) -> list[Arrival]:
        out: list[Arrival] = []
        for _ in range(self.spec.concurrency):
            out += self._one(self.spec.start)
        return out

    def finished(self, arrival: Arrival, now: float) -> list[Arrival]:
        return self._one(now)


@attrs.frozen(kw_only=True)
class Periodic:
    """Open loop: one ``size``-byte flow every ``period`` seconds from ``start`` to the horizon."""

    size: int = attrs.field(default=1024**3, converter=_size, validator=_positive)
    period: float = attrs.field(converter=parse_duration, validator=_positive)
    start: float = attrs.field(default=0.0, converter=parse_duration)
    kind: str = "elephant"
    tenant: str = "bulk"

    def source(self, ctx: WorkloadContext) -> Source:
        return _PeriodicSource(self, ctx)


class _PeriodicSource(Source):
    def __init__(self, spec: Periodic, ctx: WorkloadContext) -> None:
        self.spec = spec
        self.ctx = ctx

    def _at(self, t: float) -> list[Arrival]:
        if t > self.ctx.horizon:
            return []
        src, dst = _pair(self.ctx)
        return [Arrival(t, self.spec.size, src, dst, self.spec.kind, self.spec.tenant)]

    def start(self) -> list[Arrival]:
        return self._at(self.spec.start)

    def arrived(self, arrival: Arrival) -> list[Arrival]:
        return self._at(arrival.time + self.spec.period)


@attrs.frozen(kw_only=True)
class KVBlocks:
    """Open loop of KV-cache blocks: Poisson arrivals at ``load`` of the available capacity.

    Block sizes are log-uniform in ``[size_min, size_max]`` (many small
    blocks, a few large ones, as prefix-cache pages of varying sequence
    lengths are).  Each block belongs to one of ``tenants`` tenants, drawn
    uniformly, and in a cluster to a uniformly drawn (sender, receiver) pair.
    """

    load: float = attrs.field(validator=_positive)
    size_min: int = attrs.field(default=2 * 1024**2, converter=_size, validator=_positive)
    size_max: int = attrs.field(default=64 * 1024**2, converter=_size, validator=_positive)
    tenants: int = attrs.field(default=16, validator=_at_least_one)
    start: float = attrs.field(default=0.0, converter=parse_duration)
    kind: str = "kv"

    def __attrs_post_init__(self) -> None:
        if self.size_max < self.size_min:
            raise ConfigError(f"size_max ({self.size_max}) must not be below size_min ({self.size_min})")

    @property
    def mean_size(self) -> float:
        a, b = self.size_min, self.size_max
        return float(a) if a == b else (b - a) / math.log(b / a)

    def rate(self, capacity: float) -> float:
        """Blocks per second that make ``load`` of ``capacity`` bytes/s."""
        return self.load * capacity / self.mean_size

    def source(self, ctx: WorkloadContext) -> Source:
        return _KVSource(self, ctx)


class _KVSource(Source):
    def __init__(self, spec: KVBlocks, ctx: WorkloadContext) -> None:
        self.spec = spec
        self.ctx = ctx
        self.rate = spec.rate(ctx.capacity)
        self.log_a = math.log(spec.size_min)
        self.log_b = math.log(spec.size_max)

    def _next(self, t: float) -> list[Arrival]:
        rng = self.ctx.rng
        t += rng.expovariate(self.rate)
        if t > self.ctx.horizon:
            return []
        size = _align(math.exp(self.log_a + rng.random() * (self.log_b - self.log_a)))
        tenant = f"tenant{rng.randrange(self.spec.tenants)}"
        src, dst = _pair(self.ctx)
        return [Arrival(t, size, src, dst, self.spec.kind, tenant)]

    def start(self) -> list[Arrival]:
        return self._next(self.spec.start)

    def arrived(self, arrival: Arrival) -> list[Arrival]:
        return self._next(arrival.time)


Workload = Elephants | Periodic | KVBlocks
WORKLOAD_TYPES = (Elephants, Periodic, KVBlocks)


def check_workloads(value: Sequence[Any]) -> tuple[Workload, ...]:
    items = (value,) if isinstance(value, WORKLOAD_TYPES) else tuple(value)
    if not items:
        raise ConfigError("a scenario needs at least one workload")
    for w in items:
        if not isinstance(w, WORKLOAD_TYPES):
            raise ConfigError(f"workloads are Elephants, Periodic or KVBlocks values; got {w!r}")
    return items
