"""Failover end to end on the local backend with injected faults: byte-exact data,
nothing written outside the destination, the engine usable afterwards."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

import tent_async as tent
from tent_async.backends.local import LocalBackend, RailFaultError

MiB = 1 << 20
pytestmark = pytest.mark.anyio

# Small slices and short deadlines so that faults hit many slices and are noticed fast.
CONFIG = tent.SchedulerConfig(max_slice="512KiB", deadline_floor="50ms", backoff_base="20ms")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def rails(n: int, bandwidth: str = "400MB/s") -> list[tent.RailSpec]:
    return [tent.RailSpec(name=f"r{i}", bandwidth=bandwidth) for i in range(n)]


def buffers(size: int, pad: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = rng.integers(0, 256, size + 2 * pad, dtype=np.uint8)
    return src, dst, dst.copy()


def check(src: np.ndarray, dst: np.ndarray, before: np.ndarray, pad: int = 4096) -> None:
    np.testing.assert_array_equal(dst[pad:-pad], src)
    np.testing.assert_array_equal(dst[:pad], before[:pad])  # nothing outside the view changed
    np.testing.assert_array_equal(dst[-pad:], before[-pad:])


def local(engine: tent.Engine) -> LocalBackend:
    backend = engine.backend
    assert isinstance(backend, LocalBackend)
    return backend


@pytest.mark.parametrize("policy", ["eft", "round_robin", "single"])
@pytest.mark.parametrize("mode", ["error", "down", "stall"])
async def test_a_failing_rail_is_routed_around(policy: str, mode: str) -> None:
    src, dst, before = buffers(16 * MiB)
    events: list[tent.RailEvent] = []
    async with tent.Engine(rails=rails(3), policy=policy, config=CONFIG) as engine:
        engine.add_event_listener(events.append)
        a = engine.register(src)
        b = engine.register(dst)
        # under single the transfer binds to r0: break exactly that one
        local(engine).inject_fault("r0", mode)
        result = await engine.transfer(a[:], b[4096 : 4096 + src.size])
        assert result.bytes == src.size
        assert result.reroutes >= 1
        snap = engine.telemetry()
        assert snap["r0"].errors + snap["r0"].deadline_misses >= 1
        assert snap.inflight_bytes == 0
        kinds = {e.kind for e in events}
        assert tent.EventKind.FAILURE in kinds
        assert tent.EventKind.REROUTE in kinds
        if mode == "stall":
            assert snap["r0"].deadline_misses >= 1  # only the deadline can notice a silent stall
    check(src, dst, before)


async def test_degradation_without_errors_is_handled_by_telemetry() -> None:
    src, dst, before = buffers(32 * MiB)
    lenient = tent.SchedulerConfig(max_slice="512KiB", deadline_floor="10s")  # no deadline help
    async with tent.Engine(rails=rails(3), config=lenient) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        await engine.transfer(a[0 : 4 * MiB], b[4096 : 4096 + 4 * MiB])  # learn the rails
        local(engine).set_slowdown("r2", 0.05)
        result = await engine.transfer(a[:], b[4096 : 4096 + src.size])
        share = result.bytes_per_rail.get("r2", 0) / src.size
        assert share < 0.15, result.bytes_per_rail  # far below the 1/3 it had before
        assert engine.telemetry()["r2"].bandwidth < 0.3 * 400e6
        assert result.reroutes == 0
    check(src, dst, before)


async def test_a_flapping_rail() -> None:
    src, dst, before = buffers(32 * MiB)
    async with tent.Engine(rails=rails(3), config=CONFIG) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        backend = local(engine)

        async def flap() -> None:
            for _ in range(20):
                backend.inject_fault("r1", "error")
                await anyio.sleep(0.005)
                backend.clear_fault("r1")
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(flap)
            result = await engine.transfer(a[:], b[4096 : 4096 + src.size])
        assert result.bytes == src.size
        assert engine.telemetry()["r1"].errors >= 1
    check(src, dst, before)


async def test_all_rails_but_one_dying() -> None:
    src, dst, before = buffers(16 * MiB)
    async with tent.Engine(rails=rails(4), config=CONFIG) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        handle = engine.submit(a[:], b[4096 : 4096 + src.size])
        await anyio.sleep(0.005)
        for name, mode in (("r0", "down"), ("r1", "stall"), ("r2", "error")):
            local(engine).inject_fault(name, mode)
        result = await handle
        assert result.bytes == src.size
        snap = engine.telemetry()
        assert snap["r0"].health in ("quarantined", "probing")  # down: out of service until a probe succeeds
        assert snap["r0"].quarantines >= 1
        assert snap["r3"].errors == 0
        assert snap.inflight_bytes == 0
    check(src, dst, before)


async def test_no_rail_left_is_a_clear_error_not_a_hang() -> None:
    src, dst, _ = buffers(4 * MiB)
    async with tent.Engine(rails=rails(2), config=CONFIG) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        local(engine).inject_fault("r0", "down")
        local(engine).inject_fault("r1", "down")
        # Every rail is down: the transfer waits for a quarantine to end (no_rail_wait), the
        # probes fail too, and it ends with an error naming every rail, not a hang.
        with anyio.fail_after(5):
            with pytest.raises((tent.NoRailError, tent.TransferFailedError)) as info:
                await engine.transfer(a[:], b[4096 : 4096 + src.size])
        assert set(info.value.rail_errors) == {"r0", "r1"}
        assert "down" in info.value.rail_errors["r0"]
        assert engine.telemetry().inflight_bytes == 0
        # the engine stays usable once a rail heals and its quarantine ends
        local(engine).clear_fault("r1")
        await anyio.sleep(0.1)
        with anyio.fail_after(5):
            result = await engine.transfer(a[0 : 1 * MiB], b[4096 : 4096 + 1 * MiB])
        assert result.bytes_per_rail == {"r1": 1 * MiB}


async def test_bounded_retries_name_the_rails_and_their_errors() -> None:
    src, dst, _ = buffers(1 * MiB)
    # Plain errors (not "down") and a high quarantine threshold: the retry bound trips first.
    cfg = tent.SchedulerConfig(max_slice="256KiB", quarantine_after=100, max_attempts_per_rail=2)
    async with tent.Engine(rails=rails(2), config=cfg) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        local(engine).inject_fault("r0", "error")
        local(engine).inject_fault("r1", "error")
        with anyio.fail_after(5):
            with pytest.raises(tent.TransferFailedError, match="failed on every rail") as info:
                await engine.transfer(a[:], b[4096 : 4096 + src.size])
        assert set(info.value.rail_errors) == {"r0", "r1"}
        assert all("injected error" in e for e in info.value.rail_errors.values())
        assert engine.telemetry().inflight_bytes == 0
        local(engine).clear_fault("r0")
        local(engine).clear_fault("r1")
        assert (await engine.transfer(a[:], b[4096 : 4096 + src.size])).bytes == src.size


async def test_recovered_rail_is_used_again_automatically() -> None:
    src, dst, before = buffers(16 * MiB)
    cfg = tent.SchedulerConfig(max_slice="512KiB", backoff_base="20ms", deadline_floor="50ms")
    async with tent.Engine(rails=rails(2), config=cfg) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        local(engine).inject_fault("r0", "down")
        await engine.transfer(a[0 : 2 * MiB], b[4096 : 4096 + 2 * MiB])
        assert engine.telemetry()["r0"].health in ("quarantined", "probing")
        local(engine).clear_fault("r0")
        await anyio.sleep(0.05)  # quarantine (20 ms) is over: the rail is probed
        recovered = []
        engine.add_event_listener(lambda e: recovered.append(e) if e.kind is tent.EventKind.RECOVERY else None)
        result = await engine.transfer(a[:], b[4096 : 4096 + src.size])
        assert recovered and recovered[0].rail == "r0"
        assert result.bytes_per_rail.get("r0", 0) > 0
        assert engine.telemetry()["r0"].health == "healthy"
    check(src, dst, before)


async def test_a_single_rail_hiccup_does_not_fail_the_transfer() -> None:
    """The only rail goes down briefly: the transfer waits for it (no_rail_wait) and completes."""
    src, dst, before = buffers(8 * MiB)
    async with tent.Engine(rails=rails(1), config=CONFIG) as engine:
        a = engine.register(src)
        b = engine.register(dst)
        # The link comes back as soon as the rail is quarantined, before its probe.
        engine.add_event_listener(
            lambda e: local(engine).clear_fault("r0") if e.kind is tent.EventKind.QUARANTINE else None
        )
        handle = engine.submit(a[:], b[4096 : 4096 + src.size])
        await anyio.sleep(0.005)
        local(engine).inject_fault("r0", "down")
        with anyio.fail_after(5):
            result = await handle
        assert result.bytes == src.size
        assert engine.telemetry()["r0"].quarantines >= 1
    check(src, dst, before)


class _FailsInsidePost(LocalBackend):
    """A backend whose rail ``r0`` is known dead: it reports the failure from inside post."""

    def __init__(self, *args: object, raise_instead: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.raise_instead = raise_instead
        self.refused = 0

    def post(self, attempt: tent.core.Attempt) -> None:
        if attempt.rail_name == "r0":
            self.refused += 1
            if self.raise_instead:
                raise RailFaultError("r0 is gone (raised from post)")
            assert self._ctx is not None
            self._ctx.fail(attempt.id, RailFaultError("r0 is gone (reported from post)"), rail_down=True)
            return
        super().post(attempt)


@pytest.mark.parametrize("raise_instead", [False, True])
async def test_a_report_from_inside_post_is_acted_on_in_the_next_pump(raise_instead: bool) -> None:
    """The rule in Backend.post: reports may come from inside post; the slice is rerouted."""
    backend = _FailsInsidePost(rails(2), raise_instead=raise_instead)
    src, dst, before = buffers(8 * MiB)
    async with tent.Engine(backend=backend, config=CONFIG) as engine:
        a = engine.register(src, name="src", permission="r")
        b = engine.register(dst, name="dst")
        res = await engine.transfer(a[:], b[4096 : 4096 + 8 * MiB])
        assert backend.refused >= 1
        assert res.bytes_per_rail.get("r0", 0) == 0
        r0 = next(r for r in engine.telemetry().rails if r.name == "r0")
        assert r0.errors >= 1 and r0.bytes_total == 0
    check(src, dst, before)
