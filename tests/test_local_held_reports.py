"""The local backend's paced inline copies: reports held until the bytes would have
arrived, delivered in groups and in order, collected early by a burst of submits,
and fenced like every other report."""

from __future__ import annotations

import time

import anyio
import numpy as np
import pytest

import tent_async as tent
from tent_async.backends.local import LocalBackend
from tent_async.testing.trace import SliceTrace

KiB = 1 << 10
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _hold_the_loop(seconds: float) -> None:
    """What a burst of task starts does: keep the event loop busy, without a turn."""
    time.sleep(seconds)


def _pools(engine: tent.Engine, n: int, size: int) -> tuple[tent.Segment, tent.Segment, np.ndarray, np.ndarray]:
    src = np.random.default_rng(n).integers(0, 256, n * size, dtype=np.uint8)
    dst = np.zeros_like(src)
    return engine.register(src, name="src", permission="r"), engine.register(dst, name="dst"), src, dst


async def test_held_back_reports_arrive_in_post_order_behind_one_timer() -> None:
    """Many small copies on one paced rail: one loop timer for all the reports held back,
    each delivered when its bytes would have arrived, in the order the slices were posted."""
    rate = 50e6  # 64 KiB in 1.3 ms
    size = 64 * KiB
    async with tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=rate)]) as engine:
        a, b, src, dst = _pools(engine, 12, size)
        backend = engine.backend
        assert isinstance(backend, LocalBackend)
        with SliceTrace(engine) as trace:
            handles = [engine.submit(a[i * size : (i + 1) * size], b[i * size : (i + 1) * size]) for i in range(12)]
            await anyio.lowlevel.checkpoint()  # the pump of this turn posts what the rail may hold
            held = len(backend._due)
            assert held >= 2  # copied at once, their reports held back ...
            assert backend._due_timer is not None  # ... behind one timer, not one each
            assert sum(not h.done() for h in handles) >= held
            start = time.monotonic()
            results = [await h for h in handles]
        elapsed = time.monotonic() - start
    np.testing.assert_array_equal(dst, src)
    assert elapsed >= (12 - held - 2) * size / rate  # the rail's pace held, not skipped
    posted = [e.attempt for e in trace.of("post")]
    completed = [e.attempt for e in trace.of("complete")]
    assert completed == posted  # one rail: reports in the order the slices were posted
    assert all(e.counted for e in trace.of("complete"))
    assert all(r.slices == 1 for r in results)
    assert engine.telemetry().rails[0].deadline_misses == 0
    trace.check()


async def test_a_burst_of_submits_collects_due_reports_and_keeps_the_rail_moving() -> None:
    """Submits made in one loop turn, without yielding: once a held-back report is due, a
    later submit delivers it (its transfer settles) and posts the next slice on the
    freed rail, all before the turn ends."""
    size = 64 * KiB
    rate = 1e6  # 65 ms a slice: the second submit comes long before the first's report is due
    # (at 100 MB/s, 0.65 ms, a cold first run of this test alone was past it: the second was posted)
    config = {"window": 1, "max_window": 1}  # the rail takes one slice at a time
    async with tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=rate)], config=config) as engine:
        a, b, src, dst = _pools(engine, 3, size)
        first = engine.submit(a[:size], b[:size])  # idle: posted and copied at once
        assert np.array_equal(dst[:size], src[:size])
        second = engine.submit(a[size : 2 * size], b[size : 2 * size])  # the rail is full: waits
        assert not np.array_equal(dst[size : 2 * size], src[size : 2 * size])
        _hold_the_loop(size / rate + engine.config.target_slice_time)  # first's bytes have arrived
        third = engine.submit(a[2 * size :], b[2 * size :])  # collects first's report, posts second
        assert first.done() and first.result().bytes == size
        assert np.array_equal(dst[size : 2 * size], src[size : 2 * size])
        assert not third.done()
        await second
        await third
    np.testing.assert_array_equal(dst, src)


async def test_a_burst_of_submits_waits_for_the_pump_while_every_rail_is_full() -> None:
    """Without a due report and with every rail at its window, a submit posts nothing itself."""
    size = 64 * KiB
    config = {"window": 1, "max_window": 1}
    async with tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=1e6)], config=config) as engine:
        a, b, _src, _dst = _pools(engine, 2, size)
        with SliceTrace(engine) as trace:
            first = engine.submit(a[:size], b[:size])
            second = engine.submit(a[size:], b[size:])
            assert [e.transfer for e in trace.of("post")] == [first.id]
            second.cancel()
            first.cancel()
            with pytest.raises(tent.TransferCancelledError):
                await second
            with pytest.raises(tent.TransferCancelledError):
                await first
        assert [e.transfer for e in trace.of("post")] == [first.id]
        trace.check()


async def test_a_withdrawn_copy_is_reported_withdrawn_never_completed() -> None:
    """Fencing: a transfer cancelled while its copy's report is held back ends cancelled,
    its attempt is confirmed withdrawn, and the held report is dropped, not delivered."""
    size = 64 * KiB
    rate = 1e6  # 65 ms a slice: the report is still held when the cancel's withdrawal arrives
    async with tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=rate)]) as engine:
        a, b, _src, _dst = _pools(engine, 2, size)
        backend = engine.backend
        assert isinstance(backend, LocalBackend)
        with SliceTrace(engine) as trace:
            doomed = engine.submit(a[:size], b[:size])
            assert backend._due  # copied, report held back
            doomed.cancel()
            with pytest.raises(tent.TransferCancelledError):
                await doomed
            after = engine.submit(a[size:], b[size:])  # the rail goes on serving
            await after
            await anyio.sleep(2 * size / rate)  # past the dropped report's time
        kinds = [e.kind for e in trace if e.transfer == doomed.id]
        assert "withdrawn" in kinds
        assert "complete" not in kinds
        assert not backend._inline and not backend._withdrawn
        trace.check()


