"""Per-rail telemetry snapshots, inspectable from Python and printable.

``engine.telemetry()`` returns a :class:`Telemetry`: an immutable snapshot of
every rail (health, learned bandwidth and latency, what is in flight, totals
and failure counters) plus engine-wide counts.  The same snapshot feeds the
Prometheus exporter and the CLI, so all three always agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from .core import Health, Planner
from .units import format_rate, format_size


@attrs.frozen
class RailTelemetry:
    """One rail at one instant."""

    name: str
    health: str
    bandwidth: float  # learned, bytes/s
    latency: float  # learned, seconds
    nominal_bandwidth: float  # the hint it started from, bytes/s
    slice_size: int  # bytes the next slice on this rail would take
    inflight_slices: int
    inflight_bytes: int
    bytes_total: int  # bytes delivered for live attempts
    slices_total: int
    probes: int
    errors: int
    deadline_misses: int
    lag_excused: int  # deadlines pushed back because the engine's own loop was late
    rerouted: int  # slices taken off this rail to be sent elsewhere
    quarantines: int
    last_error: str
    samples: int  # completions the estimate has learned from
    busy_refusals: int = 0  # slices the peer refused for its own load (not failures: the rail stays healthy)
    held: bool = False  # the peer said it is busy: no new slice on this rail until its hold ends
    standby_for: str = ""  # the rail this one stands by for (RailInfo.standby_for)
    standing_by: bool = False  # usable, but leaves the bytes to that rail while it is healthy (core.stands_by)

    @property
    def state(self) -> str:
        """The health state, with ``(standby)`` while the rail stands by (tables and the CLI)."""
        return f"{self.health} (standby)" if self.standing_by else self.health

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Telemetry:
    """Snapshot of an engine's rails."""

    time: float
    policy: str
    rails: tuple[RailTelemetry, ...]
    open_transfers: int
    engine: str = ""
    transfers_done: int = 0
    transfers_failed: int = 0
    transfers_cancelled: int = 0
    bytes_done: int = 0  # bytes of transfers that completed
    loop_lag_last: float = 0.0  # seconds the engine's last timer fired late (event-loop lag)
    loop_lag_max: float = 0.0
    loop_lag_mean: float = 0.0
    backend: tuple[tuple[str, int], ...] = ()  # the backend's own counters (Backend.counters), by name

    @classmethod
    def from_planner(
        cls,
        planner: Planner,
        now: float,
        *,
        engine: str = "",
        done: int = 0,
        failed: int = 0,
        cancelled: int = 0,
        bytes_done: int = 0,
        loop_lag_last: float = 0.0,
        loop_lag_max: float = 0.0,
        loop_lag_mean: float = 0.0,
        backend: Mapping[str, int] | None = None,
    ) -> Telemetry:
        rails = tuple(
            RailTelemetry(
                name=r.name,
                health=r.health.state.value,
                bandwidth=r.estimator.bandwidth,
                latency=r.estimator.latency,
                nominal_bandwidth=r.info.bandwidth,
                slice_size=r.nominal,
                inflight_slices=len(r.inflight),
                inflight_bytes=r.inflight_bytes,
                bytes_total=r.bytes_total,
                slices_total=r.slices_total,
                probes=r.probes_total,
                errors=r.errors,
                deadline_misses=r.deadline_misses,
                lag_excused=r.lag_excused,
                rerouted=r.rerouted_from,
                quarantines=r.health.quarantines,
                last_error=r.last_error,
                samples=r.estimator.samples,
                busy_refusals=r.busy_refusals,
                held=r.held and now < r.held_until,  # poll() clears the flag; between polls, the clock
                standby_for=r.info.standby_for,
                standing_by=r.primary is not None and r.dispatchable and r.primary.health.state is Health.HEALTHY,
            )
            for r in planner.rails
        )
        return cls(
            time=now,
            policy=planner.policy.name,
            rails=rails,
            open_transfers=planner.open_transfers(),
            engine=engine,
            transfers_done=done,
            transfers_failed=failed,
            transfers_cancelled=cancelled,
            bytes_done=bytes_done,
            loop_lag_last=loop_lag_last,
            loop_lag_max=loop_lag_max,
            loop_lag_mean=loop_lag_mean,
            backend=tuple(sorted((backend or {}).items())),
        )

    def __getitem__(self, name: str) -> RailTelemetry:
        for rail in self.rails:
            if rail.name == name:
                return rail
        raise KeyError(f"no rail named {name!r}; rails: {[r.name for r in self.rails]}")

    def __iter__(self) -> Iterator[RailTelemetry]:
        return iter(self.rails)

    @property
    def inflight_bytes(self) -> int:
        return sum(r.inflight_bytes for r in self.rails)

    @property
    def inflight_slices(self) -> int:
        return sum(r.inflight_slices for r in self.rails)

    @property
    def bytes_per_rail(self) -> Mapping[str, int]:
        return {r.name: r.bytes_total for r in self.rails}

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["rails"] = [r.as_dict() for r in self.rails]
        return out

    def __str__(self) -> str:
        header = ("rail", "health", "learned bw", "latency", "slice", "in flight", "delivered", "slices", "errors")
        rows = [
            (
                r.name,
                r.state,
                format_rate(r.bandwidth),
                f"{r.latency * 1e6:.0f} us",
                format_size(r.slice_size),
                f"{r.inflight_slices} / {format_size(r.inflight_bytes)}",
                format_size(r.bytes_total),
                str(r.slices_total),
                str(r.errors + r.deadline_misses),
            )
            for r in self.rails
        ]
        widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]
        lines = [
            f"engine={self.engine or '?'} policy={self.policy} open_transfers={self.open_transfers} "
            f"done={self.transfers_done} failed={self.transfers_failed} cancelled={self.transfers_cancelled} "
            f"loop_lag_max={self.loop_lag_max * 1e3:.1f}ms"
        ]
        if not rows:
            # A listening ucx engine has no rails until a peer connects.
            lines.append("no rails yet (a listening ucx engine gets its rails when a peer connects)")
            return "\n".join(lines)
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
        return "\n".join(lines)
