"""A slice trace of an engine, and a checker of the failover invariants over it.

:class:`SliceTrace` records, on any engine, every slice the planner posts or
withdraws, every completion, failure and confirmed withdrawal the backend
reports (with whether the bytes counted), every transfer's end, and every
rail event.  It costs one method call per slice while attached, so it can be
left on in tests.  :func:`check_trace` then checks what the engine promises:

* **exactly once**: the counted completions of a transfer that ended done
  cover its bytes with no gap and no overlap;
* **no post to a quarantined rail**: between a rail's QUARANTINE and PROBE
  events nothing is posted to it;
* **nothing after the end**: no report for an attempt of a transfer arrives
  after the transfer ended (fencing);
* **every transfer ends**: done, failed with an error, or cancelled.

A violation raises :class:`TraceViolation` naming the event that broke it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from ..engine import Engine

SliceEventKind = Literal["post", "withdraw", "complete", "fail", "withdrawn", "finished", "rail"]


@attrs.frozen
class SliceEvent:
    """One line of a slice trace.

    ``attempt``/``rail``/``offset``/``length`` describe the slice (``offset`` in
    its transfer's byte stream); ``counted`` says whether a completion's bytes
    counted (the attempt was live, not a stale copy of a rerouted slice);
    ``outcome`` is a finished transfer's outcome or a rail event's kind;
    ``detail`` the error or the rail event's sentence.
    """

    time: float
    kind: SliceEventKind
    transfer: int = 0
    attempt: int = 0
    rail: str = ""
    offset: int = 0
    length: int = 0
    probe: bool = False
    counted: bool = False
    outcome: str = ""
    detail: str = ""


class TraceViolation(AssertionError):
    """A slice trace broke one of the engine's invariants."""


class SliceTrace:
    """Records an engine's slice events while attached (a context manager, or :meth:`close`)."""

    def __init__(self, engine: Engine) -> None:
        self.events: list[SliceEvent] = []
        self._remove = engine.add_slice_listener(self.events.append)

    def close(self) -> None:
        """Stop recording (the events stay)."""
        self._remove()

    def __enter__(self) -> SliceTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[SliceEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def of(self, kind: SliceEventKind) -> list[SliceEvent]:
        return [e for e in self.events if e.kind == kind]

    def check(self, *, ended: bool = True) -> None:
        """:func:`check_trace` over this trace."""
        check_trace(self.events, ended=ended)


def check_trace(events: list[SliceEvent] | SliceTrace, *, ended: bool = True) -> None:
    """Check the invariants in the module docstring; ``ended=False`` skips "every transfer ends"."""
    quarantined: set[str] = set()
    finished: dict[int, SliceEvent] = {}
    counted: dict[int, list[tuple[int, int]]] = {}
    posted: set[int] = set()
    for e in events:
        if e.kind == "rail":
            if e.outcome == "quarantine":
                quarantined.add(e.rail)
            elif e.outcome in ("probe", "recovery"):
                quarantined.discard(e.rail)
        elif e.kind == "post":
            posted.add(e.transfer)
            if e.rail in quarantined:
                raise TraceViolation(f"{e}: posted to {e.rail!r} while it was quarantined")
            if e.transfer in finished:
                raise TraceViolation(f"{e}: posted after transfer {e.transfer} ended")
        elif e.kind in ("complete", "fail", "withdrawn"):
            if e.transfer in finished:
                raise TraceViolation(f"{e}: reported after transfer {e.transfer} ended (a slice was not fenced)")
            if e.kind == "complete" and e.counted:
                counted.setdefault(e.transfer, []).append((e.offset, e.length))
        elif e.kind == "finished":
            finished[e.transfer] = e
            if e.outcome == "done":
                _exactly_once(e, sorted(counted.get(e.transfer, [])))
            elif e.outcome == "failed" and not e.detail:
                raise TraceViolation(f"{e}: failed without an error")
    if ended:
        open_ = sorted(posted - set(finished))
        if open_:
            raise TraceViolation(f"transfers {open_} never ended")


def _exactly_once(fin: SliceEvent, spans: list[tuple[int, int]]) -> None:
    pos = 0
    for offset, length in spans:
        if offset != pos:
            what = "overlap" if offset < pos else "gap"
            raise TraceViolation(f"transfer {fin.transfer} ended done with a {what} at byte {min(offset, pos)}")
        pos += length
    if pos != fin.length:
        raise TraceViolation(f"transfer {fin.transfer} ended done with {pos} of {fin.length} bytes counted")
