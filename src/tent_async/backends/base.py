"""The small interface between the engine and a transport.

A backend moves the bytes of one attempt over one rail and reports back; it
makes no scheduling decision.  The engine hands it :class:`Attempt` objects
(rail, source segment and offset, destination segment and offset, length) and
the backend calls the :class:`BackendContext` when an attempt completed,
failed, or was withdrawn.  Like httpx's transports, backends are
interchangeable behind this interface: ``local`` (in-process copies), ``sim``
(an emulated fabric in virtual time) and ``ucx`` (ucxx).

Fencing contract: after :meth:`Backend.withdraw`, the backend must eventually
report the attempt as withdrawn, completed or failed, and it may only do so
once none of the attempt's bytes can still land in the destination.  The
engine reports a transfer finished only after every attempt is resolved.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Callable, Coroutine, Hashable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import attrs

from ..core import Attempt, RailInfo, SchedulerConfig, standby_error
from ..errors import ConfigError, SegmentError, UnregisteredSegmentError
from ..memory import copy_bytes, copy_extents, copy_grid
from ..rails import RailSpec
from ..segments import Segment, SegmentBase


@attrs.frozen
class _Named:
    """A rail spec's name and the rail it stands by for, for :func:`~tent_async.core.standby_error`."""

    name: str
    standby_for: str | None


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class BackendContext(Protocol):
    """What the engine offers a backend.  Call it only from the event loop thread."""

    def complete(self, attempt_id: int, wire_time: float | None = None) -> None:
        """All bytes of the attempt landed.  ``wire_time``: seconds on the wire, if measured.

        The wire time is the rail's own: where rails share a thread that does the
        moving (the ucx backend progresses every rail's worker on the event loop, in
        both processes), the time that thread spent on *other* rails' work while the
        attempt was out is left out, or a fast rail beside slow ones would be learned
        as slow (and a small transfer then sent to the wrong rail).  ``local`` moves
        each rail's bytes on a thread of its own and ``sim`` keeps each rail's time in
        its model, so both report the attempt's time on its rail as it was.
        """

    def fail(
        self,
        attempt_id: int,
        error: BaseException,
        *,
        rail_down: bool = False,
        transfer_fatal: bool = False,
        busy: bool = False,
    ) -> None:
        """The attempt failed; see :meth:`Planner.fail` for the flags."""

    def withdrawn(self, attempt_id: int) -> None:
        """A withdrawn attempt is stopped; none of its bytes can land any more."""

    def rail_down(self, rail: str, reason: str) -> None:
        """The backend learned that a rail is gone."""

    def flush(self) -> bool:
        """Act on the reports made so far now, instead of at the end of this loop turn.

        Reports are batched: the engine acts on all of one loop turn's reports at
        once, a turn later.  A backend that delivers completions in batches of its
        own (the ucx backend's progress pass) calls this once a batch is over, so
        that the transfers they finish settle, and the slices they make room for
        are posted, in the same turn.  Returns True when a transfer it settled had
        a caller waiting for it: the backend should then leave the rest of its
        own work to a later callback, so that the caller runs first.
        """

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None) -> None:
        """Run ``fn(*args)`` as a task in the engine's task group."""

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the engine's event loop from any thread."""

    def add_rail(self, info: RailInfo) -> None:
        """Add a rail discovered after start (e.g. paired with a newly connected peer)."""

    def lookup_segment(self, name: str) -> Segment | None:
        """The engine's registered local segment called ``name``, if any (for serving peers)."""

    def deliver_notification(self, message: str, source: str, key: Hashable = None) -> bool:
        """Hand a peer's notification to the application (after the data it announces).

        False: dropped, because the engine's queue of unread notifications is full
        (overall, or for this source).  ``key`` identifies the source for that bound
        when ``source`` is a name the peer chose (a backend's connection, for instance).
        """

    @property
    def engine_name(self) -> str:
        """The engine's name, as peers should know it."""


