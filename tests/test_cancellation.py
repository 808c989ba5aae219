"""Cancellation from anyio and asyncio scopes: clean, fenced, and the engine stays usable."""

from __future__ import annotations

import asyncio

import anyio
import numpy as np
import pytest

import tent_async as tent

MiB = 1 << 20
pytestmark = pytest.mark.anyio

SLOW = [tent.RailSpec(name="a", bandwidth="100MB/s"), tent.RailSpec(name="b", bandwidth="50MB/s")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _accounting(engine: tent.Engine) -> tuple[int, int, int]:
    snap = engine.telemetry()
    return snap.inflight_bytes, snap.inflight_slices, snap.open_transfers


async def test_cancel_scope_cancels_the_transfer_and_fences_it() -> None:
    src = np.full(64 * MiB, 9, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=SLOW) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        before = _accounting(engine)
        with anyio.move_on_after(0.05) as scope:
            await engine.transfer(a[:], b[:])
        assert scope.cancelled_caught
        # transfer() returned only after every attempt was withdrawn: accounting is back
        # exactly where it was, and the destination no longer changes.
        assert _accounting(engine) == before == (0, 0, 0)
        snapshot = dst.copy()
        assert 0 < int(np.count_nonzero(snapshot)) < snapshot.size
        await anyio.sleep(0.1)
        np.testing.assert_array_equal(dst, snapshot)
        assert b.busy == 0 and a.busy == 0
        # the engine is reusable
        result = await engine.transfer(a[0 : 4 * MiB], b[0 : 4 * MiB])
        assert result.bytes == 4 * MiB
        assert (dst[: 4 * MiB] == 9).all()


async def test_cancelling_a_task_group_cancels_all_its_transfers() -> None:
    src = np.ones(32 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=SLOW) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(engine.transfer, a[i * 4 * MiB : (i + 1) * 4 * MiB], b[i * 4 * MiB : (i + 1) * 4 * MiB])
            await anyio.sleep(0.03)
            tg.cancel_scope.cancel()
        assert _accounting(engine) == (0, 0, 0)
        engine.unregister(a)  # nothing holds it any more


async def test_asyncio_wait_for_timeout_cancels_cleanly() -> None:
    src = np.ones(64 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=SLOW) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(engine.transfer(a[:], b[:]), timeout=0.05)
        assert _accounting(engine) == (0, 0, 0)


async def test_handle_cancel_from_another_task() -> None:
    src = np.ones(64 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(rails=SLOW) as engine:
        handle = engine.submit(engine.register(src)[:], engine.register(dst)[:])
        assert handle.status is tent.TransferStatus.RUNNING and not handle.done()
        with pytest.raises(anyio.WouldBlock):
            handle.result()
        await anyio.sleep(0.02)
        assert 0 < handle.bytes_done < handle.total_bytes
        handle.cancel()
        assert handle.status is tent.TransferStatus.CANCELLING
        with pytest.raises(tent.TransferCancelledError):
            await handle
        assert handle.status is tent.TransferStatus.CANCELLED
        handle.cancel()  # idempotent
        assert isinstance(handle.exception(), tent.TransferCancelledError)
        assert _accounting(engine) == (0, 0, 0)


async def test_cancel_after_completion_is_a_no_op() -> None:
    async with tent.Engine() as engine:
        a = engine.register(bytearray(1000))
        b = engine.register(bytearray(1000))
        handle = engine.submit(a[:], b[:])
        result = await handle
        handle.cancel()
        assert handle.status is tent.TransferStatus.DONE
        assert handle.result() == result
