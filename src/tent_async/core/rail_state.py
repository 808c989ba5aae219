"""A rail as the core sees it: a static description plus live state.

:class:`RailInfo` is what a backend tells the core about a rail (name,
nominal bandwidth and latency, topology tier).  :class:`RailState` is the
planner's live view of it: what is in flight, what the estimator learned,
where it stands in the health state machine, and running totals.
"""

from __future__ import annotations

from typing import Any

import attrs

from .config import SchedulerConfig
from .decisions import Attempt
from .health import Health, RailHealth
from .slicing import nominal_slice
from .telemetry import RailEstimator


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class RailInfo:
    """Static description of a rail for the core.

    ``bandwidth`` (bytes/s) and ``latency`` (s) are starting points that
    telemetry replaces; ``tier`` indexes ``SchedulerConfig.tier_penalty``
    (0: same PCIe switch, 1: same NUMA node, 2: across NUMA nodes).
    """

    name: str
    bandwidth: float = attrs.field(validator=_positive)
    latency: float = 0.0
    tier: int = 0


class RailState:
    """Live state of one rail inside the planner."""

    __slots__ = (
        "_config",
        "bytes_total",
        "deadline_misses",
        "errors",
        "estimator",
        "health",
        "index",
        "inflight",
        "inflight_bytes",
        "info",
        "last_activity",
        "last_completion",
        "last_error",
        "name",
        "nominal",
        "penalty",
        "probe_checked",
        "probes_total",
        "rerouted_from",
        "slices_total",
        "window_full",
    )

    def __init__(self, index: int, info: RailInfo, config: SchedulerConfig) -> None:
        self.index = index
        self.info = info
        self.name = info.name
        penalties = config.tier_penalty
        self.penalty = penalties[min(max(info.tier, 0), len(penalties) - 1)]
        self.estimator = RailEstimator(
            bandwidth=info.bandwidth,
            latency=info.latency,
            alpha=config.ewma_alpha,
            alpha_down=config.ewma_alpha_down,
        )
        self.health = RailHealth(config)
        self.inflight: dict[int, Attempt] = {}  # insertion order == post order
        self.inflight_bytes = 0
        self.last_completion = -float("inf")
        self.last_activity = -float("inf")
        self.probe_checked = -float("inf")  # last time an idle probe found nothing to carry
        self.nominal = nominal_slice(info.bandwidth, config)
        self.window_full = config.window
        self.bytes_total = 0
        self.slices_total = 0
        self.probes_total = 0
        self.errors = 0
        self.deadline_misses = 0
        self.rerouted_from = 0
        self.last_error = ""
        self._config = config

    def refresh_nominal(self) -> None:
        """Recompute the slice size after the bandwidth estimate moved."""
        self.nominal = nominal_slice(self.estimator.bandwidth, self._config)

    def has_room(self) -> bool:
        health = self.health
        if health.state is Health.QUARANTINED:
            return False
        return len(self.inflight) < (self.window_full if health.state is Health.HEALTHY else 1)

    def effective_bandwidth(self, now: float) -> float:
        """Estimated bandwidth, lowered when the oldest slice in flight is overdue.

        A rail that suddenly slowed down tells nothing through completions
        until one arrives; an overdue slice already proves it is at most
        ``expected / elapsed`` as fast as believed.
        """
        bw = self.estimator.bandwidth
        if self.inflight:
            oldest = next(iter(self.inflight.values()))
            elapsed = now - oldest.posted_at
            if elapsed > oldest.expected > 0.0:
                bw *= oldest.expected / elapsed
        return bw

    def expected_time(self, size: int, now: float) -> float:
        """Seconds until a slice of ``size`` bytes posted now would finish (no penalty)."""
        return self.estimator.latency + (self.inflight_bytes + size) / self.effective_bandwidth(now)
