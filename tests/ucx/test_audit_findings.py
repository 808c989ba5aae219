"""Findings of an adversarial review of the ucx backend (issue 11, "audit" helper).

Each test shows one way an authenticated peer still gets past a bound the
threat model (docs/ucx.md) states; each fails on the code it was written
against and should pass once the finding is fixed.  The attackers are real
engines whose links are driven by hand: they send crafted headers on their
own link and, where the attack needs it, stop progressing their UCX worker
(so they neither read what the server sends them nor match it), which a
hostile process can do at will.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest

import tent_async as tent
from conftest import requires_ucxx
from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx import scatter

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20
LO = [{"name": "lo", "device": "lo"}]
RAILS = [tent.RailSpec(name="lo", device="lo")]


async def until(check: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Wait until ``check()``; returns whether it came true within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await anyio.sleep(0.02)
    return check()


@contextmanager
def deaf(rail: Any) -> Iterator[None]:
    """The attacker's rail stops progressing its UCX worker and stops sweeping it.

    What the server sends it stays in its socket (or, matched by nothing, in its
    unexpected queue): a rendezvous send towards it never completes and an eager
    one stalls once the socket buffers are full.  Its own sends still go out
    (UCX writes them to the socket from inside ``tag_send``).  Restored after, so
    that the engines close normally.
    """
    progress = rail.progress
    handle = rail._sweep_handle
    if handle is not None:
        handle.cancel()
    progress._closed = True  # LoopProgress: no pass runs, kicks are ignored
    progress.loop.remove_reader(progress._fd)  # (its event fd stays readable: the loop would spin on it)
    try:
        yield
    finally:
        progress.loop.add_reader(progress._fd, progress._on_event)
        progress._closed = False
        progress._scheduled = False
        progress.kick()
        rail._sweep_handle = None
        rail.sweep()


def send_header(link: Any, header: p.Message, slot: int) -> Any:
    """Post ``header`` into the server's header ``slot`` on ``link`` (no reply receive posted)."""
    ch = link.channel
    assert ch is not None
    data = np.frombuffer(p.pack_data(header), dtype=np.uint8)
    req = ch.tag_send(data, p.make_tag(link.peer_ns, p.KIND_CONTROL, slot))
    # A send: the channel must never close its endpoint while it is going out (channel.py).  Tests
    # that leave ``send=True`` out crash their own process now and then (see the audit report).
    ch.keep(req, data, None, send=True)
    return req, data


