"""Things that happened to rails, for logs, metrics and subscribers.

The planner appends these as it makes decisions; the driver drains them with
:meth:`Planner.drain_events` and fans them out (log records, an async
iterator, callbacks, counters).
"""

from __future__ import annotations

import enum

import attrs


class EventKind(enum.Enum):
    """What kind of rail event this is."""

    FAILURE = "failure"  # a slice failed on the rail (error or missed deadline)
    REROUTE = "reroute"  # slices were taken off the rail to be sent elsewhere
    SUSPECT = "suspect"  # the rail was healthy and is now suspect
    QUARANTINE = "quarantine"  # the rail is out of service until ``until``
    PROBE = "probe"  # the quarantine ended; the rail gets probe slices
    RECOVERY = "recovery"  # the rail is healthy again
    STANDBY = "standby"  # a standby rail took over from the rail it stands by for, or handed back


@attrs.frozen
class RailEvent:
    """One rail event.  ``detail`` is a human-readable sentence."""

    time: float
    kind: EventKind
    rail: str
    detail: str = ""
    slices: int = 0  # for REROUTE: how many slices moved
    until: float | None = None  # for QUARANTINE: end of the back-off
