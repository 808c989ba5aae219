"""A transfer as the core sees it: pieces, what is left to send, what is in flight.

Work left is a queue of byte ranges.  Slices are cut from the front range at
dispatch time; a range whose attempt failed goes back to the *front*, with
the failure remembered per rail so that retries are bounded.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence

from .decisions import Piece
from .rail_state import RailState


class Phase(enum.Enum):
    """Where a transfer stands inside the planner."""

    RUNNING = "running"
    FAILING = "failing"  # failed; waiting for its attempts to be withdrawn
    CANCELLING = "cancelling"  # cancelled; waiting for its attempts to be withdrawn


class PendingRange:
    """Bytes ``[offset, offset + length)`` of piece ``piece`` still to be sent.

    ``history`` counts failed attempts per rail index for these bytes (``None``
    while there were none, which is the common, fast case).
    """

    __slots__ = ("history", "length", "offset", "piece")

    def __init__(self, piece: int, offset: int, length: int, history: dict[int, int] | None = None) -> None:
        self.piece = piece
        self.offset = offset
        self.length = length
        self.history = history

    def __repr__(self) -> str:
        return f"PendingRange(piece={self.piece}, offset={self.offset}, length={self.length}, history={self.history})"


class TransferState:
    """Live state of one transfer inside the planner."""

    __slots__ = (
        "acked",
        "attempts",
        "bound",
        "bytes_per_rail",
        "error",
        "id",
        "in_active",
        "live",
        "pending",
        "phase",
        "pieces",
        "rail_errors",
        "rails",
        "reroutes",
        "rr_next",
        "slices",
        "stalled_since",
        "submitted_at",
        "total",
    )

    def __init__(self, tid: int, pieces: Sequence[Piece], rails: Sequence[RailState], now: float) -> None:
        self.id = tid
        self.pieces = tuple(pieces)
        self.rails = tuple(rails)  # eligible rails, in the planner's order
        self.total = sum(p.length for p in self.pieces)
        self.acked = 0
        self.pending: deque[PendingRange] = deque(
            PendingRange(i, 0, p.length) for i, p in enumerate(self.pieces) if p.length > 0
        )
        self.live: set[int] = set()  # attempt ids that are LIVE or WITHDRAWING
        self.phase = Phase.RUNNING
        self.bytes_per_rail: dict[str, int] = {}
        self.slices = 0
        self.attempts = 0
        self.reroutes = 0
        self.submitted_at = now
        self.error: BaseException | None = None
        self.rail_errors: dict[str, str] = {}
        self.rr_next = tid % len(self.rails) if self.rails else 0
        self.bound: RailState | None = None
        self.in_active = False
        self.stalled_since: float | None = None  # every rail quarantined since then
