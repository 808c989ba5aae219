"""Engine(backend="sim"): API-level code against the simulated fabric, real bytes, virtual time."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tent_async as tent
from tent_async.backends.sim import Degrade, Errors, Outage, SimBackend, SimRail, Stall, flapping

GBPS = 1e9 / 8  # bytes/s in one Gb/s


def rails(n: int = 4, speed: str = "100Gb/s", **kw: Any) -> list[SimRail]:
    return [SimRail(name=f"nic{i}", capacity=speed, **kw) for i in range(n)]


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn)


def data(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


async def copy_through(
    fabric: Any, size: int, *, policy: str = "eft", seed: int = 0, config: tent.SchedulerConfig | None = None
) -> tuple[tent.TransferResult, np.ndarray, np.ndarray, list[tent.RailEvent], tent.Telemetry]:
    src = data(size, seed)
    dst = np.zeros_like(src)
    events: list[tent.RailEvent] = []
    async with tent.Engine(backend="sim", fabric=fabric, policy=policy, seed=seed, config=config) as engine:
        engine.add_event_listener(events.append)
        a = engine.register(src, name="src", permission="r")
        b = engine.register(dst, name="dst")
        result = await engine.transfer(a[:], b[:])
        telemetry = engine.telemetry()
    return result, src, dst, events, telemetry


# ----------------------------------------------------------------- basics


def test_transfer_is_byte_exact_and_takes_virtual_time() -> None:
    size = 64 << 20

    async def main() -> None:
        result, src, dst, _, _ = await copy_through(rails(4), size)
        assert np.array_equal(src, dst)
        assert result.bytes == size
        assert sum(result.bytes_per_rail.values()) == size
        capacity = 4 * 100 * GBPS
        # the fluid lower bound is never beaten, and eft gets close to it
        assert result.elapsed >= size / capacity
        assert result.elapsed <= 1.5 * size / capacity + 1e-3

    run(main)


def test_virtual_clock_and_sleep() -> None:
    async def main() -> None:
        async with tent.Engine(backend="sim", fabric=rails(2)) as engine:
            backend = engine.backend
            assert isinstance(backend, SimBackend)
            t0 = backend.now
            await backend.sleep(2.5)
            assert backend.now == pytest.approx(t0 + 2.5)
            assert backend.clock() == backend.now

    run(main)


def test_copy_false_moves_no_data_but_completes() -> None:
    async def main() -> None:
        src = data(8 << 20)
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", fabric=rails(2), copy=False) as engine:
            a, b = engine.register(src), engine.register(dst)
            result = await engine.transfer(a[:], b[:])
        assert result.bytes == src.size
        assert not dst.any()

    run(main)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(1, 3 << 20),
    src_off=st.integers(0, 4096),
    dst_off=st.integers(0, 4096),
    n_rails=st.integers(1, 4),
    policy=st.sampled_from(["eft", "round_robin", "single"]),
    seed=st.integers(0, 2**16),
)
def test_views_are_copied_exactly_and_nothing_else_changes(
    size: int, src_off: int, dst_off: int, n_rails: int, policy: str, seed: int
) -> None:
    fabric = [SimRail(name=f"r{i}", capacity=f"{(i + 1) * 10}Gb/s", jitter="3us") for i in range(n_rails)]

    async def main() -> None:
        src = data(size + src_off + 7, seed)
        dst = data(size + dst_off + 9, seed + 1)
        before = dst.copy()
        async with tent.Engine(backend="sim", fabric=fabric, policy=policy, seed=seed) as engine:
            a, b = engine.register(src), engine.register(dst)
            result = await engine.transfer(a[src_off : src_off + size], b[dst_off : dst_off + size])
        assert result.bytes == size
        assert np.array_equal(dst[dst_off : dst_off + size], src[src_off : src_off + size])
        assert np.array_equal(dst[:dst_off], before[:dst_off])
        assert np.array_equal(dst[dst_off + size :], before[dst_off + size :])
        assert result.elapsed >= size / sum(r.capacity for r in fabric)

    run(main)


def test_concurrent_transfers_and_batches() -> None:
    async def main() -> None:
        srcs = [data(3 << 20, i) for i in range(6)]
        dsts = [np.zeros_like(s) for s in srcs]
        async with tent.Engine(backend="sim", fabric=rails(3, jitter="2us"), seed=4) as engine:
            segs = [(engine.register(s), engine.register(d)) for s, d in zip(srcs, dsts, strict=True)]
            results = await asyncio.gather(*(engine.transfer(a[:], b[:]) for a, b in segs[:4]))
            batch = await engine.transfer_batch([(a[:], b[:]) for a, b in segs[4:]])
        assert all(r.bytes == 3 << 20 for r in results)
        assert batch.bytes == 2 * (3 << 20)
        for s, d in zip(srcs, dsts, strict=True):
            assert np.array_equal(s, d)

    run(main)


def test_same_seed_same_virtual_outcome() -> None:
    fabric = [SimRail(name=f"nic{i}", capacity="50Gb/s", jitter="20us") for i in range(3)]

    async def once() -> tuple[float, dict[str, int]]:
        result, *_ = await copy_through(fabric, 16 << 20, seed=11)
        return result.elapsed, dict(result.bytes_per_rail)

    assert run(once) == run(once)


def test_two_sim_engines_share_one_virtual_clock() -> None:
    async def main() -> None:
        src = data(4 << 20)
        d1, d2 = np.zeros_like(src), np.zeros_like(src)
        async with (
            tent.Engine(backend="sim", fabric=rails(2)) as e1,
            tent.Engine(backend="sim", fabric=rails(2, speed="10Gb/s")) as e2,
        ):
            a1, b1 = e1.register(src), e1.register(d1)
            a2, b2 = e2.register(src), e2.register(d2)
            r1, r2 = await asyncio.gather(e1.transfer(a1[:], b1[:]), e2.transfer(a2[:], b2[:]))
            assert e1.backend.clock() == e2.backend.clock()
        assert np.array_equal(src, d1)
        assert np.array_equal(src, d2)
        assert r2.elapsed > r1.elapsed

    run(main)


def test_cancel_leaves_no_stale_writes() -> None:
    async def main() -> None:
        src = data(32 << 20)
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", fabric=rails(2, speed="10Gb/s")) as engine:
            a, b = engine.register(src), engine.register(dst)
            handle = engine.submit(a[:], b[:])
            backend = engine.backend
            assert isinstance(backend, SimBackend)
            await backend.sleep(0.004)  # part of it is done
            handle.cancel()
            with pytest.raises(tent.TransferCancelledError):
                await handle
            snapshot = dst.copy()
            await backend.sleep(1.0)  # nothing of it may land any more
            assert np.array_equal(dst, snapshot)
            assert 0 < np.count_nonzero(dst == src) < src.size

    run(main)


# ------------------------------------------------------------ failover


def test_rail_erroring_is_rerouted_byte_exact() -> None:
    fabric = [*rails(3), SimRail(name="bad", capacity="100Gb/s", profile=(Errors(at=0.0),))]

    async def main() -> None:
        result, src, dst, events, tel = await copy_through(fabric, 128 << 20)
        assert np.array_equal(src, dst)
        assert result.bytes_per_rail.get("bad", 0) == 0
        assert result.reroutes > 0
        assert tel["bad"].errors > 0
        assert any(e.kind is tent.EventKind.FAILURE and e.rail == "bad" for e in events)

    run(main)


def test_injected_error_mode_mirrors_local_backend() -> None:
    async def main() -> None:
        src = data(16 << 20)
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", fabric=rails(3)) as engine:
            backend = engine.backend
            assert isinstance(backend, SimBackend)
            backend.inject_fault("nic0", "error")
            a, b = engine.register(src), engine.register(dst)
            result = await engine.transfer(a[:], b[:])
            assert np.array_equal(src, dst)
            assert result.bytes_per_rail.get("nic0", 0) == 0
            backend.clear_fault("nic0")
            with pytest.raises(tent.ConfigError):
                backend.inject_fault("nic0", "melt")
            with pytest.raises(tent.ConfigError):
                backend.inject_fault("nic9", "down")

    run(main)


def test_silent_stall_is_caught_by_deadline_and_released() -> None:
    fabric = [*rails(3), SimRail(name="hung", capacity="100Gb/s", profile=(Stall(at=0.0005),))]
    config = tent.SchedulerConfig(deadline_floor="5ms")

    async def main() -> None:
        result, src, dst, events, tel = await copy_through(fabric, 64 << 20, config=config)
        assert np.array_equal(src, dst)
        assert tel["hung"].deadline_misses > 0
        assert tel["hung"].inflight_slices == 0  # the stalled slices were withdrawn, not leaked
        misses = [e for e in events if e.kind is tent.EventKind.FAILURE and e.rail == "hung"]
        assert misses
        assert all("deadline" in e.detail for e in misses)
        assert result.elapsed >= 0.005  # a stalled slice is only noticed at its deadline

    run(main)


def test_flapping_rail_backs_off_and_data_stays_exact() -> None:
    fabric = [
        *rails(2, speed="40Gb/s"),
        SimRail(name="flappy", capacity="40Gb/s", profile=flapping(0.0005, "2ms", "3ms", 20)),
    ]

    async def main() -> None:
        result, src, dst, events, tel = await copy_through(fabric, 64 << 20)
        assert np.array_equal(src, dst)
        assert tel["flappy"].quarantines >= 1
        kinds = {e.kind for e in events if e.rail == "flappy"}
        assert tent.EventKind.QUARANTINE in kinds
        assert result.bytes == src.size

    run(main)


@pytest.mark.parametrize("policy", ["eft", "round_robin", "single"])
def test_all_rails_but_one_dying(policy: str) -> None:
    fabric = [
        SimRail(name=f"nic{i}", capacity="100Gb/s", error_delay="100us", profile=(Outage(at=0.0003 * (i + 1)),))
        for i in range(3)
    ] + [SimRail(name="survivor", capacity="25Gb/s")]

    async def main() -> None:
        result, src, dst, _, tel = await copy_through(fabric, 48 << 20, policy=policy)
        assert np.array_equal(src, dst)
        assert result.bytes_per_rail["survivor"] > 0
        for i in range(3):
            assert tel[f"nic{i}"].health == "quarantined"

    run(main)


def test_every_rail_dead_fails_clearly_and_engine_survives() -> None:
    fabric = [SimRail(name=f"nic{i}", capacity="10Gb/s", profile=(Outage(at=0.0, until=1.0),)) for i in range(2)]

    async def main() -> None:
        src = data(1 << 20)
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", fabric=fabric) as engine:
            a, b = engine.register(src), engine.register(dst)
            with pytest.raises(tent.TransferError) as info:
                await engine.transfer(a[:], b[:])
            assert "nic0" in str(info.value)
            assert "nic1" in str(info.value)
            backend = engine.backend
            assert isinstance(backend, SimBackend)
            await backend.sleep(12.0)  # the outage ends at 1 s; quarantines expire
            result = await engine.transfer(a[:], b[:])
            assert result.bytes == src.size
            assert np.array_equal(src, dst)

    run(main)


def test_degraded_rail_keeps_only_its_share() -> None:
    fabric = [
        *rails(3),
        SimRail(name="weak", capacity="100Gb/s", profile=(Degrade(at=0.0, factor=0.05),)),
    ]

    async def main() -> None:
        result, src, dst, _, _ = await copy_through(fabric, 128 << 20)
        assert np.array_equal(src, dst)
        share = result.bytes_per_rail.get("weak", 0) / src.size
        assert share < 0.05  # its capacity share is 5/305: it must not get a rail's quarter

    run(main)


# --------------------------------------------------------------- config


def test_bad_configuration_is_explained() -> None:
    with pytest.raises(tent.ConfigError, match="needs a fabric"):
        tent.Engine(backend="sim")
    with pytest.raises(tent.ConfigError, match="not both"):
        tent.Engine(backend="sim", rails=[tent.RailSpec(name="a", bandwidth="1GB/s")], fabric=rails(1))
    with pytest.raises(tent.ConfigError, match="needs a bandwidth"):
        tent.Engine(backend="sim", rails=[tent.RailSpec(name="a")])
    with pytest.raises(tent.ConfigError, match="fabric must be"):
        tent.Engine(backend="sim", fabric=[1, 2])
    with pytest.raises(tent.ConfigError, match="bad options"):
        tent.Engine(backend="sim", fabric=rails(1), nonsense=True)


def test_rail_specs_work_as_a_fabric() -> None:
    async def main() -> None:
        specs = [tent.RailSpec(name="a", bandwidth="20Gb/s"), tent.RailSpec(name="b", bandwidth="5Gb/s")]
        src = data(4 << 20)
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", rails=specs) as engine:
            x, y = engine.register(src), engine.register(dst)
            result = await engine.transfer(x[:], y[:])
            assert engine.rails == ["a", "b"]
        assert np.array_equal(src, dst)
        assert result.elapsed >= src.size / (25 * GBPS)

    run(main)


def test_every_byte_lands_exactly_once_despite_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record each slice the fabric delivers: live ones must tile the destination exactly."""
    landed: list[tuple[int, int, bool]] = []
    original = SimBackend.on_complete

    def spy(self: SimBackend, flow: Any) -> None:
        a = flow.token
        landed.append((a.dst_offset, a.length, a.state is tent.core.AttemptState.LIVE))
        original(self, flow)

    monkeypatch.setattr(SimBackend, "on_complete", spy)
    fabric = [
        SimRail(name="ok", capacity="40Gb/s", jitter="5us"),
        SimRail(name="errs", capacity="40Gb/s", profile=(Errors(at=0.001, until=0.003),)),
        SimRail(name="hangs", capacity="40Gb/s", profile=(Stall(at=0.002, until=0.004),)),
        SimRail(name="flaps", capacity="40Gb/s", profile=flapping(0.0005, "1ms", "1ms", 10)),
    ]
    config = tent.SchedulerConfig(deadline_floor="3ms")

    async def main() -> None:
        result, src, dst, _, _ = await copy_through(fabric, 96 << 20, config=config, seed=5)
        assert np.array_equal(src, dst)
        assert result.reroutes > 0

    run(main)
    live = sorted((off, n) for off, n, is_live in landed if is_live)
    pos = 0
    for off, n in live:
        assert off == pos, f"gap or overlap at byte {pos}"
        pos += n
    assert pos == 96 << 20


def test_second_engine_keeps_time_moving_after_the_first_closes() -> None:
    async def main() -> None:
        src = data(16 << 20)
        dst = np.zeros_like(src)
        leader_up = anyio.Event()

        async def first() -> None:
            async with tent.Engine(backend="sim", fabric=rails(1)) as engine:  # starts first: drives the clock
                leader_up.set()
                backend = engine.backend
                assert isinstance(backend, SimBackend)
                await backend.sleep(0.001)

        with anyio.fail_after(60):  # a hang guard, not a speed assertion
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                await leader_up.wait()
                async with tent.Engine(backend="sim", fabric=rails(1, speed="1Gb/s")) as slow:
                    a, b = slow.register(src), slow.register(dst)
                    result = await slow.transfer(a[:], b[:])  # ~134 virtual ms: outlives the first engine
        assert result.bytes == src.size
        assert np.array_equal(src, dst)

    run(main)
