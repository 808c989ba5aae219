"""How rails' UCX workers progress (backends/ucx/progress.py): behaviour, never speed.

With ``progress="loop"`` (the default) the worker is progressed on the event
loop itself, so the loop must stay usable: transfers complete while other
tasks keep the loop busy (or hold it outright for a while), and other
callbacks keep running while a large transfer is in flight.  Every mode moves
the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from typing import Any

import anyio
import numpy as np
import pytest

import tent_async as tent
from conftest import PeerProcess, requires_ucxx

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20
KV = 16 * MiB
RAILS = [{"name": "lo", "device": "lo"}, {"name": "shm", "device": "shm"}]


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(buf: np.ndarray) -> str:
    return hashlib.sha256(buf.tobytes()).hexdigest()


# Deadlines a loaded CI host cannot miss ("poll" spins on both sides of a 2-core machine).
ROUND_CONFIG = tent.SchedulerConfig(target_slice_time=4e-3, window=3, deadline_floor=2.0)


def start_server(spawn_peer: Any, mode: str, **options: Any) -> PeerProcess:
    server: PeerProcess = spawn_peer(
        name="decode-0", rails=RAILS, progress=mode, segments=[{"name": "kv", "size": KV, "seed": 1}], **options
    )
    return server


async def _write_read_round(engine: tent.Engine, peer: tent.Peer, server: PeerProcess, seed: int) -> None:
    remote = await peer.segment("kv")
    data, out = pattern(seed, KV), np.zeros(KV, np.uint8)
    src = engine.register(data, name=f"src-{seed}")
    dst = engine.register(out, name=f"dst-{seed}")
    try:
        await engine.transfer(src[:], remote[:])
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(data)
        for off in range(0, 64 * 4096, 4096):  # small ones too: inline WRITEs and READs
            await engine.transfer(src[off : off + 4096], remote[off : off + 4096])
            await engine.transfer(remote[off : off + 4096], dst[off : off + 4096])
        await engine.transfer(remote[:], dst[:])
        assert digest(out) == digest(data)
    finally:
        engine.unregister(src)
        engine.unregister(dst)


@pytest.mark.parametrize("mode", ["loop", "poll", "thread"])
async def test_every_progress_mode_moves_the_same_bytes(spawn_peer: Any, mode: str) -> None:
    server = start_server(spawn_peer, mode)
    rails = [tent.RailSpec(**r) for r in RAILS]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, progress=mode, config=ROUND_CONFIG) as engine:
        assert {r.progress.mode for r in engine.backend.local_rails.values()} == {mode}
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            await _write_read_round(engine, peer, server, seed=7)
        notifiers = [t for t in threading.enumerate() if t.name.startswith("tent-ucx-notifier")]
        # Loop modes hand no completion to another thread: there is no notifier thread at all.
        assert (len(notifiers) > 0) == (mode == "thread")


async def test_transfers_complete_and_the_loop_stays_responsive_while_it_is_busy(spawn_peer: Any) -> None:
    """Loop progress under a busy event loop: CPU-bound tasks, a loop held outright, many tasks.

    * 4 tasks burn CPU in 2 ms steps, yielding in between; a 16 MiB WRITE/READ
      and 4 KiB transfers still complete byte-exact;
    * the loop is held for 0.3 s by a synchronous call while transfers are in
      flight (UCX's events wait for it; nothing is lost);
    * a 1 ms ticker keeps ticking while a 64 MiB transfer is in flight: a
      progress pass is bounded and yields to other callbacks.
    """
    server = start_server(spawn_peer, "loop")
    rails = [tent.RailSpec(**r) for r in RAILS]
    # The ucx defaults, with deadlines that a 0.3 s hold and a shared, loaded CI machine cannot
    # miss: this test is about progress, not about failover (tests elsewhere cover that).
    config = tent.SchedulerConfig(target_slice_time=4e-3, window=3, deadline_floor=2.0)
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config) as engine:
        assert {r.progress.mode for r in engine.backend.local_rails.values()} == {"loop"}
        with anyio.fail_after(120):
            peer = await engine.connect(server.address)
            stop = asyncio.Event()

            async def burn() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    while time.perf_counter() - t0 < 0.002:
                        pass
                    await asyncio.sleep(0)

            burners = [asyncio.ensure_future(burn()) for _ in range(4)]
            try:
                await _write_read_round(engine, peer, server, seed=11)

                # The loop held outright while slices are in flight.
                held = pattern(12, KV)
                src = engine.register(held, name="held")
                remote = await peer.segment("kv")
                try:
                    moving = asyncio.ensure_future(engine.transfer(src[:], remote[:]))
                    await asyncio.sleep(0)  # the transfer starts: slices posted
                    time.sleep(0.3)  # noqa: ASYNC251  (holding the loop is the point)
                    await moving
                    assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(held)
                finally:
                    engine.unregister(src)
            finally:
                stop.set()
                await asyncio.gather(*burners)

            # Other callbacks run while a large transfer is in flight.
            big = engine.register(pattern(13, KV), name="big")
            ticks: list[float] = []

            async def tick() -> None:
                while True:
                    ticks.append(time.perf_counter())
                    await asyncio.sleep(0.001)

            ticker = asyncio.ensure_future(tick())
            try:
                await asyncio.sleep(0.01)
                before = len(ticks)
                t0 = time.perf_counter()
                count = 0
                # At least 4 WRITEs and 0.1 s of them: over shared memory on a quiet machine four
                # take ~8 ms, in which a 1 ms ticker can tick 3 times without any starving.
                while count < 4 or time.perf_counter() - t0 < 0.1:
                    await engine.transfer(big[:], remote[:])
                    count += 1
                during = len(ticks) - before
            finally:
                ticker.cancel()
                engine.unregister(big)
            assert during >= 4, f"the ticker ran {during} times during {count} x 16 MiB WRITEs"
            assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(pattern(13, KV))


async def test_shared_memory_moves_a_slices_bytes_with_both_processes_on_one_core(spawn_peer: Any) -> None:
    """Both engines pinned to one CPU (a busy 2-core host): the shm FIFO is filled and drained in turn.

    Before, the sender's passes kept the core while its FIFO was full and the
    receiver drained it once per scheduler time slice (0.4-0.6 GB/s instead of
    2-5); now each side yields the CPU between passes while a slice's bytes
    move (progress.py, ``_keep_streaming``).  Behaviour only: bytes exact both
    ways, and both sides yielded while they sent and received.
    """
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mine)})  # the peer process inherits it
    try:
        shm = [{"name": "shm", "device": "shm"}]
        server = spawn_peer(name="decode-0", rails=shm, segments=[{"name": "kv", "size": KV, "seed": 1}])
        config = tent.SchedulerConfig(target_slice_time=4e-3, window=3, deadline_floor=2.0)
        rails = [tent.RailSpec(**r) for r in shm]
        # cma=False: UCX's own streaming over shm is what is measured (a direct copy bypasses it)
        async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config, cma=False) as engine:
            with anyio.fail_after(60):
                peer = await engine.connect(server.address)
                remote = await peer.segment("kv")
                data, out = pattern(21, KV), np.zeros(KV, np.uint8)
                src, dst = engine.register(data, name="src"), engine.register(out, name="dst")
                (progress,) = [r.progress for r in engine.backend.local_rails.values()]  # type: ignore[attr-defined]
                await engine.transfer(src[:], remote[:])
                assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(data)
                sent, served = progress.yields, server.cmd(cmd="yields")["yields"]
                assert sent > 0 and served > 0  # the WRITE's sender and receiver both gave way
                await engine.transfer(remote[:], dst[:])
                assert digest(out) == digest(data)
                assert progress.yields > sent and server.cmd(cmd="yields")["yields"] > served
    finally:
        os.sched_setaffinity(0, mine)
