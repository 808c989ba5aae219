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
    async with tent.Engine(backend="ucx", name="prefill-0", rails=[tent.RailSpec(**r) for r in RAILS]) as engine:
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
        assert sources["from 1"].startswith("twin#") and sources["from 1"] != sources["from 0"]


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
