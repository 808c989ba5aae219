"""The asyncio engine: the I/O shell around the sans-IO planner.

The engine turns the application's intent (``transfer(src, dst)``) into
planner events, carries out the planner's decisions through a backend, and
turns backend reports back into planner events.  It never decides which rail
carries a slice; the planner does.

Concurrency model: one event loop thread.  Backends report on that thread
(threads use ``call_soon_threadsafe``); every report updates the planner and
at once *pumps* it: polls it and executes its decisions (a report made from
inside the pump only asks for one more round).  A timer re-arms the pump for
the planner's next deadline.  No task is spawned per transfer or per slice,
so thousands of concurrent transfers cost only their bookkeeping.

A burst of submits (ten thousand tasks that each call ``transfer()``, started
in one loop turn) would otherwise leave the rails idle until the turn ends:
on a backend that allows it (``posts_early``), ``submit`` pumps at once when
a report the backend held back (``local``'s paced copies) has fallen due and
no pump has run for a quarter of a slice time, so that data moves while the
tasks start, and one pump serves every report of that while.  Every pump
first collects the backend's due reports (:meth:`Backend.deliver_due`).

Structured concurrency: the engine owns an anyio task group for its lifetime
(``async with Engine(...)``); backend tasks live in it.  Cancelling a caller's
scope cancels its transfer, and the caller resumes only after every attempt of
the transfer has been withdrawn, so the destination is never written after
``transfer()`` returned or raised.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import anyio
import attrs
import numpy as np

from . import batches
from .backends import Backend, make_backend
from .core import AttemptState, Finished, Outcome, Piece, Planner, Post, RailEvent, RailInfo, SchedulerConfig, Withdraw
from .core.events import EventKind
from .core.extents import Extents
from .core.transfer_state import Priority
from .errors import (
    ConfigError,
    DuplicateSegmentError,
    EngineClosedError,
    NoRailError,
    ReadOnlySegmentError,
    SegmentBusyError,
    TransferCancelledError,
    TransferError,
    UnregisteredSegmentError,
    UnsupportedBufferError,
)
from .memory import as_memory
from .rails import RailSpec
from .segments import PERMISSIONS, Permission, Segment, SegmentBase, View
from .telemetry import Telemetry
from .testing.trace import SliceEvent

logger = logging.getLogger("tent_async")

MAX_QUEUED_NOTIFICATIONS = 65536  # notifications not read by the application yet (a source: a quarter)
MAX_QUEUED_NOTIFICATION_BYTES = 64 << 20  # ... and their text (a source: a quarter)


def _note_size(note: Notification) -> int:
    return 4 * len(note.message) + 64  # at most 4 bytes a character, and the object around it


def _in_remote_order(ext: Extents) -> Extents:
    """``ext`` ordered by its peer side when exactly one side is a peer's (Backend.remote_order)."""
    remote = [isinstance(seg, SegmentBase) and seg.is_remote for seg in ext.segments]
    src_remote = {remote[s] for s, _d in ext.seg_pairs()}
    dst_remote = {remote[d] for _s, d in ext.seg_pairs()}
    if dst_remote == {True} and src_remote == {False}:
        return ext.in_order_of("dst")
    if src_remote == {True} and dst_remote == {False}:
        return ext.in_order_of("src")
    return ext


event_logger = logging.getLogger("tent_async.rails")

# A notification travels in one control message; the ucx protocol refuses longer text
# (backends/ucx/protocol.py MAX_MESSAGE), so every backend refuses it up front.
MAX_NOTIFY_BYTES = 1 << 16

_EVENT_LEVEL = {
    EventKind.FAILURE: logging.WARNING,
    EventKind.QUARANTINE: logging.WARNING,
    EventKind.SUSPECT: logging.INFO,
    EventKind.REROUTE: logging.INFO,
    EventKind.PROBE: logging.INFO,
    EventKind.RECOVERY: logging.INFO,
    EventKind.STANDBY: logging.INFO,
}


class TransferStatus(enum.Enum):
    """Where a submitted transfer stands."""

    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@attrs.frozen
class TransferResult:
    """What a completed transfer did.

    ``bytes_per_rail`` maps rail name to the bytes that rail delivered;
    ``slices`` counts delivered slices, ``attempts`` every try (retries
    included), ``reroutes`` slices moved off a failing rail.
    """

    id: int
    bytes: int
    elapsed: float
    bytes_per_rail: Mapping[str, int]
    slices: int
    attempts: int
    reroutes: int

    @property
    def throughput(self) -> float:
        """Bytes per second over the whole transfer (0 for an empty one)."""
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0


@attrs.frozen
class Notification:
    """A message a peer attached to a transfer, delivered after the transfer's data landed."""

    message: str
    source: str  # name of the engine that sent it


