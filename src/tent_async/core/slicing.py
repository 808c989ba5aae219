"""How big a slice is: the same expected time on every rail.

Slices are cut lazily, at the moment a rail is chosen, from the front of the
transfer's remaining bytes.  Cutting late lets the size follow the rail that
will carry it (big on fast rails, small on slow ones) and lets a rerouted
range be re-cut for the rail it moves to.
"""

from __future__ import annotations

from .config import SchedulerConfig


def nominal_slice(bandwidth: float, config: SchedulerConfig) -> int:
    """The slice size for a rail of ``bandwidth`` bytes/s, before the tail rule.

    ``bandwidth * target_slice_time``, clamped to ``[min_slice, max_slice]``
    and rounded down to ``slice_align``.
    """
    size = int(bandwidth * config.target_slice_time)
    size = max(config.min_slice, min(config.max_slice, size))
    return max(config.slice_align, size - size % config.slice_align)


def amortized_slice(nominal: int, wire_bandwidth: float, cost: float, mean_size: float, config: SchedulerConfig) -> int:
    """``nominal``, grown so that a fixed per-slice ``cost`` stays a small share of a slice's time.

    A slice of ``s`` bytes takes ``cost + s / wire_bandwidth``; the cost is at
    most ``slice_cost_share`` of that when ``s >= wire_bandwidth * cost * (1 -
    share) / share``.  Growth is at most twice ``mean_size`` (the sizes the
    estimate came from) per step, so a cost that was really a slower rail is
    corrected by the next, bigger slices before they get big; never above
    ``max_slice``, never below ``nominal``.

    Acts only on a cost that would sink slices sized from the ratio to
    ``min_slice``: a slice of ``s = bw * target`` bytes at the effective rate
    ``bw = s / (cost + s / wire_bandwidth)`` settles at ``s = wire_bandwidth *
    (target - cost)``, at or below ``min_slice`` once ``cost >= target -
    min_slice / wire_bandwidth``.  A smaller cost leaves a slice above the
    floor, of which it is at most its share of the target, and rails whose
    rate swings with bursty neighbours show spurious costs of that order
    (``bench sim``'s congested scenario lost 4 % of its throughput when
    slices grew on costs of half the target).
    """
    share = config.slice_cost_share
    if share >= 1.0 or cost < config.target_slice_time - config.min_slice / wire_bandwidth:
        return nominal
    want = wire_bandwidth * cost * (1.0 - share) / share
    if want <= nominal:
        return nominal
    size = int(min(want, 2.0 * mean_size, float(config.max_slice)))
    size -= size % config.slice_align
    return max(nominal, size)


def tail_floor(wire_bandwidth: float, fixed: float, config: SchedulerConfig) -> int:
    """The smallest slice worth cutting below ``min_slice`` at the end of a transfer.

    At a transfer's end a slow rail's last slice is its share of the remainder
    (:class:`~.policies.EarliestFinish`), so that the rails finish together
    instead of one taking a whole ``min_slice`` and finishing last.  Not
    smaller than this: a slice also pays a fixed time (``fixed``: the rail's
    learned per-slice cost or latency), which should stay within
    ``slice_cost_share`` of the slice's time (as :func:`amortized_slice` keeps
    it); and an eighth of ``min_slice`` at least, because the share of a rail
    that already holds its last slices grows only by the drift of the
    estimates (a few percent of the time left), and cutting that drift into
    slices would add slices, not balance.  At most ``min_slice``.
    """
    share = config.slice_cost_share
    align = config.slice_align
    size = int(min(max(wire_bandwidth * fixed * (1.0 - share) / share, config.min_slice / 8), config.min_slice))
    return max(align, size - size % align)


def cut(nominal: int, remaining: int, tail_merge: float) -> int:
    """How many of ``remaining`` bytes the next slice takes.

    Takes ``nominal`` bytes, or everything when what would be left is smaller
    than ``tail_merge * nominal`` (a tiny tail rides along with the slice
    before it instead of costing a decision and a round trip of its own).
    """
    if remaining <= nominal or remaining - nominal < tail_merge * nominal:
        return remaining
    return nominal
