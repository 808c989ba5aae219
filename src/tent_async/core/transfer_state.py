"""A transfer as the core sees it: a byte stream, what is left to send, what is in flight.

A transfer is one byte stream laid over its extents (see :mod:`.extents`).
Work left is a queue of stream ranges.  Slices are cut from the front range at
dispatch time; a range whose attempt failed goes back to the *front*, with
the failure remembered per rail so that retries are bounded.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import attrs

from .extents import Extents
from .rail_state import RailState

if TYPE_CHECKING:
    from .queues import RailGroup


class Phase(enum.Enum):
    """Where a transfer stands inside the planner."""

    RUNNING = "running"
    FAILING = "failing"  # failed; waiting for its attempts to be withdrawn
    CANCELLING = "cancelling"  # cancelled; waiting for its attempts to be withdrawn


class Priority(enum.IntEnum):
    """Dispatch classes: latency-critical first, bulk last (see :mod:`.queues`)."""

    HIGH = 0
    NORMAL = 1
    BACKGROUND = 2

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2:
            return cls(value)
        raise ValueError(f"priority must be 'high', 'normal' or 'background', got {value!r}")


@attrs.frozen
class TransferProgress:
    """What a driver may know about an open transfer, as a value."""

    id: int
    acked: int
    total: int
    slices: int
    attempts: int
    reroutes: int
    submitted_at: float
    priority: Priority


class PendingRange:
    """Stream bytes ``[offset, offset + length)`` still to be sent.

    ``history`` counts failed attempts per rail index for these bytes (``None``
    while there were none, which is the common, fast case).
    """

    __slots__ = ("history", "length", "offset")

    def __init__(self, offset: int, length: int, history: dict[int, int] | None = None) -> None:
        self.offset = offset
        self.length = length
        self.history = history

    def __repr__(self) -> str:
        return f"PendingRange(offset={self.offset}, length={self.length}, history={self.history})"


class TransferState:
    """Live state of one transfer inside the planner.

    ``extents`` is ``None`` for a transfer of one contiguous extent (the
    common case, kept free of arrays); ``single`` then holds its
    ``(src, src_offset, dst, dst_offset)``.
    """

    __slots__ = (
        "acked",
        "attempts",
        "bound",
        "busy_since",
        "bytes_per_rail",
        "error",
        "extents",
        "group",
        "id",
        "live",
        "pending",
        "pending_bytes",
        "phase",
        "priority",
        "queued",
        "rail_errors",
        "rails",
        "reroutes",
        "rr_next",
        "single",
        "slices",
        "stalled_since",
        "submitted_at",
        "total",
    )

    def __init__(
        self,
        tid: int,
        extents: Extents | None,
        single: tuple[Hashable, int, Hashable, int] | None,
        total: int,
        rails: Sequence[RailState],
        now: float,
        priority: Priority,
    ) -> None:
        self.id = tid
        self.extents = extents
        self.single = single
        self.rails = tuple(rails)  # eligible rails, in the planner's order
        self.total = total
        self.acked = 0
        # A list, front first: nearly always one range, and a deque's first block
        # alone costs more than half a kilobyte per open transfer.
        self.pending: list[PendingRange] = [PendingRange(0, total)] if total else []
        self.pending_bytes = total
        self.live = 0  # attempts that are LIVE or WITHDRAWING
        self.phase = Phase.RUNNING
        self.priority = priority
        self.bytes_per_rail: dict[str, int] = {}
        self.slices = 0
        self.attempts = 0
        self.reroutes = 0
        self.submitted_at = now
        self.error: BaseException | None = None
        self.rail_errors: dict[str, str] | None = None  # last error per rail, once there is one
        self.rr_next = tid % len(self.rails) if self.rails else 0
        self.bound: RailState | None = None
        self.group: RailGroup | None = None
        self.queued = False  # in its group's queue (or the planner's stalled set)
        self.stalled_since: float | None = None  # every rail quarantined since then
        self.busy_since: float | None = None  # refused as busy since then, no slice completed

    def progress(self) -> TransferProgress:
        return TransferProgress(
            id=self.id,
            acked=self.acked,
            total=self.total,
            slices=self.slices,
            attempts=self.attempts,
            reroutes=self.reroutes,
            submitted_at=self.submitted_at,
            priority=self.priority,
        )
