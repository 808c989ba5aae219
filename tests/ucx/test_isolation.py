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

import tent_async as tent
from conftest import requires_ucxx

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
