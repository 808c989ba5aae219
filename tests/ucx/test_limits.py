"""What an authenticated peer can make an engine hold is bounded (issue 11, finding 5).

Unread notifications, slices in flight per link and early WRITE bytes each have
a bound; past it the engine refuses with a counted protocol error, and keeps
serving other peers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import tent_async as tent
from conftest import requires_ucxx
from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx import server as srv
from tent_async.engine import MAX_QUEUED_NOTIFICATION_BYTES, MAX_QUEUED_NOTIFICATIONS

MiB = 1 << 20
LO = [{"name": "lo", "device": "lo"}]


async def until(check: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``check`` (it asks another process: there is no event to wait on)."""
    for _ in range(int(seconds / 0.05)):
        if check():
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_unread_notifications_are_bounded_per_source_and_overall() -> None:
    engine = tent.Engine(backend="local")
    deliver = engine._deliver_notification
    share = MAX_QUEUED_NOTIFICATIONS // 4
    assert all(deliver(tent.Notification(message="x", source="a")) for _ in range(share))
    assert not deliver(tent.Notification(message="x", source="a"))  # its quarter is full
    assert deliver(tent.Notification(message="x", source="b"))  # others are not shut out
    big = "y" * (MAX_QUEUED_NOTIFICATION_BYTES // 4 // 4 // 2)  # half a source's byte share
    assert deliver(tent.Notification(message=big, source="c"))
    assert not deliver(tent.Notification(message=big, source="c"))
    # Reading them frees their room.
    engine._notifications.clear()
    engine._notes_queued.clear()
    assert deliver(tent.Notification(message="x", source="a"))


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_peer_flooding_unread_notifications_is_refused(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", read_notes=False, rails=LO, segments=[{"name": "kv", "size": MiB}])
    async with tent.Engine(backend="ucx", name="noisy", rails=[tent.RailSpec(**LO[0])]) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
        text = "n" * 60_000
        for _ in range(200):
            peer.notify(text)
            await anyio.lowlevel.checkpoint()
        await until(lambda: server.cmd(cmd="stats")["stats"].get("notifications_dropped", 0) >= 100)
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["protocol_errors"] >= 100
        assert not peer.closed  # refused, not disconnected: the peer may be honest and the application slow


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_slices_in_flight_per_link_are_bounded(spawn_peer: Any) -> None:
    """WRITE headers whose bytes never come: beyond one per header slot they are refused."""
    server = spawn_peer(name="decode-0", rails=LO, segments=[{"name": "kv", "size": MiB}])
    async with tent.Engine(backend="ucx", name="rogue", rails=[tent.RailSpec(**LO[0])]) as rogue:
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)
            kv = await peer.segment("kv")
        link = next(iter(peer.links.values()))
        ch = link.channel
        assert ch is not None
        request = 1000
        for _batch in range(5):
            for slot in range(peer.slots):  # one header per slot, each re-posted by the server at once
                reply = np.zeros(4096, dtype=np.uint8)  # its ERROR must not look unexpected here
                ch.keep(ch.tag_recv(reply, p.make_tag(link.ns, p.KIND_CONTROL, request)), reply, None)
                header = p.SliceRequest(p.Op.WRITE, request, "kv", kv.sid, 0, 64 * 1024)
                message = np.frombuffer(p.pack_data(header), dtype=np.uint8)
                ch.keep(ch.tag_send(message, p.make_tag(link.peer_ns, p.KIND_CONTROL, slot)), message, None)
                request += 1
            await anyio.sleep(0.2)
        refused = 4 * peer.slots
        await until(lambda: server.cmd(cmd="stats")["stats"].get("rejected", 0) >= refused)
        assert server.cmd(cmd="stats")["stats"]["protocol_errors"] >= refused
    # Once the rogue is gone its receives are cancelled and the segment is free again.

    def unregistered() -> bool:
        try:
            server.cmd(cmd="unregister", segment="kv")
        except RuntimeError as exc:
            if "SegmentBusyError" not in str(exc):
                raise
            return False
        return True

    await until(unregistered)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_early_write_bytes_beyond_the_bound_drop_the_connection(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=LO, segments=[{"name": "kv", "size": MiB}])
    size = srv.STASH_BYTES_PER_LINK * 5 // 8
    async with tent.Engine(backend="ucx", name="rogue", rails=[tent.RailSpec(**LO[0])]) as rogue:
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)
        link = next(iter(peer.links.values()))
        ch = link.channel
        assert ch is not None
        bulk = np.ones(size, dtype=np.uint8)
        for request in (1, 2):  # bulk bytes for two WRITEs whose headers never come
            ch.keep(ch.tag_send(bulk, p.make_tag(link.peer_ns, p.KIND_DATA, request)), bulk, None)
        for _ in range(1500):  # another process: no event to wait on
            if peer.closed:
                break
            await anyio.sleep(0.02)
        assert peer.closed
        assert "beyond the bound" in peer.closed_reason()
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["protocol_errors"] >= 1 and stats["early_writes"] == 1


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_peer_setting_links_up_without_end_is_dropped(spawn_peer: Any) -> None:
    """Each LINK costs the server an address check and a UCX endpoint: bounded per connection."""
    server = spawn_peer(name="decode-0", rails=LO, segments=[{"name": "kv", "size": MiB}])
    async with tent.Engine(backend="ucx", name="rogue", rails=[tent.RailSpec(**LO[0])]) as rogue:
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)
        address = rogue.backend.local_rails["lo"].address  # type: ignore[attr-defined]
        for i in range(srv.LINK_BURST + 10):
            peer.send_control(p.Link(link_id=10**9 + i, rail="lo", address=address, namespace=1 + i))
        await until(lambda: peer.closed)
        assert server.cmd(cmd="stats")["stats"]["protocol_errors"] >= 1
