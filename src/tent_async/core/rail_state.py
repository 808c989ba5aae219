"""A rail as the core sees it: a static description plus live state.

:class:`RailInfo` is what a backend tells the core about a rail (name,
nominal bandwidth and latency, topology tier).  :class:`RailState` is the
planner's live view of it: what is in flight, what the estimator learned,
where it stands in the health state machine, and running totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import attrs

from .config import SchedulerConfig
from .decisions import Attempt
from .health import Health, RailHealth
from .slicing import amortized_slice, nominal_slice, tail_floor
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
    ``slice_cost`` (s) is the fixed cost the backend states for every slice
    (header, check, acknowledgement, thread hops): it is added to the
    latency the estimator starts from, so the expected finish of a slice
    includes it, and the estimator then learns the real intercept.
    ``extents_free`` and ``extent_bytes`` state how many extents one slice of
    a scatter-gather transfer may carry: at most ``extents_free`` plus one per
    ``extent_bytes`` of its length (0: no limit) and at most ``extents_max``
    in all (0: no cap), as a peer bounds the work one header may ask of it;
    the planner cuts such slices shorter to fit.
    ``standby_for`` names another rail whose capacity this one shares (TCP
    between two processes on one host moves its bytes with the same CPUs as
    shared memory to the same peer, at a higher cost per byte): the rail then
    leaves a transfer's bytes to that rail while it is healthy, one of the
    transfer's rails and has retries left for them (:func:`stands_by`), so it
    adds failover without taking capacity from the better rail.  It carries as
    soon as that rail is suspect, quarantined or probing, as any rail would.
    eft's idle probes still visit it, so its health is known before it is needed.
    One level only: a rail that stands by has no standbys itself
    (:func:`standby_error`).
    """

    name: str
    bandwidth: float = attrs.field(validator=_positive)
    latency: float = 0.0
    tier: int = 0
    slice_cost: float = 0.0
    extents_free: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    extent_bytes: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    extents_max: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    standby_for: str = attrs.field(default="", kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.standby_for == self.name:
            raise ValueError(f"rail {self.name!r} cannot stand by for itself")


class _Standby(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def standby_for(self) -> str | None: ...


def standby_error(infos: Sequence[_Standby], *, pending_ok: bool = False) -> str:
    """What is wrong with the standby relations of ``infos`` ("" if nothing).

    Every named rail must be one of ``infos`` (unless ``pending_ok``: the
    planner takes rails one at a time, and a standby whose rail never comes
    carries like any rail), and the relation has one level: a rail stands by
    only for a rail that stands by for nothing, so there are no chains and no
    cycles.
    """
    by_name = {i.name: i for i in infos}
    for info in infos:
        target = info.standby_for
        if not target:
            continue
        if target == info.name:
            return f"rail {info.name!r} cannot stand by for itself"
        if target not in by_name and not pending_ok:
            return f"rail {info.name!r} stands by for {target!r}, which is not a rail here ({sorted(by_name)})"
        primary = by_name.get(target)
        if primary is not None and primary.standby_for:
            return (
                f"rail {info.name!r} stands by for {target!r}, which itself stands by for "
                f"{primary.standby_for!r}: a standby's rail must not stand by (one level only)"
            )
    return ""


def stands_by(rail: RailState, rails: tuple[RailState, ...], history: dict[int, int] | None, limit: int) -> bool:
    """Does standby ``rail`` leave these bytes to the rail it stands by for?

    Yes while that rail is healthy, is one of the transfer's ``rails`` and has
    retries left for the bytes (``history``: attempts per rail index, ``limit``
    at most); a policy calls this only for a rail with a ``primary``.  So the
    standby carries as soon as its rail is suspect, quarantined or probing,
    takes what that rail may no longer retry, and serves a transfer that may
    not use that rail at all.
    """
    primary = rail.primary
    return (
        primary is not None
        and primary.health.state is Health.HEALTHY
        and primary in rails
        and (history is None or history.get(primary.index, 0) < limit)
    )


class RailState:
    """Live state of one rail inside the planner."""

    __slots__ = (
        "_config",
        "bulk_inflight",
        "busy_refusals",
        "busy_streak",
        "bw",
        "bytes_total",
        "deadline_misses",
        "deadline_scale",
        "delivered",
        "delivered_bytes",
        "delivered_seconds",
        "dispatchable",
        "errors",
        "estimator",
        "head_expected",
        "head_length",
        "head_posted",
        "health",
        "held",
        "held_until",
        "index",
        "inflight",
        "inflight_bytes",
        "info",
        "lag_excused",
        "last_activity",
        "last_completion",
        "last_error",
        "lat",
        "name",
        "nominal",
        "penalty",
        "posts",
        "primary",
        "probe_checked",
        "probes_total",
        "rerouted_from",
        "room",
        "slices_total",
        "slow",
        "standbys",
        "tail",
        "window",
        "window_full",
        "window_max",
    )

    def __init__(self, index: int, info: RailInfo, config: SchedulerConfig) -> None:
        self.index = index
        self.info = info
        self.name = info.name
        penalties = config.tier_penalty
        self.penalty = penalties[min(max(info.tier, 0), len(penalties) - 1)]
        self.estimator = RailEstimator(
            bandwidth=info.bandwidth,
            latency=info.latency + info.slice_cost,
            alpha=config.ewma_alpha,
            alpha_down=config.ewma_alpha_down,
        )
        self.health = RailHealth(config)
        self.primary: RailState | None = None  # the rail this one stands by for (info.standby_for), once added
        self.standbys: list[RailState] = []  # rails standing by for this one
        self.inflight: dict[int, Attempt] = {}  # insertion order == post order
        self.inflight_bytes = 0
        self.bulk_inflight = 0  # background-class slices among them
        # Mirrors of the estimator and of the oldest attempt in flight, kept as
        # plain attributes because the dispatcher reads them for every rail of
        # every decision.
        self.bw = info.bandwidth
        self.lat = self.estimator.latency
        self.head_posted = 0.0
        self.head_expected = 0.0
        self.head_length = 0
        self.last_completion = -float("inf")
        # Bytes per second the rail delivered while busy, on the planner's own clock (0: not
        # yet measured); see note_delivery().
        self.delivered = 0.0
        self.delivered_bytes = 0.0
        self.delivered_seconds = 0.0
        self.last_activity = -float("inf")
        self.probe_checked = -float("inf")  # last time an idle probe found nothing to carry
        self.nominal = nominal_slice(info.bandwidth, config)
        # Too slow to move min_slice in target_slice_time (eft plans such a rail's last slice
        # of a transfer below min_slice, down to ``tail``; policies.EarliestFinish).
        self.slow = info.bandwidth * config.target_slice_time < config.min_slice
        self.tail = tail_floor(info.bandwidth, self.lat, config)
        self.window_full = config.window
        self.window = config.window  # slices allowed in flight in the current health state
        self.window_max = max(config.window, config.max_window)  # 0: no byte budget (Planner)
        self.room = True  # may take another slice now (see _update_room)
        self.dispatchable = True  # healthy or suspect: a policy may choose it
        self.deadline_scale = 1.0  # grows when a slice withdrawn for its deadline completes after all
        self.bytes_total = 0
        self.slices_total = 0
        self.probes_total = 0
        self.posts = 0  # slices ever posted (an attempt compares it with its own count)
        self.errors = 0
        self.busy_refusals = 0  # slices the peer refused for its load (not failures)
        self.busy_streak = 0  # refusals since the rail's last completed slice
        self.held = False  # the peer is busy: no new slice before held_until
        self.held_until = 0.0
        self.deadline_misses = 0
        self.lag_excused = 0  # deadlines pushed back because the driver polled late
        self.rerouted_from = 0
        self.last_error = ""
        self._config = config

    def refresh(self) -> None:
        """Pick up the estimator's new values (and the slice size they imply)."""
        self.refresh_estimates()
        self._update_room()

    def refresh_estimates(self) -> None:
        """:meth:`refresh` without the room update, for a caller that updates the room next."""
        est = self.estimator
        self.bw = est.bandwidth
        self.lat = est.latency
        self.nominal = nominal_slice(self.bw, self._config)
        # A cost guessed from the hint's slope (slices of one size so far) acts only at
        # min_slice, where a rail slower than its hint would otherwise look just the same.
        if est.cost > 0.0 and (est.slope_measured or self.nominal <= self._config.min_slice):
            self.nominal = amortized_slice(self.nominal, est.wire_bandwidth, est.cost, est.mean_size, self._config)
        slow = self.bw * self._config.target_slice_time < self._config.min_slice
        if slow:
            self.tail = tail_floor(est.wire_bandwidth, max(est.cost, est.latency), self._config)
        elif self.slow:  # fast again: what it delivered as a slow rail is stale
            self.delivered = self.delivered_bytes = self.delivered_seconds = 0.0
        self.slow = slow

    def note_delivery(self, nbytes: int, seconds: float) -> None:
        """A slice of ``nbytes`` completed ``seconds`` after the rail's previous completion,
        and was in flight all that time: the rail delivered it in that interval (measured
        on slow rails only, where it is used).

        This rate is measured on the planner's clock from completions alone, whatever
        wire time the backend reports.  A backend's wire time can leave out time that
        still moved the rail's bytes (the ucx backend subtracts its event loop's time
        on other rails, while the kernel keeps sending a TCP rail's queued bytes), and
        an estimate a tenth too fast on a slow rail ends the transfer late: the tail
        rule plans a slow rail's last slice with the lower of the two.  A ratio of
        decayed sums, as in the estimator, so slices completing together do not make
        it explode.
        """
        a = self._config.ewma_alpha
        if self.delivered_seconds == 0.0:
            self.delivered_bytes, self.delivered_seconds = float(nbytes), seconds
        else:
            self.delivered_bytes += a * (nbytes - self.delivered_bytes)
            self.delivered_seconds += a * (seconds - self.delivered_seconds)
        if self.delivered_seconds > 0.0:
            self.delivered = self.delivered_bytes / self.delivered_seconds

    def add(self, attempt: Attempt) -> None:
        """Account a newly posted attempt."""
        if not self.inflight:
            self.head_posted = attempt.posted_at
            self.head_expected = attempt.expected
            self.head_length = attempt.length
        self.inflight[attempt.id] = attempt
        self.posts += 1
        attempt.rail_posts = self.posts
        self.inflight_bytes += attempt.length
        if attempt.bulk:
            self.bulk_inflight += 1
        self._update_room()

    def remove(self, attempt: Attempt) -> None:
        """Release a resolved attempt (idempotent)."""
        inflight = self.inflight
        if inflight.pop(attempt.id, None) is None:
            return
        self.inflight_bytes -= attempt.length
        if attempt.bulk:
            self.bulk_inflight -= 1
        if inflight and attempt.posted_at <= self.head_posted:
            head = next(iter(inflight.values()))
            self.head_posted = head.posted_at
            self.head_expected = head.expected
            self.head_length = head.length
        self._update_room()

    def sync_health(self) -> None:
        """Mirror the health state into the two fields the dispatcher reads for every decision.

        Both come from :class:`~.health.RailHealth`, which alone decides what a
        state allows; this only caches the answer.
        """
        health = self.health
        self.dispatchable = health.dispatchable
        # A rail held for a busy peer keeps its health but has no window until the hold ends.
        self.window = 0 if self.held else health.window(self.window_full)
        self._update_room()

    def _update_room(self) -> None:
        """May the rail take a small slice now?  (``has_room``: a slice of any size.)

        A rail takes a slice while it holds fewer than ``window`` slices, and a
        healthy one also takes small slices (``min_slice`` or less) while what
        it holds is less than ``window`` nominal slices' worth of bytes, up to
        ``max_window`` slices: a stream of small transfers then keeps a fast
        rail busy across the driver's reaction time, as one elephant's big
        slices do, while work committed ahead of a decision stays as short.
        """
        n = len(self.inflight)
        self.room = n < self.window or (
            n < self.window_max
            and self.health.state is Health.HEALTHY
            and self.inflight_bytes < self.window * self.nominal
        )

    def set_window_max(self, window_max: int) -> None:
        """Slices a healthy rail may hold by the byte budget; 0 turns the budget off."""
        self.window_max = window_max
        self._update_room()

    def has_room(self) -> bool:
        """May the rail take a slice of any size now (the plain ``window`` count)?"""
        return len(self.inflight) < self.window

    def effective_bandwidth(self, now: float) -> float:
        """Estimated bandwidth, lowered when the oldest slice in flight is overdue.

        A rail that suddenly slowed down tells nothing through completions
        until one arrives; an overdue slice already proves it is at most
        ``expected / elapsed`` as fast as believed.
        """
        bw = self.bw
        if self.inflight:
            elapsed = now - self.head_posted
            if elapsed > self.head_expected > 0.0:
                bw *= self.head_expected / elapsed
        return bw

    def expected_time(self, size: int, now: float) -> float:
        """Seconds until a slice of ``size`` bytes posted now would finish (no penalty)."""
        return self.lat + (self.inflight_bytes + size) / self.effective_bandwidth(now)
