"""Bytes reach the peer they were meant for, and a READ is complete only when every byte arrived.

Issue 11, findings 1 and 2: two peers under one engine name (the old default
``engine-1`` made that the normal case) shared rail names, and the link set up
last overwrote the other; a peer that sent half of a large READ but claimed the
whole of it had the READ reported complete with stale bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from typing import Any

import anyio
import numpy as np
import pytest
from relay import tcp_relay

import tent_async as tent
from conftest import requires_ucxx
from tent_async.backends.ucx import protocol as p

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20
RAILS = [{"name": "lo", "device": "lo"}, {"name": "shm", "device": "shm"}]


def test_default_engine_names_are_unique_across_engines_and_processes() -> None:
    first = tent.Engine(backend="local")
    second = tent.Engine(backend="local")
    assert first.name != second.name
    assert str(os.getpid()) in first.name  # and a random part, so other processes and hosts differ too


async def test_two_peers_with_one_name_connected_at_once_each_get_their_own_bytes(spawn_peer: Any) -> None:
    twins = [
        spawn_peer(name="twin", rails=RAILS, segments=[{"name": "kv", "size": MiB, "seed": seed}]) for seed in (1, 2)
    ]
    async with tent.Engine(backend="ucx", name="client", rails=[tent.RailSpec(**r) for r in RAILS]) as engine:
        with anyio.fail_after(30):
            peers = await asyncio.gather(*(engine.connect(t.address) for t in twins))
        assert peers[0].name == peers[1].name == "twin"
        assert not set(peers[0].rails) & set(peers[1].rails), (peers[0].rails, peers[1].rails)
        data = [np.random.default_rng(10 + i).integers(0, 256, MiB, dtype=np.uint8) for i in range(2)]
        with anyio.fail_after(30):
            kvs = [await peer.segment("kv") for peer in peers]
            srcs = [engine.register(d, name=f"src{i}") for i, d in enumerate(data)]
            await asyncio.gather(*(engine.transfer(srcs[i][:], kvs[i][:]) for i in range(2)))
        for twin, d in zip(twins, data, strict=True):
            assert twin.cmd(cmd="digest", segment="kv")["digest"] == hashlib.sha256(d.tobytes()).hexdigest()
        # READs come back from the peer they were asked of.
        outs = [np.zeros(MiB, dtype=np.uint8) for _ in range(2)]
        with anyio.fail_after(30):
            dsts = [engine.register(o, name=f"dst{i}") for i, o in enumerate(outs)]
            await asyncio.gather(*(engine.transfer(kvs[i][:], dsts[i][:]) for i in range(2)))
        for o, d in zip(outs, data, strict=True):
            assert (o == d).all()


async def test_a_read_half_delivered_but_claimed_whole_fails(spawn_peer: Any) -> None:
    """The peer sends half the bytes of every large READ and says SENT with the full length."""
    server = spawn_peer(name="liar", lying_reads=True, rails=RAILS, segments=[{"name": "kv", "size": MiB, "seed": 3}])
    rails = [tent.RailSpec(**r) for r in RAILS]
    # cma=False: the checks of UCX's path (a direct copy on shm reads the peer's memory itself, cma.py)
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, cma=False) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        out = np.full(MiB, 0xEE, dtype=np.uint8)  # stale bytes a short message would leave behind
        dst = engine.register(out, name="dst")
        with anyio.fail_after(30), pytest.raises(tent.ProtocolError, match="did not all arrive"):
            await engine.transfer(kv[:], dst[:])
        assert engine.backend.stats["protocol_errors"] >= 1  # type: ignore[attr-defined]
        # Small READs (answered inline, with their length) are not affected and still complete.
        with anyio.fail_after(30):
            await engine.transfer(kv[:4096], dst[:4096])
        assert out[:4096].tobytes().hex() == server.cmd(cmd="read", segment="kv", start=0, stop=4096)["hex"]


async def test_a_peer_cannot_turn_a_refusal_into_retries(spawn_peer: Any) -> None:
    """Only an extent-list slice takes staging, so only its refusal may say "retry" (the peer's
    load): a WRITE into a read-only segment refused with "retry" still fails the transfer at
    once with RemoteAccessError, not after busy retries (review of issue 11's busy refusals)."""
    server = spawn_peer(name="decode-0", retry_refusals=True, rails=RAILS, segments=[{"name": "kv", "size": MiB}])
    config = tent.SchedulerConfig(busy_wait=60.0)  # were the refusal taken as busy, the test would time out
    rails = [tent.RailSpec(**r) for r in RAILS]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        server.cmd(cmd="unregister", segment="kv")  # the peer refuses the WRITE: unknown segment
        src = engine.register(np.ones(MiB, dtype=np.uint8), name="src")
        with anyio.fail_after(20), pytest.raises(tent.RemoteAccessError) as info:
            await engine.transfer(src[:], kv[:])
        assert not isinstance(info.value, tent.RemoteBusyError)


async def test_a_relayed_handshake_gets_nothing(spawn_peer: Any) -> None:
    """A host without the secret relays a legitimate client's handshake to the target (issue 11, finding 3).

    It sees only sealed bytes (no worker address, no catalogue entry), and the
    first message it adds of its own ends the session.
    """
    name = "kv-cache-of-request-0042"
    target = spawn_peer(name="decode-0", secret="s3cret", rails=RAILS, segments=[{"name": name, "size": MiB}])
    async with tcp_relay(target.address) as relay:
        rails = [tent.RailSpec(**r) for r in RAILS]
        async with tent.Engine(backend="ucx", name="prefill-0", secret="s3cret", rails=rails) as engine:
            with anyio.fail_after(30):
                peer = await engine.connect(f"127.0.0.1:{relay.port}")
                await peer.segment(name)
            assert peer.name == "decode-0"
            for address in target.cmd(cmd="addresses")["addresses"]:
                assert bytes.fromhex(address) not in relay.seen
            assert name.encode() not in relay.seen
            # The relay adds a message of its own (it cannot seal one): the target ends the session.
            before = target.cmd(cmd="stats")["stats"].get("protocol_errors", 0)
            relay.upstream[0].write(p.frame(p.Lookup(name=name)))
            for _ in range(1500):  # another process: no event to wait on
                if peer.closed:
                    break
                await anyio.sleep(0.02)
            assert peer.closed
            assert target.cmd(cmd="stats")["stats"]["protocol_errors"] == before + 1


async def test_notifications_of_two_peers_with_one_name_are_told_apart(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB}])
    rails = [tent.RailSpec(**RAILS[0])]
    async with (
        tent.Engine(backend="ucx", name="twin", rails=rails) as first,
        tent.Engine(backend="ucx", name="twin", rails=rails) as second,
    ):
        for i, engine in enumerate((first, second)):
            with anyio.fail_after(30):
                peer = await engine.connect(server.address)
                kv = await peer.segment("kv")
                src = engine.register(np.zeros(4096, dtype=np.uint8), name="src")
                await engine.transfer(src[:], kv[:4096], notify=f"from {i}")
        for _ in range(500):  # another process: no event to wait on
            notes = server.cmd(cmd="notes")["notes"]
            if len(notes) == 2:
                break
            await anyio.sleep(0.02)
        sources = {n["message"]: n["source"] for n in notes}
        assert sources["from 0"] == "twin"
        assert re.fullmatch(r"twin#[0-9a-f]{8}", sources["from 1"]), sources  # random, not the connection id


