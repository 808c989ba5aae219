"""The loop-mode progress pass (backends/ucx/progress.py) against a stand-in worker: no UCX needed.

What the pass promises: a watched request's callback runs in the pass that
resolved its future, exactly once (past ``WATCH_SCAN`` watched requests, and at
close, by the future's own callback instead); requests a callback posts are progressed in the same pass;
and ``away()`` counts the time the loop spent progressing the *other* rails,
which the initiator subtracts from a slice's wire time (peer.py).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tent_async.backends.ucx import progress as P
from tent_async.backends.ucx.peer import Link, _Op
from tent_async.backends.ucx.protocol import TAG_INDEX_BITS, Op

pytestmark = pytest.mark.anyio


class FakeWorker:
    """Just what LoopProgress calls; ``run_request_notifier`` resolves what ``complete`` queued."""

    def __init__(self, fd: int, busy: float = 0.0) -> None:
        self.epoll_file_descriptor = fd
        self.busy = busy  # seconds each productive progress call takes (a large TCP push)
        self.ready: list[tuple[asyncio.Future[None], int]] = []  # futures to resolve, progress calls left
        self.progress_calls = 0

    def init_blocking_progress_mode(self) -> None: ...
    def populate_python_futures_pool(self) -> None: ...
    def cancel_inflight_requests(self, *_: Any) -> None: ...
    def clear_python_futures_pool(self) -> None: ...
    def wait_request_notifier(self, **_: Any) -> None: ...
    def progress(self) -> None: ...

    def arm(self) -> bool:
        return True

    def progress_once(self) -> bool:
        self.progress_calls += 1
        if not any(left > 0 for _, left in self.ready):
            return False
        self.ready = [(f, left - 1) for f, left in self.ready]
        if self.busy:
            time.sleep(self.busy)
        return True

    def run_request_notifier(self) -> None:
        for future, left in list(self.ready):
            if left <= 0 and not future.done():
                future.set_result(None)
        self.ready = [(f, left) for f, left in self.ready if not f.done()]

    def request(self, loop: asyncio.AbstractEventLoop, progress_calls: int = 1) -> Any:
        future: asyncio.Future[None] = loop.create_future()
        self.ready.append((future, progress_calls))
        return SimpleNamespace(future=future, completed=False)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    pipes = [os.pipe() for _ in range(2)]
    yield [r for r, _ in pipes]
    for r, w in pipes:
        os.close(r)
        os.close(w)


async def test_a_watched_completion_is_delivered_once_in_the_pass_that_resolved_it(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker = FakeWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "a")
    try:
        await asyncio.sleep(0.01)  # the first pass ran
        calls: list[str] = []
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1

        req = worker.request(loop)
        prog.watch(req, lambda fut: calls.append("first"))
        second = worker.request(loop)

        def posted_by_callback(fut: Any) -> None:
            calls.append("posts")
            third = worker.request(loop)
            prog.watch(third, lambda fut: calls.append(f"third after {ticks} ticks"))
            prog.kick()  # a server answering from inside the pass

        prog.watch(second, posted_by_callback)
        prog.kick()
        loop.call_soon(tick)  # queued behind the pass: runs after it
        await asyncio.sleep(0.01)
        # Both delivered, and what the callback posted completed in the same pass (before the tick).
        assert calls == ["first", "posts", "third after 0 ticks"]
        await asyncio.sleep(0.01)  # the futures' own callbacks ran and found them delivered
        assert calls == ["first", "posts", "third after 0 ticks"]
    finally:
        prog.close()


async def test_past_the_scan_limit_the_futures_callbacks_deliver(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker = FakeWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "a")
    try:
        got: list[int] = []
        reqs = [worker.request(loop) for _ in range(P.WATCH_SCAN + 5)]
        for i, req in enumerate(reqs):
            prog.watch(req, lambda fut, i=i: got.append(i))
        prog.kick()
        await asyncio.sleep(0.02)
        assert sorted(got) == list(range(len(reqs)))  # each exactly once
    finally:
        prog.close()


class FloodedWorker(FakeWorker):
    """A worker whose socket holds a flood: each progress call takes ``per_call`` more messages in."""

    def __init__(self, fd: int, flood: int, per_call: int) -> None:
        super().__init__(fd)
        self.wire = flood  # messages still in the kernel's socket buffer
        self.per_call = per_call
        self.unexpected = 0  # messages in UCX's unexpected queue (its descriptor pools)
        self.most = 0

    def progress_once(self) -> bool:
        honest = super().progress_once()
        took = min(self.per_call, self.wire)
        self.wire -= took
        self.unexpected += took
        self.most = max(self.most, self.unexpected)
        return honest or took > 0


async def test_a_flood_waits_on_the_wire_not_in_ucxs_queue_and_honest_requests_go_on(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker = FloodedWorker(fds[0], flood=20_000, per_call=100)
    prog = P.LoopProgress(worker, loop, "lo")
    drains = 0

    def drain() -> bool:  # as LocalRail.drain: up to 256 per call, True once the queue is empty
        nonlocal drains
        drains += 1
        worker.unexpected -= min(256, worker.unexpected)
        return worker.unexpected == 0

    prog.intake = drain
    try:
        delivered: list[str] = []
        honest = worker.request(loop, progress_calls=3)
        prog.watch(honest, lambda fut: delivered.append("honest"))
        prog.kick()
        for _ in range(500):
            await asyncio.sleep(0.001)
            if not worker.wire and not worker.unexpected:
                break
        assert worker.wire == 0 and worker.unexpected == 0  # the whole flood was taken and dropped
        assert delivered == ["honest"]
        # Never more queued than one progress call takes in: without the gate a pass of
        # PASS_BUDGET calls would queue PASS_BUDGET x 100 before the sweeper's next look.
        assert worker.most <= worker.per_call
        assert drains >= 20_000 // 256
    finally:
        prog.close()


async def test_away_counts_time_spent_on_the_other_rails(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    slow = FakeWorker(fds[0], busy=0.004)  # a rail pushing a large TCP message
    fast = FakeWorker(fds[1])
    a = P.LoopProgress(slow, loop, "tcp")
    b = P.LoopProgress(fast, loop, "shm")
    try:
        await asyncio.sleep(0.01)
        a0, b0 = a.away(), b.away()
        slow.request(loop, progress_calls=5)  # 5 productive calls of 4 ms on the slow rail
        a.kick()
        await asyncio.sleep(0.05)
        assert b.away() - b0 >= 0.019  # the fast rail's loop was elsewhere for ~20 ms
        assert a.away() - a0 < 0.01  # its own passes do not count
    finally:
        a.close()
        b.close()


async def test_on_batch_runs_in_the_pass_after_its_completions_and_is_not_this_rails_time(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker_a = FakeWorker(fds[0])
    a = P.LoopProgress(worker_a, loop, "shm")
    b = P.LoopProgress(FakeWorker(fds[1]), loop, "tcp")
    try:
        await asyncio.sleep(0.01)
        calls: list[str] = []
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1

        def on_batch() -> None:  # the engine's pump: settles, posts the next slice on this rail
            calls.append(f"batch after {ticks} ticks")
            if len(calls) > 2:
                return
            time.sleep(0.005)  # the engine's own time: neither rail's
            nxt = worker_a.request(loop)
            a.watch(nxt, lambda fut: calls.append(f"next after {ticks} ticks"))
            a.kick()

        a.on_batch = on_batch
        a0, b0 = a.away(), b.away()
        req = worker_a.request(loop)
        a.watch(req, lambda fut: calls.append("reply"))
        a.kick()
        loop.call_soon(tick)
        await asyncio.sleep(0.02)
        # After the completions a pass delivered; the slice it posted completed in the same
        # pass (no tick between), and on_batch ran again after that delivery.
        assert calls == ["reply", "batch after 0 ticks", "next after 0 ticks", "batch after 0 ticks"]
        assert b.away() - b0 < 0.004  # the 5 ms (or more) in on_batch were not the shm rail's
        assert a.away() == a0
    finally:
        a.on_batch = None
        a.close()
        b.close()


async def test_a_pass_that_woke_a_caller_lets_it_run_before_the_rest_of_the_pass(fds: list[int]) -> None:
    """on_batch True (a settled transfer's caller waits): the caller runs first, the pass's rest after."""
    loop = asyncio.get_running_loop()
    worker = FakeWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "shm")
    try:
        await asyncio.sleep(0.01)
        order: list[str] = []
        woken: asyncio.Future[None] = loop.create_future()

        settled_at = [0]

        def on_batch() -> bool:  # the engine's pump settled a transfer whose caller awaits it
            woken.set_result(None)
            order.append("settled")
            settled_at[0] = worker.progress_calls
            return True

        async def caller() -> None:
            await woken
            order.append(f"caller ran ({worker.progress_calls - settled_at[0]} progress calls after the settle)")

        prog.on_batch = on_batch
        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0)
        req = worker.request(loop)
        prog.watch(req, lambda fut: order.append("reply"))
        real_arm = worker.arm
        arms: list[int] = []

        def arm() -> bool:
            arms.append(len(order))
            return real_arm()

        worker.arm = arm  # type: ignore[method-assign]
        prog.kick()
        await task
        await asyncio.sleep(0.01)
        assert order == ["reply", "settled", "caller ran (0 progress calls after the settle)"]
        # The pass did not arm (or go round again) before the caller ran; a pass after it did.
        assert arms and arms[0] == 3
    finally:
        prog.on_batch = None
        prog.close()


class BusyOnceWorker(FakeWorker):
    """``arm`` answers BUSY ``busy`` times in a row (shared memory: a drained wake-up signal), then arms."""

    def __init__(self, fd: int, busy: int) -> None:
        super().__init__(fd)
        self.busy_arms = busy
        self.arms = 0

    def arm(self) -> bool:
        self.arms += 1
        if self.busy_arms:
            self.busy_arms -= 1
            return False
        return True


class SignalledWorker(FakeWorker):
    """Review: UCX's async thread queued work for this thread and signalled the worker's event
    fd; the arm consumes that signal and answers BUSY, and the work is done only by a progress
    call (``ucp_worker_arm``)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.queued: asyncio.Future[None] | None = None

    def arm(self) -> bool:
        if self.queued is not None:
            self.ready.append((self.queued, 1))  # the queued work: done by the next progress call
            self.queued = None
            return False
        return True


async def test_work_signalled_by_ucxs_thread_is_done_in_the_pass_whose_arm_took_the_signal(
    fds: list[int],
) -> None:
    """A second arm after a BUSY one would succeed (the signal is gone) and leave the work
    for an unrelated event or the 50 ms safety pass; one progress call in between does it."""
    loop = asyncio.get_running_loop()
    worker = SignalledWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "shm")
    try:
        await asyncio.sleep(0.01)
        done = loop.create_future()
        worker.queued = done
        prog.kick()
        await asyncio.sleep(0)  # the one pass the kick scheduled
        assert done.done()
    finally:
        prog.close()


