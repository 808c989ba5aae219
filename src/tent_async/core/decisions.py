"""What the core tells its driver to do: post or withdraw an attempt, finish a transfer.

The planner never performs I/O.  Each call to :meth:`Planner.poll` returns a
list of these decisions, and the driver (the asyncio engine, or a simulator)
carries them out and later feeds back what happened.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from typing import Any

import attrs

from .extents import SliceExtents


@attrs.frozen
class Piece:
    """One (source, destination) pair of a transfer, as opaque references plus offsets.

    The core never looks inside ``src``/``dst``; the driver uses them to find
    the memory (for the engine they are segments).
    """

    src: Hashable
    src_offset: int
    dst: Hashable
    dst_offset: int
    length: int


class AttemptState(enum.Enum):
    """Life of one attempt to move one slice."""

    LIVE = "live"  # posted, its bytes count if it completes
    WITHDRAWING = "withdrawing"  # stale: asked to be withdrawn, may still land
    DONE = "done"  # resolved: completed, failed, or withdrawal confirmed


@attrs.define(slots=True, eq=False)
class Attempt:
    """One try at moving one slice over one rail.

    A slice is a run of its transfer's byte stream.  When the run lies in one
    extent, ``src``/``src_offset``/``dst``/``dst_offset`` say where, and
    ``extents`` is ``None``.  A scatter-gather slice (only for backends that
    declare ``scatter_gather``) carries several extents in ``extents``; the
    four fields then describe its first extent.

    A slice that fails is re-cut and retried as new attempts, so every attempt
    id is unique for the planner's lifetime and a late report for an old
    attempt can never be mistaken for a new one.
    """

    id: int
    transfer_id: int
    rail: int
    rail_name: str
    offset: int  # within the transfer's byte stream
    length: int
    src: Hashable
    src_offset: int
    dst: Hashable
    dst_offset: int
    posted_at: float
    expected: float  # seconds the planner expects it to take, queueing on the rail included
    deadline: float
    probe: bool = False
    started_idle: bool = False
    history: dict[int, int] | None = None  # failed tries of these bytes per rail index
    extents: SliceExtents | None = None  # several extents: a scatter-gather slice
    bulk: bool = False  # of a background-class transfer
    state: AttemptState = AttemptState.LIVE
    tag: Any = None  # free for the driver (e.g. a task or request handle)
    rail_posts: int = 0  # the rail's post count once this one was posted (a later count: overlapped)
    missed: bool = False  # withdrawn because it missed its deadline
    excused: bool = False  # its deadline was pushed back once because the driver itself was late


# Post, Withdraw and Finished are created once per slice or transfer on the hot
# path; attrs' frozen classes cost about half as much again to construct (Finished,
# ten fields: 0.64 us frozen, 0.16 us plain), so these are plain slotted classes.
# Treat them as read-only.


@attrs.define(slots=True)
class Post:
    """Start moving ``attempt.length`` bytes over rail ``attempt.rail``."""

    attempt: Attempt


@attrs.define(slots=True)
class Withdraw:
    """Stop ``attempt`` if it can be stopped, then report it resolved.

    The attempt is stale (its slice was rerouted, or its transfer is being
    cancelled or failed).  The driver must eventually call ``withdrawn``,
    ``complete`` or ``fail`` for it; until then its transfer stays open, so no
    stale copy can land after the transfer is reported finished.
    """

    attempt: Attempt


class Outcome(enum.Enum):
    """How a transfer ended."""

    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@attrs.define(slots=True)
class Finished:
    """A transfer ended; no attempt of it is live or withdrawing any more."""

    transfer_id: int
    outcome: Outcome
    bytes_per_rail: Mapping[str, int]
    slices: int
    attempts: int
    reroutes: int
    submitted_at: float
    finished_at: float
    error: BaseException | None = None
    acked: int = 0  # bytes that landed (all of them when DONE; what got through before a cancel or failure)


Decision = Post | Withdraw | Finished
