"""Tunables of the scheduler, with the reasons for their defaults.

Every number the core uses lives here, in one frozen value, so that a run can
be reproduced from its config and a benchmark can change one knob at a time.
Strings such as ``"1ms"`` or ``"64KiB"`` are accepted wherever a duration or
size is expected.
"""

from __future__ import annotations

import numbers
from typing import Any

import attrs

from ..errors import ConfigError
from ..units import parse_duration, parse_size


def _number(attribute: attrs.Attribute[Any], value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{attribute.name} must be a number, got {value!r}")
    return value


def _positive(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _number(attribute, value) > 0:
        raise ConfigError(f"{attribute.name} must be positive, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not _number(attribute, value) >= 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _fraction(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < _number(attribute, value) <= 1.0:
        raise ConfigError(f"{attribute.name} must be in (0, 1], got {value!r}")


def _at_least_one(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{attribute.name} must be an integer, got {value!r}")
    if value < 1:
        raise ConfigError(f"{attribute.name} must be at least 1, got {value!r}")


def _penalties(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value or any(isinstance(p, bool) or not isinstance(p, numbers.Real) or not float(p) >= 1.0 for p in value):
        raise ConfigError(f"{attribute.name} must be a non-empty tuple of factors >= 1.0, got {value!r}")


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    """How the core slices, dispatches, learns and fails over.

    Slicing
        ``target_slice_time`` (1 ms): a slice should take about this long on the
        rail that carries it, so a 2 GB/s rail gets ~2 MB slices and a
        200 MB/s rail ~200 kB.  One millisecond keeps Python's decision rate in
        the low thousands per second per rail while bounding how much data a
        failed rail can hold hostage.  ``min_slice`` (64 KiB) keeps per-slice
        overhead small on slow rails; ``max_slice`` (16 MiB) bounds a slice on
        very fast rails; slices are multiples of ``slice_align`` (4 KiB) except
        the last one of an extent.  Under ``eft`` a transfer that would fill
        fewer slices than it has rails is water-filled over them instead
        (see :class:`~.policies.EarliestFinish`), never below ``min_slice``,
        except for the last slice of a transfer on a rail too slow to move
        ``min_slice`` in ``target_slice_time`` (its share, so that it ends with
        the others, down to :func:`~.slicing.tail_floor`).
        A remainder smaller than ``tail_merge`` (0.5) of a slice is merged into
        the slice before it rather than sent alone.  When a rail shows a fixed
        cost per slice big enough to sink its slices to ``min_slice`` (see
        Telemetry), its slices grow until that cost is at most
        ``slice_cost_share`` (0.25) of a slice's time, above
        ``target_slice_time`` if need be (1.0 turns this off).

    Dispatch
        ``window`` (2): slices a healthy rail may hold in flight.  Two keeps the
        wire busy while one completes, and is short enough that each decision
        is made late, with fresh telemetry.  A healthy rail also takes more
        slices of ``min_slice`` or less while what it holds is less than ``window``
        nominal slices' worth of bytes, up to ``max_window`` (16) slices (under
        ``eft``): many small transfers then keep a fast rail as busy as one
        elephant's big slices do.  ``tie_band`` (0.05): rails whose
        expected finish is within 5 % of the best are equivalent, so a slice is
        not held for a busy rail that is barely better (a rail too slow for
        one ``min_slice`` in ``target_slice_time`` is used outside the band
        while its slice lands before the transfer could end; docs/design.md).
        ``tier_penalty``
        multiplies a rail's expected finish by its topology tier (same PCIe
        switch, same NUMA node, across NUMA).  ``probe_interval`` (100 ms): an
        eligible rail that carried nothing for this long gets one small probe
        slice under ``eft`` so its estimate never goes stale.
        ``round_robin_slice`` (0 = derive): the fixed slice size of the
        state-blind ``round_robin`` baseline; by default the median of the
        rails' nominal slice sizes, so both policies cut similar slices.

    Queues
        Transfers that may use the same rails wait in one queue per priority
        class (``high``, ``normal``, ``background``).  The next slice goes to
        the highest class with work, round-robin between the transfers of that
        class (one slice each), except that a lower class passed over
        ``priority_aging`` (8) times in a row takes the next turn: background
        traffic gets at least one slice in nine however busy the rails are.
        Under ``eft`` background slices are ``background_slice`` (0.1) of
        the nominal size, leave one slot of each window free and avoid rails
        that carry a higher class's slice, so latency-critical traffic never
        waits behind a full window of bulk.  The fraction trades bulk's
        decisions per second (ten times more at 0.1) against how long an
        urgent slice shares a rail with bulk already in flight
        (docs/benchmarks.md, ``bench priority``).

    Telemetry
        Bandwidth is a ratio of exponentially weighted sums of bytes and wire
        seconds, which stays correct when a backend completes several slices
        at once.  ``ewma_alpha`` (0.25) is the weight of a new completion;
        ``ewma_alpha_down`` (0.5) is used when a sample is below the estimate so
        that a degrading rail is noticed within a couple of slices.  A fit of
        wire time = cost + bytes / bandwidth over slices of different sizes
        tells a fixed per-slice cost from a slower rail (docs/design.md).

    Failover
        ``deadline_factor`` (4) x expected time, but at least ``deadline_floor``
        (20 ms): a slice that has not completed by then counts as failed.  The
        floor absorbs scheduler hiccups of a busy Python process.
        ``quarantine_after`` (3) failures within ``failure_window`` (1 s) move a
        rail from suspect to quarantined; a backend may also declare a rail
        down at once.  Quarantine lasts ``backoff_base`` (50 ms) doubled per
        repeat, at most ``backoff_cap`` (5 s); each ``backoff_decay`` (2 s) of
        clean service forgives one doubling, so a flapping rail stays backed
        off.  ``recover_after`` (2) successes bring a suspect rail back to
        healthy.  A piece of data is retried at most ``max_attempts_per_rail``
        (2) times on each rail and ``max_attempts`` (16) times overall before
        its transfer fails.

        A missed deadline can be a false alarm (an overloaded host, a rail
        slower than believed): when a slice withdrawn for its deadline still
        completes, the rail's deadlines are doubled, up to
        ``deadline_backoff_cap`` (8) times, and relax again with each slice
        that completes in time.  When every rail a transfer may use is
        quarantined, the transfer waits up to ``no_rail_wait`` (1 s) for one to
        come back (quarantine over, probe succeeded) before failing with
        ``NoRailError``: one rail's hiccup must not fail a single-rail engine.
        A driver that polls late (its event loop's lag) has the deadlines that
        passed meanwhile pushed back once, when it was late by more than
        ``lag_tolerance`` (2 ms): less is ordinary timer jitter, and excusing
        it would only delay the detection of every real stall.

        A peer may refuse a slice for its own load (``busy``: no staging memory
        free, nothing landed).  That is not a rail fault: the rail keeps its
        health and its other slices, takes no new slice for ``busy_hold``
        (2 ms), doubled for each further refusal in a row up to
        ``busy_hold_cap`` (100 ms) and reset by the rail's next completed
        slice, and the refused bytes go back without spending their retries.
        A transfer refused as busy for ``busy_wait`` (5 s) without any of its
        slices completing fails with the peer's error.
    """

    target_slice_time: float = attrs.field(default=1e-3, converter=parse_duration, validator=_positive)
    min_slice: int = attrs.field(default=64 * 1024, converter=parse_size, validator=_positive)
    max_slice: int = attrs.field(default=16 * 1024 * 1024, converter=parse_size, validator=_positive)
    slice_align: int = attrs.field(default=4096, converter=parse_size, validator=_positive)
    tail_merge: float = attrs.field(default=0.5, validator=_fraction)
    slice_cost_share: float = attrs.field(default=0.25, validator=_fraction)

    window: int = attrs.field(default=2, validator=_at_least_one)
    max_window: int = attrs.field(default=16, validator=_at_least_one)
    tie_band: float = attrs.field(default=0.05, validator=_non_negative)
    tier_penalty: tuple[float, ...] = attrs.field(default=(1.0, 1.15, 1.4), converter=tuple, validator=_penalties)
    probe_interval: float = attrs.field(default=0.1, converter=parse_duration, validator=_positive)
    round_robin_slice: int = attrs.field(default=0, converter=parse_size, validator=_non_negative)
    priority_aging: int = attrs.field(default=8, validator=_at_least_one)
    background_slice: float = attrs.field(default=0.1, validator=_fraction)

    ewma_alpha: float = attrs.field(default=0.25, validator=_fraction)
    ewma_alpha_down: float = attrs.field(default=0.5, validator=_fraction)

    deadline_factor: float = attrs.field(default=4.0, validator=_positive)
    deadline_floor: float = attrs.field(default=0.02, converter=parse_duration, validator=_positive)
    quarantine_after: int = attrs.field(default=3, validator=_at_least_one)
    failure_window: float = attrs.field(default=1.0, converter=parse_duration, validator=_positive)
    backoff_base: float = attrs.field(default=0.05, converter=parse_duration, validator=_positive)
    backoff_cap: float = attrs.field(default=5.0, converter=parse_duration, validator=_positive)
    backoff_decay: float = attrs.field(default=2.0, converter=parse_duration, validator=_positive)
    recover_after: int = attrs.field(default=2, validator=_at_least_one)
    max_attempts_per_rail: int = attrs.field(default=2, validator=_at_least_one)
    max_attempts: int = attrs.field(default=16, validator=_at_least_one)
    deadline_backoff_cap: float = attrs.field(default=8.0, validator=_positive)
    no_rail_wait: float = attrs.field(default=1.0, converter=parse_duration, validator=_non_negative)
    lag_tolerance: float = attrs.field(default=0.002, converter=parse_duration, validator=_non_negative)
    busy_hold: float = attrs.field(default=0.002, converter=parse_duration, validator=_positive)
    busy_hold_cap: float = attrs.field(default=0.1, converter=parse_duration, validator=_positive)
    busy_wait: float = attrs.field(default=5.0, converter=parse_duration, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.min_slice > self.max_slice:
            raise ConfigError(f"min_slice ({self.min_slice}) must not exceed max_slice ({self.max_slice})")
        if self.slice_align > self.min_slice:
            raise ConfigError(f"slice_align ({self.slice_align}) must not exceed min_slice ({self.min_slice})")
        if self.busy_hold > self.busy_hold_cap:
            raise ConfigError(f"busy_hold ({self.busy_hold}) must not exceed busy_hold_cap ({self.busy_hold_cap})")
        if self.backoff_base > self.backoff_cap:
            raise ConfigError(f"backoff_base ({self.backoff_base}) must not exceed backoff_cap ({self.backoff_cap})")
