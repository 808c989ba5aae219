"""Two processes on loopback: WRITE and READ over shared-memory and TCP rails, byte-exact.

The peer engine runs in another process; the test process is the connecting
engine.  Every check of the peer's memory goes through a digest the peer
computes itself, so what is asserted is what really landed there.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tent_async as tent
from conftest import PeerProcess, requires_ucxx

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20
KV = 8 * MiB


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(buf: np.ndarray) -> str:
    return hashlib.sha256(buf.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def server() -> Iterator[PeerProcess]:
    peer = PeerProcess(
        {
            "name": "decode-0",
            "segments": [
                {"name": "kv", "size": KV, "seed": 1},
                {"name": "ro", "size": MiB, "seed": 2, "permission": "r"},
            ],
        }
    )
    try:
        yield peer
    finally:
        peer.close()


@contextlib.asynccontextmanager
async def client(address: str, **options: Any) -> AsyncIterator[tuple[tent.Engine, tent.Peer]]:
    async with tent.Engine(backend="ucx", name="prefill-0", **options) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(address)
        yield engine, peer


async def test_write_read_and_notification_in_order(server: PeerProcess) -> None:
    server.cmd(cmd="fill", segment="kv", seed=1)
    async with client(server.address) as (engine, peer):
        assert isinstance(peer, tent.Peer) and peer.name == "decode-0"
        assert {"decode-0/shm", "decode-0/lo"} <= set(peer.rails)
        remote = await peer.segment("kv")
        assert isinstance(remote, tent.RemoteSegment) and isinstance(remote, tent.SegmentBase)
        assert remote.size == KV and remote.permission == "rw" and remote.kind == "host"
        src = pattern(7, 4 * MiB)
        local = engine.register(src, name="kv-out")
        with anyio.fail_after(30):
            result = await engine.transfer(local[:], remote[MiB : 5 * MiB], notify=f"check kv {MiB} {5 * MiB}")
        assert result.bytes == 4 * MiB and sum(result.bytes_per_rail.values()) == 4 * MiB
        assert set(result.bytes_per_rail) <= set(peer.rails)
        assert server.cmd(cmd="digest", segment="kv", start=MiB, stop=5 * MiB)["digest"] == digest(src)
        untouched = pattern(1, KV)
        assert server.cmd(cmd="digest", segment="kv", start=0, stop=MiB)["digest"] == digest(untouched[:MiB])
        # READ it back into a fresh buffer
        back = np.zeros(4 * MiB, dtype=np.uint8)
        dst = engine.register(back, name="back")
        with anyio.fail_after(30):
            await engine.transfer(remote[MiB : 5 * MiB], dst[:])
        np.testing.assert_array_equal(back, src)
        # The notification arrived, and when it did the data was already there.
        notes: list[dict[str, Any]] = []
        for _ in range(1000):  # polling another process: no event to wait on
            notes = server.cmd(cmd="notes")["notes"]
            if notes:
                break
            await anyio.sleep(0.01)
        assert notes[-1]["message"] == f"check kv {MiB} {5 * MiB}"
        assert notes[-1]["source"] == "prefill-0"
        assert notes[-1]["digest"] == digest(src)
        snap = engine.telemetry()
        names = {r.name for r in snap}
        assert set(peer.rails) == names
        assert sum(r.bytes_total for r in snap) >= 8 * MiB


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_sizes_and_offsets_are_byte_exact(server: PeerProcess, data: st.DataObject) -> None:
    """Hypothesis drives many transfers through one engine (small and large, inline and tagged)."""
    plans = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["write", "read"]),
                st.integers(1, 3 * MiB),
                st.integers(0, KV),
                st.integers(0, KV),
                st.integers(0, 2**32 - 1),
            ),
            min_size=1,
            max_size=4,
        )
    )

    async def run() -> None:
        async with client(server.address) as (engine, peer):
            remote = await peer.segment("kv")
            for op, n, a, b, seed in plans:
                n = min(n, KV - a, KV - b)
                if n <= 0:
                    continue
                buf = pattern(seed, KV)
                local = engine.register(buf, name=f"l{seed}-{a}-{b}-{n}-{op}")
                with anyio.fail_after(30):
                    if op == "write":
                        await engine.transfer(local[a : a + n], remote[b : b + n])
                        got = server.cmd(cmd="digest", segment="kv", start=b, stop=b + n)["digest"]
                        assert got == digest(buf[a : a + n])
                    else:
                        expect = server.cmd(cmd="read", segment="kv", start=b, stop=b + n)["hex"]
                        before = buf.copy()
                        await engine.transfer(remote[b : b + n], local[a : a + n])
                        assert buf[a : a + n].tobytes().hex() == expect
                        assert np.array_equal(buf[:a], before[:a]) and np.array_equal(buf[a + n :], before[a + n :])
                engine.unregister(local)

    anyio.run(run, backend="asyncio")


async def test_only_tcp_rail_or_only_shm_rail(spawn_peer: Any) -> None:
    """Explicit rails: each kind moves bytes on its own."""
    for device in ("shm", "lo"):
        spec = [{"name": "r0", "device": device}]
        server = spawn_peer(name=f"only-{device}", rails=spec, segments=[{"name": "kv", "size": MiB, "seed": 3}])
        async with client(server.address, rails=[tent.RailSpec(name="r0", device=device)]) as (engine, peer):
            assert peer.rails == [f"only-{device}/r0"]
            remote = await peer.segment("kv")
            src = pattern(11, MiB)
            local = engine.register(src, name="src")
            with anyio.fail_after(30):
                result = await engine.transfer(local[:], remote[:])
            assert result.bytes_per_rail == {f"only-{device}/r0": MiB}
            assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(src)


async def test_permission_and_bounds_violations_write_nothing(server: PeerProcess) -> None:
    server.cmd(cmd="fill", segment="kv", seed=1)
    async with client(server.address) as (engine, peer):
        ro = await peer.segment("ro")
        kv = await peer.segment("kv")
        src = engine.register(pattern(5, 2 * MiB), name="src")
        before_ro = server.cmd(cmd="digest", segment="ro")["digest"]
        before_kv = server.cmd(cmd="digest", segment="kv")["digest"]
        rejected = server.cmd(cmd="stats")["stats"].get("rejected", 0)
        # Honest client: refused before anything is sent.
        with pytest.raises(tent.ReadOnlySegmentError):
            await engine.transfer(src[:4096], ro[:4096])
        with pytest.raises(tent.OutOfBoundsError):
            kv[KV - 10 : KV + 10]
        # A lying client (forged catalogue entries): the peer itself refuses.
        forged_ro = tent.RemoteSegment(peer, "ro", ro.size, "host", "rw", ro.sid)
        forged_kv = tent.RemoteSegment(peer, "kv", 2 * KV, "host", "rw", kv.sid)
        unknown = tent.RemoteSegment(peer, "nope", KV, "host", "rw", 12345)
        cases = [
            (src[:4096], forged_ro[:4096], "read-only"),  # small: inline
            (src[: 1 * MiB], forged_ro[: 1 * MiB], "read-only"),  # large: tagged send, drained
            # Wholly past the end: a WRITE that straddles the end may be sprayed, and its
            # slices inside the segment are legitimate writes; every slice here is refused.
            (src[: 2 * MiB], forged_kv[KV : KV + 2 * MiB], "outside segment"),
            (src[:4096], unknown[:4096], "unknown segment"),
        ]
        for s, d, words in cases:
            with anyio.fail_after(30), pytest.raises(tent.RemoteAccessError, match=words):
                await engine.transfer(s, d)
        # READ past the end is refused too
        back = engine.register(np.zeros(2 * MiB, dtype=np.uint8), name="back")
        with anyio.fail_after(30), pytest.raises(tent.RemoteAccessError, match="outside segment"):
            await engine.transfer(forged_kv[KV - MiB : KV + MiB], back[:])
        assert server.cmd(cmd="digest", segment="ro")["digest"] == before_ro
        assert server.cmd(cmd="digest", segment="kv")["digest"] == before_kv
        assert server.cmd(cmd="stats")["stats"]["rejected"] >= rejected + 5
        # The connection is still good after the refusals.
        with anyio.fail_after(30):
            await engine.transfer(src[: 2 * MiB], kv[: 2 * MiB])
        assert server.cmd(cmd="digest", segment="kv", start=0, stop=2 * MiB)["digest"] == digest(pattern(5, 2 * MiB))


async def test_stale_registration_is_refused(spawn_peer: Any) -> None:
    server = spawn_peer(name="stale", segments=[{"name": "kv", "size": MiB, "seed": 1}])
    async with client(server.address) as (engine, peer):
        old = await peer.segment("kv")
        server.cmd(cmd="unregister", segment="kv")
        server.cmd(cmd="register", segment="kv", size=MiB, seed=4)
        src = engine.register(pattern(9, MiB), name="src")
        with anyio.fail_after(30), pytest.raises(tent.RemoteAccessError, match="registered again"):
            await engine.transfer(src[:], old[:])
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(pattern(4, MiB))
        new = await peer.segment("kv", refresh=True)
        with anyio.fail_after(30):
            await engine.transfer(src[:], new[:])
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(pattern(9, MiB))
        with pytest.raises(tent.UnregisteredSegmentError, match="no segment named"):
            await peer.segment("missing")


async def test_engine_rules_for_remote_segments(server: PeerProcess) -> None:
    async with client(server.address) as (engine, peer):
        kv = await peer.segment("kv")
        a = engine.register(np.zeros(MiB, dtype=np.uint8), name="a")
        b = engine.register(np.zeros(MiB, dtype=np.uint8), name="b")
        with pytest.raises(tent.SegmentError, match="two local segments"):
            engine.submit(a[:], b[:])
        with pytest.raises(tent.SegmentError, match="two peer segments"):
            engine.submit(kv[:MiB], kv[MiB : 2 * MiB])
        assert engine.address is None  # not listening
        await peer.close()
        with pytest.raises(tent.PeerClosedError):
            engine.submit(a[:], kv[:MiB])


async def test_discovered_tcp_rails_stand_by_for_shared_memory_and_take_over_when_it_fails(
    server: PeerProcess,
) -> None:
    """rails=None to a peer on this host: TCP carries nothing while shared memory can (it would
    take the same CPUs at a higher cost per byte), and takes over at once when it cannot."""
    server.cmd(cmd="fill", segment="kv", seed=1)
    async with client(server.address) as (engine, peer):
        shm = "decode-0/shm"
        tcp = [name for name in peer.rails if name != shm]
        assert shm in peer.rails and tcp, peer.rails
        snap = engine.telemetry()
        assert all(snap[name].standby_for == shm and snap[name].standing_by for name in tcp)
        assert snap[shm].standby_for == "" and not snap[shm].standing_by
        remote = await peer.segment("kv")
        src = pattern(12, KV)
        local = engine.register(src, name="src")
        posts: list[tuple[str, bool]] = []  # (rail, probe) of every slice posted
        engine.add_slice_listener(lambda e: posts.append((e.rail, e.probe)) if e.kind == "post" else None)
        with anyio.fail_after(30):
            result = await engine.transfer(local[:], remote[:])
        # Only eft's idle probes visit the standby rails; every other slice is shared memory's.
        assert all(probe for rail, probe in posts if rail != shm), posts
        assert result.bytes_per_rail.get(shm, 0) > KV // 2, result.bytes_per_rail
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(src)

        events: list[tent.RailEvent] = []
        engine.add_event_listener(events.append)
        src2 = pattern(13, KV)
        src[:] = src2  # the registered buffer itself
        handle = engine.submit(local[:], remote[:])
        engine.backend._links[shm].close("test: shared memory went away")  # type: ignore[attr-defined]
        with anyio.fail_after(30):
            result = await handle
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(src2)
        assert sum(result.bytes_per_rail.get(name, 0) for name in tcp) > 0, result.bytes_per_rail
        took = [e for e in events if e.kind is tent.EventKind.STANDBY and "carries while" in e.detail]
        assert {e.rail for e in took} == set(tcp), events
        # Shared memory comes back (its quarantine ends, a probe relinks it): TCP stands by again.
        with anyio.fail_after(30):
            while not all(engine.telemetry()[name].standing_by for name in tcp):
                await engine.transfer(local[: 4 * MiB], remote[: 4 * MiB])
                await anyio.sleep(0.01)
        assert engine.telemetry()[shm].health == "healthy"
        del posts[:]
        with anyio.fail_after(30):
            result = await engine.transfer(local[:], remote[:])
        assert posts and all(probe for rail, probe in posts if rail != shm), posts
