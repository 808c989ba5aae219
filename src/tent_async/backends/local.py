"""In-process copy rails: real bytes, real threads, optional bandwidth throttling.

Each rail is one worker thread (think of it as a DMA engine) that serves its
attempts in order.  Host copies go through numpy, which releases the GIL, so
rails copy in parallel; CUDA copies go through cupy.  A rail given a
bandwidth is paced to it, so heterogeneous rails can be shown and tested
without a network.

Faults can be injected per rail (:meth:`LocalBackend.inject_fault`) to
exercise failover: ``"error"`` fails each slice, ``"down"`` fails it and
declares the rail gone, ``"stall"`` swallows slices silently (a hung peer), and
:meth:`LocalBackend.set_slowdown` degrades a rail without errors.

Small host-memory slices (up to ``inline_max``, 256 KiB by default) are
copied on the event loop itself, at once, and their completion is reported
when the rail's pacing says the bytes would have arrived: a hand-off to a
thread and back costs more than such a memcpy, and thousands of small flows
would otherwise convoy on the GIL between the loop and the rail threads.
Those reports wait in one queue ordered by arrival (then post order), behind
one loop timer for the earliest, and are delivered in groups: everything due
when the timer fires, or when the engine asks (:meth:`LocalBackend.deliver_due`,
which it does in every pump, and from ``submit`` while a burst of submits
holds the loop, at most once a quarter of a slice time).  So a loop turn that
starts thousands of tasks keeps the rails moving, and a completion costs no
loop callback of its own.  Large slices and anything touching CUDA go to the
rail's thread.
A rail thread hands its reports to one reporter thread, which wakes the loop
(:class:`_Reporter`): the rail goes on to its next queued slice at once
instead of waiting for the GIL while the loop handles the report.

Fencing: a withdrawn attempt that has not started is dropped; one being copied
is reported only after its copy finished; a stalled one is released at once
(it never touched the destination); an inline one has landed already and is
reported withdrawn at once.  So a withdrawal is always confirmed, and only
once nothing of the attempt can land any more.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import anyio

from ..core import Attempt
from ..errors import ConfigError, SegmentError, TentError
from ..rails import RailSpec
from ..segments import Segment, SegmentBase
from ..units import parse_size
from .base import Backend, BackendContext, copy_attempt

FAULT_MODES = ("error", "down", "stall")
_BURST = 1e-3
INLINE_MAX = 256 * 1024


logger = logging.getLogger("tent_async.local")


class RailFaultError(TentError):
    """An injected fault on a local rail."""


def _host_only(a: Attempt) -> bool:
    ext = a.extents
    if ext is None:  # the common case, once per slice: no generator
        src, dst = a.src, a.dst
        return isinstance(src, Segment) and isinstance(dst, Segment) and src.kind == "host" == dst.kind
    return all(isinstance(s, Segment) and s.kind == "host" for s in ext.segments)


class _Worker(threading.Thread):
    """Serves one rail's attempts in order."""

    def __init__(self, backend: LocalBackend, spec: RailSpec) -> None:
        super().__init__(name=f"tent-local-{spec.name}", daemon=True)
        self.backend = backend
        self.spec = spec
        self.rate = spec.bandwidth  # bytes/s, or None for unthrottled
        self.queue: queue.SimpleQueue[Attempt | None] = queue.SimpleQueue()
        self.fault: str | None = None
        self.slowdown = 1.0  # fraction of the nominal speed the rail delivers
        self.stalled: dict[int, Attempt] = {}
        self.lock = threading.Lock()
        self.next_free = 0.0  # token-bucket timeline of a throttled rail

    def run(self) -> None:
        while True:
            attempt = self.queue.get()
            if attempt is None:
                return
            try:
                self._serve(attempt)
            except BaseException as exc:  # never let one slice kill the rail thread
                self.backend.report_fail(attempt.id, exc)

    def _serve(self, a: Attempt) -> None:
        backend = self.backend
        if backend.is_withdrawn(a.id):
            backend.report_withdrawn(a.id)
            return
        with self.lock:
            fault = self.fault
            if fault == "stall":
                self.stalled[a.id] = a
                return
        if fault == "error":
            backend.report_fail(a.id, RailFaultError(f"injected error on rail {self.spec.name}"))
            return
        if fault == "down":
            backend.report_fail(a.id, RailFaultError(f"rail {self.spec.name} is down (injected)"), rail_down=True)
            return
        start = time.monotonic()
        copy_attempt(a, "local")
        finish = self.paced_finish(a.length, start)
        delay = finish - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        wire = time.monotonic() - start
        if backend.is_withdrawn(a.id):
            backend.report_withdrawn(a.id)
        else:
            backend.report_complete(a.id, wire)

    def paced_finish(self, nbytes: int, start: float) -> float:
        """When ``nbytes`` copied from ``start`` on would have arrived at the rail's pace (0: now)."""
        slowdown = self.slowdown
        if self.rate is not None:
            # Pace on an ideal timeline with up to _BURST seconds of catch-up, so
            # that sleep overshoot does not accumulate into a lower rate.
            with self.lock:
                self.next_free = max(self.next_free, start - _BURST) + nbytes / (self.rate * slowdown)
                return self.next_free
        if slowdown < 1.0:
            return start + (time.monotonic() - start) / slowdown
        return 0.0

    def release_stalled(self, aid: int) -> bool:
        with self.lock:
            return self.stalled.pop(aid, None) is not None