async def connect_from_another_address(server: tent.Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Connect an honest engine counted under another source address (standing in for another
    host); returns why it was refused, or "" if it got its links."""
    from tent_async.backends.ucx import server as srv

    monkeypatch.setattr(srv, "source_key", lambda ip: "192.0.2.7")
    async with tent.Engine(backend="ucx", name="honest", rails=RAILS) as honest:
        with anyio.fail_after(30):
            try:
                await honest.connect(server.address)  # type: ignore[arg-type]
            except tent.TentError as exc:
                return str(exc)
    return ""


# ======================================================= 1. replies never read


async def test_replies_a_client_never_reads_are_not_held_without_bound(spawn_peer: Any) -> None:
    """A client that keeps sending inline READ headers and never reads the replies.

    The server re-posts a header slot as soon as it answered into it, whether or
    not the client has received the answer, and a reply whose send cannot go out
    (the client's socket is full) is kept, with its bytes, until it can.  So an
    authenticated client pays ~20 bytes per header and the server keeps a 16 KiB
    ``DATA`` reply for each, with no bound: the threat model's "slices in flight
    per link: one per header slot" does not cover replies.  Expected: the server
    holds at most about one reply per header slot for a link (and then drops the
    connection, or stops answering), so its memory stays flat.  On the code under
    review it kept all 1,600 (+25 MiB here, and it grows as long as the client sends).
    """
    server = spawn_peer(name="decode-0", rails=LO, segments=[{"name": "kv", "size": MiB}])
    async with tent.Engine(backend="ucx", name="rogue", rails=RAILS) as rogue:
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)
            kv = await peer.segment("kv")
        link = next(iter(peer.links.values()))
        inline = peer.inline_limit  # 16 KiB: the largest DATA reply

        def served() -> int:
            return int(server.cmd(cmd="stats")["stats"].get("served_read", 0))

        before = server.cmd(cmd="trim")["memory"]["rss_mib"]
        kept = []
        sent = 0
        request = 1000
        with deaf(link.rail):
            for _batch in range(200):  # 1,600 headers: 25 MiB of replies
                for slot in range(peer.slots):
                    header = p.SliceRequest(p.Op.READ, request, "kv", kv.sid, 0, inline, inline=True)
                    kept.append(send_header(link, header, slot))
                    request += 1
                    sent += 1
                # Paced on the server's own count: a header sent before the server re-posted its slot
                # would be a different violation (and not the point here).
                if not await until(lambda n=sent: served() >= n or peer.closed, 10.0) or peer.closed:
                    break
            after = server.cmd(cmd="memory")["memory"]["rss_mib"]
            stats = server.cmd(cmd="stats")["stats"]
        grew = after - before
        print(f"server RSS {before} -> {after} MiB after {sent} headers; served {stats.get('served_read')}")
        assert "a header no slot was free for" not in (peer.closed_reason() if peer.closed else "")
        assert peer.closed or grew < 8, (
            f"the server holds the replies of {stats.get('served_read')} inline READs the client never read: "
            f"RSS +{grew:.1f} MiB"
        )


# ==================================================== 2. parking past its bounds


@asynccontextmanager
async def links_parked_by_one_source(
    connections: int, header: Callable[[int], p.Message]
) -> AsyncIterator[tuple[tent.Engine, dict[str, int]]]:
    """A server with ``connections`` endpoints lingering for one source address, all left
    through links set up beforehand (yields the server and its counts meanwhile).

    One attacker engine connects ``connections`` times (one source address; each connection
    has one link up on rail ``lo``, all set up before any endpoint lingers, so no ``LINK`` is
    refused).  It goes deaf, sends one large READ header per link (the server's rendezvous
    send towards it never completes), and closes each link with ``UNLINK``: the server closes
    its side, and since its send is still going out the endpoint lingers (and parks after
    ``LINGER_MAX``) with what it holds.
    """
    from tent_async.backends.ucx.protocol import Unlink

    async with (
        tent.Engine(backend="ucx", name="server", rails=RAILS, listen="127.0.0.1:0") as server,
        tent.Engine(backend="ucx", name="rogue", rails=RAILS) as rogue,
    ):
        server.register(np.ones(8 * MiB, dtype=np.uint8), name="kv")
        peers = []
        with anyio.fail_after(120):
            for _ in range(connections):
                peers.append(await rogue.connect(server.address))  # type: ignore[arg-type]
            sid = (await peers[0].segment("kv")).sid
        rail = rogue.backend.local_rails["lo"]  # type: ignore[attr-defined]
        serving = server.backend._server  # type: ignore[attr-defined]
        srail = server.backend.local_rails["lo"]  # type: ignore[attr-defined]
        pool = scatter.staging_of(server.backend.site)  # type: ignore[attr-defined]
        kept = []
        with deaf(rail):
            for i, peer in enumerate(peers):
                link = next(iter(peer.links.values()))
                kept.append(send_header(link, header(sid), 0))
                if not await until(lambda n=i + 1: serving.segment_ops.get("kv", 0) >= n, 5.0):
                    break  # refused (a bound held): nothing more is left behind
                peer.send_control(Unlink(link_id=link.link_id, reason="attacker: closed, but not reading"))

                def closed(n: int = i + 1) -> bool:
                    return sum(len(c.links) for c in serving.connections.values()) == connections - n

                assert await until(closed)
            census = {
                "lingering_from_source": int(srail.parked_by[("source", "127.0.0.1")]),
                "lingering_on_rail": int(sum(srail.parked_by.values())),
                "staging_parked": int(pool.parked),
                "staging_in_use": int(pool.in_use),
            }
            print(census)
            yield server, census
        for peer in peers:
            await peer.close()


async def test_one_source_with_links_already_up_shuts_a_rail_to_every_other_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server bounds lingering endpoints per source address (``MAX_PARKED_PER_KEY``, 4)
    so that only "an attacker with many addresses" can reach the rail-wide ``MAX_LINGERING``
    (64), past which no peer gets a new link on the rail.  Both are checked only at ``LINK``:
    one address may hold ``MAX_CONNECTIONS_PER_SOURCE`` = 64 connections, each with a link up,
    and stalling all 64 reaches ``MAX_LINGERING`` alone.  Every other peer, from any address,
    is then refused a link on that rail (a fenced link cannot come back, a new peer cannot
    connect over it) for as long as the attacker keeps its endpoints open without reading.
    Expected: one source never holds more than its bound of the rail's lingering budget, so a
    peer from another address still gets its link."""
    from tent_async.backends.ucx import server as srv
    from tent_async.backends.ucx.channel import MAX_PARKED_PER_KEY

    def read(sid: int) -> p.Message:
        return p.SliceRequest(p.Op.READ, 77, "kv", sid, 0, MiB)

    async with links_parked_by_one_source(srv.MAX_CONNECTIONS_PER_SOURCE, read) as (server, census):
        assert census["lingering_from_source"] > MAX_PARKED_PER_KEY  # past its own bound already
        refused = await connect_from_another_address(server, monkeypatch)
        assert not refused, f"a peer from another address got no link: {refused}"


async def test_parked_staging_stays_within_the_bound_the_threat_model_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parked READ staging leaves the engine's bound for slices being served
    (``LinkStaging.park``) and is bounded instead "by refusing new links (STAGING_PER_ENGINE
    parked in all; so at most about twice the engine's staging is held)" (docs/ucx.md).  Only
    new links are refused, so a source whose links are already up parks a full share on each:
    links x ``STAGING_PER_CONNECTION``, here 6 x the engine's whole bound (the bounds are made
    small so the test stays cheap; with the defaults, 64 connections from one address park
    8 GiB, and 256 from four addresses 32 GiB, none of it released until the attacker reads
    or its UCX endpoints fail)."""
    bound = 2 * MiB
    monkeypatch.setattr(scatter, "STAGING_PER_LINK", bound)
    monkeypatch.setattr(scatter, "STAGING_PER_CONNECTION", bound)
    monkeypatch.setattr(scatter, "STAGING_PER_ENGINE", bound)

    def readv(sid: int) -> p.Message:
        return p.ScatterRequest(p.Op.READ, 77, (("kv", sid),), 1, bound, p.pack_table([0], [0], [bound]))

    async with links_parked_by_one_source(6, readv) as (_server, census):
        held = census["staging_parked"] + census["staging_in_use"]
        assert held <= 2 * scatter.STAGING_PER_ENGINE, census


async def test_four_stalled_reads_from_one_address_shut_the_engine_to_new_links(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server refuses every new link, on every rail and from every address, once parked
    staging reaches ``STAGING_PER_ENGINE`` (``Server._lingering_refusal``).  One connection's
    share is a quarter of that, so four READVs of a full share each, stalled and closed from
    one address (four links: within ``MAX_PARKED_PER_KEY``, no bound passed), reach it: the
    engine then takes no new peer and re-links no fenced link until the attacker reads or its
    endpoints fail.  The threat model says only "an attacker with many addresses" can shut a
    rail this way.  Bounds made small (same ratios as the defaults: 512 MiB per engine, 128 MiB
    per connection) so the test stays cheap."""

    share = 2 * MiB
    monkeypatch.setattr(scatter, "STAGING_PER_LINK", share)
    monkeypatch.setattr(scatter, "STAGING_PER_CONNECTION", share)
    monkeypatch.setattr(scatter, "STAGING_PER_ENGINE", 4 * share)

    def readv(sid: int) -> p.Message:
        return p.ScatterRequest(p.Op.READ, 77, (("kv", sid),), 1, share, p.pack_table([0], [0], [share]))

    async with links_parked_by_one_source(4, readv) as (server, census):
        assert census["lingering_from_source"] <= 4  # within the per-source bound
        refused = await connect_from_another_address(server, monkeypatch)
        assert not refused, f"a peer from another address got no link: {refused}"


# ============================================== 5. a server that does not read

# Covered by tests/ucx/test_limits.py::
# test_a_server_that_stops_reading_control_is_dropped_before_the_client_queues_without_bound
# (the client gives up on a server that leaves a burst unread, rather than at the first one).


# ================================== 6. the engine's early-bytes stash, filled by one peer


async def test_a_peer_filling_the_engines_early_write_stash_gets_honest_peers_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Early WRITE bytes are kept for their header within ``STASH_BYTES_PER_LINK`` (64 MiB) and
    ``STASH_BYTES`` (256 MiB) per engine; a message past either bound is a protocol violation of
    *the connection it came on*.  One authenticated peer with four links fills the engine's
    bound with eager bulk messages it announces no header for (forced eager on its side; it can
    keep them there by sending the matching headers just before ``STASH_TTL`` and new early
    bytes right after).  Then any honest client whose WRITE bytes overtake their header (the
    ordinary race the stash exists for; a busy server loop makes it common, and a peer can keep
    the loop busy) is dropped as a protocol violator and its transfer fails.  Bounds made small
    (same 1:4 ratio as the defaults); the honest peer's headers are dispatched 50 ms late, as in
    ``test_write_bytes_that_overtake_their_header_are_kept_for_it``.  Expected: the honest
    transfer completes (the engine-wide bound falls on whoever holds the most, or on a
    per-connection share, never on the newcomer)."""
    from tent_async.backends.ucx import server as srv

    per_link = MiB
    monkeypatch.setattr(srv, "STASH_BYTES_PER_LINK", per_link)
    monkeypatch.setattr(srv, "STASH_BYTES", 4 * per_link)
    piece = per_link // 8  # eight early messages per link (one per header slot)
    eager = [tent.RailSpec(name="lo", device="lo", options={"RNDV_THRESH": "inf"})]
    config = tent.SchedulerConfig(target_slice_time=4e-3, window=3, deadline_floor=1.0)
    async with (
        tent.Engine(backend="ucx", name="server", rails=RAILS, listen="127.0.0.1:0") as server,
        tent.Engine(backend="ucx", name="rogue", rails=eager) as rogue,
        tent.Engine(backend="ucx", name="honest", rails=RAILS, config=config) as honest,
    ):
        server.register(np.zeros(4 * MiB, dtype=np.uint8), name="kv")
        serving = server.backend._server  # type: ignore[attr-defined]
        with anyio.fail_after(60):
            hogs = [await rogue.connect(server.address) for _ in range(4)]  # type: ignore[arg-type]
            peer = await honest.connect(server.address)  # type: ignore[arg-type]
            kv = await peer.segment("kv")
        kept = []
        for hog in hogs:
            link = next(iter(hog.links.values()))
            ch = link.channel
            for index in range(1, 9):
                data = np.full(piece, 0xEE, dtype=np.uint8)
                req = ch.tag_send(data, p.make_tag(link.peer_ns, p.KIND_DATA, index))
                ch.keep(req, data, None, send=True)
                kept.append((req, data))
        assert await until(lambda: serving.stashed_bytes >= 4 * per_link, 10.0), serving.stashed_bytes
        assert not any(h.closed for h in hogs)  # within every bound

        on_header = srv.ServerLink._on_header

        def slow_header(self: Any, slot: int, msg: Any, error: Any) -> None:
            asyncio.get_running_loop().call_later(0.05, on_header, self, slot, msg, error)

        monkeypatch.setattr(srv.ServerLink, "_on_header", slow_header)
        src = honest.register(np.full(MiB, 7, dtype=np.uint8), name="src")
        failed = ""
        with anyio.fail_after(30):
            try:
                await honest.transfer(src[:], kv[:MiB])
            except tent.TentError as exc:
                failed = f"{type(exc).__name__}: {exc}"
        reason = peer.closed_reason() if peer.closed else ""
        assert not failed and not peer.closed, f"the honest WRITE failed ({failed}); its peer: {reason}"