async def test_a_peer_cannot_take_the_label_another_peer_will_get(spawn_peer: Any) -> None:
    """Review: labels were "<name>#<connection id>", and connection ids count up from 1.

    A client that names itself "twin#3" before the third connection (a second "twin")
    got the label that connection was about to get, and their notifications could not be
    told apart.
    """
    server = spawn_peer(name="decode-0", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB}])
    rails = [tent.RailSpec(**RAILS[0])]
    async with (
        tent.Engine(backend="ucx", name="twin", rails=rails) as first,
        tent.Engine(backend="ucx", name="twin#3", rails=rails) as rogue,
        tent.Engine(backend="ucx", name="twin", rails=rails) as second,
    ):
        for engine in (first, rogue, second):  # connections 1, 2, 3
            with anyio.fail_after(30):
                peer = await engine.connect(server.address)
                kv = await peer.segment("kv")
                src = engine.register(np.zeros(4096, dtype=np.uint8), name="src")
                await engine.transfer(src[:], kv[:4096], notify=engine.name + " " + str(id(engine)))
        for _ in range(500):  # another process: no event to wait on
            notes = server.cmd(cmd="notes")["notes"]
            if len(notes) == 3:
                break
            await anyio.sleep(0.02)
        sources = [n["source"] for n in notes]
        assert len(set(sources)) == 3, sources
        assert "twin#3" in sources  # the rogue keeps its own name; the second twin got another label


