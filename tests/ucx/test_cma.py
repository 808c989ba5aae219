"""Direct copies between two engines on one host (cma.py): byte-exact, verified, fenced, bounded.

The copy and the verification are checked in one process (a process may
copy from and to itself); the engine path with two processes over a
shared-memory rail: contiguous and extent-list WRITEs and READs land exactly,
the server counts them as direct, ``cma=False`` keeps them on UCX, a header
asking for a direct copy from a client that did not prove it shares the host
drops its connection, an extent list outside its segment is refused before
any address is given, and a segment stays busy until the initiator's DONE
(or, when the link closes first, until WHERE's deadline and the margin).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scatter import Rogue, blocks, copied

import tent_async as tent
from conftest import PeerProcess, requires_ucxx
from tent_async.backends.ucx import cma
from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx.peer import OP_SENT, OP_WITHDRAWING, Link, _Op
from tent_async.memory import as_memory

MiB = 1 << 20
KV = 8 * MiB
SHM = [{"name": "shm", "device": "shm"}]
SEGMENTS = [{"name": "kv", "size": KV, "seed": 1}, {"name": "ro", "size": MiB, "seed": 2, "permission": "r"}]

needs_cma = pytest.mark.skipif(not cma.available(), reason="no process_vm_readv here (Linux only)")


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(buf: np.ndarray) -> str:
    return hashlib.sha256(buf.tobytes()).hexdigest()


# ============================================================ in one process


@needs_cma
def test_copy_moves_scattered_pieces_both_ways_past_one_calls_iovec_limit() -> None:
    rng = np.random.default_rng(3)
    src, dst = pattern(5, 1 << 20), np.zeros(1 << 20, dtype=np.uint8)
    n = 3 * cma.IOV_BATCH + 17  # four calls
    order = rng.permutation(n)
    lengths = np.full(n, 256, dtype=np.uint64)
    local = cma.address(src) + (np.arange(n, dtype=np.uint64) * 256)
    remote = cma.address(dst) + order.astype(np.uint64) * 256
    cma.copy(os.getpid(), local, remote, lengths, write=True)
    want = np.zeros_like(dst)
    want.reshape(-1, 256)[order] = src[: n * 256].reshape(n, 256)
    assert np.array_equal(dst, want)
    back = np.zeros_like(src)
    cma.copy(os.getpid(), cma.address(back) + np.arange(n, dtype=np.uint64) * 256, remote, lengths, write=False)
    assert np.array_equal(back[: n * 256], src[: n * 256])


@needs_cma
@settings(max_examples=60, deadline=None)
@given(st.data())
def test_copy_lands_any_two_layouts_byte_exact_whole_or_split_between_threads(data: st.DataObject) -> None:
    """Random pieces, each side in order or permuted (runs merged into iovecs on each side on its
    own), written and read, copied by one thread or split at a random byte between two."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n = data.draw(st.integers(1, 3 * cma.IOV_BATCH))
    lengths = rng.integers(1, 300, n).astype(np.uint64)

    def layout() -> np.ndarray:
        order = rng.permutation(n) if data.draw(st.booleans()) else np.arange(n)
        out = np.empty(n, dtype=np.uint64)
        out[order] = np.concatenate(([0], np.cumsum(lengths[order])[:-1])).astype(np.uint64)
        return out

    mine, theirs = layout(), layout()
    ours, peer = pattern(1, 1 << 20), pattern(2, 1 << 20)
    write = data.draw(st.booleans())
    split = data.draw(st.booleans())
    old = cma.SPLIT_MIN
    cma.SPLIT_MIN = 1 if split else 1 << 62
    try:
        cma.copy(os.getpid(), cma.address(ours) + mine, cma.address(peer) + theirs, lengths, write=write)
    finally:
        cma.SPLIT_MIN = old
    src, dst, s_at, d_at = (ours, peer, mine, theirs) if write else (peer, ours, theirs, mine)
    want = pattern(2 if write else 1, 1 << 20)
    for a, b, k in zip(s_at.tolist(), d_at.tolist(), lengths.tolist(), strict=True):
        want[b : b + k] = src[a : a + k]
    assert np.array_equal(dst, want)


