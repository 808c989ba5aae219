"""Handshake refusals, connecting to nothing, and peers that die or hang mid-transfer."""

from __future__ import annotations

import signal
import socket
import threading
from typing import Any

import anyio
import numpy as np
import pytest

import tent_async as tent
from conftest import requires_ucxx

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connect_to_nothing_fails_fast() -> None:
    async with tent.Engine(backend="ucx", name="lonely") as engine:
        with anyio.fail_after(10), pytest.raises(tent.PeerConnectError, match="connection refused"):
            await engine.connect(f"127.0.0.1:{_free_port()}")


@pytest.mark.parametrize("where", ["256.1.1.1:0", "192.0.2.1:0", "in-use"])
async def test_listening_where_one_cannot_is_a_config_error(where: str) -> None:
    """A bad host name, an address of another machine, or a port in use: ConfigError, nothing left open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listen = f"127.0.0.1:{taken.getsockname()[1]}" if where == "in-use" else where
        with anyio.fail_after(20), pytest.raises(tent.ConfigError, match="cannot listen on"):
            async with tent.Engine(backend="ucx", name="nowhere", listen=listen):
                pass  # pragma: no cover - start must fail


async def test_a_silent_listener_times_out_with_a_clear_error() -> None:
    """Something accepts the TCP connection but never speaks the protocol."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    try:
        async with tent.Engine(backend="ucx", name="lonely", connect_timeout=0.5) as engine:
            with anyio.fail_after(10), pytest.raises(tent.PeerConnectError, match="handshake"):
                await engine.connect(f"127.0.0.1:{server.getsockname()[1]}")
    finally:
        thread.join(5)
        for s in accepted:
            s.close()
        server.close()


@pytest.mark.parametrize(
    ("server_cfg", "client_opts", "words"),
    [
        ({"protocol_version": 99}, {}, "version 99"),
        ({"secret": "s3cret"}, {"secret": "wrong"}, "secret"),
        ({"secret": "s3cret"}, {}, "requires a shared secret"),
        ({}, {"secret": "s3cret"}, "has none"),
    ],
)
async def test_handshake_mismatch_is_refused_on_both_sides(
    spawn_peer: Any, server_cfg: dict[str, Any], client_opts: dict[str, Any], words: str
) -> None:
    server = spawn_peer(name="decode-0", segments=[{"name": "kv", "size": MiB}], **server_cfg)
    async with tent.Engine(backend="ucx", name="prefill-0", **client_opts) as engine:
        with anyio.fail_after(15), pytest.raises(tent.HandshakeError, match=words):
            await engine.connect(server.address)
    for _ in range(500):  # the peer logs and counts the refusal too
        if server.cmd(cmd="stats")["stats"].get("handshake_refused", 0) >= 1:
            break
        await anyio.sleep(0.01)
    assert server.cmd(cmd="stats")["stats"]["handshake_refused"] >= 1