async def test_a_handshake_the_client_refuses_is_counted_as_refused_not_malformed(spawn_peer: Any) -> None:
    """Review: a client that cannot open WELCOME answers REFUSED in the clear, which the
    server counted as a malformed message.  A relay flips one byte of the sealed WELCOME."""
    target = spawn_peer(name="decode-0", secret="s3cret", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB}])
    host, port = target.address.rsplit(":", 1)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t_reader, t_writer = await asyncio.open_connection(host, int(port))

        async def down() -> None:  # target -> client: CHALLENGE as it is, WELCOME with a byte flipped
            for n in range(2):
                header = await t_reader.readexactly(4)
                body = bytearray(await t_reader.readexactly(int.from_bytes(header, "big")))
                if n == 1:
                    body[-1] ^= 1
                writer.write(header + bytes(body))
            while data := await t_reader.read(65536):
                writer.write(data)

        async def up() -> None:
            while data := await reader.read(65536):
                t_writer.write(data)
            t_writer.close()

        await asyncio.gather(down(), up(), return_exceptions=True)
        writer.close()

    relay = await asyncio.start_server(serve, "127.0.0.1", 0)
    before = target.cmd(cmd="stats")["stats"]
    try:
        rails = [tent.RailSpec(**RAILS[0])]
        async with tent.Engine(backend="ucx", name="prefill-0", secret="s3cret", rails=rails) as engine:
            with anyio.fail_after(30), pytest.raises(tent.HandshakeError, match="did not prove"):
                await engine.connect(f"127.0.0.1:{relay.sockets[0].getsockname()[1]}")
        for _ in range(500):
            stats = target.cmd(cmd="stats")["stats"]
            if stats.get("handshake_refused", 0) > before.get("handshake_refused", 0):
                break
            await anyio.sleep(0.02)
        assert stats.get("handshake_refused", 0) == before.get("handshake_refused", 0) + 1, stats
        assert stats.get("protocol_errors", 0) == before.get("protocol_errors", 0), stats
    finally:
        relay.close()


async def test_a_relayed_or_misdirected_connection_to_another_engine_is_refused(spawn_peer: Any) -> None:
    """A relay can forward a handshake to another engine that knows the secret (review of issue 11,
    finding 1): with expect_name= the client refuses the engine it did not mean to reach."""
    decode0 = spawn_peer(name="decode-0", secret="s3cret", rails=RAILS, segments=[{"name": "kv", "size": MiB}])
    rails = [tent.RailSpec(**r) for r in RAILS]
    async with (
        tcp_relay(decode0.address) as relay,  # listens where the client believes decode-1 is
        tent.Engine(backend="ucx", name="prefill-0", secret="s3cret", rails=rails) as engine,
    ):
        with anyio.fail_after(30), pytest.raises(tent.HandshakeError, match="is 'decode-0', not 'decode-1'"):
            await engine.connect(f"127.0.0.1:{relay.port}", expect_name="decode-1")
        assert engine.rails == []  # nothing was paired with the wrong engine
        with anyio.fail_after(30):
            peer = await engine.connect(decode0.address, expect_name="decode-0")
        assert peer.name == "decode-0"
        with pytest.raises(tent.ConfigError, match="expect_name"):
            await engine.connect(decode0.address, expect_name=7)


async def test_a_connection_back_to_oneself_is_refused() -> None:
    rails = [tent.RailSpec(**RAILS[0])]
    async with tent.Engine(backend="ucx", name="loop-0", rails=rails, listen="127.0.0.1:0") as engine:
        assert engine.address is not None
        with anyio.fail_after(30), pytest.raises(tent.HandshakeError, match="this engine itself"):
            await engine.connect(engine.address)


async def test_rail_names_are_never_reused_after_a_peer_closes(spawn_peer: Any) -> None:
    """A transfer still queued for a closed peer's rail must not reach a new peer of the same name."""
    rails = [tent.RailSpec(**RAILS[0])]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails) as engine:
        first = spawn_peer(name="decode-0", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB}])
        with anyio.fail_after(30):
            peer = await engine.connect(first.address)
        old = list(peer.rails)
        await peer.close()
        second = spawn_peer(name="decode-0", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB}])
        with anyio.fail_after(30):
            again = await engine.connect(second.address)
        assert not set(again.rails) & set(old), (old, again.rails)


def test_the_read_tail_marker_goes_through_the_gpu_path_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: a large READ into GPU memory had no tail check.  No GPU here: a stand-in for a
    cupy view and for ``cupy`` records that the marker is copied over and the stream waited
    for before UCX may write, and that the tail is read back from the device."""
    import contextlib
    import sys
    import types

    from tent_async.backends.ucx import peer as peer_mod

    calls: list[str] = []

    class Stream:
        def synchronize(self) -> None:
            calls.append("synchronize")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(get_current_stream=lambda: Stream())  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", fake)

    class DeviceView:  # what a cupy view offers: set(), get() and a device context
        def __init__(self, n: int) -> None:
            self.host = np.zeros(n, dtype=np.uint8)
            self.device = contextlib.nullcontext()

        def set(self, arr: np.ndarray) -> None:
            calls.append("set")
            self.host[:] = arr

        def get(self) -> np.ndarray:
            calls.append("get")
            return self.host.copy()

    view = DeviceView(16)
    marker = os.urandom(16)
    peer_mod._put_bytes(view, marker)
    assert calls == ["set", "synchronize"]
    assert peer_mod._get_bytes(view) == marker and calls[-1] == "get"
    host = np.zeros(16, dtype=np.uint8)  # host memory: plain numpy, no cupy involved
    peer_mod._put_bytes(host, marker)
    assert peer_mod._get_bytes(host) == marker