@needs_cma
def test_copy_refuses_loudly_when_the_kernel_copies_less() -> None:
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(cma.CmaError, match="failed"):
        cma.copy(os.getpid(), np.array([cma.address(buf)]), np.array([8]), np.array([64]), write=False)


SERVER_SIDE = (("127.0.0.1", 5000), ("127.0.0.1", 6000))  # a control connection as the server sees it
CLIENT_SIDE = (("127.0.0.1", 6000), ("127.0.0.1", 5000))  # ... and as its client does


@needs_cma
@pytest.mark.anyio
async def test_verification_proves_host_user_and_connection_once_per_token() -> None:
    verifier = cma.Verifier()
    assert await verifier.start()
    assert cma.valid_name(verifier.name)
    try:
        seen: list[int] = []
        token = verifier.grant(7, SERVER_SIDE, seen.append)
        with pytest.raises(cma.CmaError):  # a wrong token
            await cma.verify(verifier.name, 7, bytes(16), CLIENT_SIDE, limit=1.0)
        # A token relayed from another connection (a peer in the middle forwarding our WELCOME to
        # a client of ours on this host): that client names its own connection, not this one.
        elsewhere = (("127.0.0.1", 6001), ("127.0.0.1", 7000))
        with pytest.raises(cma.CmaError):
            await cma.verify(verifier.name, 7, token, elsewhere, limit=1.0)
        assert seen == []
        assert await cma.verify(verifier.name, 7, token, CLIENT_SIDE) == os.getpid()  # still granted
        assert seen == [os.getpid()]
        with pytest.raises(cma.CmaError):  # used up: one verification per grant
            await cma.verify(verifier.name, 7, token, CLIENT_SIDE, limit=1.0)
        other = verifier.grant(8, SERVER_SIDE, seen.append)
        verifier.revoke(8)
        with pytest.raises(cma.CmaError):  # revoked (its connection dropped)
            await cma.verify(verifier.name, 8, other, CLIENT_SIDE, limit=1.0)
        assert seen == [os.getpid()]
        assert verifier.refused == 4
    finally:
        await verifier.aclose()
    with pytest.raises(cma.CmaError, match="not reachable"):
        await cma.verify(f"tent-ucx-{os.getpid()}-{'0' * 16}", 1, bytes(16), CLIENT_SIDE, limit=1.0)
    with pytest.raises(cma.CmaError, match="not a tent_async"):  # a server cannot aim us at any socket
        await cma.verify("some-other-socket", 1, bytes(16), CLIENT_SIDE, limit=1.0)


@needs_cma
@pytest.mark.anyio
async def test_verification_refuses_a_socket_held_by_another_process_than_its_name_says() -> None:
    name = "tent-ucx-1-0123456789abcdef"  # names pid 1; this process holds it

    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(nothing, path="\0" + name)
    try:
        with pytest.raises(cma.CmaError, match="held by process"):
            await cma.verify(name, 1, bytes(16), CLIENT_SIDE, limit=1.0)
    finally:
        server.close()


@needs_cma
@pytest.mark.anyio
async def test_the_verifier_serves_a_bounded_number_of_callers_at_once() -> None:
    verifier = cma.Verifier()
    assert await verifier.start()
    idle = []
    try:
        token = verifier.grant(3, SERVER_SIDE, lambda pid: None)
        for _ in range(cma.MAX_VERIFYING):  # callers that connect and say nothing
            idle.append(await asyncio.open_unix_connection(path="\0" + verifier.name))
        await asyncio.sleep(0.05)
        with pytest.raises(cma.CmaError):
            await cma.verify(verifier.name, 3, token, CLIENT_SIDE, limit=1.0)
        for _reader, writer in idle:
            writer.close()
        idle.clear()
        await asyncio.sleep(0.05)
        assert await cma.verify(verifier.name, 3, token, CLIENT_SIDE) == os.getpid()  # the grant was kept
    finally:
        for _reader, writer in idle:
            writer.close()
        await verifier.aclose()


