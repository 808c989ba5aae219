"""What each rail has shown it can do: bandwidth and latency learned from wire time.

The estimator is fed one completed slice at a time with the seconds the slice
spent *on the wire* (from when the rail could start on it to when it finished),
never the time it waited in the engine's own queue.  Bandwidth is the ratio of
two exponentially weighted sums, bytes over wire seconds, rather than an
average of per-slice rates: when a backend finishes two interleaved slices
almost together, the second one's near-zero wire time would make a per-slice
rate explode, while the ratio of sums stays right.

That ratio is the rail's *effective* rate at the sizes it was given.  When
every slice also pays a fixed cost (Python work per slice on a loaded host, a
round trip a short window cannot hide), the ratio reads the cost as a slower
rail, and slices sized from it shrink, pay the cost more often per byte and
sink to ``min_slice``.  So the estimator also fits ``wire time = cost +
bytes / wire_bandwidth`` by decayed least squares over the same samples; the
sizing rule (:func:`~.slicing.amortized_slice`) grows slices, when the cost
would sink them to ``min_slice``, until it is a small share of their time.  Slices of one size cannot tell a cost from a
slower rail: then the fit keeps the last slope it could measure (at first the
rail's nominal hint), which makes any excess time a cost.  Until a slope has
been measured that cost is only a guess (a rail slower than its hint looks
the same), so sizing acts on it only at ``min_slice``, where it would
otherwise stay for good: it grows the slices a little, and the grown slices
show the real slope.
"""

from __future__ import annotations

import attrs

_LATENCY_FLOOR = 1e-6  # seconds: lets a rail declared with zero latency still learn one
_FIT_ALPHA = 0.125  # weight of a new slice in the cost fit's moments (a memory of ~8 slices)
_PRIOR_SPREAD = 0.05  # the prior slope weighs as much as sizes spread by 5 % of their mean
_SURE_SPREAD = 0.1  # sizes spread by 10 %: the fitted slope becomes the new prior
_PRIOR_SPREAD2 = _PRIOR_SPREAD * _PRIOR_SPREAD
_SURE_SPREAD2 = _SURE_SPREAD * _SURE_SPREAD
_SURE_SAMPLES = 8  # ... over at least the fit's memory: the first few slices carry start-up effects
_MAX_OVER_HINT = 4.0  # a fitted wire bandwidth never exceeds 4x the larger of the hint and the ratio
_WRONG_START = 4.0  # a missed deadline bounding the rate this far under the start proves the start wrong


@attrs.define(slots=True)
class RailEstimator:
    """EWMA bandwidth (bytes/s) and latency (s) of one rail."""

    bandwidth: float
    latency: float
    alpha: float = 0.25
    alpha_down: float = 0.5
    samples: int = 0
    cost: float = 0.0  # fitted fixed seconds per slice (0 until slices show one)
    wire_bandwidth: float = 0.0  # fitted bytes/s once the cost is split off (the hint until then)
    mean_size: float = 0.0  # decayed mean slice size the fit saw
    slope_measured: bool = False  # sizes have once spread enough to measure the slope
    _bytes: float = 0.0
    _seconds: float = 0.0
    _hint: float = 0.0
    _slope: float = 0.0  # prior seconds per byte: the last slope the sizes could measure
    _mt: float = 0.0  # decayed moments of (size, time): E[t], E[size^2], E[size*t]
    _mxx: float = 0.0
    _mxt: float = 0.0

    def __attrs_post_init__(self) -> None:
        # The nominal hint acts as a prior worth one millisecond of traffic.
        self._seconds = 1e-3
        self._bytes = self.bandwidth * 1e-3
        self._hint = self.bandwidth
        self.wire_bandwidth = self.bandwidth
        self._slope = 1.0 / self.bandwidth

    def at_most(self, nbytes: int, elapsed: float) -> bool:
        """A rail that has finished no slice yet has had ``nbytes`` for ``elapsed`` s without finishing them.

        Its rate is then below ``nbytes / elapsed``: if that is far below the
        starting rate (under a quarter of it: a hint, or the device's nominal speed
        when none was given: a shaped veth reports 10 Gbit/s whatever it carries),
        the start was a wrong guess, and the estimator starts again from the bound.
        (Within a factor of four, a slice sized from the estimate finishes within
        its deadline anyway, and a hinted rail whose first slices were only delayed,
        by a loaded host say, keeps its hint.)  Without this a rail too
        slow to finish even ``min_slice`` within the deadline floor never finishes
        a slice in time, so it never learns its rate and only cycles through
        quarantine.  Once a slice has completed, a miss says nothing about the
        rate (the rail may be stalled or dead) and is ignored here.  Returns
        whether the estimate changed.
        """
        if self.samples or elapsed <= 0.0:
            return False
        rate = nbytes / elapsed
        if rate * _WRONG_START >= self.bandwidth:
            return False
        self.bandwidth = self.wire_bandwidth = rate
        self._seconds = 1e-3  # a prior worth one millisecond of traffic, as the hint's
        self._bytes = rate * 1e-3
        self._slope = 1.0 / rate
        return True

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
        # The fit takes the whole wire time: its intercept is the per-slice cost, and
        # the latency split above would hand part of that cost to the latency.
        self._fit(float(nbytes), wire_time)

    def _fit(self, size: float, seconds: float) -> None:
        """Update the decayed least-squares fit of ``seconds = cost + size * slope``.

        Ridge-regularised towards the prior slope, so that slices of one size
        give the prior back instead of a division by zero; the slope is
        clamped so that the cost is never negative and the wire bandwidth
        never absurd (at most ``_MAX_OVER_HINT`` x the hint or the ratio).
        Runs for every completed slice: plain locals, no powers.
        """
        if self.samples == 1:
            mx, mt, mxx, mxt = size, seconds, size * size, size * seconds
        else:
            a = _FIT_ALPHA
            mx = self.mean_size
            mx += a * (size - mx)
            mt = self._mt
            mt += a * (seconds - mt)
            mxx = self._mxx
            mxx += a * (size * size - mxx)
            mxt = self._mxt
            mxt += a * (size * seconds - mxt)
        self.mean_size, self._mt, self._mxx, self._mxt = mx, mt, mxx, mxt
        if mx <= 0.0 or mt <= 0.0:
            return
        mx2 = mx * mx
        var = mxx - mx2
        if var < 0.0:
            var = 0.0
        ridge = _PRIOR_SPREAD2 * mx2
        slope = (mxt - mx * mt + ridge * self._slope) / (var + ridge)
        if slope > mt / mx:
            slope = mt / mx
        hint = self._hint if self._hint > self.bandwidth else self.bandwidth
        if slope * hint * _MAX_OVER_HINT < 1.0:
            slope = 1.0 / (_MAX_OVER_HINT * hint)  # time that hardly grows with size: mostly cost
        if var >= _SURE_SPREAD2 * mx2 and self.samples >= _SURE_SAMPLES:
            self._slope = slope
            self.slope_measured = True
        self.wire_bandwidth = 1.0 / slope
        # A cost rises only as fast as the moments move once more, and falls at once:
        # a rail whose rate swings with a bursty neighbour shows a cost for a few
        # slices, a real one on every slice.
        cost = mt - slope * mx
        if cost < self.cost:
            self.cost = cost if cost > 0.0 else 0.0
        else:
            self.cost += _FIT_ALPHA * (cost - self.cost)
