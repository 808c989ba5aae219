"""How a rail's UCX worker makes progress, and how its completions reach the event loop.

Three ways, chosen per rail (``UcxBackend(progress=...)``, docs/ucx.md "Progress"):

``"loop"`` (the default)
    Blocking mode on the event loop, as ucx-py did: the worker's event file
    descriptor is watched with ``loop.add_reader``; when it fires, and after
    every request we post, one *pass* runs on the loop thread: progress the
    worker (a bounded number of ``ucp_worker_progress`` calls), resolve the
    futures of completed requests (``run_request_notifier``), and arm the
    worker again.  While a send of ours or a receive of a slice's bytes over
    shared memory is unfinished the pass goes on (``call_soon``), yielding the
    CPU between passes (``sched_yield``), until the worker has made no
    progress for ``STREAM_SPIN`` seconds (``LoopProgress._keep_streaming``);
    then it arms, and polls a stalled send every ``SEND_POLL`` seconds: such
    a send whose FIFO is full advances only when polled (UCX raises no event
    when the peer frees room).  Over TCP a full socket raises an event; an unfinished send
    is polled every ``SEND_POLL_EVENTED`` seconds all the same, as the
    progress thread's 1 ms epoll timeout did.  No thread is involved: a completion costs no thread
    hand-off, only the loop's own ``epoll_wait`` wake-up.
``"poll"``
    The same, but after activity (a pass that made progress, or a post; not a
    bare event, which another rail's message can raise on an idle worker) the
    pass keeps rescheduling itself (``call_soon``) for ``POLL_SPIN`` seconds
    before it arms and blocks: lower latency while messages keep coming, at
    the price of a busy loop.
``"thread"``
    What the backend did before: ucxx's progress thread (blocking, 1 ms epoll
    timeout) and a notifier thread that wakes the event loop to resolve
    futures.  Three threads per completion; kept as the fallback, and used for
    CUDA rails (the progress thread makes the GPU's context current on itself,
    which must not happen to the application's event-loop thread).

In every mode a request's completion is an asyncio future resolved on the
loop thread, and the backend hears of it through :meth:`Progress.watch`, so
it does not know which mode runs.  In the loop modes a watched request's
callback runs inside the pass that resolved its future, not one loop turn
later (``add_done_callback`` goes through ``call_soon``): a slice's reply is
acted on, and a header answered, in the pass that received it (while few
requests are watched: past ``WATCH_SCAN`` the pass does not look through
them, and the futures' own callbacks deliver instead; they are attached only then,
after a failed pass and at close, since otherwise each would be one more loop
callback per request that finds it delivered).  The one rule the loop modes add: whoever posts
a request calls :meth:`Progress.kick` afterwards (:class:`~.channel.Channel`
and :class:`~.rails.LocalRail` do), because a request can complete inside the
call that posts it, and UCX raises no event for that.

A pass is bounded (``PASS_BUDGET`` progress calls) so that a flood of incoming
messages cannot hold the loop: past the budget the pass yields (``call_soon``)
and the loop's other callbacks run first.  And it takes in no more than it can
get rid of: after every progress call that took something, the rail empties
UCX's unexpected-message queue (:attr:`Progress.intake`), and while that is not
empty the pass progresses no further, so a flood backs up in the kernel's socket
buffers rather than in UCX's descriptor pools, which never shrink.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _ucxx

logger = logging.getLogger("tent_async.ucx")

PROGRESS_MODES = ("loop", "poll", "thread")
DEFAULT_PROGRESS = "loop"
PASS_BUDGET = 64  # ucp_worker_progress calls per pass before the loop gets a turn
POLL_SPIN = 0.002  # "poll": seconds of spinning after the last activity before blocking
SEND_POLL = 0.0002  # loop modes, shared memory: seconds between polls of a stalled, unfinished send
SEND_POLL_EVENTED = 0.001  # ... TCP (a full socket raises an event; this is the progress thread's epoll timeout)
STREAM_SPIN = 0.0005  # loop modes, shared memory: seconds a stalled bulk send or receive yields the CPU and
# polls again (os.sched_yield) before the pass arms and sleeps (see LoopProgress._keep_streaming)
STREAM_MAX = 1.0  # ... and seconds after its post a request stops keeping passes going (one never finished)
SAFETY_INTERVAL = 0.05  # loop modes: a pass at least this often, in case an event was missed
ROUNDS = 3  # loop modes: progress, resolve, deliver rounds per pass while callbacks post new requests
ARM_TRIES = 2  # loop modes: arms a pass tries (progressing again between) before it leaves it to the next turn
WATCH_SCAN = 64  # loop modes: watched requests a pass looks through for completions (more: futures' callbacks)

Watcher = Callable[[Any], None]


class _Meter:
    """Seconds spent in progress passes on one event loop, all rails together."""

    __slots__ = ("__weakref__", "running", "total")

    def __init__(self) -> None:
        self.total = 0.0
        self.running = False  # a pass is running (a send posted inside it is counted by the pass)


_meters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Meter] = weakref.WeakKeyDictionary()


def _meter(loop: asyncio.AbstractEventLoop) -> _Meter:
    meter = _meters.get(loop)
    if meter is None:
        meter = _meters[loop] = _Meter()
    return meter


class Progress:
    """Progresses one worker; its completions resolve asyncio futures on ``loop``."""

    mode = ""

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.worker: Any = worker
        self.loop = loop
        self.name = name
        # Called after a pass delivered completions (the engine's BackendContext.flush), so that
        # what they report is acted on in the same pass; the thread mode delivers one at a time.
        # True: a caller waits for a transfer it settled (the pass then yields to it).
        self.on_batch: Callable[[], bool] | None = None
        # The loop modes' gate on the wire (the rail's LocalRail.drain): called before each
        # progress call that could take more messages in; False means UCX's unexpected queue is
        # not empty yet, so the pass takes nothing more and yields.  The thread mode cannot gate.
        self.intake: Callable[[], bool] | None = None
        self._gate_failed_at = -1e9  # when a failing intake was last reported

    def kick(self, send: Any = None) -> None:
        """A request was just posted on the worker (or an endpoint created): make sure it progresses.

        ``send``: the request, if it is a send (the loop modes poll while a send is unfinished).
        """

    def posted(self) -> None:
        """A control message's request was just posted, and it did not complete inside the call.

        Unlike :meth:`kick`, schedules no pass: a header's or reply's bounded
        receive, or a send that UCX finished inside the call, needs nothing
        progressed now, and what comes for it raises an event.
        """

    def stream(self, req: Any) -> None:
        """A send or receive of a slice's bytes was just posted (after :meth:`kick`): on shared
        memory the loop modes keep it flowing while it is unfinished (``LoopProgress._keep_streaming``)."""

    def away(self) -> float:
        """Seconds the loop has spent progressing the *other* rails' workers (a running count).

        The difference over a slice's flight is time the loop could not spend on
        this rail: a 16 MiB TCP message pushed inside one progress call holds a
        shared-memory slice's completion back by that long, and a wire time that
        included it would teach the planner that shared memory is slow (see
        :class:`~tent_async.backends.base.BackendContext`, ``complete``).  Zero
        in ``"thread"`` mode, where each worker has a thread of its own.
        """
        return 0.0

    def account(self, seconds: float) -> None:
        """A send was posted on this rail's worker, outside a pass, and the call took ``seconds``
        (or the loop did other work for this rail there: a WRITE's extents gathered, peer.py).

        UCX's TCP transport pushes as much of a message as the socket takes from inside
        the send call itself, so a large send posted by the engine's pump holds the loop
        like a progress pass does, and counts toward the other rails' ``away()`` alike.
        """

    def watch(self, req: Any, fn: Watcher) -> None:
        """Call ``fn(req.future)`` once the request's future is done (on the loop thread)."""
        req.future.add_done_callback(fn)

    def close(self) -> None:
        """Stop progressing; the worker is released by its owner afterwards."""


def _set_cuda_device(gpu: int) -> None:  # pragma: no cover - needs a GPU
    """Progress-thread start hook: make the GPU's CUDA context current on that thread."""
    import cupy

    cupy.cuda.Device(gpu).use()
    cupy.cuda.runtime.free(0)  # forces the primary context into existence


class ThreadProgress(Progress):
    """ucxx's progress thread plus a notifier thread (the backend's original way)."""

    mode = "thread"

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, name: str, gpu: int | None = None) -> None:
        super().__init__(worker, loop, name)
        ucx = _ucxx.loaded()
        if gpu is not None:  # pragma: no cover - needs a GPU
            worker.set_progress_thread_start_callback(_set_cuda_device, cb_args=(gpu,))
        worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self._queue: queue.Queue[str] = queue.Queue()
        self._notifier: threading.Thread | None = threading.Thread(
            target=ucx.notifier,
            args=(loop, worker, self._queue),
            name=f"tent-ucx-notifier-{name}",
            daemon=True,
        )
        self._notifier.start()

    def close(self) -> None:
        try:
            self.worker.stop_progress_thread()
        except Exception:  # pragma: no cover - best effort at shutdown
            logger.exception("rail %s: stopping the progress thread failed", self.name)
        if self._notifier is not None:
            self._queue.put("shutdown")
            self.worker.stop_request_notifier_thread()  # wakes the notifier now, not in 1 s
            self._notifier.join(timeout=3)
            self._notifier = None
        self.worker = None  # the worker holds descriptors and sockets until its last reference goes