class _Reporter(threading.Thread):
    """Carries the rail threads' reports to the event loop, so that a rail never waits for it.

    Waking the loop writes to its self-pipe, and that write lets go of the GIL;
    the loop thread, woken by it, then takes the GIL and keeps it while it
    handles the report and posts the next slice, and the rail thread waits for
    the GIL before it can start the slice already queued for it (a gap of
    60-400 us per slice on a loaded 2-core machine, docs/benchmarks.md).
    Handing the report to this thread (a queue put, which keeps the GIL) lets
    the rail go straight on to its next copy; this thread wakes the loop once
    for every batch of reports waiting, in the order they were made.
    """

    def __init__(self, backend: LocalBackend) -> None:
        super().__init__(name="tent-local-reports", daemon=True)
        self.backend = backend
        self.queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            ctx = self.backend._ctx
            if ctx is not None:
                try:
                    ctx.call_soon_threadsafe(_deliver_all, batch)
                except RuntimeError:  # the loop closed under us: nobody is left to tell
                    return
                except Exception:  # never die with reports still to carry: log and go on
                    logger.exception("tent-local-reports: could not hand reports to the event loop")
            if stop:
                return


def _deliver_all(batch: list[Callable[[], None]]) -> None:
    """Run reports in order; one that raises is logged and the rest still run."""
    for deliver in batch:
        try:
            deliver()
        except Exception as exc:  # as a callback of its own would: logged by the loop
            asyncio.get_running_loop().call_exception_handler(
                {"message": "error delivering a local rail's report", "exception": exc}
            )


