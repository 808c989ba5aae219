"""The public API on the local backend: the issue's example, batches, handles, telemetry."""

from __future__ import annotations

import mmap

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import tent_async as tent
from tent_async.backends.local import LocalBackend
from tent_async.core import Attempt

MiB = 1 << 20
pytestmark = pytest.mark.anyio

RAILS = [
    tent.RailSpec(name="nic0", bandwidth="2GB/s"),
    tent.RailSpec(name="nic1", bandwidth="2GB/s"),
    tent.RailSpec(name="slow0", bandwidth="200MB/s"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_the_issue_example_moves_every_byte() -> None:
    src = np.arange(32 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(backend="local", rails=RAILS, policy="eft") as engine:
        a = engine.register(src, name="kv-src")
        b = engine.register(dst, name="kv-dst")
        assert isinstance(a, tent.Segment)
        result = await engine.transfer(a[0 : 8 * MiB], b[1 * MiB : 9 * MiB])
        assert isinstance(result, tent.TransferResult)
        assert result.bytes == 8 * MiB and result.slices >= 1 and result.elapsed > 0
        assert sum(result.bytes_per_rail.values()) == 8 * MiB
        assert set(result.bytes_per_rail) <= {"nic0", "nic1", "slow0"}
        np.testing.assert_array_equal(dst[1 * MiB : 9 * MiB], src[0 : 8 * MiB])
        handle = engine.submit(a[:], b[:])
        assert isinstance(handle, tent.TransferHandle)
        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(engine.transfer, a[i * MiB : (i + 1) * MiB], b[i * MiB : (i + 1) * MiB])
        res = await handle
        assert res.bytes == 32 * MiB
        assert handle.status is tent.TransferStatus.DONE and handle.bytes_done == 32 * MiB
        np.testing.assert_array_equal(dst, src)
        snap = engine.telemetry()
        assert {r.name for r in snap} == {"nic0", "nic1", "slow0"}
        assert snap.inflight_bytes == 0 and snap.open_transfers == 0
        assert sum(r.bytes_total for r in snap) >= 32 * MiB + 8 * MiB + 16 * MiB
        text = str(snap)
        assert "nic0" in text and "learned bw" in text


async def test_batch_completes_when_all_pairs_do() -> None:
    src = np.random.default_rng(0).integers(0, 256, 4 * MiB, dtype=np.uint8)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    async with tent.Engine(rails=RAILS) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        pairs = [(a[i * MiB : (i + 1) * MiB], b[(7 - i) * MiB : (8 - i) * MiB]) for i in range(4)]
        result = await engine.transfer_batch(pairs)
        assert result.bytes == 4 * MiB
        for i in range(4):
            np.testing.assert_array_equal(dst[(7 - i) * MiB : (8 - i) * MiB], src[i * MiB : (i + 1) * MiB])
        assert not dst[: 3 * MiB].any()  # nothing outside the destinations changed


async def test_whole_segments_and_nested_views() -> None:
    src = bytearray(b"abcdefghij" * 1000)
    dst = bytearray(len(src))
    async with tent.Engine() as engine:
        a = engine.register(src, permission="r")
        b = engine.register(dst)
        await engine.transfer(a, b)  # a segment means all of it
        assert dst == src
        v = a[100:200][10:20]
        assert (v.offset, v.length) == (110, 10)
        await engine.transfer(v, b[0:10])
        assert dst[0:10] == src[110:120]


async def test_registers_every_kind_of_host_buffer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 16)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        arr = np.arange(1024, dtype=np.float32)  # 4096 bytes, a non-byte dtype
        mv = memoryview(bytearray(4096))
        async with tent.Engine() as engine:
            s_mm = engine.register(mm, name="mm")
            s_arr = engine.register(arr, name="arr")
            s_mv = engine.register(mv, name="mv")
            assert s_mm.size == s_arr.size == s_mv.size == 4096
            assert s_arr.kind == "host" and s_arr.permission == "rw"
            await engine.transfer(s_mm, s_mv)
            await engine.transfer(s_mv, s_arr)
            engine.unregister(s_mm)  # release the mmap export before the file closes
            engine.unregister(s_mv)
            engine.unregister(s_arr)
        assert mv.tobytes() == path.read_bytes()
        assert arr.tobytes() == path.read_bytes()


async def test_dlpack_objects_register_without_copying() -> None:
    class DLPackOnly:
        """Exposes only DLPack, like a torch CPU tensor."""

        def __init__(self, arr: np.ndarray) -> None:
            self.arr = arr

        def __dlpack__(self, **kwargs):  # type: ignore[no-untyped-def]
            return self.arr.__dlpack__(**kwargs)

        def __dlpack_device__(self):  # type: ignore[no-untyped-def]
            return self.arr.__dlpack_device__()

    backing = np.zeros(4096, dtype=np.uint8)
    async with tent.Engine() as engine:
        src = engine.register(np.full(4096, 7, dtype=np.uint8))
        dst = engine.register(DLPackOnly(backing))
        await engine.transfer(src, dst)
    assert (backing == 7).all()


async def test_zero_length_transfer() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(10))
        result = await engine.transfer(a[3:3], a[7:7])
        assert result.bytes == 0 and result.slices == 0


async def test_events_and_listeners_are_delivered() -> None:
    src = np.ones(8 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    got: list[tent.RailEvent] = []
    cfg = tent.SchedulerConfig(max_slice="256KiB")
    async with tent.Engine(rails=[tent.RailSpec(name="a"), tent.RailSpec(name="b")], config=cfg) as engine:
        remove = engine.add_event_listener(got.append)
        sub = engine.events()
        engine.backend.inject_fault("b", "down")  # type: ignore[attr-defined]
        await engine.transfer(engine.register(src)[:], engine.register(dst)[:])
        remove()
        kinds = {e.kind for e in got}
        assert tent.EventKind.FAILURE in kinds and tent.EventKind.QUARANTINE in kinds
        first = await sub.__anext__()
        assert first.rail == "b"
        sub.close()
        with pytest.raises(StopAsyncIteration):
            while True:
                await sub.__anext__()
    np.testing.assert_array_equal(src, dst)


async def test_notification_arrives_after_the_data() -> None:
    src = np.full(2 * MiB, 3, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=RAILS, name="decode-0") as engine:
        a = engine.register(src)
        b = engine.register(dst)
        await engine.transfer(a[:], b[:], notify="request 42: KV ready")
        async for note in engine.notifications():
            assert note.message == "request 42: KV ready"
            assert note.source == "decode-0"
            assert (dst == 3).all()
            break


async def test_many_concurrent_flows_from_a_task_group() -> None:
    n = 64
    src = np.random.default_rng(5).integers(0, 256, n * 64 * 1024, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=RAILS) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        results: list[tent.TransferResult] = []

        async def one(i: int) -> None:
            results.append(await engine.transfer(a[i * 65536 : (i + 1) * 65536], b[i * 65536 : (i + 1) * 65536]))

        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
        assert len(results) == n
        assert engine.telemetry().inflight_bytes == 0
    np.testing.assert_array_equal(src, dst)


async def test_engine_restrictions_on_lifecycle() -> None:
    engine = tent.Engine()
    with pytest.raises(tent.EngineClosedError, match="not running"):
        engine.submit(None, None)  # type: ignore[arg-type]
    async with engine:
        seg = engine.register(bytearray(16), name="x")
        assert engine.segment("x") is seg
    assert not seg.registered
    with pytest.raises(tent.EngineClosedError):
        engine.register(bytearray(16))
    with pytest.raises(tent.EngineClosedError, match="already started"):
        async with engine:
            pass


async def test_exiting_with_an_error_cancels_open_transfers() -> None:
    src = np.ones(64 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    slow = [tent.RailSpec(name="slow", bandwidth="100MB/s")]
    handle = None
    with pytest.raises(RuntimeError, match="boom"):
        async with tent.Engine(rails=slow) as engine:
            handle = engine.submit(engine.register(src)[:], engine.register(dst)[:])
            await anyio.sleep(0.01)
            raise RuntimeError("boom")
    assert handle is not None and handle.status is tent.TransferStatus.CANCELLED
    with pytest.raises(tent.TransferCancelledError):
        handle.result()


async def test_an_internal_failure_fails_transfers_instead_of_hanging() -> None:
    from tent_async.backends.local import LocalBackend

    class Broken(LocalBackend):
        def withdraw(self, attempt):  # type: ignore[no-untyped-def]
            raise RuntimeError("backend bug")

    src = np.ones(16 * MiB, dtype=np.uint8)
    backend = Broken([tent.RailSpec(name="slow", bandwidth="100MB/s")])
    async with tent.Engine(backend=backend) as engine:
        backend.inject_fault("slow", "stall")  # slices stay in flight: the cancel must withdraw them
        handle = engine.submit(engine.register(src)[:], engine.register(np.zeros_like(src))[:])
        await anyio.sleep(0.01)
        handle.cancel()  # the withdrawal raises inside the engine
        with anyio.fail_after(5), pytest.raises(tent.TransferError, match="failed internally"):
            await handle
        assert all(seg.busy == 0 for seg in engine.segments.values())  # segments released


async def test_two_consumers_of_notifications_both_get_served() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(64))
        b = engine.register(bytearray(64))
        got: list[str] = []

        async def consume() -> None:
            async for note in engine.notifications():
                got.append(note.message)
                return

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(consume)
            await anyio.sleep(0.01)  # both are waiting
            await engine.transfer(a, b, notify="one")
            await engine.transfer(a, b, notify="two")
        assert sorted(got) == ["one", "two"]


class _TunedLocal(LocalBackend):
    """A backend with its own scheduler defaults, as ucx has (4 ms slices, window 3 within 8 slots)."""

    def default_config(self) -> tent.SchedulerConfig:
        return tent.SchedulerConfig(target_slice_time="4ms", window=3, max_window=8)


async def test_config_mapping_changes_only_its_fields_of_the_backends_default() -> None:
    """``config={"deadline_floor": ...}`` keeps the backend's slice size and windows: a whole
    SchedulerConfig dropped them, and pd_disagg's KV batches over ucx fell to 64 KiB slices."""
    rails = [tent.RailSpec(name="a")]
    src = np.arange(MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(backend=_TunedLocal(rails), config={"deadline_floor": "1s"}) as engine:
        cfg = engine.config
        assert (cfg.deadline_floor, cfg.target_slice_time, cfg.window, cfg.max_window) == (1.0, 4e-3, 3, 8)
        await engine.transfer(engine.register(src)[:], engine.register(dst)[:])
        np.testing.assert_array_equal(dst, src)
    whole = tent.Engine(backend=_TunedLocal(rails), config=tent.SchedulerConfig(deadline_floor="1s"))
    assert (whole.config.target_slice_time, whole.config.window) == (1e-3, 2)  # a whole config replaces
    assert tent.Engine(backend=_TunedLocal(rails), config={}).config.window == 3
    with pytest.raises(tent.ConfigError, match=r"unknown SchedulerConfig field\(s\) \['deadline_flor'\]"):
        tent.Engine(backend=_TunedLocal(rails), config={"deadline_flor": "1s"})
    with pytest.raises(tent.ConfigError, match="SchedulerConfig or a mapping"):
        tent.Engine(backend=_TunedLocal(rails), config=[("window", 3)])  # type: ignore[arg-type]


class _FlooredLocal(LocalBackend):
    """A backend whose default raises min_slice, as ucx's does (256 KiB)."""

    def default_config(self) -> tent.SchedulerConfig:
        return tent.SchedulerConfig(min_slice="256KiB")


def test_a_config_clash_with_the_backends_default_names_where_the_value_came_from() -> None:
    """``config={"max_slice": "128KiB"}`` over ucx clashed with a min_slice the user never set:
    the error says that value is the backend's default and how to override it."""
    rails = [tent.RailSpec(name="a")]
    with pytest.raises(tent.ConfigError, match="must not exceed max_slice") as info:
        tent.Engine(backend=_FlooredLocal(rails), config={"max_slice": "128KiB"})
    message = str(info.value)
    assert "min_slice=262144 is the 'local' backend's default" in message
    assert "pass min_slice in config too" in message
    engine = tent.Engine(backend=_FlooredLocal(rails), config={"max_slice": "128KiB", "min_slice": "64KiB"})
    assert (engine.config.min_slice, engine.config.max_slice) == (64 * 1024, 128 * 1024)
    # A clash between fields the user set both of is reported as it was.
    with pytest.raises(tent.ConfigError) as info:
        tent.Engine(backend=_FlooredLocal(rails), config={"max_slice": "128KiB", "min_slice": "1MiB"})
    assert "default" not in str(info.value)


async def test_rail_reports_reach_the_loop_and_no_thread_outlives_the_engine() -> None:
    """Large slices are copied on rail threads and reported through one reporter thread:
    every slice's report arrives, and closing the engine ends all of those threads."""
    import threading

    src = np.random.default_rng(3).integers(0, 256, 48 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    rails = [tent.RailSpec(name="r0"), tent.RailSpec(name="r1")]
    async with tent.Engine(rails=rails, config=tent.SchedulerConfig(max_slice="1MiB")) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        result = await engine.transfer(a[:], b[:])
        assert result.slices >= 48
        assert any(t.name == "tent-local-reports" for t in threading.enumerate())
    np.testing.assert_array_equal(dst, src)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("tent-local-")]


async def test_a_report_that_raises_does_not_stop_the_reports_after_it() -> None:
    import asyncio

    from tent_async.backends.local import _deliver_all

    ran: list[int] = []
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))
    try:

        def boom() -> None:
            raise ValueError("boom")

        _deliver_all([lambda: ran.append(1), boom, lambda: ran.append(2)])
    finally:
        loop.set_exception_handler(None)
    assert ran == [1, 2]
    assert [str(e) for e in errors] == ["boom"]


class _HeldBackend(LocalBackend):
    """Records posts and moves nothing: the test reports each attempt itself."""

    def __init__(self, *, inline: bool) -> None:
        super().__init__()
        self.posts_inline = inline  # type: ignore[misc]
        self.posted: list[Attempt] = []

    def post(self, attempt: Attempt) -> None:
        self.posted.append(attempt)


@pytest.mark.parametrize("inline", [True, False])
async def test_an_idle_engine_posts_inside_submit_only_for_a_backend_that_allows_it(inline: bool) -> None:
    backend = _HeldBackend(inline=inline)
    async with tent.Engine(backend=backend) as e:
        src = e.register(np.arange(8192, dtype=np.uint8) % 251, name="src")
        dst = e.register(np.zeros(8192, dtype=np.uint8), name="dst")
        first = e.submit(src[:4096], dst[:4096])
        assert bool(backend.posted) is inline  # no loop turn yet
        assert all(a.transfer_id == first.id for a in backend.posted)
        second = e.submit(src[4096:], dst[4096:])  # the engine is busy: this one waits for the pump
        assert all(a.transfer_id == first.id for a in backend.posted)
        await anyio.lowlevel.checkpoint()
        assert {a.transfer_id for a in backend.posted} == {first.id, second.id}
        ctx = backend._ctx
        assert ctx is not None
        for a in backend.posted:
            dst.memory.array[a.dst_offset : a.dst_offset + a.length] = src.memory.array[
                a.src_offset : a.src_offset + a.length
            ]
            ctx.complete(a.id)
        assert not first.done()  # reports are acted on by the next pump ...
        ctx.flush()  # ... or now, when the backend says its batch of reports is over
        assert first.done() and second.done()
        assert (await first.wait()).bytes == 4096
        assert np.array_equal(dst.memory.array, src.memory.array)


async def test_flush_says_whether_a_transfer_it_settled_has_a_caller_waiting() -> None:
    """The ucx progress pass yields to a woken caller only when flush says there is one."""
    backend = _HeldBackend(inline=True)
    async with tent.Engine(backend=backend) as e:
        src = e.register(np.arange(8192, dtype=np.uint8) % 251, name="src")
        dst = e.register(np.zeros(8192, dtype=np.uint8), name="dst")
        ctx = backend._ctx
        assert ctx is not None
        unwatched = e.submit(src[:4096], dst[:4096])  # nobody awaits it yet
        ctx.complete(backend.posted[-1].id)
        assert ctx.flush() is False
        assert unwatched.done()
        assert ctx.flush() is False  # nothing settled

        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def caller() -> None:
                results.append((await e.transfer(src[4096:], dst[4096:])).bytes)

            tg.start_soon(caller)
            while len(backend.posted) < 2:
                await anyio.lowlevel.checkpoint()
            ctx.complete(backend.posted[-1].id)
            assert ctx.flush() is True  # its caller waits: it runs once this callback returns
            assert not results
        assert results == [4096]