class LoopProgress(Progress):
    """Blocking mode on the event loop: the worker's event fd on ``add_reader``, arm, progress."""

    mode = "loop"
    spin = 0.0  # seconds to keep polling after the last activity ("poll" sets POLL_SPIN)

    def __init__(self, worker: Any, loop: asyncio.AbstractEventLoop, name: str, *, shm: bool = False) -> None:
        """``shm``: the rail's transport is shared memory, whose stalled sends raise no event."""
        super().__init__(worker, loop, name)
        self._chase_sends = shm
        self._send_poll_interval = SEND_POLL if shm else SEND_POLL_EVENTED
        worker.init_blocking_progress_mode()
        worker.populate_python_futures_pool()
        self._fd: int | None = int(worker.epoll_file_descriptor)
        self._scheduled = False  # a pass is in the loop's ready queue
        self._active_until = 0.0
        self._closed = False
        # Unfinished sends.  A receive completes by an event; a send whose bytes do not all fit
        # at once may not: UCX's shared-memory transport, its FIFO full, raises no event when
        # the peer frees room, so it has to be polled (the progress thread did that with its
        # 1 ms epoll timeout).  While a send is unfinished the pass reschedules itself.
        self._sends: collections.deque[Any] = collections.deque()
        self._send_poll: asyncio.TimerHandle | None = None
        # The futures of unfinished sends and receives of slices' bytes (shared memory only, stream()),
        # and when a pass last made progress while one was unfinished: see _keep_streaming.
        self._streams: collections.deque[tuple[Any, float]] = collections.deque()  # (future, until)
        self._streamed_at = 0.0
        self.yields = 0  # times a stalled stream gave the CPU away instead of sleeping (tests, benchmarks)
        self.stale_skipped = 0  # events found stale by an arm, no pass run for them (tests, benchmarks)
        self.quiet_skipped = 0  # events of an idle shared-memory worker an arm found empty (the same)
        # Watched requests: key -> (its future, callback), delivered by the pass (see watch()).
        self._watched: dict[int, tuple[Any, Watcher, bool]] = {}  # key -> (future, callback, has a done-callback)
        self._keys = 0
        self._meter = _meter(loop)
        self._own = 0.0  # seconds this rail's passes took
        self._in_pass = False  # delivering callbacks: a kick means "go round again", not "schedule"
        self._outside = 0.0  # seconds of this pass spent in on_batch (not this rail's)
        self._kicked = False
        # Shared memory: the last pass left the worker unarmed (it went on in a pass of the next loop
        # turn), and a pass queued with call_soon then armed it.  The descriptor's readiness that the
        # loop reports in that turn is then the signal of a message the first pass already took (the
        # arm drained it): _on_event checks with an arm before running a whole pass for it.
        self._unarmed = False
        self._stale = False
        # The last pass made no progress.  An idle worker's descriptor also fires when another
        # rail's does: on a server with shared memory and loopback TCP to the same client, the
        # loopback worker's fired with every shared-memory message (exactly as often, in counts
        # of 36,000 and 63,000), a pass each for nothing, and in "poll" mode each started 2 ms
        # of spinning beside the rail that had work.  Now only progress (or a post) starts the
        # spin, and on shared memory an event of a worker whose last pass made no progress and
        # armed it is checked with an arm first.
        self._quiet = False
        self._clear = False  # the intake gate's last look found UCX's unexpected queue empty (_rounds)
        loop.add_reader(self._fd, self._on_event)
        self._safety: asyncio.TimerHandle | None = loop.call_later(SAFETY_INTERVAL, self._on_safety)
        self.kick()

    def kick(self, send: Any = None) -> None:
        if self._closed:
            return
        if send is not None:
            self._sends.append(send)
        # A request just took a future from ucxx's pool; below ~50 ucxx refills it, while
        # an empty pool makes ucxx log a warning and build a future the slow way.
        self.worker.populate_python_futures_pool()
        if self.spin:
            self._active_until = self.loop.time() + self.spin
        if self._in_pass:  # posted by a callback the pass delivers: the pass goes round again
            self._kicked = True
        elif not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._pass, True)

    def posted(self) -> None:
        # Nothing completed inside the call and nothing needs a progress call to go on: the
        # worker is armed (every pass ends armed or with another pass queued), so what comes
        # for the request raises an event.  Only ucxx's pool of futures is kept filled.
        if self.spin:  # "poll": activity keeps the pass spinning
            self.kick()
        elif not self._closed:
            self.worker.populate_python_futures_pool()

    def stream(self, req: Any) -> None:
        # The future, not the request: dropping the last reference to a request cancels it (a
        # refused READ's receive, peer.py), so none is kept here (as watch()).
        if self._chase_sends and not self._closed:
            streams = self._streams
            if len(streams) >= 256:  # busy passes never reach _keep_streaming's pruning
                self._streams = streams = collections.deque(e for e in streams if not e[0].done())
            streams.append((req.future, time.perf_counter() + STREAM_MAX))

    def watch(self, req: Any, fn: Watcher) -> None:
        """Deliver the completion in the pass that resolves the future, or else by its callback.

        While at most ``WATCH_SCAN`` requests are watched, only the pass delivers:
        futures are resolved only by a pass (``run_request_notifier``), which then
        looks through the watched ones, so a callback on the future would only be
        one more loop callback per request that finds it delivered.  Past that
        bound (a server with many links), after a pass that failed, and at close,
        every watched future gets its callback (:meth:`_arm_callbacks`), the path
        that scales; whichever runs first delivers and removes the entry.
        """
        self._keys += 1
        key = self._keys
        future = req.future
        # The future, not the request: dropping the last reference to a request cancels it,
        # which is how a refused READ's posted receive is stopped (peer.py), so none is kept here.
        watched = self._watched
        if len(watched) < WATCH_SCAN and not self._closed:
            watched[key] = (future, fn, False)
        else:
            watched[key] = (future, fn, True)
            future.add_done_callback(functools.partial(self._deliver_late, key))

    def _arm_callbacks(self) -> None:
        """Give every watched future without one its done-callback (delivery without a pass)."""
        watched = self._watched
        for key, (future, fn, armed) in list(watched.items()):
            if not armed:
                watched[key] = (future, fn, True)
                future.add_done_callback(functools.partial(self._deliver_late, key))

    def _deliver_late(self, key: int, future: Any) -> None:
        entry = self._watched.pop(key, None)
        if entry is not None:
            entry[1](future)

    def _deliver(self) -> bool:
        """Run the callbacks of watched requests whose futures are done (a pass just resolved them).

        Returns whether there were any.
        """
        watched = self._watched
        if not watched:
            return False
        if len(watched) > WATCH_SCAN:
            self._arm_callbacks()  # no scan: the futures' callbacks deliver (a loop turn later)
            return False
        done = [key for key, (future, _fn, _armed) in watched.items() if future.done()]
        for key in done:
            entry = watched.pop(key, None)
            if entry is None:  # an earlier callback of this batch delivered it (closing, say)
                continue
            try:
                entry[1](entry[0])
            except Exception as exc:  # as the loop would report an exception from a callback
                self.loop.call_exception_handler(
                    {"message": f"rail {self.name}: a request's completion callback failed", "exception": exc}
                )
        return bool(done)

    def _batch_done(self, nested: bool) -> bool:
        """Let the engine act on the completions just delivered, outside this rail's metering.

        The engine's pump may post slices on other rails; a large TCP send pushes its
        bytes inside the call, and that time must count as that rail's (``account``),
        not as this pass's, or it would be taken off that rail's own wire time.
        Returns whether a caller waits for a transfer it settled.
        """
        assert self.on_batch is not None
        meter = self._meter
        meter.running = nested
        t0 = time.perf_counter()
        try:
            return self.on_batch()
        finally:
            meter.running = True
            self._outside += time.perf_counter() - t0

    def _on_event(self) -> None:
        if self._scheduled:  # a pass is due anyway: it will see the event
            return
        stale = self._stale
        if stale or (self._quiet and self._chase_sends):
            # Most likely the readiness of a message a pass already took (see __init__), or
            # another worker's event seen by this idle one: on shared memory an arm that
            # succeeds says nothing is pending, and the next message raises a new event.  Not
            # over TCP: there an arm can succeed with a message waiting whose readiness this
            # event was, and nothing would wake the rail for it again (the benchmark hung).
            self._stale = False
            try:
                if self.worker is not None and not self._closed and self.worker.arm():
                    if stale:
                        self.stale_skipped += 1
                    else:
                        self.quiet_skipped += 1
                    return
            except Exception:  # pragma: no cover - a worker being torn down: the pass finds out
                pass
        self._pass()

    def _on_safety(self) -> None:
        self._safety = None
        if self._closed:
            return
        if not self._scheduled:
            self._pass()
        self._safety = self.loop.call_later(SAFETY_INTERVAL, self._on_safety)

    def _on_send_poll(self) -> None:
        self._send_poll = None
        if not self._scheduled:
            self._pass()

    def _pass(self, queued: bool = False) -> None:
        """One pass; ``queued``: it was queued with ``call_soon`` (it runs before this turn's events)."""
        self._scheduled = False
        self._stale = False
        unarmed, self._unarmed = self._unarmed, False
        if self._send_poll is not None:
            self._send_poll.cancel()
            self._send_poll = None
        if self._closed or self.worker is None:
            return
        meter = self._meter
        nested = meter.running  # a callback of another rail's pass closed an endpoint here, say
        meter.running = True
        self._outside = 0.0
        t0 = time.perf_counter()
        try:
            armed = self._run_pass(self.worker, nested)
            if armed and queued and unarmed and self._chase_sends:
                self._stale = True
        finally:
            meter.running = nested
            if not nested:
                spent = time.perf_counter() - t0 - self._outside
                self._own += spent
                meter.total += spent

    def away(self) -> float:
        return self._meter.total - self._own

    def account(self, seconds: float) -> None:
        meter = self._meter
        if not meter.running:  # inside a pass, the pass's own timing counts it
            self._own += seconds
            meter.total += seconds

    def _gate(self) -> bool:
        """``intake()``, open if it raised: a failing drain must not stall the rail (it is reported)."""
        assert self.intake is not None
        try:
            return self.intake()
        except Exception as exc:
            now = time.monotonic()
            if now - self._gate_failed_at >= 10.0:  # once per 10 s: it runs on every progress call
                self._gate_failed_at = now
                self.loop.call_exception_handler(
                    {"message": f"rail {self.name}: draining UCX's unexpected messages failed", "exception": exc}
                )
            return True

    def _rounds(self, worker: Any, nested: bool, budget: int) -> tuple[bool, bool, int] | None:
        """Progress, resolve, deliver, up to ``ROUNDS`` times; (made progress, busy, budget left), or None if closed."""
        made = busy = False
        gate = self._gate if self.intake is not None else None
        # Closed while UCX's unexpected queue is not empty (a backlog left by the last pass, or
        # what a progress call just took in): nothing more is taken from the wire in this pass.
        # Only progress calls fill the queue, so it is looked at after each one that took
        # something, and before the first only if the last look found it not empty (_clear):
        # a progress call that took nothing added nothing to it, so a look that found it empty
        # holds until the next call that takes something (one tag_probe per pass fewer).
        held = gate is not None and not self._clear and not gate()
        for _round in range(ROUNDS):
            if held:
                busy = True
            else:
                for _ in range(budget):
                    budget -= 1
                    if not worker.progress_once():
                        break
                    made = True
                    if gate is not None and not gate():
                        held = busy = True
                        break
                else:
                    busy = True
            self._clear = not held
            # Requests whose endpoint closed or failed were scheduled for cancellation;
            # ucxx cancels them here (Worker::progress does the same after its own loop).
            worker.cancel_inflight_requests(0, 1)
            worker.run_request_notifier()  # resolve the futures of what completed
            if not self._watched:
                break
            self._kicked = False
            self._in_pass = True
            woke = False
            try:
                delivered = self._deliver()  # may post requests, close endpoints, even close this rail
                if delivered and self.on_batch is not None and not self._closed:
                    woke = self._batch_done(nested)
            finally:
                self._in_pass = False
            if self._closed:
                return None
            if woke:
                # A transfer settled and its caller waits: the caller runs first, the rest of
                # this pass (more rounds, the arm) in a pass right after it, in the next loop
                # iteration; it would otherwise sit on the caller's critical path (about 15 us
                # per small transfer here: a round that finds nothing, the arm, often a BUSY
                # retry).  What the caller then posts is progressed by that same pass.
                busy = True
                break
            # A callback posted something (a server's answer, the next header): progress it now,
            # in this turn, rather than in a pass of the next one.
            if not self._kicked or busy:
                break
        return made, busy, budget

    def _run_pass(self, worker: Any, nested: bool = False) -> bool:
        """Progress, deliver and arm; True if it left the worker armed (nothing queued after it)."""
        armed = False
        quiet = True
        try:
            budget = PASS_BUDGET
            for _try in range(ARM_TRIES):
                rounds = self._rounds(worker, nested, budget)
                if rounds is None:
                    return False
                made, busy, budget = rounds
                if made:
                    quiet = False
                    if self.spin:  # "poll": progress keeps the pass going for POLL_SPIN (so do posts: kick)
                        self._active_until = self.loop.time() + self.spin
                sends = self._sends
                while sends and sends[0].completed:
                    sends.popleft()
                if len(sends) > 1:  # one unfinished at the front must not keep finished ones behind it
                    self._sends = sends = collections.deque(r for r in sends if not r.completed)
                spinning = self.spin and self.loop.time() < self._active_until
                # Arm only with nothing left to progress (short-circuit); BUSY means events came in
                # meanwhile.  A bulk send or receive on shared memory goes on while it streams
                # (_keep_streaming: yielding the CPU between passes).
                again = busy or spinning or self._kicked
                if made and self._streams:
                    self._streamed_at = time.perf_counter()  # also in passes that go on anyway (busy, yielding)
                if not again and self._chase_sends:
                    if self._streams:
                        again = self._keep_streaming(made)
                    elif made and sends:  # a send not posted through stream() (raw ucxx in the benchmark)
                        again = True
                if again:
                    break
                if worker.arm():
                    armed = True
                    break
                # BUSY.  Usually what this pass already took: a shared-memory message's wake-up
                # signal, which that arm drained (about once per message).  But the arm also
                # drains the worker's own event fd, which UCX's async thread signals when it
                # queues work for this thread (ucp_worker_arm): that work would then wait for an
                # unrelated event or the safety pass.  One progress call tells the two apart:
                # it makes progress only in the second case, and the pass goes round; otherwise
                # a second arm succeeds at once and a whole round (cancellations, notifier, the
                # watched futures looked through) is saved.  The arm answers BUSY again only
                # while something is pending (a message not read yet, a send waiting:
                # mm_iface.c), and then the pass goes round once more here.
                if worker.progress_once():  # work UCX's thread queued, or a message that came in meanwhile
                    quiet = False
                    if self.spin:
                        self._active_until = self.loop.time() + self.spin
                elif worker.arm():
                    armed = True
                    break
                again = True
            self._kicked = False
        except Exception:  # pragma: no cover - a worker being torn down
            logger.debug("rail %s: progress pass failed", self.name, exc_info=True)
            self._arm_callbacks()  # what it resolved is delivered without a pass
            return False
        self._quiet = quiet and armed
        if not armed:
            self._unarmed = True
        if self._scheduled:  # a callback's own pass (a close on another rail, say) is on its way
            return False
        if again:
            self._scheduled = True
            self.loop.call_soon(self._pass, True)
            return False
        if sends:  # armed, but a stalled send raises no event when it could go on: poll it
            self._send_poll = self.loop.call_later(self._send_poll_interval, self._on_send_poll)
        return armed

    def _keep_streaming(self, made: bool) -> bool:
        """Shared memory, a slice's bytes still moving (:meth:`stream`): go on rather than arm and sleep?

        UCX moves a large message over shared memory in 8 KiB fragments through a
        small FIFO, copied in by the sender and out by the receiver.  A receiver
        that arms after every pass is woken by the sender's next fragment; when
        the two processes share one core (a busy 2-core host), the sender's
        passes kept the core while its FIFO was full (a progress call reports
        progress without having moved a byte), so the receiver drained the FIFO
        once per scheduler time slice: 0.4-0.6 GB/s instead of 4-5 (both
        processes pinned to one core, engine and raw ucxx alike; it also
        happened in unpinned runs under load, and the rail's learned rate then
        fell tenfold with it).  So while such a request is unfinished the pass
        goes on, but yields the CPU first (``sched_yield``: the other process,
        if it shares this core and is ready, fills or drains the FIFO
        meanwhile; on a core of its own the call returns at once), and the
        receiving side does the same instead of arming after every pass.
        ``STREAM_SPIN`` after the last progress the pass arms and sleeps as
        before (a stalled send is then polled every ``SEND_POLL``).  A request
        keeps passes going for ``STREAM_MAX`` at most (a slice's bytes take
        milliseconds): the progress that counts is the worker's, so a receive
        whose bytes never come (a peer that announced them and stopped) would
        otherwise keep the loop polling for as long as other traffic flows.
        """
        now = time.perf_counter()
        streams = self._streams
        while streams and (streams[0][0].done() or streams[0][1] < now):
            streams.popleft()
        if len(streams) > 1:
            self._streams = streams = collections.deque(e for e in streams if not e[0].done() and e[1] >= now)
        if not streams:
            return False
        if not made and now - self._streamed_at >= STREAM_SPIN:  # _run_pass notes each pass's progress
            return False
        self.yields += 1
        os.sched_yield()
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in (self._safety, self._send_poll):
            if handle is not None:
                handle.cancel()
        self._safety = self._send_poll = None
        if self._fd is not None and not self.loop.is_closed():
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._fd)
        self._fd = None
        self._sends.clear()
        self._streams.clear()
        # _watched stays: the futures' own callbacks deliver what is still out (and retrieve
        # their errors: a cancelled request's future would otherwise log one at exit).
        # Resolve what completed (requests the endpoints' closing cancelled), then let the
        # futures go: they hold references into the worker.
        with contextlib.suppress(Exception):
            self.worker.progress()
            self.worker.run_request_notifier()
        self._arm_callbacks()
        with contextlib.suppress(Exception):
            self.worker.clear_python_futures_pool()
        with contextlib.suppress(Exception):
            # No notifier thread runs, but ucxx counts its notifier as running while its
            # "futures ready" flag is set (only a wait clears it), and warns when the worker
            # is destroyed.  A wait of 1 ns clears the flag.
            self.worker.wait_request_notifier(period_ns=1)
        self.worker = None  # the worker holds descriptors and sockets until its last reference goes


class PollProgress(LoopProgress):
    """Like "loop", but spins for ``POLL_SPIN`` seconds after activity (progress, or a post) before it blocks."""

    mode = "poll"
    spin = POLL_SPIN


def make_progress(
    mode: str, worker: Any, loop: asyncio.AbstractEventLoop, name: str, *, kind: str = "tcp", gpu: int | None = None
) -> Progress:
    """The progress engine ``mode`` for ``worker`` on a rail of ``kind`` (CUDA rails always get the thread)."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode == "thread" or gpu is not None:
        return ThreadProgress(worker, loop, name, gpu)
    if mode == "poll":
        return PollProgress(worker, loop, name, shm=kind == "shm")
    return LoopProgress(worker, loop, name, shm=kind == "shm")


__all__ = ["DEFAULT_PROGRESS", "PROGRESS_MODES", "Progress", "make_progress"]
