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


def cut(nominal: int, remaining: int, tail_merge: float) -> int:
    """How many of ``remaining`` bytes the next slice takes.

    Takes ``nominal`` bytes, or everything when what would be left is smaller
    than ``tail_merge * nominal`` (a tiny tail rides along with the slice
    before it instead of costing a decision and a round trip of its own).
    """
    if remaining <= nominal or remaining - nominal < tail_merge * nominal:
        return remaining
    return nominal