class TransferHandle:
    """A submitted transfer: awaitable, cancellable, inspectable.

    ``await handle`` returns the :class:`TransferResult` or raises the
    transfer's error (:class:`TransferCancelledError` if it was cancelled
    through :meth:`cancel`).  It can be awaited any number of times.
    """

    # Slotted, and waiters are futures made only when someone waits (the first in a
    # slot of its own, a list only for a second): ten thousand open handles are ten
    # thousand times this object, and every object an open transfer keeps is one more
    # for each garbage collection to scan (docs/benchmarks.md, flows).
    __slots__ = (
        "_acked",
        "_destinations",
        "_engine",
        "_error",
        "_result",
        "_segments",
        "_settled",
        "_status",
        "_waiter",
        "_waiters",
        "id",
        "total_bytes",
    )

    def __init__(
        self,
        engine: Engine,
        tid: int,
        total: int,
        segments: Sequence[SegmentBase],
        destinations: Sequence[SegmentBase] | None = None,
    ) -> None:
        self._engine = engine
        self.id = tid
        self.total_bytes = total
        self._segments = segments
        self._destinations = destinations  # None: the last of `segments` (a single pair's)
        self._status = TransferStatus.RUNNING
        self._result: TransferResult | None = None
        self._error: BaseException | None = None
        self._acked = 0
        self._settled = False
        self._waiter: asyncio.Future[None] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None

    @property
    def status(self) -> TransferStatus:
        return self._status

    @property
    def bytes_done(self) -> int:
        """Bytes that landed so far (after a cancel or failure: what landed before it)."""
        if self._settled:
            return self._acked
        planner = self._engine._planner
        if planner is not None and planner.has_transfer(self.id):
            return planner.progress(self.id)[0]
        return self._acked

    def done(self) -> bool:
        """Has the transfer ended (done, failed or cancelled) with nothing left in flight?"""
        return self._settled

    def cancel(self) -> None:
        """Cancel the transfer; a no-op once it ended.  Awaiting it then raises TransferCancelledError."""
        if self._status is TransferStatus.RUNNING:
            self._status = TransferStatus.CANCELLING
            self._engine._cancel(self.id)

    def result(self) -> TransferResult:
        """The result of a transfer that ended; raises its error if it failed."""
        if not self.done():
            raise anyio.WouldBlock(f"transfer {self.id} is still {self._status.value}; await it first")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def exception(self) -> BaseException | None:
        if not self.done():
            raise anyio.WouldBlock(f"transfer {self.id} is still {self._status.value}; await it first")
        return self._error

    async def wait(self) -> TransferResult:
        """Wait for the end of the transfer and return its result (or raise its error)."""
        await self._wait_settled()
        return self.result()

    async def _wait_settled(self) -> None:
        if self._settled:
            return
        waiter = self._add_waiter()
        try:
            await waiter
        finally:
            self._drop_waiter(waiter)

    def _add_waiter(self) -> asyncio.Future[None]:
        """A future that :meth:`_settle` resolves (made only when someone waits)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiter is None:
            self._waiter = waiter
        elif self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        return waiter

    def _drop_waiter(self, waiter: asyncio.Future[None]) -> None:
        if self._waiter is waiter:
            self._waiter = None
        elif self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)

    def _destination_segments(self) -> Sequence[SegmentBase]:
        """The segments this transfer writes into."""
        return self._destinations if self._destinations is not None else self._segments[-1:]

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<TransferHandle {self.id} {self._status.value} {self.bytes_done}/{self.total_bytes} B>"

    # engine side
    def _settle(
        self, status: TransferStatus, result: TransferResult | None, error: BaseException | None, acked: int = 0
    ) -> None:
        self._acked = acked
        self._status = status
        self._result = result
        self._error = error
        self._settled = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)


class EventSubscription:
    """An async iterator over rail events, from :meth:`Engine.events`.

    Buffers up to ``maxlen`` events; if the subscriber falls behind, the oldest
    are dropped and counted in ``dropped``.  Iteration ends when the engine
    closes or :meth:`close` is called.
    """

    def __init__(self, engine: Engine, maxlen: int) -> None:
        self._engine = engine
        self._queue: collections.deque[RailEvent] = collections.deque(maxlen=maxlen)
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def _push(self, event: RailEvent) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._wakeup.set()

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        self._engine._subscriptions.discard(self)

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> RailEvent:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = asyncio.Event()
            await self._wakeup.wait()
        return self._queue.popleft()

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Pair = tuple["View | SegmentBase", "View | SegmentBase"]
PriorityName = Literal["high", "normal", "background"] | Priority


class Engine:
    """Moves bytes between registered segments over a pool of rails.

    ``backend``
        ``"local"`` (in-process copies, the default), ``"sim"`` (emulated
        fabric), ``"ucx"`` (ucxx), or a :class:`~tent_async.backends.Backend`.
    ``rails``
        :class:`RailSpec` list; backends that discover rails accept ``None``.
    ``policy``
        ``"eft"`` (earliest expected finish, default), ``"round_robin"`` or
        ``"single"``: see :mod:`tent_async.core.policies`.
    ``config``
        By default the backend's :class:`SchedulerConfig`
        (:meth:`Backend.default_config`, documented there and in the backend).
        A mapping of field names to values changes only those fields of the
        backend's default (``config={"deadline_floor": "1s"}``); a whole
        :class:`SchedulerConfig` replaces it, including the slice size and
        windows the backend tuned for itself (the ucx backend's 4 ms slices
        and a window within the peer's header slots): over ucx on the veth
        testbed a plain ``SchedulerConfig(deadline_floor=...)`` moved KV
        batches at 0.16 and 0.74 of the links' rate in the two recorded runs,
        the backend's defaults at 0.86 and 0.93 in the same runs; both depend
        on the host's load (docs/benchmarks.md).
    ``name``
        This engine's name (shown to peers and in notifications).
    Other keyword arguments go to the backend.

    Use it as ``async with Engine(...) as engine:`` on asyncio (directly, or
    through anyio's asyncio backend).
    """

    def __init__(
        self,
        backend: str | Backend = "local",
        rails: Sequence[RailSpec] | None = None,
        policy: str = "eft",
        *,
        config: SchedulerConfig | Mapping[str, Any] | None = None,
        name: str | None = None,
        **backend_options: Any,
    ) -> None:
        if rails is not None:
            rails = list(rails)
            bad = [r for r in rails if not isinstance(r, RailSpec)]
            if bad:
                raise ConfigError(f"rails must be tent_async.RailSpec objects, got {bad[0]!r}")
            names = [r.name for r in rails]
            if len(set(names)) != len(names):
                raise ConfigError(f"rail names must be unique within an engine, got {names}")
        from .core.policies import POLICIES

        if not isinstance(policy, str) or policy not in POLICIES:
            raise ConfigError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
        if config is not None and not isinstance(config, (SchedulerConfig, Mapping)):
            raise ConfigError(
                "config must be a tent_async.SchedulerConfig or a mapping of its fields to change, "
                f"got {type(config).__name__}"
            )
        # Unique across processes and hosts: two engines left at the default name must never be
        # mistaken for one another by a peer (issue 11: data reached the wrong peer).
        self.name = name or f"engine-{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(4)}"
        self.policy = policy
        self._backend = make_backend(backend, rails, **backend_options)
        self.config = config if isinstance(config, SchedulerConfig) else self._config_of(config)
        self._planner: Planner | None = None
        self._segments: dict[str, Segment] = {}
        self._handles: dict[int, TransferHandle] = {}
        self._subscriptions: set[EventSubscription] = set()
        self._listeners: list[Callable[[RailEvent], None]] = []
        self._slice_listeners: list[Callable[[SliceEvent], None]] = []
        # (notification, the key its source's share of the queue is counted under)
        self._notifications: collections.deque[tuple[Notification, Hashable]] = collections.deque()
        self._notes_queued: collections.Counter[object] = (
            collections.Counter()
        )  # None: bytes; a source key; (source key, "bytes")
        self._notify_waiters: set[asyncio.Event] = set()
        self._notify_for: dict[int, str] = {}
        self._seg_ids = itertools.count(1)
        self._state = "new"  # new -> running -> closing -> closed
        self._tg: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pumping = False
        self._pump_again = False
        self._timer: Any = None
        self._timer_at: float | None = None
        self._counters: collections.Counter[str] = collections.Counter()
        self.loop_lag = LoopLag()
        self._timer_fired = False  # the next pump was started by the timer: judge deadlines
        self._pump_scheduled = False
        self._pump_handle: asyncio.Handle | None = None  # the scheduled pump, cancelled by flush()
        self._final_telemetry: Telemetry | None = None  # the last snapshot, kept readable after close
        self._early_slack = self.config.target_slice_time / 4  # see _reports_waiting
        self._last_pump = -math.inf
        self._woke = False  # a pump settled a transfer someone awaits (_Context.flush reads it)

    # ============================================================ lifecycle

    def _config_of(self, overrides: Mapping[str, Any] | None) -> SchedulerConfig:
        """The backend's default config with ``overrides`` applied (``config`` as a mapping)."""
        base = self._backend.default_config()
        if not overrides:
            return base
        fields = {f.name for f in attrs.fields(SchedulerConfig)}
        unknown = sorted(str(k) for k in overrides if k not in fields)
        if unknown:
            raise ConfigError(f"config: unknown SchedulerConfig field(s) {unknown}; known fields: {sorted(fields)}")
        try:
            return attrs.evolve(base, **overrides)
        except ConfigError as exc:
            # A check between fields may name one the user never set (ucx: max_slice below the
            # backend's min_slice): say where that value came from and how to change it.
            plain = SchedulerConfig()
            tuned = [
                name
                for name in sorted(fields - set(overrides))
                if getattr(base, name) != getattr(plain, name) and re.search(rf"\b{name}\b", str(exc))
            ]
            if not tuned:
                raise
            values = ", ".join(f"{name}={getattr(base, name)!r}" for name in tuned)
            raise ConfigError(
                f"{exc}: {values} is the {self._backend.name!r} backend's default, not yours; "
                f"pass {' and '.join(tuned)} in config too to override it"
            ) from exc

    async def __aenter__(self) -> Engine:
        if self._state != "new":
            raise EngineClosedError(f"engine {self.name!r} was already started; create a new Engine")
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError("tent_async runs on asyncio; with anyio use the asyncio backend") from None
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            await self._backend.start(_Context(self))
            self._planner = Planner(
                self._backend.rail_infos(),
                self.config,
                self.policy,
                scatter_gather=self._backend.scatter_gather,
            )
        except BaseException:
            # Close the task group as if nothing happened, so the start-up error comes out
            # as itself (a ConfigError, say), not wrapped in an exception group.
            self._state = "closed"
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
            raise
        self._state = "running"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._tg is not None
        self._state = "closing"
        with anyio.CancelScope(shield=True):
            handles = list(self._handles.values())
            if exc is not None:
                for h in handles:
                    h.cancel()
            for h in handles:
                await h._wait_settled()
            await self._backend.aclose()
        self._close_state()
        # The body's own exception propagates unchanged (not wrapped in an
        # exception group): the task group is closed as if the body ended
        # cleanly, so it raises only if one of the engine's tasks failed.
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        return None

    def _close_state(self) -> None:
        if self._planner is not None:
            self._final_telemetry = self._snapshot(self._planner)
        self._state = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for seg in self._segments.values():
            seg._release()
        self._segments.clear()
        for sub in list(self._subscriptions):
            sub.close()
        self._wake_notification_waiters()

    def _require_running(self) -> Planner:
        if self._state != "running" or self._planner is None:
            hint = "use `async with Engine(...) as engine:`" if self._state == "new" else "it was closed"
            raise EngineClosedError(f"engine {self.name!r} is not running; {hint}")
        return self._planner

    @property
    def backend(self) -> Backend:
        """The backend instance (for backend-specific knobs such as fault injection)."""
        return self._backend

    @property
    def planner(self) -> Planner:
        """The sans-IO planner driving this engine (for tools and tests)."""
        return self._require_running()

    @property
    def rails(self) -> list[str]:
        """Names of the engine's rails."""
        return [r.name for r in self._require_running().rails]

    @property
    def running(self) -> bool:
        return self._state == "running"

    # ============================================================= segments

    def register(self, buffer: Any, name: str | None = None, permission: Permission = "rw") -> Segment:
        """Register memory so that it can be transferred; returns a :class:`Segment`.

        ``buffer``: anything with the buffer protocol (numpy arrays,
        bytearray, memoryview, mmap), DLPack (torch tensors) or, with cupy
        installed, ``__cuda_array_interface__``.  The memory is used in place,
        never copied; keep it alive and unchanged while transfers read it.
        ``permission``: ``"rw"`` (default) or ``"r"`` (peers and transfers may
        only read it).
        """
        if self._state in ("closing", "closed"):
            raise EngineClosedError(f"engine {self.name!r} is closed; cannot register memory")
        if permission not in PERMISSIONS:
            raise ConfigError(f"permission must be 'r' or 'rw', got {permission!r}")
        if name is None:
            name = f"seg-{next(self._seg_ids)}"
            while name in self._segments:
                name = f"seg-{next(self._seg_ids)}"
        elif not isinstance(name, str) or not name:
            raise ConfigError(f"segment name must be a non-empty string, got {name!r}")
        if name in self._segments:
            raise DuplicateSegmentError(
                f"a segment named {name!r} is registered already; pick another name or unregister it first"
            )
        if isinstance(buffer, SegmentBase | View):
            raise UnsupportedBufferError(f"{buffer!r} is registered already; slice it instead of registering it")
        memory = as_memory(buffer)
        if memory.readonly and permission == "rw":
            raise ReadOnlySegmentError(
                f"cannot register read-only {type(buffer).__name__} as {name!r} with permission 'rw'; "
                "pass permission='r'"
            )
        seg = Segment(name, memory, permission, self)
        self._segments[name] = seg
        self._on_register(seg)
        return seg

    def unregister(self, segment: Segment | str) -> None:
        """Forget a segment.  Refused with :class:`SegmentBusyError` while transfers use it."""
        seg = self.segment(segment) if isinstance(segment, str) else segment
        if not isinstance(seg, Segment):
            raise UnsupportedBufferError(f"unregister takes a Segment or its name, got {type(segment).__name__}")
        seg.check_owner(self)
        if seg.busy:
            raise SegmentBusyError(
                f"segment {seg.name!r} is used by {seg.busy} open transfer(s); await or cancel them first"
            )
        if seg.held:
            raise SegmentBusyError(
                f"segment {seg.name!r}: {seg.held} send(s) of transfers that already ended still read it, "
                "on links whose peer stopped reading (UCX cannot stop a send midway); it is free once that "
                "peer reads or disconnects, or when this engine closes"
            )
        self._on_unregister(seg)  # the backend may refuse (peers still writing into it)
        seg._release()
        del self._segments[seg.name]

    def segment(self, name: str) -> Segment:
        """The registered segment called ``name``."""
        try:
            return self._segments[name]
        except KeyError:
            raise UnregisteredSegmentError(
                f"no segment named {name!r} is registered; registered: {sorted(self._segments)}"
            ) from None

    @property
    def segments(self) -> Mapping[str, Segment]:
        return dict(self._segments)

    def _on_register(self, seg: Segment) -> None:
        self._backend.on_register(seg)

    def _on_unregister(self, seg: Segment) -> None:
        self._backend.on_unregister(seg)

    # ================================================================ peers

    @property
    def address(self) -> str | None:
        """What peers connect to (backends that listen, e.g. ucx); ``None`` otherwise."""
        return self._backend.address

    async def connect(self, address: str, **options: Any) -> Any:
        """Connect to the engine listening at ``address``; returns a :class:`Peer` (ucx backend).

        Options (ucx): ``timeout=`` for the handshake, ``expect_name=`` the peer
        engine's name, refusing any other engine that answers (a wrong address,
        or a relay forwarding the connection elsewhere; see docs/ucx.md).
        """
        self._require_running()
        return await self._backend.connect(address, **options)

    # ============================================================ transfers

    def submit(
        self,
        src: View | SegmentBase,
        dst: View | SegmentBase,
        *,
        notify: str | None = None,
        priority: PriorityName = "normal",
    ) -> TransferHandle:
        """Start copying ``src`` into ``dst``; returns at once with a :class:`TransferHandle`.

        Both are views (``seg[a:b]``) or whole segments, of equal length.
        ``notify``: a message delivered to the destination's engine after
        the data landed (see :meth:`notifications`).  ``priority``:
        ``"high"`` (latency-critical, e.g. KV cache on the TTFT path),
        ``"normal"`` or ``"background"`` (offload, bulk); see
        :mod:`tent_async.core.queues` for the rule.
        """
        planner = self._require_running()
        prio = self._priority(priority)
        s = self._as_view(src, "source")
        d = self._as_view(dst, "destination")
        batches.check_pair(s, d)
        self._backend.check_pair(s.segment, d.segment)
        return self._submit_pair(planner, s, d, notify, prio)

    def _submit_pair(self, planner: Planner, s: View, d: View, notify: str | None, prio: Priority) -> TransferHandle:
        """One checked (source, destination) pair of equal length, writable destination, as one transfer."""
        batches.check_overlap_pair(s, d)
        rails = self._backend.rails_for(s.segment, d.segment)
        if rails is not None and not rails:
            raise NoRailError(f"no rail can carry {s!r} -> {d!r}")
        piece = Piece(s.segment, s.offset, d.segment, d.offset, s.length)
        segments = (s.segment,) if s.segment is d.segment else (s.segment, d.segment)
        return self._start(planner, [piece], s.length, segments, None, rails, notify, prio)

    def submit_batch(
        self, pairs: Iterable[Pair], *, notify: str | None = None, priority: PriorityName = "normal"
    ) -> TransferHandle:
        """Start many copies as one transfer that completes when all of them do.

        The pairs become one extent list; pairs adjacent on both sides (the
        next source continues the previous one, and so does the next
        destination) are merged when that shortens the list by an eighth or
        more (:meth:`~tent_async.core.extents.Extents.coalesced`), and slices
        may carry many blocks.  For
        thousands of blocks between two segments, :meth:`submit_blocks` takes
        the block table as arrays and is much cheaper per block.
        """
        planner = self._require_running()
        prio = self._priority(priority)
        index: dict[int, int] = {}  # id(segment) -> position in `segments`, once checked
        segments: list[SegmentBase] = []
        checked: set[tuple[int, int]] = set()
        cols: tuple[list[int], list[int], list[int], list[int], list[int]] = ([], [], [], [], [])
        s_seg, s_off, d_seg, d_off, length = cols
        for pair in pairs:
            try:
                src, dst = pair
            except (TypeError, ValueError):
                raise TypeError(f"a batch is an iterable of (src, dst) pairs; got {pair!r}") from None
            # The per-pair path is the cost of a batch: check a segment once, a view cheaply.
            s = src if type(src) is View else self._as_view(src, "source")
            d = dst if type(dst) is View else self._as_view(dst, "destination")
            si = index.get(id(s.segment))
            if si is None:
                self._as_view(s, "source")
                si = index[id(s.segment)] = len(segments)
                segments.append(s.segment)
            di = index.get(id(d.segment))
            if di is None:
                self._as_view(d, "destination")
                di = index[id(d.segment)] = len(segments)
                segments.append(d.segment)
            if s.length != d.length or (si, di) not in checked:
                batches.check_pair(s, d)
                self._backend.check_pair(s.segment, d.segment)
                checked.add((si, di))
            s_seg.append(si)
            s_off.append(s.offset)
            d_seg.append(di)
            d_off.append(d.offset)
            length.append(s.length)
        ext = Extents(
            segments,
            np.array(s_seg, dtype=np.int32),
            np.array(s_off, dtype=np.int64),
            np.array(d_seg, dtype=np.int32),
            np.array(d_off, dtype=np.int64),
            np.array(length, dtype=np.int64),
        )
        return self._submit_extents(planner, ext, notify, prio)

    def submit_blocks(
        self,
        src: SegmentBase | View,
        src_offsets: Any,
        dst: SegmentBase | View,
        dst_offsets: Any,
        lengths: Any,
        *,
        notify: str | None = None,
        priority: PriorityName = "normal",
    ) -> TransferHandle:
        """Start copying blocks ``src[src_offsets[i]:+lengths[i]]`` to ``dst[dst_offsets[i]:...]`` as one transfer.

        The block table is given as arrays (numpy or sequences of ints;
        ``lengths`` may be one number): the shape of a paged KV cache, where a
        request is thousands of blocks scattered in a registered pool.  Checked
        as arrays (bounds, permission, overlap in memory), held as arrays,
        copied in scatter-gather slices: the cost per block is a few array
        elements, not a Python object.  ``src``/``dst`` may be segments or
        views; offsets are relative to them and every block must lie inside.
        """
        planner = self._require_running()
        prio = self._priority(priority)
        s_view = self._as_view(src, "source")
        d_view = self._as_view(dst, "destination")
        if not d_view.segment.writable:
            raise batches.read_only_error(d_view, d_view.segment)
        self._backend.check_pair(s_view.segment, d_view.segment)
        run = batches.one_run(s_view, src_offsets, d_view, dst_offsets, lengths)
        if run is not None:  # blocks in order on both sides: the transfer submit() makes of the run
            return self._submit_pair(planner, *run, notify, prio)
        ext = batches.from_blocks(s_view, src_offsets, d_view, dst_offsets, lengths)
        return self._submit_extents(planner, ext, notify, prio)

    def _submit_extents(self, planner: Planner, ext: Extents, notify: str | None, prio: Priority) -> TransferHandle:
        if self._backend.remote_order and len(ext) > 1:
            ext = _in_remote_order(ext)
        merged = ext.coalesced()
        # The same bytes either way (a merged run is its blocks, end to end): check the
        # merged runs when merging shrank the list, else the blocks as given, whose one
        # block size lets the destination check use a bitmap instead of a sort.
        batches.check_overlaps(merged if 2 * len(merged) <= len(ext) else ext)
        ext = merged
        segments = [seg for seg in ext.segments if isinstance(seg, SegmentBase)]
        dst_used = sorted({d for _s, d in ext.seg_pairs()})
        destinations = [segments[i] for i in dst_used]
        rails = self._eligible(ext)
        return self._start(planner, ext, ext.total, segments, destinations, rails, notify, prio)

    def _start(
        self,
        planner: Planner,
        pieces: Sequence[Piece] | Extents,
        total: int,
        segments: Sequence[SegmentBase],
        destinations: list[SegmentBase] | None,
        rails: Sequence[str] | None,
        notify: str | None,
        prio: Priority,
    ) -> TransferHandle:
        if notify is not None:
            _check_notify(notify)
        idle = planner.idle
        tid = planner.submit(pieces, self._backend.clock(), rails, priority=prio)
        handle = TransferHandle(self, tid, total, segments, destinations)
        for seg in segments:
            if isinstance(seg, Segment):
                seg._busy += 1
        self._handles[tid] = handle
        if notify is not None:
            self._notify_for[tid] = notify
        backend = self._backend
        if backend.posts_inline and not (self._pumping or self._timer_fired):
            if idle and not self._pump_scheduled:
                # Nothing else is open: post now rather than a loop turn later.
                self._pump()
                return handle
            if backend.posts_early and self._reports_waiting(backend):
                # Held-back reports are due and no pump has run for a while: pump now, so
                # that rails keep moving while a burst of submits holds the loop (thousands
                # of tasks started in one turn); otherwise the burst shares the one pump at
                # the end of the turn.  (Pumping whenever a rail was below its window, too,
                # made a burst on rails with time to spare pump once per submit: 12 us of
                # planner time per slice instead of 8 at 100 flows, and no faster.)
                self._pump()
                return handle
        self._kick()
        return handle

    def _reports_waiting(self, backend: Backend) -> bool:
        """Has a held-back report fallen due, with no pump for a quarter of a slice time?

        A rail holds a window of slices (a slice time each, and more of small ones), so
        collecting its reports that late leaves it no less busy, and one pump then serves
        every report of that while instead of one pump per submit.
        """
        due = backend.report_due_at()
        if due == math.inf:
            return False
        now = backend.clock()
        return due <= now and now - self._last_pump >= self._early_slack

    @staticmethod
    def _priority(priority: PriorityName | Priority) -> Priority:
        if priority == "normal":
            return Priority.NORMAL
        try:
            return Priority.parse(priority)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    async def transfer(
        self,
        src: View | SegmentBase,
        dst: View | SegmentBase,
        *,
        notify: str | None = None,
        priority: PriorityName = "normal",
    ) -> TransferResult:
        """Copy ``src`` into ``dst`` and wait for it; the engine chooses the rails.

        Cancelling the caller cancels the transfer; the call returns (raising
        the cancellation) only after nothing of it can land any more.
        """
        # self._wait(), inlined: one coroutine object fewer per call, and a task that
        # thousands of callers start at once keeps one frame, not two.
        handle = self.submit(src, dst, notify=notify, priority=priority)
        if not handle._settled:
            waiter = handle._add_waiter()
            try:
                await waiter
            except BaseException:
                await self._abandon(handle, waiter)
                raise
        return handle.result()

    async def transfer_batch(
        self, pairs: Iterable[Pair], *, notify: str | None = None, priority: PriorityName = "normal"
    ) -> TransferResult:
        """Copy many (src, dst) pairs as one transfer and wait for all of them."""
        return await self._wait(self.submit_batch(pairs, notify=notify, priority=priority))

    async def transfer_blocks(
        self,
        src: SegmentBase | View,
        src_offsets: Any,
        dst: SegmentBase | View,
        dst_offsets: Any,
        lengths: Any,
        *,
        notify: str | None = None,
        priority: PriorityName = "normal",
    ) -> TransferResult:
        """Copy a block table between two segments and wait for it (see :meth:`submit_blocks`)."""
        handle = self.submit_blocks(src, src_offsets, dst, dst_offsets, lengths, notify=notify, priority=priority)
        return await self._wait(handle)

    async def _wait(self, handle: TransferHandle) -> TransferResult:
        # handle.wait(), inlined: two coroutine frames fewer per call.  transfer() holds a copy
        # of this body (one coroutine fewer for each of thousands of flows): change both.
        if not handle._settled:
            waiter = handle._add_waiter()
            try:
                await waiter
            except BaseException:
                await self._abandon(handle, waiter)
                raise
        return handle.result()

    @staticmethod
    async def _abandon(handle: TransferHandle, waiter: asyncio.Future[None]) -> None:
        """A waiting caller was cancelled: cancel its transfer and wait until nothing of it can land."""
        handle._drop_waiter(waiter)
        if not handle._settled:
            handle.cancel()
            with anyio.CancelScope(shield=True):
                await handle._wait_settled()

    def _as_view(self, obj: object, role: str) -> View:
        if isinstance(obj, SegmentBase):
            obj = obj[:]
        if not isinstance(obj, View):
            raise UnsupportedBufferError(
                f"the {role} must be a view of a registered segment (seg[a:b]) or a segment, "
                f"got {type(obj).__name__}; register the buffer with engine.register() first"
            )
        seg = obj.segment
        if isinstance(seg, Segment):
            seg.check_owner(self)
        else:
            self._backend.check_remote(seg)
        return obj

    def _eligible(self, ext: Extents) -> list[str] | None:
        """Rails that can carry every (source segment, destination segment) pair of ``ext``."""
        allowed: set[str] | None = None
        if not len(ext):
            return None
        for si, di in ext.seg_pairs():
            src, dst = ext.segments[si], ext.segments[di]
            assert isinstance(src, SegmentBase)
            assert isinstance(dst, SegmentBase)
            names = self._backend.rails_for(src, dst)
            if names is None:
                continue
            allowed = set(names) if allowed is None else allowed & set(names)
        if allowed is None:
            return None
        if not allowed:
            raise NoRailError("no rail can carry every pair of this batch; split the batch by peer")
        return sorted(allowed)

    def _cancel(self, tid: int) -> None:
        if self._planner is not None and self._planner.cancel(tid, self._backend.clock()):
            self._kick()

    # ======================================================== observability

    def telemetry(self) -> Telemetry:
        """A snapshot of every rail: health, learned bandwidth and latency, in flight, totals.

        After the engine closed this is the snapshot taken as it closed (the
        run's final totals), the same object every time; before it started
        it raises :class:`EngineClosedError`.
        """
        if self._state == "closed" and self._final_telemetry is not None:
            return self._final_telemetry
        if self._state == "closing" and self._planner is not None:
            return self._snapshot(self._planner)
        return self._snapshot(self._require_running())

    def _snapshot(self, planner: Planner) -> Telemetry:
        c = self._counters
        return Telemetry.from_planner(
            planner,
            self._backend.clock(),
            engine=self.name,
            done=c["done"],
            failed=c["failed"],
            cancelled=c["cancelled"],
            bytes_done=c["bytes"],
            loop_lag_last=self.loop_lag.last,
            loop_lag_max=self.loop_lag.max,
            loop_lag_mean=self.loop_lag.mean,
            backend=self._backend.counters(),
        )

    def events(self, maxlen: int = 10_000) -> EventSubscription:
        """Subscribe to rail events (failures, reroutes, quarantines, probes, recoveries).

        ``async for event in engine.events(): ...``; also usable as a context
        manager that unsubscribes on exit.
        """
        sub = EventSubscription(self, maxlen)
        if self._state == "closed":
            sub.close()
        else:
            self._subscriptions.add(sub)
        return sub

    def add_event_listener(self, callback: Callable[[RailEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every rail event; returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    async def notifications(self) -> AsyncIterator[Notification]:
        """Messages attached to transfers into this engine's segments, each after its data landed.

        Several consumers share one queue: each notification goes to one of them.
        """
        while True:
            while self._notifications:
                note, key = self._notifications.popleft()
                size = _note_size(note)
                queued = self._notes_queued
                queued[None] -= size
                queued[key] -= 1
                queued[(key, "bytes")] -= size
                if queued[key] <= 0:  # forget a source with nothing queued (connections come and go)
                    del queued[key]
                    del queued[(key, "bytes")]
                yield note
            if self._state == "closed":
                return
            wakeup = asyncio.Event()
            self._notify_waiters.add(wakeup)
            try:
                await wakeup.wait()
            finally:
                self._notify_waiters.discard(wakeup)

    def _deliver_notification(self, note: Notification, key: Hashable = None) -> bool:
        """Queue ``note``; False (dropped) once the queue holds too much, overall or from its source.

        Peers can send notifications faster than the application reads them: the
        queue is bounded in count and bytes, and one source may fill only a quarter.
        A source is ``key`` (the backend's identity of the sender, e.g. its
        connection), or else ``note.source``.
        """
        key = ("source", note.source) if key is None else ("key", key)
        size = _note_size(note)
        queued = self._notes_queued
        if (
            len(self._notifications) >= MAX_QUEUED_NOTIFICATIONS
            or queued[None] + size > MAX_QUEUED_NOTIFICATION_BYTES
            or queued[key] >= MAX_QUEUED_NOTIFICATIONS // 4
            or queued[(key, "bytes")] + size > MAX_QUEUED_NOTIFICATION_BYTES // 4
        ):
            return False
        queued[None] += size
        queued[key] += 1
        queued[(key, "bytes")] += size
        self._notifications.append((note, key))
        self._wake_notification_waiters()
        return True

    def _wake_notification_waiters(self) -> None:
        for wakeup in list(self._notify_waiters):
            wakeup.set()

    # ================================================================ pump

    def _kick(self) -> None:
        """Poll the planner soon: at the end of this turn of the event loop, once.

        Every report and request of one loop iteration (a thousand task starts,
        a batch of completions) is acted on by one pump, scheduled with
        ``call_soon``: one poll instead of one per event, for the price of one
        loop hop.  Calls from inside a running pump only ask it to go round
        once more.
        """
        if self._loop is None or self._state == "closed":
            return
        if self._pumping:
            self._pump_again = True
            return
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._pump_handle = self._loop.call_soon(self._scheduled_pump)

    def _scheduled_pump(self) -> None:
        self._pump_scheduled = False
        self._pump_handle = None
        if self._state != "closed":
            self._pump()

    def _flush(self) -> None:
        """Run the pump that reports scheduled now, not a loop turn later (``BackendContext.flush``).

        Not when the timer started it: deadlines are judged only after every report
        queued before the timer's callback (see :meth:`_pump_once`).
        """
        handle = self._pump_handle
        if handle is None or self._pumping or self._timer_fired or self._state == "closed":
            return
        handle.cancel()
        self._pump_handle = None
        self._pump_scheduled = False
        self._pump()

    def _pump(self) -> None:
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_once()
                if not self._pump_again:
                    break
        except Exception as exc:  # a bug in the engine or a backend: fail loudly, never hang
            logger.exception("tent_async engine %r crashed while scheduling", self.name)
            self._crash(exc)
        finally:
            self._pumping = False

    def _crash(self, exc: Exception) -> None:
        """Fail every open transfer with the internal error, so that no caller waits forever.

        Every attempt still out is asked to stop (best effort: the backend may be what
        failed), and the segments are released, so the application can clean up.
        """
        self._state = "closing"
        planner = self._planner
        if planner is not None:
            for attempt in planner.attempts():
                try:
                    self._backend.withdraw(attempt)
                except Exception:
                    logger.debug("withdrawing attempt %d after a crash failed", attempt.id, exc_info=True)
        for handle in list(self._handles.values()):
            for seg in handle._segments:
                if isinstance(seg, Segment):
                    seg._busy -= 1
            error = TransferError(
                f"engine {self.name!r} failed internally: {exc!r}; please report this. "
                "Slices already handed to the backend were asked to stop, but may still land"
            )
            error.__cause__ = exc
            acked = planner.progress(handle.id)[0] if planner is not None and planner.has_transfer(handle.id) else 0
            handle._settle(TransferStatus.FAILED, None, error, acked)
        self._handles.clear()

    def _pump_once(self) -> None:
        planner = self._planner
        if planner is None or self._state == "closed":
            return
        backend = self._backend
        now = backend.clock()
        self._last_pump = now
        if backend.report_due_at() <= now:
            # Reports the backend held back until now (local's paced inline copies): the
            # poll below sees them, so they need no other round of the pump.
            backend.deliver_due(now)
            self._pump_again = False
        # Deadlines are judged only in the pump the timer's callback starts: it was
        # armed for the earliest deadline, and asyncio runs it after every report
        # queued before it (due timers in time order, then thread reports), so a
        # busy loop never blames a rail for a completion it has not read yet.  How
        # late the callback ran is the loop's lag, which excuses the deadlines that
        # passed meanwhile (Planner.poll).
        judge = self._timer_fired
        self._timer_fired = False
        late_by = 0.0
        if judge and self._timer_at is not None:
            late_by = max(0.0, now - self._timer_at)
            self.loop_lag.record(late_by)
            self._timer_at = None  # consumed: _arm_timer arms the next one
        decisions = planner.poll(now, late_by=late_by, deadlines=judge)
        events = planner.drain_events()
        if self._slice_listeners:
            self._trace_pump(now, decisions, events)
        for decision in decisions:
            if type(decision) is Post:
                try:
                    backend.post(decision.attempt)
                except Exception as exc:  # a backend that cannot even start the slice
                    planner.fail(decision.attempt.id, backend.clock(), exc)
                    self._kick()
            elif type(decision) is Withdraw:
                # Not one that resolved since the planner decided (a report delivered at the
                # start of this pump): nothing of it is left to stop, and a backend would keep
                # the id it was told to watch for (local: _withdrawn) forever.
                if decision.attempt.state is not AttemptState.DONE:
                    backend.withdraw(decision.attempt)
            else:
                assert isinstance(decision, Finished)
                self._finish(decision)
        if events:
            self._publish(events)
        self._arm_timer(planner.next_wakeup())

    # ============================================================ slice trace

    def add_slice_listener(self, callback: Callable[[SliceEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every slice event (see :mod:`tent_async.testing.trace`).

        Returns a function that removes it.  Meant for tests and tools: while a
        listener is attached every slice costs a few more object creations.
        """
        self._slice_listeners.append(callback)

        def remove() -> None:
            if callback in self._slice_listeners:
                self._slice_listeners.remove(callback)

        return remove

    def _trace(self, event: SliceEvent) -> None:
        for callback in list(self._slice_listeners):
            callback(event)

    def _trace_pump(self, now: float, decisions: list[Any], events: list[RailEvent]) -> None:
        # Rail events first: the planner made them before this poll's decisions.
        for ev in events:
            self._trace(SliceEvent(ev.time, "rail", rail=ev.rail, outcome=ev.kind.value, detail=ev.detail))
        for d in decisions:
            if type(d) is Post or type(d) is Withdraw:
                a = d.attempt
                kind: Literal["post", "withdraw"] = "post" if type(d) is Post else "withdraw"
                self._trace(SliceEvent(now, kind, a.transfer_id, a.id, a.rail_name, a.offset, a.length, a.probe))
            else:
                fin = d
                detail = str(fin.error) if fin.error is not None else ""
                self._trace(
                    SliceEvent(
                        now, "finished", fin.transfer_id, length=fin.acked, outcome=fin.outcome.value, detail=detail
                    )
                )

    def _trace_report(self, kind: Literal["complete", "fail", "withdrawn"], attempt_id: int, detail: str = "") -> None:
        planner = self._planner
        a = planner.attempt(attempt_id) if planner is not None else None
        if a is None:
            return  # unknown or resolved already: the planner ignores it too
        counted = kind == "complete" and a.state is AttemptState.LIVE
        self._trace(
            SliceEvent(
                self._backend.clock(),
                kind,
                a.transfer_id,
                a.id,
                a.rail_name,
                a.offset,
                a.length,
                a.probe,
                counted,
                detail=detail,
            )
        )

    def _arm_timer(self, when: float | None) -> None:
        """Make sure a timer fires by ``when``.

        A timer already armed for an earlier instant is kept: it fires early,
        the pump finds nothing due and arms the next one.  Re-arming on every
        pump (the earliest deadline moves with every completion) cost a timer
        handle and a heap entry per slice.
        """
        armed = self._timer_at
        if self._timer is not None and armed is not None and (when is None or armed <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._backend.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_fired = True
        self._kick()

    def _finish(self, fin: Finished) -> None:
        handle = self._handles.pop(fin.transfer_id, None)
        notify = self._notify_for.pop(fin.transfer_id, None)
        if handle is None:
            return
        for seg in handle._segments:
            if isinstance(seg, Segment):
                seg._busy -= 1
        handle._acked = fin.acked
        if handle._waiter is not None or handle._waiters:
            self._woke = True  # a caller runs once this loop callback returns (_Context.flush)
        if fin.outcome is Outcome.DONE:
            # Positional, in the field order (id, bytes, elapsed, bytes_per_rail, slices, attempts,
            # reroutes): once per transfer, and keywords cost a third more.
            result = TransferResult(
                fin.transfer_id,
                handle.total_bytes,
                fin.finished_at - fin.submitted_at,
                fin.bytes_per_rail,
                fin.slices,
                fin.attempts,
                fin.reroutes,
            )
            if notify is not None:
                self._send_notification(handle, notify)
            self._counters["done"] += 1
            self._counters["bytes"] += handle.total_bytes
            handle._settle(TransferStatus.DONE, result, None, fin.acked)
        elif fin.outcome is Outcome.CANCELLED:
            self._counters["cancelled"] += 1
            handle._settle(
                TransferStatus.CANCELLED,
                None,
                TransferCancelledError(
                    f"transfer {fin.transfer_id} was cancelled after {fin.acked} of {handle.total_bytes} bytes landed"
                ),
                fin.acked,
            )
        else:
            error = fin.error or TransferError(f"transfer {fin.transfer_id} failed")
            self._counters["failed"] += 1
            handle._settle(TransferStatus.FAILED, None, error, fin.acked)

    def _send_notification(self, handle: TransferHandle, message: str) -> None:
        if not self._backend.send_notification(handle._destination_segments(), message):
            self._deliver_notification(Notification(message=message, source=self.name))

    def _publish(self, events: list[RailEvent]) -> None:
        for event in events:
            event_logger.log(_EVENT_LEVEL.get(event.kind, logging.INFO), "%s", event.detail)
            for sub in self._subscriptions:
                sub._push(event)
            for callback in list(self._listeners):
                try:
                    callback(event)
                except Exception:
                    logger.exception("rail event listener %r raised", callback)


@attrs.define
class LoopLag:
    """How late the engine's timers fired: the event loop's lag, as the engine saw it.

    ``last`` and ``max`` in seconds, ``mean`` over ``samples`` timer wakeups.
    A late wakeup excuses deadlines that passed meanwhile
    (``Telemetry.lag_excused``).
    """

    last: float = 0.0
    max: float = 0.0
    total: float = 0.0
    samples: int = 0

    def record(self, lag: float) -> None:
        self.last = lag
        self.total += lag
        self.samples += 1
        if lag > self.max:
            self.max = lag

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0


class _Context:
    """The :class:`BackendContext` an engine gives its backend."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _planner(self) -> Planner | None:
        return self._engine._planner

    def complete(self, attempt_id: int, wire_time: float | None = None) -> None:
        planner = self._planner()
        if planner is not None:
            if self._engine._slice_listeners:
                self._engine._trace_report("complete", attempt_id)
            planner.complete(attempt_id, self._engine._backend.clock(), wire_time)
            self._engine._kick()

    def fail(
        self,
        attempt_id: int,
        error: BaseException,
        *,
        rail_down: bool = False,
        transfer_fatal: bool = False,
        busy: bool = False,
    ) -> None:
        planner = self._planner()
        if planner is not None:
            if self._engine._slice_listeners:
                self._engine._trace_report("fail", attempt_id, str(error) or type(error).__name__)
            planner.fail(
                attempt_id,
                self._engine._backend.clock(),
                error,
                rail_down=rail_down,
                transfer_fatal=transfer_fatal,
                busy=busy,
            )
            self._engine._kick()

    def withdrawn(self, attempt_id: int) -> None:
        planner = self._planner()
        if planner is not None:
            if self._engine._slice_listeners:
                self._engine._trace_report("withdrawn", attempt_id)
            planner.withdrawn(attempt_id, self._engine._backend.clock())
            self._engine._kick()

    def rail_down(self, rail: str, reason: str) -> None:
        planner = self._planner()
        if planner is not None:
            planner.rail_down(rail, self._engine._backend.clock(), reason)
            self._engine._kick()

    def flush(self) -> bool:
        engine = self._engine
        outer, engine._woke = engine._woke, False  # a flush from inside another keeps the outer's answer
        engine._flush()
        woke = engine._woke
        engine._woke = outer or woke
        return woke

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any, name: str | None = None) -> None:
        tg = self._engine._tg
        if tg is None:
            raise EngineClosedError("the engine is not running")
        tg.start_soon(fn, *args, name=name)

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._engine._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def deliver_notification(self, message: str, source: str, key: Hashable = None) -> bool:
        """False: dropped, the engine's notification queue is full (overall or for ``key``/``source``)."""
        return self._engine._deliver_notification(Notification(message=message, source=source), key)

    def add_rail(self, info: RailInfo) -> None:
        planner = self._planner()
        if planner is None:
            raise EngineClosedError("the engine is not running")
        planner.add_rail(info)

    def lookup_segment(self, name: str) -> Segment | None:
        seg = self._engine._segments.get(name)
        return seg if seg is not None and seg.registered else None

    @property
    def engine_name(self) -> str:
        return self._engine.name


def _check_notify(notify: object) -> None:
    """A notification is text of at most MAX_NOTIFY_BYTES in UTF-8; anything else is refused now,
    not when the transfer has completed (or, for a peer, by its protocol check)."""
    if not isinstance(notify, str):
        raise ConfigError(
            f"notify must be a str (the message delivered after the data), got {type(notify).__name__} "
            f"{notify!r:.40}; pass e.g. notify=str(request_id)"
        )
    try:
        size = len(notify.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ConfigError(f"notify must be valid Unicode text: {exc}") from None
    if size > MAX_NOTIFY_BYTES:
        raise ConfigError(
            f"notify is {size} bytes of UTF-8; the limit is {MAX_NOTIFY_BYTES}: send a key "
            "(a request id) and keep the payload in a registered segment"
        )