class Backend(abc.ABC):
    """Carries attempts over rails.  Subclasses live in ``tent_async.backends``."""

    name: ClassVar[str]
    scatter_gather: ClassVar[bool] = False
    """Can one attempt carry many extents (``Attempt.extents``)?  Without it the
    planner cuts every slice inside one extent."""
    posts_inline: ClassVar[bool] = False
    """May the engine pump (and so :meth:`post`) from inside ``submit`` when nothing else is
    open, instead of a loop turn later?  Saves a turn per small transfer (ucx); off by
    default because it moves posts ahead of other callbacks already queued, an order the
    virtual-time backends' figures depend on."""
    posts_early: ClassVar[bool] = False
    """With ``posts_inline``: may the engine also pump from inside ``submit`` while other
    transfers are open, when a report this backend holds back has fallen due
    (:meth:`report_due_at`) and no pump has run for a quarter of a slice time?  A burst
    of submits (ten thousand tasks started in one loop turn) then keeps the rails moving
    while it runs, instead of leaving them idle until the turn ends."""
    remote_order: ClassVar[bool] = False
    """Should a block table to or from a peer be put in the order of its peer side before it
    is sliced (:meth:`~tent_async.core.extents.Extents.in_order_of`)?  The application's
    order means nothing for a batch (destinations never overlap), and some transports copy
    the peer's memory faster in address order (ucx's direct copies pin the peer's pages
    iovec by iovec: adjacent blocks there become one iovec)."""
    _ctx: BackendContext | None = None

    def counters(self) -> Mapping[str, int]:
        """What the backend counts beside the rails (the ucx backend: refusals, protocol errors,
        direct copies, ...), for telemetry and metrics; none by default."""
        return {}

    @abc.abstractmethod
    def rail_specs(self) -> Sequence[RailSpec]:
        """The rails this backend provides, with their hints filled in."""

    def rail_infos(self) -> list[RailInfo]:
        """The rails as the core sees them (name, bandwidth, latency, tier)."""
        specs = self.rail_specs()
        problem = standby_error([_Named(s.name, s.options.get("standby_for")) for s in specs])
        if problem:
            raise ConfigError(f"options['standby_for']: {problem}")
        infos = []
        for spec in specs:
            bandwidth = spec.bandwidth if spec.bandwidth is not None else self.default_bandwidth(spec)
            infos.append(
                RailInfo(
                    name=spec.name,
                    bandwidth=bandwidth,
                    latency=spec.latency,
                    tier=int(spec.tier),
                    slice_cost=self.slice_cost(spec),
                    standby_for=spec.options.get("standby_for", ""),
                )
            )
        return infos

    def slice_cost(self, spec: RailSpec) -> float:
        """The fixed cost of one slice on this rail, in seconds (header, check, ACK, thread hops).

        Enters the expected finish of every slice (as the starting latency the
        estimator then refines), so a small transfer is not split when one
        more slice would cost more than it saves.
        """
        return 0.0

    def default_config(self) -> SchedulerConfig:
        """The scheduler settings an engine on this backend uses unless given others.

        The defaults suit rails whose per-slice overhead is a few microseconds;
        a backend with a costlier round trip per slice (ucx) asks for longer
        slices and a deeper window so that the overhead stays amortised.
        """
        return SchedulerConfig()

    def default_bandwidth(self, spec: RailSpec) -> float:
        """Starting bandwidth estimate of a rail given without one (bytes/s)."""
        return 10e9

    async def start(self, ctx: BackendContext) -> None:
        """Begin serving; called once when the engine starts."""
        self._ctx = ctx

    async def aclose(self) -> None:
        """Release resources; called once when the engine closes, after all transfers ended."""
        return None

    @abc.abstractmethod
    def post(self, attempt: Attempt) -> None:
        """Start moving the attempt's bytes.  Must not block; report through the context.

        A report may come at any time after ``post`` began, including from
        inside ``post`` itself (a link already known to be down fails the
        attempt at once): the engine records it in the planner immediately
        and acts on it in its next pump, never in the middle of this one, so
        the pump's later posts to the same rail are still made (the planner
        withdraws them at once).  Raising from ``post`` fails the attempt as a
        plain error; report ``rail_down=True`` to quarantine the rail at once.
        """

    @abc.abstractmethod
    def withdraw(self, attempt: Attempt) -> None:
        """Stop a posted attempt if possible, then report it (see the fencing contract)."""

    def report_due_at(self) -> float:
        """When the earliest report this backend holds back falls due (``math.inf``: none).

        A backend that knows in advance when an attempt will complete (``local``
        paces its inline copies) may hold the report until then; the engine
        collects due reports with :meth:`deliver_due` in every pump.
        """
        return math.inf

    def deliver_due(self, now: float) -> None:
        """Report every held-back report due by ``now``, oldest first (see :meth:`report_due_at`)."""
        return None

    # Peers.  Backends that connect to other engines override these.

    @property
    def address(self) -> str | None:
        """What peers connect to, for backends that listen; ``None`` otherwise."""
        return None

    async def connect(self, address: str, **options: Any) -> Any:
        """Connect to a peer engine; returns a peer object."""
        raise ConfigError(f"the {self.name} backend has no peers; use backend='ucx' to reach other engines")

    def check_remote(self, segment: SegmentBase) -> None:
        """Raise unless ``segment`` is a remote segment this backend can reach."""
        raise UnregisteredSegmentError(
            f"{segment!r} is not a segment of this engine; the {self.name} backend has no peers"
        )

    def on_register(self, segment: Segment) -> None:
        """A local segment was registered (e.g. to publish it to peers)."""
        return None

    def on_unregister(self, segment: Segment) -> None:
        """A local segment is about to be unregistered; raise SegmentBusyError to refuse."""
        return None

    def send_notification(self, destinations: Sequence[SegmentBase], message: str) -> bool:
        """Deliver ``message`` to the engine owning remote ``destinations``, after the data.

        Return False when the destinations are local (the engine then delivers it itself).
        """
        return False

    def rails_for(self, src: SegmentBase, dst: SegmentBase) -> Sequence[str] | None:
        """Names of the rails that can carry data from ``src`` to ``dst``; ``None`` for all."""
        return None

    def check_pair(self, src: SegmentBase, dst: SegmentBase) -> None:
        """Raise a :class:`~tent_async.errors.TentError` if this backend cannot move src to dst."""
        return None

    # The clock and timers.  Real backends use the event loop's monotonic clock;
    # the simulator replaces both with virtual time.

    def clock(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        loop = asyncio.get_running_loop()
        return loop.call_at(loop.time() + max(0.0, when - self.clock()), callback)


def copy_attempt(attempt: Attempt, backend: str) -> None:
    """Move an attempt's bytes between local segments: one extent, or a scatter-gather list.

    For the backends whose rails copy within this process (``local``, ``sim``).
    """
    ext = attempt.extents
    if ext is None:
        src, dst = attempt.src, attempt.dst
        if not isinstance(src, Segment) or not isinstance(dst, Segment):
            raise SegmentError(f"{backend} rails copy between local segments only, got {src!r} -> {dst!r}")
        copy_bytes(dst.memory, attempt.dst_offset, src.memory, attempt.src_offset, attempt.length)
        return
    memories = []
    for seg in ext.segments:
        if not isinstance(seg, Segment):
            raise SegmentError(f"{backend} rails copy between local segments only, got {seg!r}")
        memories.append(seg.memory)
    one_pair = ext.one_pair
    if one_pair:  # a block table: its grid, worked out once per transfer, makes a slice one numpy call
        grid = ext.block_grid()
        if grid is not None and copy_grid(memories[grid.src_seg], memories[grid.dst_seg], grid, ext.offset, ext.nbytes):
            return
    copy_extents(memories, *ext.arrays(), one_pair=one_pair)