def _link_for_copies(pid: int | None) -> tuple[Link, list[str]]:
    """A Link with just what _copy uses: its peer (pid, turning copies off) and its name."""
    link = Link.__new__(Link)
    off: list[str] = []
    failed: list[tuple[int, BaseException, dict[str, bool]]] = []
    ctx = SimpleNamespace(fail=lambda aid, exc, **how: failed.append((aid, exc, how)))
    site = SimpleNamespace(ctx=ctx, clock=time.monotonic)
    link.peer = SimpleNamespace(  # type: ignore[assignment]
        cma_pid=pid, cma_late=0, name="decode-0", cma_off=off.append, site=site, failed=failed, closed=False
    )
    link.name = "shm"
    link.peer_ns = 1
    return link, off


@needs_cma
def test_the_initiator_copies_only_while_the_slice_is_live_and_before_the_deadline() -> None:
    """Fencing: a slice withdrawn before its WHERE, or whose WHERE is late, copies nothing."""
    there = np.zeros(4096, dtype=np.uint8)
    mine = pattern(9, 4096)
    src = SimpleNamespace(memory=as_memory(mine))
    attempt = SimpleNamespace(id=1, src=src, dst=None, src_offset=0, dst_offset=0, length=4096)
    link, off = _link_for_copies(os.getpid())

    def where(until: float) -> p.Where:
        return p.Where(request=1, bases=(cma.address(there),), until=until)

    op = _Op(attempt, link, p.Op.WRITE, 0.0)  # type: ignore[arg-type]
    op.state, op.cma = OP_WITHDRAWING, True
    link._copy(op, where(time.monotonic() + 10))
    assert not op.data_ok and op.error is None and op.redo is None and not there.any()  # withdrawn: nothing moved

    op = _Op(attempt, link, p.Op.WRITE, 0.0)  # type: ignore[arg-type]
    op.state, op.cma = OP_SENT, True
    link._copy(op, where(time.monotonic() - 0.001))
    assert not op.data_ok and not there.any()
    assert op.redo is not None and "deadline" in op.redo[0] and op.redo[1]  # again, as the peer's load
    op.reply = where(0.0)
    link._report(op)
    ((aid, exc, how),) = link.peer.failed  # type: ignore[attr-defined]
    assert aid == 1 and isinstance(exc, tent.RemoteBusyError) and how == {"busy": True}  # the rail stays up
    link.peer.failed.clear()  # type: ignore[attr-defined]

    op = _Op(attempt, link, p.Op.WRITE, 0.0)  # type: ignore[arg-type]
    op.state, op.cma = OP_SENT, True
    link._copy(op, where(time.monotonic() + 10))
    assert op.data_ok and np.array_equal(there, mine)

    op = _Op(attempt, link, p.Op.WRITE, 0.0)  # type: ignore[arg-type]
    op.state, op.cma = OP_SENT, True
    link._copy(op, p.Where(request=1, bases=(8,), until=time.monotonic() + 10))  # the kernel refuses
    assert not op.data_ok and op.redo is not None and not op.redo[1]
    assert off  # later slices to this peer go over UCX
    op.reply = where(0.0)
    link._report(op)
    ((aid, exc, how),) = link.peer.failed  # type: ignore[attr-defined]
    assert how == {"busy": False}  # charged to the rail, not taken down: the next goes over UCX

    link, off = _link_for_copies(os.getpid())
    for _ in range(3):  # a loop too slow for the deadlines, every time: direct copies go off
        op = _Op(attempt, link, p.Op.WRITE, 0.0)  # type: ignore[arg-type]
        op.state, op.cma = OP_SENT, True
        link._copy(op, where(time.monotonic() - 0.001))
    assert len(off) == 1 and "deadline" in off[0]


# ============================================================ two processes