async def test_a_busy_arm_is_retried_in_the_same_pass_and_then_left_to_the_next_turn(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker = BusyOnceWorker(fds[0], busy=0)
    prog = P.LoopProgress(worker, loop, "shm")
    try:
        await asyncio.sleep(0.01)
        worker.busy_arms, worker.arms, progress_before = 1, 0, worker.progress_calls
        prog.kick()
        await asyncio.sleep(0)  # exactly the one pass the kick scheduled
        # BUSY once (a drained wake-up signal): one progress call finds nothing queued, and it
        # is armed again at once, with no second round.
        assert worker.arms == 2
        assert worker.progress_calls == progress_before + 2
        assert not prog._scheduled  # no pass queued for the next turn
        worker.busy_arms, worker.arms, progress_before = 2, 0, worker.progress_calls
        prog.kick()  # BUSY twice (something pending): progressed again, then armed, in that pass
        await asyncio.sleep(0)
        assert worker.arms == 3
        assert worker.progress_calls == progress_before + 3
        assert not prog._scheduled
        worker.busy_arms, worker.arms = 9, 0  # BUSY every time: bounded, the next turn goes on
        prog.kick()
        await asyncio.sleep(0)
        assert worker.arms == 2 * P.ARM_TRIES
        assert prog._scheduled
        await asyncio.sleep(0.01)
        assert worker.busy_arms == 0  # later passes armed it
    finally:
        prog.close()


def _link(away: float) -> Any:
    link: Any = Link.__new__(Link)
    link.rail = SimpleNamespace(progress=SimpleNamespace(away=lambda: away))
    link.last_done = 0.0
    link.last_away = 0.0
    return link


def _op(t_post: float, away: float) -> _Op:
    op = _Op(None, None, Op.WRITE, t_post)  # type: ignore[arg-type]
    op.away = away
    return op


def test_wire_time_leaves_out_the_larger_of_both_sides_time_elsewhere() -> None:
    # Posted at 1.0 with the loop 2.0 s "away" so far; done at 1.010 with 2.006 away: 6 ms elsewhere here.
    assert _link(2.006)._wire_time(_op(1.0, 2.0), 1.010, 0.0) == pytest.approx(0.004)
    # The peer was elsewhere 8 ms (overlapping ours): the larger counts, not the sum.
    assert _link(2.006)._wire_time(_op(1.0, 2.0), 1.010, 0.008) == pytest.approx(0.002)
    # A peer's claim (or our own count) never makes it less than a tenth of what it took.
    assert _link(2.0)._wire_time(_op(1.0, 2.0), 1.010, 5.0) == pytest.approx(0.001)
    # A slice posted before the link's previous completion is timed from that completion.
    link = _link(2.0)
    link.last_done, link.last_away = 1.005, 1.999
    assert link._wire_time(_op(1.0, 1.99), 1.010, 0.0) == pytest.approx(0.004)
    assert (link.last_done, link.last_away) == (1.010, 2.0)


async def test_a_send_posted_outside_a_pass_counts_once_toward_the_other_rails(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker_a = FakeWorker(fds[0])
    a = P.LoopProgress(worker_a, loop, "tcp")
    b = P.LoopProgress(FakeWorker(fds[1]), loop, "shm")
    try:
        await asyncio.sleep(0.01)
        a0, b0 = a.away(), b.away()
        a.account(0.003)  # the engine's pump posted a large TCP send that took 3 ms
        assert b.away() - b0 == pytest.approx(0.003)
        assert a.away() == a0
        # A send posted by a callback inside a's pass is already in the pass's own time.
        req = worker_a.request(loop)
        a.watch(req, lambda fut: a.account(0.003))
        a.kick()
        await asyncio.sleep(0.01)
        assert b.away() - b0 < 0.003 + 0.002  # the claimed 3 ms were not added a second time
    finally:
        a.close()
        b.close()


def test_a_link_refuses_moves_its_state_table_does_not_allow() -> None:
    from tent_async.backends.ucx.peer import LinkState, LinkStateError

    link: Any = Link.__new__(Link)
    link.name = "peer/shm"
    link.state = LinkState.IDLE
    with pytest.raises(LinkStateError, match="from idle to up"):
        link._move(LinkState.UP)  # never up without LINKED and BOUND
    assert link.state is LinkState.IDLE
    for step in (LinkState.LINKING, LinkState.BINDING, LinkState.UP):
        link._move(step)
    with pytest.raises(LinkStateError, match="from up to binding"):
        link._move(LinkState.BINDING)
    assert link._move(LinkState.IDLE) is LinkState.UP  # torn down from anywhere
    assert link._move(LinkState.IDLE) is LinkState.IDLE  # closing twice is allowed


def test_a_slice_in_flight_refuses_moves_its_state_table_does_not_allow() -> None:
    from tent_async.backends.ucx.peer import OpState, OpStateError

    S = OpState
    link = SimpleNamespace(name="peer/shm")
    lives = [
        [S.SENT, S.REPORTED],  # answered (or failed) and reported
        [S.SENT, S.WITHDRAWING, S.REPORTED],  # withdrawn in flight: reported once its requests ended
        [S.SENT, S.WITHDRAWING, S.WITHDRAWING, S.REPORTED],  # withdrawn again (the engine after a crash)
        [S.WITHDRAWN, S.REPORTED],  # withdrawn while queued
        [S.REPORTED],  # queued when its link was torn down: failed
    ]
    legal = set()
    for life in lives:
        op = _Op(None, link, Op.WRITE, 0.0)  # type: ignore[arg-type]
        assert op.state is S.QUEUED
        for step in life:
            was = op.state
            assert op.move(step) is was
            assert op.state is step
            legal.add((was, step))
        assert op.state is S.REPORTED
    reach = {S.QUEUED: [], S.SENT: [S.SENT], S.WITHDRAWN: [S.WITHDRAWN], S.WITHDRAWING: [S.SENT, S.WITHDRAWING]}
    reach[S.REPORTED] = [S.REPORTED]
    refused = 0
    for was in S:
        for to in S:
            if (was, to) in legal:
                continue
            op = _Op(None, link, Op.WRITE, 0.0)  # type: ignore[arg-type]
            for step in reach[was]:
                op.move(step)
            with pytest.raises(OpStateError, match=f"rail peer/shm: slice .* from {was} to {to}"):
                op.move(to)
            assert op.state is was  # a refused move changes nothing
            refused += 1
    # Among them: a header sent twice, a queued slice fenced, and anything after the report.
    assert {(S.SENT, S.SENT), (S.QUEUED, S.WITHDRAWING), (S.REPORTED, S.WITHDRAWN)} <= {
        (w, t) for w in S for t in S if (w, t) not in legal
    }
    assert refused == len(S) ** 2 - len(legal) == 25 - 8


def test_a_pipelined_slices_away_time_starts_at_the_links_previous_reply() -> None:
    """The client times a slice from its predecessor's completion; the server must not report
    away time from before that (it would be taken off the wire time twice)."""
    from types import SimpleNamespace

    from tent_async.backends.ucx.server import ServerLink

    clock = [0.0]
    link = object.__new__(ServerLink)
    link.rail = SimpleNamespace(progress=SimpleNamespace(away=lambda: clock[0]))  # type: ignore[assignment]
    link.away_replied = 0.0
    first, second = 0.0, 0.001  # both headers arrived; the loop then spent 3 ms on other rails
    clock[0] = 0.003
    assert link.away_since(first) == 3000
    clock[0] = 0.005  # 2 ms more elsewhere before the second slice's reply
    assert link.away_since(second) == 2000  # not 4000: the first 2 ms were the first slice's


def test_an_endpoint_with_a_send_going_out_is_never_closed_it_parks() -> None:
    """Issue 11: closing a UCX TCP endpoint mid-send, then the peer's closing its side, crashes
    the process (channel.py).  A closed channel with a send still going out lingers; after
    LINGER_MAX it parks (the owner settles in ``on_park``; the request and its buffer stay held)
    and closes only once the send completes, UCX fails it, or the rail closes.  Lingering
    endpoints count per key, for the owners' admission bound."""
    import collections

    from tent_async.backends.ucx import _ucxx
    from tent_async.backends.ucx import channel as C

    if _ucxx.available() is not None:
        pytest.skip("ucxx is not installed")
    _ucxx.load()
    loop = asyncio.new_event_loop()
    try:
        watched: dict[Any, Any] = {}

        class Ep:
            closed = False

            def set_close_callback(self, fn: Any) -> None: ...
            def remove_close_callback(self) -> None: ...

            def close_blocking(self, *_: Any) -> None:
                self.closed = True

        rail = SimpleNamespace(
            loop=loop,
            progress=SimpleNamespace(watch=lambda req, fn: watched.__setitem__(id(req), fn), kick=lambda *a: None),
            channels=set(),
            parked=0,
            parked_by=collections.Counter(),
        )

        def channel_with_a_send(calls: list[Any]) -> tuple[Any, Any, Any]:
            ep = Ep()
            ch = C.Channel(rail, ep, "test", lambda ch, reason: None)  # type: ignore[arg-type]
            req = SimpleNamespace(future=loop.create_future())
            ch.keep(req, b"bytes", calls.append, send=True)
            return ch, ep, req

        calls: list[Any] = []
        ch, ep, req = channel_with_a_send(calls)
        parks: list[str] = []
        ch.abort("unlinked", linger=True, park_key="peer-a", on_park=lambda: parks.append("settled") is None)
        assert ch.closed and ch.lingering and not ch.parked and not ep.closed
        assert rail.parked_by["peer-a"] == 1 and rail.parked == 0 and not parks
        assert ch._linger is not None and ch._linger.when() - loop.time() <= C.LINGER_MAX
        ch._linger.cancel()
        ch._park(lambda: parks.append("settled") is None)  # LINGER_MAX passed, the send still going out
        assert ch.parked and rail.parked == 1 and not ep.closed  # never closed mid-send
        assert parks == ["settled"] and not calls  # the owner settled; the send's callback waits for UCX
        assert ch.pending == 1  # the request and its buffer stay held for UCX
        req.future.set_result(None)
        watched[id(req)](req.future)  # the send completed: the parked endpoint closes
        assert ep.closed and not ch.parked and rail.parked == 0 and not rail.parked_by
        assert calls == [None] and ch.pending == 0  # its callback ran once, when UCX gave it back

        failed_ep: list[Any] = []
        ch, ep, req = channel_with_a_send(failed_ep)
        ch.abort("unlinked", linger=True, park_key="source-b")
        ch._linger.cancel()
        ch._park(None)
        assert ch.parked and not ep.closed
        ch._closed_on_loop()  # UCX failed the endpoint (the peer closed): safe to close now
        assert ep.closed and rail.parked == 0 and not rail.parked_by

        ch, ep, req = channel_with_a_send([])
        ch.abort("unlinked", linger=True, park_key="source-b")
        ch._linger.cancel()

        def broken() -> bool:
            raise RuntimeError("an owner's bug")

        ch._park(broken)  # an owner that fails is no reason to close mid-send
        assert ch.parked and not ep.closed
        ch.abort("rail closing")  # a plain abort closes a lingering endpoint now
        assert ep.closed and rail.parked == 0 and not rail.parked_by

        ch, ep, req = channel_with_a_send([])
        ch.fail("cannot send: a UCX error on posting")  # another send still going out on it
        assert ch.closed and ch.lingering and not ep.closed  # the error path does not close mid-send either
        ch.abort("rail closing")
        assert ep.closed and not rail.parked_by

        ch, ep, req = channel_with_a_send([])
        ch.abort("unlinked", linger=True, park_key="peer-a", on_park=lambda: False)
        ch._linger.cancel()
        ch._park(lambda: False)  # the owner still has a receive into caller memory on it
        assert ep.closed and not ch.parked and rail.parked == 0 and not rail.parked_by
    finally:
        loop.close()


def test_a_parked_links_ops_are_settled_and_what_ucx_still_reads_stays_held() -> None:
    """Issue 11 review: Link._park_ops settles the ops of a link whose endpoint parked, holds a
    WRITE's source segment until UCX gives it back, and abandons a READ's staging.  A READ's
    receive into caller memory is never there any more (Link._admit); were one
    there, it would refuse (the endpoint is then closed, the only way to stop the receive),
    and say so: logged and counted as the bug it would be."""
    import collections

    import numpy as np

    import tent_async as tent
    from tent_async.backends.ucx import peer as P
    from tent_async.backends.ucx.control import LogLimiter

    engine = tent.Engine(backend="local")
    seg = engine.register(np.zeros(64, dtype=np.uint8), name="src")
    link = object.__new__(P.Link)
    link.name = "peer/lo"
    link.rail = SimpleNamespace(plan=SimpleNamespace(kind="tcp"))  # type: ignore[assignment]
    stats: collections.Counter[str] = collections.Counter()
    link.peer = SimpleNamespace(site=SimpleNamespace(stats=stats, log=LogLimiter()))  # type: ignore[assignment]
    settled: list[Any] = []
    link._settle = settled.append  # type: ignore[method-assign]

    def op(**kw: Any) -> Any:
        base = dict(
            state=P.OP_SENT,
            pending=1,
            buffer=None,
            sg=None,
            sending=False,
            held=None,
            attempt=SimpleNamespace(src=seg),
            error=None,
            stalled=False,
            direct=False,
        )
        base.update(kw)
        return SimpleNamespace(**base)

    into_caller = op(buffer=("view", "segment"), direct=True)
    write = op(sending=True, pending=2)
    assert not link._park_ops([write, into_caller])  # refused: nothing settled, nothing held
    assert not settled and not write.stalled and seg.held == 0
    assert stats["closed_mid_send"] == 1

    into_staging = op(buffer=("staging", "segment"), sg=object())
    staged_read = op(buffer=("staging", "segment"), staged=np.zeros(8, dtype=np.uint8))  # a plain READ, staged
    done = op(pending=0)
    reported = op(state=P.OP_REPORTED)
    assert link._park_ops([write, into_staging, staged_read, done, reported])
    assert settled == [write, into_staging, staged_read] and write.stalled and into_staging.stalled
    assert staged_read.stalled and write.error and into_staging.error and staged_read.error
    assert stats["closed_mid_send"] == 1
    assert seg.held == 1 and write.held is seg
    with pytest.raises(tent.SegmentBusyError, match="stopped reading"):
        engine.unregister(seg)
    link._send_done(write)(None)  # UCX gives the WRITE's memory back
    assert seg.held == 0 and write.held is None and not write.sending
    engine.unregister(seg)


class StreamWorker(BusyOnceWorker):
    """A slice's bytes through a shared-memory FIFO: one productive progress call per pass while it moves.

    ``stalled``: the peer neither fills nor drains the FIFO (every call unproductive).
    """

    def __init__(self, fd: int) -> None:
        super().__init__(fd, busy=0)
        self.stalled = False
        self._moved = False

    def progress_once(self) -> bool:
        self.progress_calls += 1
        if self.stalled or self._moved:
            self._moved = False  # the next call of this pass finds the FIFO full (or empty) again
            return False
        self._moved = True
        return True


def _yields(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    got: list[float] = []
    monkeypatch.setattr(P.os, "sched_yield", lambda: got.append(time.perf_counter()))
    return got


@pytest.mark.parametrize("direction", ["send", "receive"])
async def test_a_slices_bytes_on_shared_memory_flow_with_the_cpu_yielded_between_passes(
    fds: list[int], monkeypatch: pytest.MonkeyPatch, direction: str
) -> None:
    # On one core shared with the peer, a pass that kept the CPU while the FIFO was full (or
    # armed and slept after every fragment) moved 0.4-0.6 GB/s instead of 2-5 (progress.py).
    yields = _yields(monkeypatch)
    loop = asyncio.get_running_loop()
    worker = StreamWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "shm", shm=True)
    try:
        await asyncio.sleep(0.01)
        worker.arms = 0
        req: Any = worker.request(loop, progress_calls=10**9)  # unfinished until resolved below
        prog.stream(req)
        if direction == "send":
            prog.kick(req)
        else:
            prog.kick()
        await asyncio.sleep(0.005)
        moving = len(yields)
        assert moving >= 5  # pass after pass, each after giving the CPU away
        assert worker.arms == 0  # never armed (and slept) while the bytes moved
        # The peer stops: the passes go on for STREAM_SPIN, then arm and sleep.
        worker.stalled = True
        await asyncio.sleep(P.STREAM_SPIN + 0.005)
        assert worker.arms >= 1
        calls, stalled = worker.progress_calls, len(yields)
        await asyncio.sleep(0.005)
        assert len(yields) == stalled  # asleep: no more passes, no more yields ...
        if direction == "receive":
            assert worker.progress_calls == calls  # ... nor progress calls (a send is still polled)
        # It moves again (an event): passes resume until it completes, then the pass arms as before.
        worker.stalled = False
        prog.kick()
        await asyncio.sleep(0.003)
        assert len(yields) > stalled
        worker.ready.clear()
        req.future.set_result(None)
        req.completed = True
        await asyncio.sleep(0.003)
        done = len(yields)
        await asyncio.sleep(0.005)
        assert len(yields) == done  # finished: nothing keeps the pass going
    finally:
        prog.close()


async def test_streaming_is_for_shared_memory_and_holds_no_request(
    fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc
    import weakref

    yields = _yields(monkeypatch)
    loop = asyncio.get_running_loop()
    tcp_worker, shm_worker = StreamWorker(fds[0]), StreamWorker(fds[1])
    tcp = P.LoopProgress(tcp_worker, loop, "tcp", shm=False)
    shm = P.LoopProgress(shm_worker, loop, "shm", shm=True)
    try:
        await asyncio.sleep(0.01)

        class Request:  # dropping its last reference cancels a ucxx request (peer.py relies on it)
            def __init__(self, future: asyncio.Future[None]) -> None:
                self.future, self.completed = future, False

        tcp_req = Request(loop.create_future())
        tcp.stream(tcp_req)
        tcp.kick()
        await asyncio.sleep(0.005)
        assert yields == []  # TCP raises events when a socket has room or data: no streaming
        shm_req = Request(loop.create_future())
        gone = weakref.ref(shm_req)
        shm.stream(shm_req)
        del shm_req
        gc.collect()
        assert gone() is None  # only its future is kept
    finally:
        tcp.close()
        shm.close()


def test_a_writes_gather_counts_as_its_own_rails_time() -> None:
    """The client gathers a WRITEV slice's extents on the loop, outside any pass: that time goes
    to the link's own rail (``account``), so the other rails' slices in flight leave it out of
    their wire time (as a READ's scatter, which runs in its rail's pass).  Unaccounted, every
    gather made the other rails look slower, on WRITE only."""
    accounted: list[float] = []
    sent: list[str] = []

    class Plan:
        kind = Op.WRITE

        def header(self, request: int) -> str:
            return f"WRITEV {request}"

        def bulk(self) -> bytes:
            time.sleep(0.005)  # 5 ms of copying extents into staging
            return b"gathered"

    progress = SimpleNamespace(account=accounted.append)
    channel = SimpleNamespace(
        rail=SimpleNamespace(delayed=False, progress=progress),
        send_message=lambda msg, tag: sent.append(msg),
        recv_message=lambda buf, tag, then: None,
        tag_send=lambda data, tag: sent.append(bytes(data)) or object(),
        keep=lambda req, buf, then, send=False: None,
    )
    link: Any = Link.__new__(Link)
    link.channel, link.free_slots, link._buffers = channel, [0], []
    link.ns, link.peer_ns, link.name = 1, 2, "peer/shm"
    link.peer = SimpleNamespace(inline_limit=16384)
    link.indices, link._random, link.loud, link.direct = set(), [5], 0, 0  # the slice's tag index: 5
    op = _Op(SimpleNamespace(id=7), link, Op.WRITE, 0.0)  # type: ignore[arg-type]
    op.sg = Plan()  # type: ignore[assignment]
    link._send(op)
    assert sent == [f"WRITEV {7 << TAG_INDEX_BITS | 5}", b"gathered"]  # header first, then the gathered bytes
    assert len(accounted) == 1 and accounted[0] >= 0.005


async def test_a_receive_whose_bytes_never_come_stops_keeping_passes_going(
    fds: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress that keeps a stream's passes going is the worker's (other traffic's too): a
    receive a peer announced and never fills stops counting after STREAM_MAX."""
    yields = _yields(monkeypatch)
    monkeypatch.setattr(P, "STREAM_MAX", 0.02)
    loop = asyncio.get_running_loop()
    worker = StreamWorker(fds[0])  # other traffic: a productive call every pass
    prog = P.LoopProgress(worker, loop, "shm", shm=True)
    try:
        await asyncio.sleep(0.01)
        never: Any = SimpleNamespace(future=loop.create_future(), completed=False)
        prog.stream(never)
        prog.kick()
        await asyncio.sleep(0.01)
        assert yields  # within STREAM_MAX: passes go on
        await asyncio.sleep(0.03)
        worker.arms, counted = 0, len(yields)
        prog.kick()
        await asyncio.sleep(0.01)
        assert len(yields) == counted and worker.arms >= 1  # past it: the pass arms and sleeps
    finally:
        never.future.cancel()
        prog.close()


def test_a_read_into_caller_memory_and_a_send_that_can_stall_never_share_a_link() -> None:
    """Issue 11: what Link._admit lets out.  While a large READ receives into caller memory on
    the link (link.direct): plain READ headers, while fewer than QUIET_SLOTS headers are
    unanswered; a WRITE or an extent list waits (its send could stall beside that receive).
    While a WRITE or an extent list is in flight (link.loud), a large plain READ waits (it would
    receive into caller memory), unless the link receives such READs into staging (a network
    rail); small ones (answered inline) and everything else go.  With neither, everything
    goes, as before."""
    from tent_async.backends.ucx import peer as P

    link = object.__new__(P.Link)
    link.peer = SimpleNamespace(slots=16)  # type: ignore[assignment]
    link.free_slots = list(range(16))
    link.direct = link.loud = 0
    link.stage_reads = False

    def op(kind: Op, sg: Any = None, inline: bool = False, cma: bool = False) -> Any:
        return SimpleNamespace(kind=kind, sg=sg, inline=inline, cma=cma)

    read, write, small_read = op(Op.READ), op(Op.WRITE), op(Op.READ, inline=True)
    assert link._admit(read) and link._admit(write) and link._admit(small_read)  # one direction: all go
    link.direct = 1
    assert link._admit(read) and link._admit(small_read) and not link._admit(write)
    assert not link._admit(op(Op.READ, sg=object()))  # an extent list's header may carry a table: waits
    link.free_slots = list(range(16 - P.QUIET_SLOTS + 1))  # QUIET_SLOTS - 1 headers unanswered
    assert link._admit(read)
    link.free_slots.pop()  # QUIET_SLOTS unanswered: the next plain READ waits too
    assert not link._admit(read) and not link._admit(small_read)
    link.direct, link.loud = 0, 1
    assert not link._admit(read)  # would receive into caller memory beside the WRITE's send
    assert link._admit(small_read) and link._admit(write)
    assert link._admit(op(Op.READ, cma=True))  # copied directly (cma.py): nothing received into caller memory
    link.stage_reads = True
    assert link._admit(read)  # goes, into staging (Link._send)
    link.loud = 0
    assert link._admit(read) and link._admit(write)


async def test_withdrawing_the_queued_head_lets_the_slices_behind_it_go() -> None:
    """Review: admission now depends on the slice (a WRITE waits while a READ receives into
    caller memory), so withdrawing the queue's head must flush the queue, or the slices behind
    it wait for some other completion."""
    from tent_async.backends.ucx import peer as P

    flushed: list[int] = []
    link = object.__new__(P.Link)
    link.waiting = collections.deque()
    link.ops = {}
    link.peer = SimpleNamespace(site=SimpleNamespace(ctx=SimpleNamespace(withdrawn=lambda aid: None)))  # type: ignore[assignment]
    link._flush = lambda: flushed.append(len(link.waiting))  # type: ignore[method-assign]
    link._settle = lambda op: None  # type: ignore[method-assign]
    head = _Op(SimpleNamespace(id=1), link, Op.WRITE, 0.0)  # type: ignore[arg-type]
    behind = _Op(SimpleNamespace(id=2), link, Op.READ, 0.0)  # type: ignore[arg-type]
    link.ops = {1: head, 2: behind}
    link.waiting.extend([head, behind])
    link.withdraw(SimpleNamespace(id=1))  # type: ignore[arg-type]
    assert list(link.waiting) == [behind] and not flushed  # scheduled, not run inside withdraw
    await asyncio.sleep(0)
    assert flushed == [1]


def test_a_slices_request_id_carries_a_random_tag_index_unique_on_its_link() -> None:
    """Issue 11: the tag index of a slice's reply and bulk bytes is random (a peer learns it only
    from the header, so it cannot match a READ's receive it has not read) and unique among the
    link's slices in flight; the attempt's id stays above it."""
    from tent_async.backends.ucx import peer as P
    from tent_async.backends.ucx.protocol import TAG_INDEX_BITS, TAG_INDEX_MASK

    link = object.__new__(P.Link)
    link.indices, link._random = set(), []
    ids = [link._request(attempt) for attempt in range(1, 1001)]
    assert [r >> TAG_INDEX_BITS for r in ids] == list(range(1, 1001))
    indices = [r & TAG_INDEX_MASK for r in ids]
    assert len(set(indices)) == 1000 == len(link.indices)  # unique while in flight
    assert indices != sorted(indices)  # not counting up
    assert max(indices) > TAG_INDEX_MASK // 2  # spread over the 23 bits, not near the attempt ids
    link.indices, link._random = {5}, [9, TAG_INDEX_MASK, 5]  # drawn from the end
    assert link._request(7) == (7 << TAG_INDEX_BITS) | 9  # 5 is in flight, all ones is the BIND's
    assert link.indices == {5, 9} and not link._random


async def test_a_control_post_that_completed_nothing_queues_no_pass(fds: list[int]) -> None:
    """``posted()`` (a header's or reply's receive, an eager send done in the call): no pass, no round."""
    loop = asyncio.get_running_loop()
    worker = FakeWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "lo")
    try:
        await asyncio.sleep(0.01)
        calls = worker.progress_calls
        prog.posted()
        assert not prog._scheduled
        await asyncio.sleep(0.01)
        assert worker.progress_calls == calls  # nothing ran for it
        # Inside a pass it asks for no further round either (kick() does).
        rounds: list[bool] = []
        req = worker.request(loop)

        def answer(fut: Any) -> None:
            prog.posted()
            rounds.append(prog._kicked)

        prog.watch(req, answer)
        prog.kick()
        await asyncio.sleep(0.01)
        assert rounds == [False]
    finally:
        prog.close()


class PassCounter:
    """Counts a progress engine's passes (its ``_run_pass`` calls) in ``n``."""

    def __init__(self, prog: Any) -> None:
        self.n = 0
        real = prog._run_pass

        def counted(w: Any, nested: bool = False) -> bool:
            self.n += 1
            return bool(real(w, nested))

        prog._run_pass = counted


class ArmCountingWorker(FakeWorker):
    """``arm`` answers from ``answers`` (then True), and is counted."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.answers: list[bool] = []
        self.arms = 0

    def arm(self) -> bool:
        self.arms += 1
        return self.answers.pop(0) if self.answers else True


async def test_a_stale_event_after_a_queued_pass_armed_costs_an_arm_not_a_pass(fds: list[int]) -> None:
    """Shared memory: a pass left the worker unarmed (it woke a caller), a queued pass armed it; the
    descriptor's readiness reported in that turn is checked with an arm, and a pass runs only if it fails."""
    loop = asyncio.get_running_loop()
    worker = ArmCountingWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "shm", shm=True)
    passes = PassCounter(prog)
    try:
        await asyncio.sleep(0.01)
        passes.n = 0
        prog._unarmed = True  # as a pass that yielded to a woken caller leaves it
        prog.kick()
        await asyncio.sleep(0)  # the queued pass: armed
        assert prog._stale and passes.n == 1
        worker.arms = 0
        prog._on_event()  # the stale readiness: an arm that succeeds, no pass
        assert passes.n == 1 and worker.arms == 1 and prog.stale_skipped == 1
        assert not prog._stale  # once only for staleness; but the worker is quiet (its passes made no
        # progress), so the next event is checked with an arm too, and a pass runs when it fails
        assert prog._quiet
        worker.answers = [False]
        prog._on_event()
        assert passes.n == 2 and prog.stale_skipped == 1 and prog.quiet_skipped == 0
        # A real event after such a pass: the arm fails (something is pending), so the pass runs.
        prog._unarmed = True
        prog.kick()
        await asyncio.sleep(0)
        assert prog._stale
        worker.answers = [False]
        prog._on_event()
        assert passes.n == 4 and prog.stale_skipped == 1
    finally:
        prog.close()
    # Not on TCP, where the readiness does not outlive the pass that took the message.
    worker = ArmCountingWorker(fds[1])
    tcp = P.LoopProgress(worker, loop, "lo", shm=False)
    try:
        await asyncio.sleep(0.01)
        tcp._unarmed = True
        tcp.kick()
        await asyncio.sleep(0)
        assert not tcp._stale
    finally:
        tcp.close()


POLL_SETTLE = P.POLL_SPIN + 0.02


class ProgressingWorker(ArmCountingWorker):
    """``progress_once`` reports progress ``made`` times, then none."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.made = 0

    def progress_once(self) -> bool:
        super().progress_once()
        if self.made:
            self.made -= 1
            return True
        return False


@pytest.mark.parametrize("mode", ["loop", "poll"])
async def test_an_idle_shared_memory_workers_spurious_events_cost_an_arm_and_start_no_spin(
    fds: list[int], mode: str
) -> None:
    """A shared-memory worker whose last pass made no progress checks an event with an arm first:
    another rail's message also wakes an idle worker (a loopback one beside shared memory, measured),
    and a pass for it was work for nothing; in "poll" mode it also spun 2 ms beside the rail that had
    work.  Progress ends the quiet: the next event runs a pass at once, and in "poll" mode spins."""
    loop = asyncio.get_running_loop()
    worker = ProgressingWorker(fds[0])
    cls = P.PollProgress if mode == "poll" else P.LoopProgress
    prog = cls(worker, loop, "shm", shm=True)
    passes = PassCounter(prog)
    try:
        await asyncio.sleep(0.01)  # the first pass: nothing to do, armed
        assert prog._quiet
        passes.n, worker.arms, prog._active_until = 0, 0, 0.0
        for _ in range(5):  # spurious readiness: armed again, no pass, no spin
            prog._on_event()
            await asyncio.sleep(0)
        skipped = prog.quiet_skipped + prog.stale_skipped  # the first may also be the start's stale one
        assert passes.n == 0 and worker.arms == 5 and skipped == 5 and prog.quiet_skipped >= 4
        assert prog._active_until == 0.0
        worker.answers, worker.made = [False], 1  # a real message: the arm fails, the pass progresses
        prog._on_event()
        assert passes.n == 1 and not prog._quiet
        if mode == "poll":
            assert prog._active_until > loop.time() and prog._scheduled  # progress keeps the poll going
        else:
            arms = worker.arms
            prog._on_event()  # the next event after progress: a pass at once, no arm first
            assert passes.n == 2 and worker.arms > arms  # (the pass's own arm at its end)
            assert prog.quiet_skipped + prog.stale_skipped == 5
    finally:
        prog.close()


async def test_over_tcp_every_event_runs_a_pass_but_only_progress_starts_the_poll_spin(fds: list[int]) -> None:
    """TCP: an arm may succeed with a message waiting whose readiness the event was (nothing would
    wake the rail for it again), so every event runs a pass; a pass that found nothing does not
    start "poll"'s 2 ms of spinning (an idle loopback worker woken with every shared-memory message
    spun beside it on every round trip)."""
    loop = asyncio.get_running_loop()
    worker = ProgressingWorker(fds[0])
    prog = P.PollProgress(worker, loop, "lo")
    passes = PassCounter(prog)
    try:
        await asyncio.sleep(POLL_SETTLE)  # the start's kick spins POLL_SPIN, then the worker arms
        assert prog._quiet and not prog._scheduled
        passes.n, worker.arms = 0, 0
        for _ in range(3):
            prog._on_event()
            await asyncio.sleep(0)
        assert passes.n == 3 and prog.stale_skipped == prog.quiet_skipped == 0  # a pass each, no arm-first
        assert prog._active_until < loop.time() and not prog._scheduled  # and no spin
    finally:
        prog.close()


async def test_the_intake_gate_is_not_asked_again_until_a_progress_call_took_something(fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    worker = FakeWorker(fds[0])
    prog = P.LoopProgress(worker, loop, "lo")
    looks = 0
    empty = True

    def drain() -> bool:
        nonlocal looks
        looks += 1
        return empty

    prog.intake = drain
    try:
        await asyncio.sleep(0.01)
        prog.kick()
        await asyncio.sleep(0.01)
        looks = 0
        for _ in range(3):  # passes whose progress calls take nothing: the last look still holds
            prog.kick()
            await asyncio.sleep(0.001)
        assert looks == 0
        req = worker.request(loop)  # a progress call takes something: looked at after it
        prog.watch(req, lambda fut: None)
        prog.kick()
        await asyncio.sleep(0.01)
        assert looks == 1
        empty = False  # the queue is not empty after the next intake: the pass holds, and looks first next time
        req = worker.request(loop)
        prog.watch(req, lambda fut: None)
        prog.kick()
        await asyncio.sleep(0)
        assert looks == 2 and not prog._clear
        empty = True
        await asyncio.sleep(0.01)  # the held pass went on in a later turn, looking first
        assert looks >= 3 and prog._clear
    finally:
        prog.close()
