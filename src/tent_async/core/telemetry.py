"""What each rail has shown it can do: bandwidth and latency learned from wire time.

The estimator is fed one completed slice at a time with the seconds the slice
spent *on the wire* (from when the rail could start on it to when it finished),
never the time it waited in the engine's own queue.  Bandwidth is the ratio of
two exponentially weighted sums, bytes over wire seconds, rather than an
average of per-slice rates: when a backend finishes two interleaved slices
almost together, the second one's near-zero wire time would make a per-slice
rate explode, while the ratio of sums stays right.
"""

from __future__ import annotations

import attrs

_LATENCY_FLOOR = 1e-6  # seconds: lets a rail declared with zero latency still learn one


@attrs.define(slots=True)
class RailEstimator:
    """EWMA bandwidth (bytes/s) and latency (s) of one rail."""

    bandwidth: float
    latency: float
    alpha: float = 0.25
    alpha_down: float = 0.5
    samples: int = 0
    _bytes: float = 0.0
    _seconds: float = 0.0

    def __attrs_post_init__(self) -> None:
        # The nominal hint acts as a prior worth one millisecond of traffic.
        self._seconds = 1e-3
        self._bytes = self.bandwidth * 1e-3

    def observe(self, nbytes: int, wire_time: float, *, started_idle: bool) -> None:
        """Learn from one completed slice.

        ``started_idle`` says the slice had the rail to itself (nothing else in
        flight when it was posted, and, when the wire time is inferred, nothing
        posted after it before it finished), so its wire time includes one
        latency; that latency is split off and learned separately, weighted by
        latency's expected share of the wire time (a big slice can hardly tell
        a slower rail from a longer one, a small probe can).
        """
        wire_time = max(wire_time, 1e-9)
        if started_idle:
            lat_sample = max(0.0, wire_time - nbytes / self.bandwidth)
            lat_sample = min(lat_sample, wire_time)
            # A sample says little about latency when the slice's transfer time
            # dwarfs it: a rail that slowed down would pass for one that got
            # further away, and the latency would then penalise every slice on it.
            # Weight the update by latency's expected share of the wire time.
            expected_latency = self.latency + _LATENCY_FLOOR
            weight = expected_latency / (expected_latency + nbytes / self.bandwidth)
            self.latency += self.alpha * weight * (lat_sample - self.latency)
            transfer_time = max(wire_time - self.latency, 0.5 * wire_time)
        else:
            transfer_time = wire_time
        a = self.alpha_down if nbytes / transfer_time < self.bandwidth else self.alpha
        self._bytes += a * (nbytes - self._bytes)
        self._seconds += a * (transfer_time - self._seconds)
        self.bandwidth = self._bytes / self._seconds
        self.samples += 1