async def _engine(server: PeerProcess, **options: Any) -> tuple[tent.Engine, Any]:
    engine = tent.Engine(backend="ucx", name="prefill-0", rails=[tent.RailSpec(**SHM[0])], **options)
    await engine.__aenter__()
    with anyio.fail_after(30):
        peer = await engine.connect(server.address)
    return engine, peer


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@needs_cma
@pytest.mark.parametrize("direct", [True, False])
async def test_shared_memory_slices_copy_directly_byte_exact_and_not_with_cma_false(
    spawn_peer: Any, direct: bool
) -> None:
    server = spawn_peer(name="decode-0", rails=SHM, segments=SEGMENTS)
    before = server.cmd(cmd="stats")["stats"]
    engine, peer = await _engine(server, cma=direct)
    try:
        assert peer.cma_pid == (server.proc.pid if direct else None)
        kv = await peer.segment("kv")
        src = pattern(11, KV)
        local = engine.register(src, name="src")
        with anyio.fail_after(60):
            await engine.transfer(local[:], kv[:])  # contiguous: slices of one extent
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(src)
        rng = np.random.default_rng(4)
        expected = src.copy()
        for n, size in ((256, 16384), (3000, 512)):  # the second's tables go after the header
            s_off, d_off, lengths = blocks(rng, n, lambda n, size=size: np.full(n, size), KV)
            with anyio.fail_after(60):
                await engine.transfer_blocks(local, s_off, kv, d_off, lengths)
            expected = copied(expected, src, s_off, d_off, lengths)
            assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(expected)
            back = np.zeros(KV, dtype=np.uint8)
            sink = engine.register(back, name=f"sink{n}")
            with anyio.fail_after(60):
                await engine.transfer_blocks(kv, d_off, sink, s_off, lengths)
            assert np.array_equal(back, copied(np.zeros(KV, dtype=np.uint8), expected, d_off, s_off, lengths))
        whole = np.zeros(KV, dtype=np.uint8)
        with anyio.fail_after(60):
            await engine.transfer(kv[:], engine.register(whole, name="whole")[:])
        assert np.array_equal(whole, expected)
        assert dict(engine.telemetry().backend) == dict(engine.backend.stats)  # type: ignore[attr-defined]
    finally:
        await engine.__aexit__(None, None, None)
    after = server.cmd(cmd="stats")["stats"]
    direct_slices = after.get("cma_slices", 0) - before.get("cma_slices", 0)
    assert (direct_slices > 0) is direct
    assert after.get("rejected", 0) == before.get("rejected", 0)
    assert after.get("protocol_errors", 0) == before.get("protocol_errors", 0)


async def _past_the_hold(reply: p.Where) -> None:
    """Sleep until a server holding segments for ``reply`` after its link closed has let them go."""
    await anyio.sleep(max(0.0, reply.until + cma.MARGIN - time.monotonic()) + 0.3)


async def _dropped(peer: Any) -> bool:
    """Did the server drop ``peer``'s connection within two seconds?"""
    for _ in range(200):
        if peer.closed:
            return True
        await anyio.sleep(0.01)
    return False


async def _rogue(server: PeerProcess, **options: Any) -> tuple[tent.Engine, Rogue, int]:
    engine, peer = await _engine(server, **options)
    return engine, Rogue(engine, peer), (await peer.segment("kv")).sid


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_direct_copy_asked_for_by_an_unverified_client_drops_it(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=SHM, segments=SEGMENTS)
    before = server.cmd(cmd="stats")["stats"]
    engine, rogue, sid = await _rogue(server, cma=False)  # never proved it shares the host
    try:
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.WRITE, 0, "kv", sid, 0, MiB, cma=True)), wait=2.0)
        assert not isinstance(reply, p.Where)
        assert await _dropped(rogue.peer)
    finally:
        await engine.__aexit__(None, None, None)
    after = server.cmd(cmd="stats")["stats"]
    assert after["protocol_errors"] > before.get("protocol_errors", 0)
    assert after.get("cma_slices", 0) == before.get("cma_slices", 0)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@needs_cma
