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

        ``started_idle`` says the rail had nothing else in flight when the slice
        was posted, so its wire time includes one latency; that latency is
        split off and learned separately.
        """
        wire_time = max(wire_time, 1e-9)
        if started_idle:
            lat_sample = max(0.0, wire_time - nbytes / self.bandwidth)
            lat_sample = min(lat_sample, wire_time)
            self.latency += self.alpha * (lat_sample - self.latency)
            transfer_time = max(wire_time - self.latency, 0.5 * wire_time)
        else:
            transfer_time = wire_time
        a = self.alpha_down if nbytes / transfer_time < self.bandwidth else self.alpha
        self._bytes += a * (nbytes - self._bytes)
        self._seconds += a * (transfer_time - self._seconds)
        self.bandwidth = self._bytes / self._seconds
        self.samples += 1