class LocalBackend(Backend):
    """Rails that copy between segments of the same process."""

    name: ClassVar[str] = "local"
    scatter_gather: ClassVar[bool] = True
    posts_inline: ClassVar[bool] = True  # post() never reports before it returns
    posts_early: ClassVar[bool] = True

    def __init__(self, rails: Sequence[RailSpec] | None = None, *, inline_max: int | str = INLINE_MAX) -> None:
        specs = list(rails) if rails is not None else [RailSpec(name="local0")]
        try:
            self.inline_max = parse_size(inline_max)
        except ValueError as exc:
            raise ConfigError(f"inline_max: {exc}") from None
        if not specs:
            raise ConfigError("the local backend needs at least one rail")
        for spec in specs:
            if spec.backend not in (None, self.name):
                raise ConfigError(f"rail {spec.name!r} asks for backend {spec.backend!r}, but this is 'local'")
        self._specs = specs
        self._workers: dict[str, _Worker] = {}
        self._withdrawn: set[int] = set()
        # Inline copies waiting for their paced arrival: aid -> wire time, and a heap of
        # (arrival, aid) behind one loop timer (an aid withdrawn meanwhile is skipped).
        self._inline: dict[int, float] = {}
        self._due: list[tuple[float, int]] = []
        self._due_timer: asyncio.TimerHandle | None = None
        self._due_timer_at = math.inf
        self._delivering = False  # inside deliver_due (a report's listener may submit, and pump)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: BackendContext | None = None
        self._reporter: _Reporter | None = None

    # ----------------------------------------------------------- lifecycle

    def rail_specs(self) -> Sequence[RailSpec]:
        return self._specs

    def slice_cost(self, spec: RailSpec) -> float:
        """~20 us: a queue hand-off to the rail's thread and a report back through the event loop."""
        return 20e-6

    async def start(self, ctx: BackendContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._reporter = _Reporter(self)
        self._reporter.start()
        for spec in self._specs:
            worker = _Worker(self, spec)
            self._workers[spec.name] = worker
            worker.start()

    async def aclose(self) -> None:
        self._closing = True  # every transfer ended: nothing held back is still owed
        if self._due_timer is not None:
            self._due_timer.cancel()
            self._due_timer = None
            self._due_timer_at = math.inf
        self._due.clear()
        self._inline.clear()
        self._withdrawn.clear()
        workers = list(self._workers.values())
        for worker in workers:
            worker.queue.put(None)

        reporter = self._reporter

        def join_all() -> None:
            for worker in workers:
                worker.join(timeout=5.0)
            # After the rails: it carries their last reports.  A rail still copying past the
            # timeout reports straight to the loop from now on (_report).
            self._reporter = None
            if reporter is not None:
                reporter.queue.put(None)
                reporter.join(timeout=5.0)

        await anyio.to_thread.run_sync(join_all)  # never block the event loop on a busy copy
        self._workers.clear()
        self._reporter = None

    # --------------------------------------------------------- data movement

    def check_pair(self, src: SegmentBase, dst: SegmentBase) -> None:
        for seg in (src, dst):
            if not isinstance(seg, Segment):
                raise SegmentError(
                    f"the local backend copies between local segments only; {seg!r} is not one. "
                    "Use the ucx backend for remote segments"
                )

    def post(self, attempt: Attempt) -> None:
        worker = self._workers[attempt.rail_name]
        if attempt.length <= self.inline_max and worker.queue.empty() and _host_only(attempt):
            self._post_inline(worker, attempt)
        else:
            worker.queue.put(attempt)

    def _post_inline(self, worker: _Worker, a: Attempt) -> None:
        """Copy now on the loop; report when the rail's pace says the bytes arrived."""
        loop = self._loop
        assert loop is not None
        aid = a.id
        with worker.lock:
            fault = worker.fault
            if fault == "stall":
                worker.stalled[aid] = a
                return
        if fault is not None:
            error = RailFaultError(
                f"injected error on rail {worker.spec.name}" if fault == "error" else f"rail {worker.spec.name} is down"
            )
            loop.call_soon(self._deliver_inline, aid, "fail", error, fault == "down")
            return
        start = time.monotonic()
        try:
            copy_attempt(a, "local")
        except Exception as exc:
            loop.call_soon(self._deliver_inline, aid, "error", exc, False)
            return
        finish = worker.paced_finish(a.length, start)
        now = time.monotonic()
        if finish < now:
            finish = now
        self._inline[aid] = finish - start
        heapq.heappush(self._due, (finish, aid))
        if finish < self._due_timer_at:
            self._arm_due(finish)

    def _arm_due(self, when: float) -> None:
        """One loop timer, for the earliest report held back (re-armed only for an earlier one)."""
        loop = self._loop
        assert loop is not None
        if self._closing:
            return
        if self._due_timer is not None:
            self._due_timer.cancel()
        self._due_timer_at = when
        self._due_timer = loop.call_at(loop.time() + (when - time.monotonic()), self._on_due_timer)

    def _on_due_timer(self) -> None:
        self._due_timer = None
        at, self._due_timer_at = self._due_timer_at, math.inf
        # Everything due by the instant the timer was armed for (the loop may run a timer
        # a hair early), and whatever fell due since.
        # The engine acts on them in the pump they ask for, at the end of this loop turn,
        # with whatever else this turn brings: no flush, which would pump for this group
        # alone (one pump per completion on a loop with time to spare).
        self.deliver_due(max(at, time.monotonic()))

    def report_due_at(self) -> float:
        due = self._due
        return due[0][0] if due else math.inf

    def deliver_due(self, now: float) -> None:
        """Report, in order of arrival, every inline copy whose bytes have arrived by ``now``.

        Not again from inside itself (a slice listener that submits, and so pumps, while
        a report is delivered): the outer call goes on in order.  A report that raises
        goes to the loop's exception handler, as a callback of its own would, and does
        not stop the ones after it.
        """
        if self._delivering:
            return
        self._delivering = True
        due = self._due
        inline = self._inline
        ctx = self._ctx
        try:
            while due and due[0][0] <= now:
                _finish, aid = heapq.heappop(due)
                wire = inline.pop(aid, None)
                if wire is None or ctx is None:
                    continue  # withdrawn meanwhile: reported as withdrawn instead
                try:
                    ctx.complete(aid, wire)
                except Exception as exc:
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "error delivering a local rail's report", "exception": exc}
                    )
        finally:
            self._delivering = False
        if due and self._due_timer is None:
            self._arm_due(due[0][0])

    def _deliver_inline(self, aid: int, what: str, value: Any, rail_down: bool) -> None:
        """A failed or withdrawn inline attempt's report (one callback each: these are rare)."""
        ctx = self._ctx
        if ctx is None:
            return
        if aid in self._withdrawn:
            self._withdrawn.discard(aid)
            ctx.withdrawn(aid)
        else:
            ctx.fail(aid, value, rail_down=rail_down)

    def withdraw(self, attempt: Attempt) -> None:
        if self._inline.pop(attempt.id, None) is not None:  # copied already: nothing more of it can land
            assert self._loop is not None
            self._loop.call_soon(self._deliver_inline, attempt.id, "withdrawn", None, False)
            self._withdrawn.add(attempt.id)
            return
        self._withdrawn.add(attempt.id)
        worker = self._workers.get(attempt.rail_name)
        if worker is not None and worker.release_stalled(attempt.id):
            self.report_withdrawn(attempt.id)

    # ------------------------------------------------------ reports (any thread)

    def is_withdrawn(self, aid: int) -> bool:
        return aid in self._withdrawn

    def _report(self, method: str, aid: int, *args: object, **kwargs: object) -> None:
        ctx = self._ctx
        if ctx is None:
            return

        def deliver() -> None:
            self._withdrawn.discard(aid)
            getattr(ctx, method)(aid, *args, **kwargs)

        reporter = self._reporter
        if reporter is not None and reporter.is_alive() and threading.current_thread() is not reporter:
            reporter.queue.put(deliver)
        else:
            ctx.call_soon_threadsafe(deliver)

    def report_complete(self, aid: int, wire_time: float) -> None:
        self._report("complete", aid, wire_time)

    def report_fail(self, aid: int, error: BaseException, *, rail_down: bool = False) -> None:
        self._report("fail", aid, error, rail_down=rail_down)

    def report_withdrawn(self, aid: int) -> None:
        self._report("withdrawn", aid)

    # ------------------------------------------------------------ fault knobs

    def _worker(self, rail: str) -> _Worker:
        try:
            return self._workers[rail]
        except KeyError:
            raise ConfigError(f"unknown rail {rail!r}; rails: {sorted(self._workers)}") from None

    def inject_fault(self, rail: str, mode: str) -> None:
        """Make ``rail`` fail: ``"error"``, ``"down"`` or ``"stall"`` (silent)."""
        if mode not in FAULT_MODES:
            raise ConfigError(f"unknown fault mode {mode!r}; use one of {FAULT_MODES}")
        worker = self._worker(rail)
        with worker.lock:
            worker.fault = mode

    def set_slowdown(self, rail: str, fraction: float) -> None:
        """Make ``rail`` deliver ``fraction`` (0 < f <= 1) of its speed, without errors."""
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"slowdown fraction must be in (0, 1], got {fraction}")
        self._worker(rail).slowdown = fraction

    def clear_fault(self, rail: str) -> None:
        """Heal ``rail``: no injected fault, full speed.  Stalled slices stay stalled until withdrawn."""
        worker = self._worker(rail)
        with worker.lock:
            worker.fault = None
        worker.slowdown = 1.0