async def test_a_report_due_before_the_cancels_withdrawal_is_not_withdrawn_again() -> None:
    """Review: a cancel queues its withdrawals for the next pump, which first collects the
    reports due; one due by then is delivered (a withdrawing attempt's completion, not
    counted), and the backend is not then told to withdraw the resolved attempt: it kept
    that id in its set of withdrawn ones forever."""
    size = 64 * KiB
    async with tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=10e6)]) as engine:  # 6.5 ms a slice
        a, b, _src, _dst = _pools(engine, 2, size)
        backend = engine.backend
        assert isinstance(backend, LocalBackend)
        doomed = engine.submit(a[:size], b[:size])
        assert backend._due
        _hold_the_loop(0.02)  # its report falls due
        doomed.cancel()
        with pytest.raises(tent.TransferCancelledError):
            await doomed
        await engine.transfer(a[size:], b[size:])
        assert not backend._inline and not backend._withdrawn
        snap = engine.telemetry()
        assert snap.open_transfers == 0 and snap.inflight_bytes == 0


async def test_a_report_delivered_from_inside_a_report_keeps_the_order() -> None:
    """Review: a slice listener that submits (and so may pump) while a held report is
    delivered re-entered the delivery, and reports reached the planner out of order."""
    import asyncio
    import heapq

    backend = LocalBackend()

    class _Ctx:
        def __init__(self) -> None:
            self.completed: list[int] = []

        def complete(self, attempt_id: int, wire_time: float | None = None) -> None:
            if attempt_id == 1:
                backend.deliver_due(5.0)  # what a pump started from a listener does
            self.completed.append(attempt_id)

    ctx = _Ctx()
    backend._ctx = ctx  # type: ignore[assignment]
    backend._loop = asyncio.get_running_loop()
    for aid, due in ((1, 1.0), (2, 2.0), (3, 3.0)):
        backend._inline[aid] = 0.001
        heapq.heappush(backend._due, (due, aid))
    backend.deliver_due(5.0)
    assert ctx.completed == [1, 2, 3]
    assert backend._due_timer is None


async def test_closing_drops_what_was_held_back() -> None:
    size = 64 * KiB
    engine = tent.Engine(rails=[tent.RailSpec(name="r", bandwidth=1e6)])  # 65 ms a slice
    async with engine:
        a, b, _src, _dst = _pools(engine, 1, size)
        backend = engine.backend
        assert isinstance(backend, LocalBackend)
        handle = engine.submit(a[:], b[:])
        assert backend._due and backend._due_timer is not None
        handle.cancel()
    assert not backend._due and not backend._inline and backend._due_timer is None


async def test_a_held_report_that_raises_does_not_stop_the_ones_after_it() -> None:
    import asyncio
    import heapq

    class _Ctx:
        def __init__(self) -> None:
            self.completed: list[int] = []

        def complete(self, attempt_id: int, wire_time: float | None = None) -> None:
            if attempt_id == 2:
                raise ValueError("boom")
            self.completed.append(attempt_id)

    backend = LocalBackend()
    ctx = _Ctx()
    backend._ctx = ctx  # type: ignore[assignment]
    backend._loop = asyncio.get_running_loop()
    for aid, due in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 9.0)):
        backend._inline[aid] = 0.001
        heapq.heappush(backend._due, (due, aid))
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))
    try:
        backend.deliver_due(5.0)
    finally:
        loop.set_exception_handler(None)
        if backend._due_timer is not None:
            backend._due_timer.cancel()
    assert ctx.completed == [1, 3]  # in order, past the one that raised; 4 is not due yet
    assert [str(e) for e in errors] == ["boom"]
    assert backend.report_due_at() == 9.0


async def test_a_burst_collects_due_reports_at_most_once_a_quarter_slice_time() -> None:
    """Reports due at once (an unpaced rail) are not collected by every submit of a burst:
    one pump serves all of them once a quarter of target_slice_time has passed."""
    size = 64 * KiB
    config = {"window": 1, "max_window": 1, "target_slice_time": "200ms"}  # 50 ms between pumps
    async with tent.Engine(rails=[tent.RailSpec(name="r")], config=config) as engine:
        a, b, src, dst = _pools(engine, 3, size)
        with SliceTrace(engine) as trace:
            first = engine.submit(a[:size], b[:size])  # idle: posted; its report is due at once
            assert engine.backend.report_due_at() <= time.monotonic()
            second = engine.submit(a[size : 2 * size], b[size : 2 * size])  # a pump ran just now
            assert [e.transfer for e in trace.of("post")] == [first.id]
            assert not first.done()
            _hold_the_loop(0.06)
            third = engine.submit(a[2 * size :], b[2 * size :])  # now one pump collects and posts
            assert first.done()
            assert [e.transfer for e in trace.of("post")] == [first.id, second.id]
            await second
            await third
        trace.check()
    np.testing.assert_array_equal(dst, src)