async def test_direct_copies_are_checked_like_any_slice_before_an_address_is_given(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=SHM, segments=SEGMENTS)
    engine, rogue, sid = await _rogue(server)
    try:
        ro = (await rogue.peer.segment("ro")).sid
        kv = ("kv", sid)
        refused = {  # the furthest extent of the slice ends past the segment's end
            "outside": p.ScatterRequest(p.Op.WRITE, 0, (kv,), 2, 8192, cma=True, reach=(KV + 3996,)),
            "read-only": p.encode(p.SliceRequest(p.Op.WRITE, 0, "ro", ro, 0, 4096, cma=True)),
            "past the end": p.encode(p.SliceRequest(p.Op.READ, 0, "kv", sid, KV - 10, 4096, cma=True)),
        }
        for what, header in refused.items():
            reply = await rogue.send(header)
            assert isinstance(reply, p.Error), (what, reply)
        # Refused direct WRITEs send no bytes, so none is waited for (64 such waits closed the link).
        stale = p.encode(p.SliceRequest(p.Op.WRITE, 0, "kv", sid + 1000, 0, 4096, cma=True))
        for _ in range(70):
            assert isinstance(await rogue.send(stale), p.Error)
        assert not rogue.peer.closed and rogue.link.channel is not None
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.READ, 0, "kv", sid, 0, 4096, cma=True)))
        assert isinstance(reply, p.Where) and len(reply.bases) == 1 and reply.until > time.monotonic()
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@needs_cma
async def test_a_segment_stays_busy_until_done_or_the_deadline_after_its_link_closed(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=SHM, segments=SEGMENTS)
    engine, rogue, sid = await _rogue(server)
    try:
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.WRITE, 0, "kv", sid, 0, 4096, cma=True)))
        assert isinstance(reply, p.Where)
        with pytest.raises(RuntimeError, match="in flight"):  # answered: the client may be copying now
            server.cmd(cmd="unregister", segment="kv")
        link = rogue.link
        done = np.ones(1, dtype=np.uint8)
        ch = link.channel
        ch.keep(ch.tag_send(done, p.make_tag(link.peer_ns, p.KIND_DATA, reply.request)), done, None, send=True)
        for _ in range(200):
            try:
                server.cmd(cmd="unregister", segment="kv")
                break
            except RuntimeError:
                await anyio.sleep(0.01)
        else:
            pytest.fail("DONE did not free the segment")
        server.cmd(cmd="register", segment="kv", size=KV, seed=1)
        sid = (await rogue.peer.segment("kv", refresh=True)).sid
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.WRITE, 0, "kv", sid, 0, 4096, cma=True)))
        assert isinstance(reply, p.Where)
        link.close("test: the link closes before DONE", tell=True)
        await asyncio.sleep(0.3)
        with pytest.raises(RuntimeError, match="in flight"):  # the copy could still be under way
            server.cmd(cmd="unregister", segment="kv")
        await _past_the_hold(reply)
        server.cmd(cmd="unregister", segment="kv")  # then it is free
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@needs_cma
async def test_a_direct_copy_asked_for_on_a_tcp_link_drops_even_a_verified_client(spawn_peer: Any) -> None:
    rails = [*SHM, {"name": "lo", "device": "lo"}]
    server = spawn_peer(name="decode-0", rails=rails, segments=SEGMENTS)
    engine = tent.Engine(backend="ucx", name="prefill-0", rails=[tent.RailSpec(**r) for r in rails])
    await engine.__aenter__()
    try:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            sid = (await peer.segment("kv")).sid
        assert peer.cma_pid == server.proc.pid
        rogue = Rogue(engine, peer)
        rogue.link = next(link for link in peer.links.values() if link.rail.plan.kind == "tcp")
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.READ, 0, "kv", sid, 0, 4096, cma=True)), wait=2.0)
        assert not isinstance(reply, p.Where)
        assert await _dropped(peer)
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@needs_cma
async def test_a_client_that_never_says_done_is_dropped(spawn_peer: Any) -> None:
    """A WHERE holds segments until DONE; a client that never sends it is dropped (DONE_WAIT),
    which frees them once the deadline and margin are past."""
    server = spawn_peer(name="decode-0", rails=SHM, segments=SEGMENTS, done_wait=0.5)
    engine, rogue, sid = await _rogue(server)
    try:
        reply = await rogue.send(p.encode(p.SliceRequest(p.Op.WRITE, 0, "kv", sid, 0, 4096, cma=True)))
        assert isinstance(reply, p.Where)
        assert await _dropped(rogue.peer)
        assert server.cmd(cmd="stats")["stats"]["protocol_errors"] >= 1
        await _past_the_hold(reply)
        server.cmd(cmd="unregister", segment="kv")  # held no longer
    finally:
        await engine.__aexit__(None, None, None)