async def test_matching_secret_connects(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", secret="s3cret", segments=[{"name": "kv", "size": MiB, "seed": 1}])
    async with tent.Engine(backend="ucx", name="prefill-0", secret="s3cret") as engine:
        with anyio.fail_after(15):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
            src = engine.register(np.full(MiB, 3, dtype=np.uint8), name="src")
            await engine.transfer(src[:], kv[:])
        assert server.cmd(cmd="read", segment="kv", start=0, stop=4)["hex"] == "03030303"


async def test_a_killed_peer_fails_the_transfer_quickly_and_clearly(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", segments=[{"name": "kv", "size": 64 * MiB}])
    async with tent.Engine(backend="ucx", name="prefill-0") as engine:
        with anyio.fail_after(15):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        src = engine.register(np.ones(64 * MiB, dtype=np.uint8), name="src")
        failures: list[BaseException] = []

        async def pump() -> None:
            try:
                while True:
                    await engine.transfer(src[:], kv[:])
            except tent.TentError as exc:
                failures.append(exc)

        with anyio.fail_after(20):  # a hang guard, not a speed assertion
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump)
                await anyio.sleep(0.3)
                server.signal(signal.SIGKILL)
        assert failures, "the transfer to a killed peer did not fail"
        text = str(failures[0])
        assert "decode-0" in text
        for _ in range(500):
            if peer.closed:
                break
            await anyio.sleep(0.01)
        assert peer.closed
        with pytest.raises(tent.PeerClosedError, match="decode-0"):
            engine.submit(src[:MiB], kv[:MiB])


async def _connected_and_warm(engine: tent.Engine, server: Any) -> tuple[Any, Any]:
    """Connect to ``server``, look up its 64 MiB "kv" and send one 64 MiB WRITE (rails learned)."""
    with anyio.fail_after(15):
        peer = await engine.connect(server.address)
        kv = await peer.segment("kv")
    src = engine.register(np.ones(64 * MiB, dtype=np.uint8), name="src")
    with anyio.fail_after(15):
        await engine.transfer(src[:], kv[:])
    return kv, src


async def test_a_hung_peer_is_caught_by_deadlines_and_its_endpoints_fenced(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", segments=[{"name": "kv", "size": 64 * MiB}])
    try:
        async with tent.Engine(backend="ucx", name="prefill-0", withdraw_grace=0.05) as engine:
            kv, src = await _connected_and_warm(engine, server)
            server.signal(signal.SIGSTOP)
            with anyio.fail_after(60), pytest.raises((tent.TransferFailedError, tent.NoRailError)):
                await engine.transfer(src[:], kv[:])
            assert engine.backend.stats["fenced_endpoints"] >= 1  # type: ignore[attr-defined]
            snap = engine.telemetry()
            assert snap.inflight_bytes == 0 and snap.open_transfers == 0
            assert any(r.deadline_misses for r in snap)
    finally:
        server.signal(signal.SIGCONT)


async def test_cancelling_a_transfer_to_a_peer_restores_accounting(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", segments=[{"name": "kv", "size": 64 * MiB}])
    async with tent.Engine(backend="ucx", name="prefill-0") as engine:
        with anyio.fail_after(15):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        src = engine.register(np.ones(64 * MiB, dtype=np.uint8), name="src")
        with anyio.fail_after(30):
            with anyio.move_on_after(0.001) as scope:
                await engine.transfer(src[:], kv[:])
            # 64 MiB do not cross in 1 ms (over shared memory on a quiet machine they did in 10 ms)
            assert scope.cancelled_caught
            snap = engine.telemetry()
            assert snap.inflight_bytes == 0 and snap.open_transfers == 0
            await engine.transfer(src[:MiB], kv[:MiB])  # still usable


async def parked_endpoints_closed(rail: Any, parked: list[Any], seconds: float = 30.0) -> None:
    """Wait (up to ``seconds``) until ``rail`` has no parked endpoint and none of ``parked`` lingers."""
    for _ in range(int(seconds / 0.02)):
        if not rail.parked and not any(ch.lingering for ch in parked):
            return
        await anyio.sleep(0.02)


async def test_a_link_fenced_mid_send_closes_its_endpoint_only_once_the_send_is_done(
    spawn_peer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fence while a WRITE's bytes are still going out: the endpoint lingers until they are out.

    Force-closing a UCX TCP endpoint mid-send leaves UCX watching a freed endpoint,
    and the peer's closing its side later crashed the process inside ``progress``
    (SIGSEGV, or an arbiter assertion: the veth benchmark on three rails; docs/ucx.md).
    So the channel cancels its receives at once and closes the endpoint when its sends
    completed; the fenced slice is reported only then (its bytes were still UCX's).
    """
    from tent_async.backends.ucx import channel as channel_module

    monkeypatch.setattr(
        channel_module, "LINGER_MAX", 30.0, raising=False
    )  # here only the send's completion may close it
    server = spawn_peer(
        name="decode-0", segments=[{"name": "kv", "size": 64 * MiB}], rails=[{"name": "lo", "device": "lo"}]
    )
    rails = [tent.RailSpec(name="lo", device="lo")]
    outcome: list[BaseException | None] = []
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, withdraw_grace=0.05) as engine:
        kv, src = await _connected_and_warm(engine, server)
        rail = engine.backend.local_rails["lo"]  # type: ignore[attr-defined]
        stats = engine.backend.stats  # type: ignore[attr-defined]

        async def write() -> None:
            try:
                await engine.transfer(src[:], kv[:])
                outcome.append(None)
            except (tent.TransferFailedError, tent.NoRailError) as exc:
                outcome.append(exc)

        server.signal(signal.SIGSTOP)  # our 64 MiB stall in the socket: the slices miss, the link is fenced
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                for _ in range(3000):  # up to ~30 s
                    if stats["fenced_endpoints"]:
                        break
                    await anyio.sleep(0.01)
                await anyio.sleep(0.2)
                lingering = [ch for ch in rail.channels if getattr(ch, "lingering", False)]
                assert lingering, "the fenced link's endpoint was closed while its WRITE was still going out"
                assert all(ch.closed and ch.ep is not None for ch in lingering)
                server.signal(signal.SIGCONT)  # the peer reads what was queued: the send completes
                for _ in range(750):  # up to ~15 s, well within LINGER_MAX
                    if not any(ch.lingering for ch in lingering):
                        break
                    await anyio.sleep(0.02)
                assert all(ch.ep is None for ch in lingering) and not set(lingering) & rail.channels
        finally:
            server.signal(signal.SIGCONT)
        assert outcome  # the transfer ended (failed over onto the link set up afresh, or failed)
        with anyio.fail_after(30):
            await anyio.sleep(1.0)  # the peer closes its side meanwhile (what crashed UCX before)
            await engine.transfer(src[:MiB], kv[:MiB])
        snap = engine.telemetry()
        assert snap.inflight_bytes == 0 and snap.open_transfers == 0


async def test_a_link_stalled_mid_send_parks_its_endpoint_and_the_transfer_still_ends(
    spawn_peer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: a peer that stops reading our WRITE for longer than LINGER_MAX.

    The old fence closed the endpoint then, mid-send, and the peer's later close could
    crash this process inside UCX (docs/ucx.md, "Closing an endpoint mid-send"), which a
    malicious server could do on purpose.  Now the endpoint parks: the transfer's fence
    ends (it fails or fails over in bounded time), the endpoint and the WRITE's memory
    stay UCX's until the peer reads or goes, and no new link to that peer on the rail is
    set up while MAX_PARKED_PER_KEY of its endpoints linger.
    """
    from tent_async.backends.ucx import channel as channel_module

    monkeypatch.setattr(channel_module, "LINGER_MAX", 0.5)
    server = spawn_peer(
        name="decode-0", segments=[{"name": "kv", "size": 64 * MiB}], rails=[{"name": "lo", "device": "lo"}]
    )
    rails = [tent.RailSpec(name="lo", device="lo")]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, withdraw_grace=0.05) as engine:
        kv, src = await _connected_and_warm(engine, server)
        rail = engine.backend.local_rails["lo"]  # type: ignore[attr-defined]
        server.signal(signal.SIGSTOP)  # our 64 MiB stall in the socket: the slices miss, the link is fenced
        try:
            with anyio.fail_after(60), pytest.raises((tent.TransferFailedError, tent.NoRailError)):
                await engine.transfer(src[:], kv[:])  # ends although its bytes are still UCX's
            parked = [ch for ch in rail.channels if ch.parked]
            assert parked, "the stalled endpoint was closed mid-send"
            assert all(ch.closed and ch.ep is not None and ch.pending for ch in parked)
            assert rail.parked == len(parked)
            assert src.held >= 1  # UCX still reads the WRITE's source: it may not be unregistered yet
            with pytest.raises(tent.SegmentBusyError, match="stopped reading"):
                engine.unregister(src)
            snap = engine.telemetry()
            assert snap.inflight_bytes == 0 and snap.open_transfers == 0
        finally:
            server.signal(signal.SIGCONT)  # the peer reads (or closes): the parked endpoints close
        await parked_endpoints_closed(rail, parked)
        assert not rail.parked and not rail.parked_by and all(ch.ep is None for ch in parked)
        assert src.held == 0
        with anyio.fail_after(30):
            await anyio.sleep(1.0)  # the peer closes its side meanwhile (what crashed UCX before)
            await engine.transfer(src[:MiB], kv[:MiB])


async def test_no_new_link_to_a_peer_whose_endpoints_still_linger() -> None:
    """Issue 11: the bound on what one peer leaves behind, on both sides.  The initiator sets up
    no link to a peer with MAX_PARKED_PER_KEY lingering endpoints on the rail; the serving side
    refuses a LINK from a source address with as many."""
    from tent_async.backends.ucx.channel import MAX_PARKED_PER_KEY
    from tent_async.backends.ucx.peer import RailLinkError

    rails = [tent.RailSpec(name="lo", device="lo")]
    async with (
        tent.Engine(backend="ucx", name="server-0", rails=rails, listen="127.0.0.1:0") as server,
        tent.Engine(backend="ucx", name="client-0", rails=rails) as client,
    ):
        with anyio.fail_after(15):
            peer = await client.connect(server.address)  # type: ignore[arg-type]
            kv_server = server.register(np.zeros(MiB, dtype=np.uint8), name="kv")
            kv = await peer.segment("kv")
            src = client.register(np.ones(MiB, dtype=np.uint8), name="src")
            await client.transfer(src[:], kv[:])
        (link,) = peer.links.values()  # type: ignore[attr-defined]
        crail = client.backend.local_rails["lo"]  # type: ignore[attr-defined]
        srail = server.backend.local_rails["lo"]  # type: ignore[attr-defined]

        crail.parked_by[link.park_key] = MAX_PARKED_PER_KEY
        link._teardown("test: link closed")
        with anyio.fail_after(15), pytest.raises(RailLinkError, match="still wait for it to read"):
            await link.open()
        del crail.parked_by[link.park_key]

        srail.parked_by[("source", "127.0.0.1")] = MAX_PARKED_PER_KEY
        with anyio.fail_after(15), pytest.raises(RailLinkError, match="still wait for it to read"):
            await link.open()
        assert server.backend.stats["links_refused_parked"] == 1  # type: ignore[attr-defined]
        del srail.parked_by[("source", "127.0.0.1")]

        from tent_async.backends.ucx import scatter
        from tent_async.backends.ucx.server import MAX_LINGERING

        # Other sources together: the rail's total bound, each source counted up to its own bound.
        others = [("source", f"192.0.2.{i}") for i in range(MAX_LINGERING // MAX_PARKED_PER_KEY)]
        for key in others:
            srail.parked_by[key] = MAX_PARKED_PER_KEY
        with anyio.fail_after(15), pytest.raises(RailLinkError, match="stopped reading what they asked for"):
            await link.open()
        for key in others:
            del srail.parked_by[key]
        assert server.backend.stats["links_refused_parked"] == 2  # type: ignore[attr-defined]
        # One other address alone, however many it left (links it had up before it stopped reading:
        # audit), does not shut the rail; nor does parked staging (bounded where it is taken).
        srail.parked_by[("source", "192.0.2.99")] = MAX_LINGERING
        pool = scatter.staging_of(server.backend.site)  # type: ignore[attr-defined]
        pool.parked = scatter.STAGING_PER_ENGINE
        with anyio.fail_after(15):
            await link.open()
            await client.transfer(src[:], kv[:])
        assert bool((kv_server.memory.array == 1).all())
        pool.parked = 0
        del srail.parked_by[("source", "192.0.2.99")]


class _PostSpy:
    """Watches one engine's UCX posts: receives into ``dst`` (caller memory) and sends from ``src``.

    Records every time one was posted while one of the other kind was still UCX's: a READ's
    receive into caller memory sharing an endpoint with a WRITE's bulk send (issue 11: if that
    send stalls, the endpoint can only park if the receive can be settled, and a receive into
    caller memory cannot be).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, src: np.ndarray, dst: np.ndarray) -> None:
        from tent_async.backends.ucx.channel import Channel

        self.recvs: list[tuple[Any, Any]] = []  # (channel, request) into dst
        self.sends: list[tuple[Any, Any]] = []  # (channel, request) from src
        self.overlaps: list[str] = []
        self.direct = self.bulk = 0
        spy = self
        tag_recv, tag_send = Channel.tag_recv, Channel.tag_send

        def live(posts: list[tuple[Any, Any]], ch: Any) -> int:
            return sum(1 for c, req in posts if c is ch and not req.completed)

        def recv(ch: Any, array: Any, tag: int, **options: Any) -> Any:
            req = tag_recv(ch, array, tag, **options)
            if np.shares_memory(array, dst):
                spy.direct += 1
                if live(spy.sends, ch):
                    spy.overlaps.append(f"a receive into caller memory posted beside {live(spy.sends, ch)} sends")
                spy.recvs.append((ch, req))
            return req

        def send(ch: Any, array: Any, tag: int) -> Any:
            req = tag_send(ch, array, tag)
            if np.shares_memory(array, src):
                spy.bulk += 1
                if live(spy.recvs, ch):
                    n = live(spy.recvs, ch)
                    spy.overlaps.append(f"a WRITE's send posted beside {n} receives into caller memory")
                spy.sends.append((ch, req))
            return req

        monkeypatch.setattr(Channel, "tag_recv", recv)
        monkeypatch.setattr(Channel, "tag_send", send)


@pytest.mark.parametrize("staged", [False, True], ids=["alternating", "staged"])
async def test_a_read_into_caller_memory_never_shares_a_link_with_a_writes_send(
    monkeypatch: pytest.MonkeyPatch, staged: bool
) -> None:
    """Issue 11 (the last crash path): a WRITE and a READ in flight on one link at once.

    Were the READ receiving into caller memory while the WRITE's send stalls (a peer that stops
    reading our WRITE while streaming the READ to us, or freezes), the endpoint's parking could
    not settle that receive, and the old code closed the endpoint mid-send, which can crash
    UCX's TCP transport.  Now a large READ waits while a WRITE is in flight on its link (over
    loopback and shared memory), or receives into staging (a network rail: forced here with
    ``stage_reads``), and a WRITE waits while a READ receives into caller memory there: the
    two never overlap on an endpoint, and both transfers still complete, byte-exact.  Fails
    on the old code (overlaps)."""
    rails = [tent.RailSpec(name="lo", device="lo")]
    size = 32 * MiB
    async with (
        tent.Engine(backend="ucx", name="server-0", rails=rails, listen="127.0.0.1:0") as server,
        tent.Engine(backend="ucx", name="client-0", rails=rails) as client,
    ):
        target = np.zeros(size, dtype=np.uint8)
        kv_server = server.register(target, name="kv")
        origin = (np.arange(size, dtype=np.uint64) * 2654435761 % 251).astype(np.uint8)
        server.register(origin, name="origin")
        src_np = np.full(size, 7, dtype=np.uint8)
        dst_np = np.zeros(size, dtype=np.uint8)
        src = client.register(src_np, name="src")
        dst = client.register(dst_np, name="dst")
        spy = _PostSpy(monkeypatch, src_np, dst_np)
        with anyio.fail_after(60):
            peer = await client.connect(server.address)  # type: ignore[arg-type]
            kv, far = await peer.segment("kv"), await peer.segment("origin")
            (link,) = peer.links.values()  # type: ignore[attr-defined]
            assert not link.stage_reads  # loopback: READs beside a WRITE wait rather than copy
            link.stage_reads = staged
            await client.transfer(far[:], dst[:])  # READs alone: into caller memory, as before
            assert spy.direct >= 1 and not client.backend.stats["reads_staged"]  # type: ignore[attr-defined]
            assert bool((dst_np == origin).all())
            dst_np[:] = 0
            for _ in range(3):  # both directions at once on the one link
                async with anyio.create_task_group() as tg:
                    tg.start_soon(client.transfer, src[:], kv[:])
                    tg.start_soon(client.transfer, far[:], dst[:])
                assert bool((dst_np == origin).all()) and bool((target == 7).all())  # byte-exact
                dst_np[:] = 0
                target[:] = 0
        assert spy.bulk >= 3 and spy.recvs
        assert not spy.overlaps, spy.overlaps[:3]
        assert bool(client.backend.stats["reads_staged"]) is staged  # type: ignore[attr-defined]
        assert client.backend.stats["closed_mid_send"] == 0  # type: ignore[attr-defined]
        del kv_server


@pytest.mark.parametrize("staged", [False, True], ids=["alternating", "staged"])
async def test_a_peer_frozen_while_a_link_carries_both_directions_never_gets_an_endpoint_closed_mid_send(
    spawn_peer: Any, monkeypatch: pytest.MonkeyPatch, staged: bool
) -> None:
    """Issue 11, the last crash path: a peer that freezes (SIGSTOP) while one link carries a
    64 MiB WRITE and a 64 MiB READ, and resumes later.

    Both transfers end in bounded time (the stalled endpoint parks after LINGER_MAX), no
    endpoint is closed while a send of ours on it is unfinished (the old code did when the
    READ's receive into caller memory had been matched part-way: it could not be settled, so
    the endpoint was closed mid-send, and the peer's later close could crash this process
    inside UCX), and no byte lands in the READ's destination after its transfer ended.  Both
    ways of keeping the two apart: alternating (loopback's) and staging (a network rail's,
    forced here).
    """
    from tent_async.backends.ucx import channel as channel_module

    monkeypatch.setattr(channel_module, "LINGER_MAX", 0.5)
    mid_send: list[str] = []
    close_endpoint = channel_module.Channel._close_endpoint
    watching = [True]

    def spy(ch: Any) -> None:
        if watching[0] and ch._sends and ch.ep is not None:
            mid_send.append(ch.label)
        close_endpoint(ch)

    monkeypatch.setattr(channel_module.Channel, "_close_endpoint", spy)
    server = spawn_peer(
        name="decode-0",
        segments=[{"name": "kv", "size": 64 * MiB}, {"name": "origin", "size": 64 * MiB, "seed": 3}],
        rails=[{"name": "lo", "device": "lo"}],
    )
    rails = [tent.RailSpec(name="lo", device="lo")]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, withdraw_grace=0.05) as engine:
        kv, src = await _connected_and_warm(engine, server)
        peer = kv.peer
        for link in peer.links.values():
            link.stage_reads = staged
        far = await peer.segment("origin")
        dst_np = np.zeros(64 * MiB, dtype=np.uint8)
        dst = engine.register(dst_np, name="dst")
        rail = engine.backend.local_rails["lo"]  # type: ignore[attr-defined]
        outcomes: list[BaseException | None] = []

        async def run(a: Any, b: Any) -> None:
            try:
                await engine.transfer(a, b)
                outcomes.append(None)
            except (tent.TransferFailedError, tent.NoRailError) as exc:
                outcomes.append(exc)

        try:
            with anyio.fail_after(60):  # a hang guard: both must end although the peer stays frozen
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run, src[:], kv[:])
                    tg.start_soon(run, far[:], dst[:])
                    await anyio.sleep(0.05)  # both directions under way on the one link
                    server.signal(signal.SIGSTOP)
            assert len(outcomes) == 2
            settled = dst_np.copy()  # what the READ left (undefined if it failed); nothing may change it now
            snap = engine.telemetry()
            assert snap.inflight_bytes == 0 and snap.open_transfers == 0
            parked = [ch for ch in rail.channels if ch.lingering]
        finally:
            server.signal(signal.SIGCONT)  # the peer reads (or closes): the parked endpoints close
        await parked_endpoints_closed(rail, parked)
        assert not rail.parked and not rail.parked_by
        with anyio.fail_after(30):
            await anyio.sleep(1.0)  # the peer closes its side meanwhile (what crashed UCX before)
            assert bool((dst_np == settled).all()), "bytes landed in the READ's destination after it ended"
            await engine.transfer(src[:MiB], kv[:MiB])
            await engine.transfer(far[:MiB], dst[:MiB])
        watching[0] = False
        assert not mid_send, mid_send
        assert engine.backend.stats["closed_mid_send"] == 0  # type: ignore[attr-defined]


async def test_a_peer_cannot_land_bytes_in_a_reads_destination_without_reading_its_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 11: the last crash path needs a READ's receive into caller memory matched by a
    peer that has not read (all) our sends; a peer that has read the READ's header has read
    everything before it.  So the tag of a READ's bytes must be unguessable: a forger that
    sends to the index it can predict (the attempt ids count up: the old code used them)
    matches nothing, its message is one nobody expected, and the link is torn down.  Fails on
    the old code: the forged bytes land in the destination."""
    from tent_async.backends.ucx import protocol as p
    from tent_async.backends.ucx.server import Server

    headers: list[tuple[Any, Any]] = []
    serve = Server.serve

    def forger(self: Any, link: Any, msg: Any) -> None:
        if msg.op is p.Op.READ and msg.segment == "origin":
            headers.append((link, msg))  # never answered: the forger does not use what it says
            return
        serve(self, link, msg)

    monkeypatch.setattr(Server, "serve", forger)
    rails = [tent.RailSpec(name="lo", device="lo")]
    async with (
        tent.Engine(backend="ucx", name="server-0", rails=rails, listen="127.0.0.1:0") as server,
        tent.Engine(backend="ucx", name="client-0", rails=rails, withdraw_grace=0.05) as client,
    ):
        server.register(np.zeros(MiB, dtype=np.uint8), name="origin")
        dst_np = np.zeros(MiB, dtype=np.uint8)
        dst = client.register(dst_np, name="dst")
        with anyio.fail_after(15):
            peer = await client.connect(server.address)  # type: ignore[arg-type]
            far = await peer.segment("origin")
        (link,) = peer.links.values()  # type: ignore[attr-defined]
        forged = np.full(MiB, 0xAB, dtype=np.uint8)
        with anyio.move_on_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.transfer, far[:], dst[:])

                def posted() -> bool:  # the READ's receive into caller memory
                    return any(op.buffer is not None and op.sg is None for op in link.ops.values())

                for _ in range(500):
                    if headers and posted():
                        break
                    await anyio.sleep(0.01)
                assert headers and posted(), "the READ's receive into caller memory was not posted"
                slink, _ = headers[0]
                (attempt,) = [op.attempt.id for op in link.ops.values() if op.attempt is not None]
                ch = slink.channel
                req = ch.tag_send(forged, p.make_tag(slink.peer_ns, p.KIND_DATA, attempt))
                ch.keep(req, forged, None, send=True)
                for _ in range(500):
                    if client.backend.stats["protocol_errors"] or (dst_np == 0xAB).sum() > 1024:  # type: ignore[attr-defined]
                        break
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert (dst_np == 0xAB).sum() <= 16, "the forged bytes landed in the READ's destination"
        assert client.backend.stats["protocol_errors"] >= 1  # type: ignore[attr-defined]
