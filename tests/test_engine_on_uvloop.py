"""The engine on uvloop's event loop (what async servers such as uvicorn run on).

The engine drives itself with the loop's public API only (``call_soon``,
``call_at``, futures); the sim backend looks for an idle loop through
CPython's ready queue where there is one and yields a few times where there
is not (uvloop).  So on uvloop the local backend moves every byte of many
concurrent transfers, a cancelled transfer returns only once nothing of it
can land, and the sim backend replays a fault schedule exactly as on the
standard loop.  (The ucx backend on uvloop: tests/ucx/test_ucx_on_uvloop.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import numpy as np
import pytest

import tent_async as tent
from tent_async.testing import FaultSchedule, FaultStep

uvloop = pytest.importorskip("uvloop")

MiB = 1 << 20
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": uvloop.new_event_loop}


async def test_many_concurrent_local_transfers_land_byte_exact_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    rails = [tent.RailSpec(name="fast", bandwidth="2GB/s"), tent.RailSpec(name="slow", bandwidth="200MB/s")]
    src = np.random.default_rng(1).integers(0, 256, 16 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(backend="local", rails=rails) as engine:
        a, b = engine.register(src), engine.register(dst)
        async with anyio.create_task_group() as tg:
            for i in range(64):  # 64 flows of 256 KiB, paced rails: timers, reports, the pump
                lo, hi = i * 256 * 1024, (i + 1) * 256 * 1024
                tg.start_soon(engine.transfer, a[lo:hi], b[lo:hi])
        np.testing.assert_array_equal(src, dst)
        assert engine.telemetry().open_transfers == 0


async def test_a_cancelled_local_transfer_settles_before_the_caller_resumes_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    rails = [tent.RailSpec(name="slow", bandwidth="50MB/s")]
    src = np.ones(32 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(backend="local", rails=rails) as engine:
        a, b = engine.register(src), engine.register(dst)
        with anyio.move_on_after(0.05):
            await engine.transfer(a[:], b[:])  # about 0.7 s at 50 MB/s: cancelled
        snap = engine.telemetry()
        assert snap.open_transfers == 0 and snap.inflight_bytes == 0  # nothing of it can land any more
        landed = int(np.count_nonzero(dst))
        await anyio.sleep(0.05)
        assert int(np.count_nonzero(dst)) == landed  # and nothing did


def test_the_sim_backend_replays_a_fault_schedule_exactly_on_uvloop() -> None:
    rails = [tent.RailSpec(name=f"r{i}", bandwidth=f"{i + 1}GB/s") for i in range(3)]
    schedule = FaultSchedule([FaultStep(0.001, "r2", "stall"), FaultStep(0.004, "r1", "down")])

    async def once() -> tuple[dict[str, int], float]:
        src = np.arange(2 * MiB, dtype=np.uint64).view(np.uint8)  # 16 MiB
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", rails=rails, seed=3) as engine:
            a, b = engine.register(src), engine.register(dst)
            async with anyio.create_task_group() as tg:
                tg.start_soon(schedule.run, engine.backend)
                result = await engine.transfer(a[:], b[:])
        np.testing.assert_array_equal(src, dst)
        return dict(result.bytes_per_rail), result.elapsed

    on_uvloop = anyio.run(once, backend_options={"loop_factory": uvloop.new_event_loop})
    assert on_uvloop == anyio.run(once, backend_options={"loop_factory": uvloop.new_event_loop})  # replays exactly
    # And as on the standard loop: virtual time does not depend on the loop.  (The backend finds
    # uvloop idle by yielding ``idle_yields`` times, where CPython's loop shows its ready queue; a
    # chain of reactions longer than that would let virtual time run ahead, and this would fail.)
    assert on_uvloop == anyio.run(once)
