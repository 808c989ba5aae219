"""Serving peers: the handshake, segment look-ups, links, and inbound slice requests.

A listening engine accepts control connections on its ``listen`` address;
UCX itself listens nowhere.  Once a client authenticated, it asks for one
*link* per rail pair (``LINK``: its rail's UCX worker address and the tag
namespace it receives in); the server opens an endpoint back to that address,
picks a random namespace of its own, posts ``slots`` bounded receives for
slice headers in it, and answers ``LINKED``.  Nothing is posted, and no UCX
address is parsed, before the client authenticated.

Every slice header is checked **before** any byte moves:

* the segment is registered and is the registration the client looked up;
* WRITE needs permission ``"rw"`` (and writable memory); nothing is ever
  received into a read-only segment;
* ``0 <= offset``, ``0 < length <= max_request``, ``offset + length <= size``;
* inline slices only for host memory and up to the negotiated inline limit.

A violation is answered with ``ERROR`` (the reason), counted in
``backend.stats["rejected"]``, logged, and never writes a byte.  The rejected
WRITE's data is still on its way (a send cannot be cancelled); it is matched
by a receive into one scratch byte, which UCX reports as truncated and drops,
so that the client's send completes without the server holding its bytes.

A header larger than its slot (truncation), one that does not decode, a
header or reply-kind message that no slot expected, and bulk bytes that no
header announced are protocol violations: counted, logged, and the whole
connection is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...errors import PeerClosedError, ProtocolError
from ...segments import Segment
from . import _ucxx, cma, scatter
from .channel import MAX_PARKED_PER_KEY, Channel, MessageTruncated
from .control import (
    MAX_WRITE_BUFFER,
    LogLimiter,
    Session,
    close_writer,
    forget_traceback,
    macs_equal,
    read_message,
    write_message,
)
from .protocol import (
    HEADER_ROOM,
    KIND_CONTROL,
    KIND_DATA,
    MAX_AWAY_US,
    MAX_CLIENT_FRAME,
    MAX_CONN_ID,
    MAX_HELLO_FRAME,
    MAX_WELCOME_FRAME,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    TAG_INDEX_MASK,
    TAIL_BYTES,
    Ack,
    Bind,
    Bound,
    Bye,
    Challenge,
    Data,
    Error,
    Hello,
    Link,
    Linked,
    LookedUp,
    Lookup,
    Message,
    Notify,
    Op,
    Refused,
    ScatterRequest,
    SegmentAd,
    Sent,
    SliceRequest,
    Unlink,
    VersionMismatch,
    Welcome,
    Where,
    clip_reason,
    encode,
    make_tag,
)
from .rails import HeapTrimmer, LocalRail, held_bytes
from .site import Site

logger = logging.getLogger("tent_async.ucx")

SLOTS = 8  # header receives posted per link (the client keeps at most this many headers unanswered)
MAX_PENDING_HANDSHAKES = 32  # unauthenticated control connections at once; more are closed at once
MAX_PENDING_PER_SOURCE = 16  # ... of them from one source address (many engines on one host connect at once)
MAX_CONNECTIONS = 256  # authenticated connections at once
MAX_CONNECTIONS_PER_SOURCE = 64  # ... of them from one source address
MAX_LINGERING = 64  # endpoints per rail still sending to peers that stopped reading; past it, no new links
LINK_BURST = 64  # LINKs a client may send at once (one per rail at connect, one per re-link) ...
LINK_RATE = 8.0  # ... and per second after that; faster is a protocol violation
MAX_DRAINS = 64  # refused WRITEs whose bytes are still awaited, per link; more closes the link
MAX_REPLIES_OUT_PER_SLOT = 2  # replies still going out per header slot of a link; more drops the client
MAX_DIRECT_PER_SLOT = 4  # direct copies answered and not yet DONE, per header slot of a link; more drops the client
DONE_WAIT = 10.0  # seconds a direct copy's DONE may take after WHERE; later drops the client
STASH_TTL = 5.0  # seconds a WRITE's early bytes may wait for their header
STASH_BYTES_PER_LINK = 64 << 20  # early WRITE bytes kept per link ...
STASH_BYTES = 256 << 20  # ... and per engine (past it the connection holding the most is dropped) ...
STASH_BYTES_PER_SHARE = STASH_BYTES // 4  # ... and per connection and per source address; past these, that one is
IPV6_SOURCE_PREFIX = 64  # per-source limits count an IPv6 client by its /64 (a host has a whole one)

_serials = itertools.count(1)


def source_key(ip: str) -> str:
    """What per-source limits count a client address under: an IPv4 address, or an IPv6 /64.

    A host with IPv6 usually has a whole /64 and can pick any address in it, so
    counting exact IPv6 addresses would give it 2^64 sources.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # a Unix socket path or another kind of address: as it is
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{addr}/{IPV6_SOURCE_PREFIX}", strict=False))
    return str(addr)


def _host_bytes(view: Any) -> bytes:
    """The bytes of a (numpy or cupy) view, on the host."""
    if hasattr(view, "get"):  # pragma: no cover - cupy, needs a GPU
        view = view.get()
    return bytes(view.tobytes())


class Connection:
    """One client engine connected to us: its control stream and its links (one per our rail)."""

    def __init__(
        self,
        conn_id: int,
        name: str,
        host_id: str,
        writer: asyncio.StreamWriter,
        session: Session | None,
    ) -> None:
        self.session = session  # with a shared secret: every message after HELLO is sealed with it
        self.source = ""  # the IP address it connected from
        self.source_key = ""  # what per-source limits count it under (an IPv6 address: its /64)
        self.label = name  # what its notifications give as their source (unique among connections)
        # What its notifications are bounded under: this connection, never reused (its name and
        # label are the client's choice, and two clients could pick the same one, issue 11 review).
        self.key = ("ucx-connection", next(_serials))
        self._link_tokens = float(LINK_BURST)
        self._link_at = 0.0
        self.conn_id = conn_id
        self.name = name
        self.host_id = host_id
        self.writer = writer
        self.links: dict[str, ServerLink] = {}  # our rail name -> link
        self.closed = False
        self.stashed = 0  # early WRITE bytes its links keep for their headers (ServerLink.stash)
        self.cma_pid: int | None = None  # set once it proved it shares our host and user (cma.py)
        self.evicting = 0  # being dropped to make room in the stash: what it held then (Server.stash_evicting)

    def send(self, msg: Message) -> None:
        write_message(self.writer, msg, self.session)

    def may_link(self, now: float) -> bool:
        """Token bucket for LINK: each one costs an address check and a UCX endpoint."""
        self._link_tokens = min(LINK_BURST, self._link_tokens + (now - self._link_at) * LINK_RATE)
        self._link_at = now
        if self._link_tokens < 1:
            return False
        self._link_tokens -= 1
        return True


class ServerLink:
    """The serving side of one link: our endpoint back to the client, header slots, early WRITE bytes."""

    def __init__(self, server: Server, conn: Connection, rail: LocalRail, msg: Link, channel: Channel) -> None:
        self.server = server
        self.conn = conn
        self.rail = rail
        self.away_replied = 0.0  # progress.away() at this link's last ACK/SENT
        self.link_id = msg.link_id
        self.peer_ns = msg.namespace
        self.channel = channel
        self.closed = False
        self.ns = rail.claim_namespace(self)
        self.drains = 0
        self.in_flight = 0  # slices whose receive or send is posted on this link
        self.direct_open = 0  # direct copies answered with WHERE, their DONE not yet received
        self.replies_out = 0  # replies still going out to the client (reply) ...
        self.max_replies_out = MAX_REPLIES_OUT_PER_SLOT * server.slots  # ... and past which it is dropped
        # request index -> (probe, length, bytes UCX holds for it, when)
        self.stash: dict[int, tuple[Any, int, int, float]] = {}
        self._stash_timer: asyncio.TimerHandle | None = None
        size = 4 + HEADER_ROOM + server.site.inline_limit
        self.slots = [np.zeros(size, dtype=np.uint8) for _ in range(server.slots)]
        # extent-list slices: bounded per link, per connection (its serial, never reused) and per engine
        self.staging = scatter.LinkStaging(scatter.staging_of(server.site), server.slots, conn.key[1], conn.source_key)

    @property
    def label(self) -> str:
        return f"rail {self.rail.name} <- {self.conn.name!r}"

    def arm(self, slot: int) -> None:
        if self.closed:
            return
        tag = make_tag(self.ns, KIND_CONTROL, slot)
        try:
            self.channel.recv_message(self.slots[slot], tag, lambda msg, err: self._on_header(slot, msg, err))
        except Exception as exc:
            self.server.close_link(self, f"cannot post a header receive: {_ucxx.describe_error(exc)}")

    def _on_header(self, slot: int, msg: Message | None, error: BaseException | None) -> None:
        if self.closed or self.channel.closed:
            return
        server = self.server
        if isinstance(error, ProtocolError):
            server.site.stats["protocol_errors"] += 1
            if isinstance(error, MessageTruncated):
                server.site.stats["truncated"] += 1
            server.violation(self.conn, str(error))
            return
        if error is not None:
            server.close_link(self, f"{self.label}: {_ucxx.describe_error(error)}")
            return
        assert msg is not None
        # The slot's receive is posted again right after the answer, in this same call: the
        # client reuses the slot only once it has the answer, and nothing progresses this
        # worker (or runs the sweeper) between the two calls, so its next header still finds
        # the receive (UCX matches one that came first from its unexpected queue).  Posting
        # it first put a tag_recv (15-40 us here) before every answer (issue 9).  Not so with
        # delayed submission: the progress thread submits the answer at once and the receive
        # later, so the receive goes first there (review).
        delayed = self.rail.delayed
        if delayed:
            self.arm(slot)
        try:
            if type(msg) is SliceRequest:
                server.serve(self, msg)
            elif type(msg) is ScatterRequest:
                scatter.serve(server, self, msg)
            elif type(msg) is Bind:
                self.reply(Bound(request=msg.request))
            else:
                server.site.stats["protocol_errors"] += 1
                server.violation(self.conn, f"{self.label}: unexpected {type(msg).__name__} in a header slot")
        finally:
            if not delayed:
                self.arm(slot)

    def reply(self, msg: Ack | Bound | Data | Error | Sent | Where) -> None:
        """The one reply to a header, into the receive the client posted for its request.

        A reply that cannot go out yet (the client's socket is full) is held, bytes and all,
        until it can.  An honest client has at most one reply per header slot unread (it
        reuses a slot only once it has the slot's reply), so a link with more than twice that
        many still going out belongs to a client that sends headers and does not read the
        answers: its connection is dropped (audit, issue 11: each unread header held a reply
        of up to 16 KiB, without bound).
        """
        if self.closed:
            return  # nothing goes out on a closed link (its slots are gone too)
        if self.replies_out >= self.max_replies_out:
            self.server.site.stats["protocol_errors"] += 1
            self.server.violation(
                self.conn,
                f"{self.label}: {self.replies_out} replies are still going out and the client sends more headers "
                f"(at most {MAX_REPLIES_OUT_PER_SLOT} per header slot); it does not read its replies",
            )
            return
        if self.channel.send_message(msg, make_tag(self.peer_ns, KIND_CONTROL, msg.request), self._reply_gone):
            self.replies_out += 1

    def _reply_gone(self, _error: BaseException | None) -> None:
        self.replies_out -= 1

    def away_since(self, mark: float) -> int:
        """Microseconds the loop spent on other rails since ``mark`` (a ``progress.away()``), for ACK/SENT.

        Counted from the link's previous reply when that came later: the client times a
        pipelined slice from its predecessor's completion, not from when its header arrived,
        so time before that must not be taken off its wire time twice.
        """
        now = self.rail.progress.away()
        since = max(mark, self.away_replied)
        self.away_replied = now
        return min(MAX_AWAY_US, max(0, int((now - since) * 1e6)))

    def refuse(self, request: int, reason: str, *, retry: bool = False) -> None:
        """Answer ``request`` with ``ERROR`` (the reason cut to what the client's receive holds)."""
        self.reply(Error(request=request, reason=clip_reason(reason), retry=retry))

    def violation(self, reason: str) -> None:
        """The client broke the protocol on this link: drop its whole connection (Server.violation)."""
        self.server.violation(self.conn, reason)

    def drain(self, msg: SliceRequest | ScatterRequest) -> None:
        """Let a refused WRITE's bytes arrive without keeping them (Server._drain)."""
        self.server._drain(self, msg)

    # ------------------------------------------------------- unexpected bytes

    def on_unexpected(self, probe: Any, kind: int, index: int, length: int) -> bool:
        """The rail's sweeper found a message in our namespace that no receive expected."""
        if self.closed:
            return False
        server = self.server
        if kind == KIND_DATA and len(self.stash) < len(self.slots) and index not in self.stash:
            # A WRITE's bytes overtook their header (still being dispatched): keep them for it,
            # within bounds per link and per engine.  What counts is what UCX holds meanwhile:
            # an eager message's bytes, or a rendezvous message's request only (its bytes wait
            # at the sender); counting a rendezvous message's length dropped honest peers
            # whose large slices overtook their headers (issue 11 review).
            cost = held_bytes(probe)
            held = sum(h for _p, _n, h, _w in self.stash.values())
            conn = self.conn
            source = server.stashed_by_source[conn.source_key]
            if (
                held + cost > STASH_BYTES_PER_LINK
                or conn.stashed + cost > STASH_BYTES_PER_SHARE
                or source + cost > STASH_BYTES_PER_SHARE
            ):
                server.site.stats["protocol_errors"] += 1
                server.loop_soon(
                    server.violation,
                    conn,
                    f"{self.label}: early WRITE bytes beyond the bound ({length} bytes; at most "
                    f"{STASH_BYTES_PER_LINK} per link and {STASH_BYTES_PER_SHARE} per connection and per source "
                    "address are kept for their headers)",
                )
                return False
            if server.stashed_bytes - server.stash_evicting + cost > STASH_BYTES:
                # Full: the bound falls on the source address holding the most (its connection
                # holding the most is dropped), not on a newcomer holding less: peers within their
                # bounds that kept the stash full had every honest peer whose bytes overtook a
                # header (the race the stash is for) dropped (audit, issue 11).  Each address
                # holds at most a quarter, so filling it takes four.
                def weight(c: Connection) -> tuple[int, int]:  # its address's share first, then its own
                    k = c.source_key
                    return server.stashed_by_source[k] - server.evicting_by_source[k], c.stashed

                hog = max((c for c in server.connections.values() if not c.evicting), key=weight, default=None)
                if hog is not None and (
                    hog is conn
                    or (hog.source_key == conn.source_key and hog.stashed <= conn.stashed + cost)
                    or (hog.source_key != conn.source_key and weight(hog)[0] <= source + cost)
                ):
                    hog = None  # the newcomer's address (or, within one address, its connection) holds the most
                server.site.stats["protocol_errors"] += 1
                if hog is None or not hog.stashed:
                    server.loop_soon(
                        server.violation,
                        conn,
                        f"{self.label}: early WRITE bytes beyond the engine's bound ({STASH_BYTES}), and its "
                        "address holds the most of them",
                    )
                    return False
                # Dropped a loop turn later (not from inside the drain); its bytes no longer count meanwhile.
                hog.evicting = hog.stashed
                server.stash_evicting += hog.stashed
                server.evicting_by_source[hog.source_key] += hog.stashed
                server.loop_soon(
                    server.violation,
                    hog,
                    f"rail {self.rail.name} <- {hog.name!r}: its address holds the most of the early WRITE bytes "
                    f"the engine keeps for their headers (at most {STASH_BYTES})",
                )
            self.stash[index] = (probe, length, cost, asyncio.get_running_loop().time())
            server.stashed_bytes += cost
            server.stashed_by_source[conn.source_key] += cost
            conn.stashed += cost
            server.site.stats["early_writes"] += 1
            if self._stash_timer is None:
                self._stash_timer = asyncio.get_running_loop().call_later(STASH_TTL, self._expire_stash)
            return True
        self.server.site.stats["protocol_errors"] += 1
        what = "bulk bytes no header announced" if kind == KIND_DATA else "a header no slot was free for"
        self.server.loop_soon(self.server.violation, self.conn, f"{self.label}: {what} ({length} bytes)")
        return False

    def take_stashed(self, request: int) -> tuple[Any, int] | None:
        """The early bytes of ``request``: filed under its tag's index (the request id's low bits)."""
        entry = self.stash.pop(request & TAG_INDEX_MASK, None)
        if entry is None:
            return None
        self.server.unstash(self.conn, entry[2])
        return entry[0], entry[1]

    def _expire_stash(self) -> None:
        self._stash_timer = None
        if self.closed or not self.stash:
            return
        now = asyncio.get_running_loop().time()
        if any(now - when >= STASH_TTL for _p, _n, _h, when in self.stash.values()):
            self.server.site.stats["protocol_errors"] += 1
            self.server.violation(self.conn, f"{self.label}: bulk bytes whose header never came")
            return
        oldest = min(when for _p, _n, _h, when in self.stash.values())
        self._stash_timer = asyncio.get_running_loop().call_later(STASH_TTL - (now - oldest), self._expire_stash)

    @property
    def park_key(self) -> tuple[str, str]:
        """What this link's lingering endpoint counts under on its rail: the client's source address."""
        return ("source", self.conn.source_key)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._stash_timer is not None:
            self._stash_timer.cancel()
            self._stash_timer = None
        for probe, _length, held, _when in self.stash.values():
            self.rail.discard(probe, foreign=False)
            self.server.unstash(self.conn, held)
        self.stash.clear()
        self.rail.release_namespace(self.ns)
        # Cancels the header slots and every slice in flight.  A READ's bytes still going out
        # finish first, however long the peer takes to read them: UCX's TCP transport cannot
        # close an endpoint mid-send safely (channel.py), and the peer could then crash this
        # engine by closing its side.  Counted against the peer's source address, which gets
        # no new link on this rail while MAX_PARKED_PER_KEY of its endpoints linger.
        self.channel.abort(reason, linger=True, park_key=self.park_key)
        if self.channel.lingering:
            self.staging.park()  # what its READs still send is out of the bounds for serving slices
        # 8 x 18 KiB of header slots: the channel holds those still posted until UCX gave them
        # back; ours go now, not when the garbage collector breaks the link's last cycle.
        self.slots = []


class Server:
    """The serving half of a ucx backend."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.slots = SLOTS
        self.connections: dict[int, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: dict[asyncio.Task[None], tuple[str, asyncio.StreamWriter]] = {}  # handshakes, oldest first
        self._pending_by_source: collections.Counter[str] = collections.Counter()
        self.segment_ops: collections.Counter[str] = collections.Counter()
        self._sids: dict[str, tuple[Segment, int]] = {}
        self._sid_counter = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._tiny = np.zeros(1, dtype=np.uint8)  # refused WRITEs' bytes are matched into this byte
        self.log = LogLimiter()
        self.stashed_bytes = 0  # early WRITE bytes kept for their headers, all links together ...
        self.stashed_by_source: collections.Counter[str] = collections.Counter()  # ... per source address
        self.stash_evicting = 0  # ... of those, held by connections being dropped to make room
        self.evicting_by_source: collections.Counter[str] = collections.Counter()
        self.trimmer = HeapTrimmer(asyncio.get_running_loop())
        self.verifier = cma.Verifier()  # direct copies for clients on this host (cma.py); started by start()
        self.direct_holds = 0  # direct copies answered whose segments are still held (answer_direct) ...
        self.direct_until = 0.0  # ... and the latest deadline among them
        self._no_direct_holds = asyncio.Event()  # set while direct_holds is 0 (aclose waits for it)
        self._no_direct_holds.set()
        self.closing = False  # aclose has begun: no more WHEREs

    # ============================================================ catalogue

    def register(self, seg: Segment) -> None:
        self._sids[seg.name] = (seg, next(self._sid_counter))

    def unregister(self, seg: Segment) -> None:
        entry = self._sids.get(seg.name)
        if entry is not None and entry[0] is seg:
            del self._sids[seg.name]

    def registration(self, name: str) -> tuple[Segment, int] | None:
        """The segment registered as ``name`` and its registration id (sid), if any."""
        return self._sids.get(name)

    def advert(self, name: str) -> SegmentAd | None:
        entry = self._sids.get(name)
        if entry is None or not entry[0].registered:
            return None
        seg, sid = entry
        return SegmentAd(name=seg.name, sid=sid, size=seg.size, kind=seg.kind, permission=seg.permission)

    def catalogue(self) -> tuple[SegmentAd, ...]:
        ads = (self.advert(name) for name in list(self._sids))
        return tuple(ad for ad in ads if ad is not None)

    # ============================================================== control

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept_control, host, port)
        sock = self._server.sockets[0]
        if self.site.cma:
            await self.verifier.start()
        return int(sock.getsockname()[1])

    def loop_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        asyncio.get_running_loop().call_soon(fn, *args)

    def _accept_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Before authentication nobody gets more than MAX_PENDING_HANDSHAKES sockets' worth of our
        # memory, and no source address more than MAX_PENDING_PER_SOURCE of them.  When all are
        # taken the oldest handshake makes room: an honest one takes milliseconds, so a host that
        # keeps handshakes open (slowloris) can no longer lock every new peer out (issue 11).
        peername = writer.get_extra_info("peername")
        source = source_key(str(peername[0]) if isinstance(peername, tuple) else str(peername))
        stats = self.site.stats
        if self._pending_by_source[source] >= MAX_PENDING_PER_SOURCE:
            stats["handshake_refused"] += 1
            self.log.warning(
                "pending",
                "engine %r: too many handshakes from %s in progress; closing a new one",
                self.site.engine_name,
                source,
            )
            writer.transport.abort()
            return
        if len(self._pending) >= MAX_PENDING_HANDSHAKES:
            oldest, (_source, oldest_writer) = next(iter(self._pending.items()))
            self._handshake_over(oldest)
            stats["handshake_refused"] += 1
            stats["handshakes_evicted"] += 1
            oldest_writer.transport.abort()
            oldest.cancel()
        task = asyncio.get_running_loop().create_task(self._serve_control(reader, writer, source))
        self._pending[task] = (source, writer)
        self._pending_by_source[source] += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handshake_over(self, task: asyncio.Task[None] | None) -> None:
        entry = self._pending.pop(task, None) if task is not None else None
        if entry is not None:
            self._pending_by_source[entry[0]] -= 1
            if self._pending_by_source[entry[0]] <= 0:
                del self._pending_by_source[entry[0]]

    def _refuse(self, writer: asyncio.StreamWriter, peer: str, reason: str) -> None:
        self.site.stats["handshake_refused"] += 1
        self.log.warning("refused", "engine %r refused a connection from %s: %s", self.site.engine_name, peer, reason)
        with contextlib.suppress(PeerClosedError):
            write_message(writer, Refused(reason=reason))

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str, source: str
    ) -> Connection | None:
        site = self.site
        challenge = Challenge(version=PROTOCOL_VERSION, nonce=os.urandom(NONCE_BYTES))
        write_message(writer, challenge)
        try:
            hello = await read_message(reader, limit=site.handshake_timeout, max_frame=MAX_HELLO_FRAME)
        except VersionMismatch as exc:
            forget_traceback(exc)
            self._refuse(writer, where, str(exc))
            return None
        except (ProtocolError, TimeoutError) as exc:
            forget_traceback(exc)
            self._refuse(writer, where, f"bad handshake: {exc or 'timed out'}")
            return None
        if not isinstance(hello, Hello):
            self._refuse(writer, where, f"expected HELLO, got {type(hello).__name__}")
            return None
        who = f"engine {hello.name!r} at {where}"
        secret = site.secret
        session = None
        if secret is not None:
            # Keys from the secret, both nonces and this very CHALLENGE and HELLO (control.Session).
            session = Session(secret, challenge, hello, server=True)
            if not hello.auth:
                self._refuse(writer, who, "this engine requires a shared secret; pass the same secret= to both")
                return None
            if not macs_equal(hello.auth, session.auth):
                self._refuse(writer, who, "shared secret mismatch; pass the same secret= to both engines")
                return None
        elif hello.auth:
            self._refuse(writer, who, "the client uses a shared secret but this engine has none; set both")
            return None
        if len(self.connections) >= MAX_CONNECTIONS:
            self._refuse(writer, who, f"engine {site.engine_name!r} already serves {MAX_CONNECTIONS} peers")
            return None
        if sum(1 for c in self.connections.values() if c.source_key == source) >= MAX_CONNECTIONS_PER_SOURCE:
            self._refuse(
                writer,
                who,
                f"engine {site.engine_name!r} already serves {MAX_CONNECTIONS_PER_SOURCE} peers at {source}",
            )
            return None
        conn_id = self._next_conn_id()
        peername = writer.get_extra_info("peername")
        peer_ip = str(peername[0]) if isinstance(peername, tuple) else ""
        conn = Connection(conn_id, hello.name, hello.host_id, writer, session)
        conn.source = peer_ip
        conn.source_key = source
        taken = {n for c in self.connections.values() for n in (c.name, c.label)}
        while conn.label in taken:
            # Another connected peer has this name: its notifications must not pass for this one's.
            # A random suffix, not the connection id: a client that could predict the label could
            # take it as its own name first and pass its notifications off as the other's.
            conn.label = f"{conn.name}#{secrets.token_hex(4)}"
        cma_token = b""
        control = cma.endpoints(writer)
        delayed = any(rail.delayed for rail in site.local_rails.values())  # DONE could beat its receive
        if self.verifier.name and hello.host_id == site.host_id and control is not None and not delayed:
            # It says it is on this host: let it prove that, and that it is at the other end of
            # this very connection (cma.py).
            cma_token = self.verifier.grant(conn_id, control, functools.partial(self._verified, conn))
        conn.send(self._welcome(conn_id, cma_token))
        self.connections[conn_id] = conn
        self.log.info("connected", "engine %r: %s connected (connection %d)", site.engine_name, who, conn_id)
        return conn

    def _verified(self, conn: Connection, pid: int) -> None:
        if not conn.closed:
            conn.cma_pid = pid
            self.log.info("cma", "engine %r: %r (pid %d) copies directly", self.site.engine_name, conn.name, pid)

    def _welcome(self, conn_id: int, cma_token: bytes = b"") -> Welcome:
        """WELCOME, with as much of the catalogue as fits in what a client reads before it trusts us."""
        site = self.site
        catalogue = self.catalogue()
        while True:
            welcome = Welcome(
                version=PROTOCOL_VERSION,
                name=site.engine_name,
                host_id=site.host_id,
                conn_id=conn_id,
                rails=site.rail_ads(),
                catalogue=catalogue,
                auth=b"",  # with a secret, WELCOME is sealed with the session: that authenticates it
                slots=self.slots,
                inline_limit=site.inline_limit,
                staging=scatter.share(),
                cma=self.verifier.name if cma_token else "",
                cma_token=cma_token,
            )
            # Sealing adds the 16-byte GCM tag and the SEALED wrapper's few bytes: 64 cover both.
            if not catalogue or len(encode(welcome)) + 64 <= MAX_WELCOME_FRAME:
                return welcome
            catalogue = catalogue[: len(catalogue) // 2]  # the client looks the others up

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
        site = self.site
        peername = writer.get_extra_info("peername")
        where = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn: Connection | None = None
        me = asyncio.current_task()
        try:
            conn = await self._handshake(reader, writer, where, source)
            self._handshake_over(me)
            if conn is not None:
                await self._control_loop(conn, reader, f"engine {conn.name!r} at {where}")
        except (PeerClosedError, ConnectionError) as exc:
            forget_traceback(exc)
        except ProtocolError as exc:
            forget_traceback(exc)
            site.stats["protocol_errors"] += 1
            self.log.warning(
                "malformed",
                "engine %r: dropping %s after a malformed control message: %s",
                site.engine_name,
                where,
                exc,
            )
        except Exception:
            self.log.exception("failed", "engine %r: serving %s failed", site.engine_name, where)
        finally:
            self._handshake_over(me)
            if conn is not None:
                self._drop(conn, "the client closed the control connection")
            await close_writer(writer)

    async def _control_loop(self, conn: Connection, reader: asyncio.StreamReader, who: str) -> None:
        ctx = self.site.ctx
        while True:
            msg = await read_message(reader, max_frame=MAX_CLIENT_FRAME, session=conn.session)
            if conn.closed:  # dropped meanwhile (a data-plane violation)
                return
            if conn.writer.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                raise ProtocolError(f"{who} does not read its answers ({MAX_WRITE_BUFFER} bytes queued)")
            if isinstance(msg, Lookup):
                conn.send(LookedUp(name=msg.name, segment=self.advert(msg.name)))
            elif isinstance(msg, Link):
                if not conn.may_link(asyncio.get_running_loop().time()):
                    raise ProtocolError(
                        f"{who} sets links up faster than {LINK_BURST} at once and {LINK_RATE:g} a second"
                    )
                self._link(conn, msg)
            elif isinstance(msg, Unlink):
                for link in list(conn.links.values()):
                    if link.link_id == msg.link_id:
                        self.close_link(link, f"the client closed the link: {msg.reason}", tell=False)
            elif isinstance(msg, Notify):
                if not ctx.deliver_notification(msg.message, conn.label, conn.key):
                    stats = self.site.stats
                    stats["notifications_dropped"] += 1
                    stats["protocol_errors"] += 1
                    self.log.warning(
                        "notification",
                        "engine %r: dropped a notification from %s: the application has not read the ones queued "
                        "(bounded per peer and per engine)",
                        self.site.engine_name,
                        who,
                    )
            elif isinstance(msg, Bye):
                return
            elif isinstance(msg, Refused):
                self.site.stats["handshake_refused"] += 1
                self.log.warning(
                    "refused-welcome",
                    "engine %r: %s refused our WELCOME: %s",
                    self.site.engine_name,
                    who,
                    msg.reason,
                )
                return
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} on the control connection")

    def _next_conn_id(self) -> int:
        while True:
            cid = next(self._conn_ids)
            if cid > MAX_CONN_ID:
                self._conn_ids = itertools.count(1)
                continue
            if cid not in self.connections:
                return cid

    # ================================================================ links

    def _link(self, conn: Connection, msg: Link) -> None:
        """Open (or reopen) the link on our rail ``msg.rail`` to the client's worker."""
        rail = self.site.local_rails.get(msg.rail)
        if rail is None:
            conn.send(Unlink(link_id=msg.link_id, reason=f"this engine has no rail {msg.rail!r}"))
            return
        old = conn.links.pop(rail.name, None)
        if old is not None:
            self.close_link(old, "replaced by a new link on the same rail", tell=False)
        refused = self._lingering_refusal(rail, conn)
        if refused:
            self.site.stats["links_refused_parked"] += 1
            conn.send(Unlink(link_id=msg.link_id, reason=refused))
            return
        label = f"rail {rail.name} <- {conn.name!r}"
        holder: list[ServerLink] = []
        try:
            ep = rail.connect(msg.address, conn.source)
            channel = Channel(rail, ep, label, lambda ch, reason: self._channel_closed(holder, reason))
        except Exception as exc:
            if isinstance(exc, ProtocolError):  # the client's worker address failed its check
                self.site.stats["protocol_errors"] += 1
            reason = f"cannot open an endpoint to the client's worker: {_ucxx.describe_error(exc)}"
            conn.send(Unlink(link_id=msg.link_id, reason=reason))
            return
        link = ServerLink(self, conn, rail, msg, channel)
        holder.append(link)
        conn.links[rail.name] = link
        for slot in range(len(link.slots)):
            link.arm(slot)
        if not link.closed:
            conn.send(Linked(link_id=msg.link_id, namespace=link.ns))
        logger.debug("%s: link %d up (namespace %#x)", link.label, link.link_id, link.ns)

    def _lingering_refusal(self, rail: LocalRail, conn: Connection) -> str:
        """Why no new link on ``rail`` for ``conn`` while endpoints of closed links linger, or "".

        A lingering endpoint holds a READ's bytes (staging, or a segment kept
        busy) that its peer asked for and has not read; closing it mid-send
        could crash this engine (channel.py), so it stays until the peer reads
        or goes.  A source with ``MAX_PARKED_PER_KEY`` lingering gets no new
        link on the rail.  For all sources together no new link is set up on
        the rail at all while ``MAX_LINGERING`` linger on it, each source
        counted up to its own bound: one address, however many links it had up
        before it stopped reading, cannot shut the rail to everyone else (audit,
        issue 11); that takes ``MAX_LINGERING / MAX_PARKED_PER_KEY`` addresses.
        Links already up go on.  Parked staging is bounded where it is taken
        (``LinkStaging.take``), not by refusing links.
        """
        lingering = rail.parked_by[("source", conn.source_key)]
        if lingering >= MAX_PARKED_PER_KEY:
            return (
                f"{lingering} endpoints of earlier links from {conn.source} on rail {rail.name!r} still wait "
                "for it to read what it asked for; read them or disconnect"
            )
        total = sum(min(n, MAX_PARKED_PER_KEY) for n in rail.parked_by.values())
        if total >= MAX_LINGERING:
            return (
                f"engine {self.site.engine_name!r} holds endpoints on rail {rail.name!r} for peers at "
                f"{len(rail.parked_by)} addresses that stopped reading what they asked for; no new link on it "
                "until they read or go"
            )
        return ""

    def _channel_closed(self, holder: list[ServerLink], reason: str) -> None:
        if holder and not holder[0].closed:
            self.close_link(holder[0], reason)

    def close_link(self, link: ServerLink, reason: str, *, tell: bool = True) -> None:
        if link.closed:
            return
        conn = link.conn
        if conn.links.get(link.rail.name) is link:
            del conn.links[link.rail.name]
        link.close(reason)
        logger.debug("%s: link %d closed: %s", link.label, link.link_id, reason)
        if tell and not conn.closed:
            with contextlib.suppress(PeerClosedError):
                conn.send(Unlink(link_id=link.link_id, reason=reason))

    def violation(self, conn: Connection, reason: str) -> None:
        """A protocol violation on the data plane: drop the whole connection."""
        if conn.closed:
            return
        self.log.warning(
            "violation",
            "engine %r: dropping the connection of %r after a protocol violation: %s",
            self.site.engine_name,
            conn.name,
            reason,
        )
        with contextlib.suppress(PeerClosedError):
            conn.send(Bye(reason=f"protocol violation: {reason}"))
        self._drop(conn, f"protocol violation: {reason}")
        conn.writer.close()  # ends its control loop

    def unstash(self, conn: Connection, held: int) -> None:
        """Early WRITE bytes ``conn`` kept are no longer kept (taken by their header, or discarded)."""
        self.stashed_bytes -= held
        conn.stashed -= held
        left = self.stashed_by_source[conn.source_key] - held
        if left > 0:
            self.stashed_by_source[conn.source_key] = left
        else:
            del self.stashed_by_source[conn.source_key]

    def _drop(self, conn: Connection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.pop(conn.conn_id, None)
        self.verifier.revoke(conn.conn_id)
        for link in list(conn.links.values()):
            self.close_link(link, reason, tell=False)
        conn.links.clear()
        if conn.evicting:  # dropped to make room in the stash: its bytes were discarded just now
            self.stash_evicting -= conn.evicting
            left = self.evicting_by_source[conn.source_key] - conn.evicting
            if left > 0:
                self.evicting_by_source[conn.source_key] = left
            else:
                del self.evicting_by_source[conn.source_key]
            conn.evicting = 0
        self.trimmer.soon()  # its endpoints, slots and early bytes are freed: give the pages back

    # ================================================================= data

    def _check(self, msg: SliceRequest) -> tuple[Segment | None, str]:
        """The segment a request may touch, or the reason it may not."""
        entry = self._sids.get(msg.segment)
        if entry is None or not entry[0].registered:
            return None, f"unknown segment {msg.segment!r} (not registered on engine {self.site.engine_name!r})"
        seg, sid = entry
        if sid != msg.sid:
            return None, (
                f"segment {msg.segment!r} was registered again since it was looked up; "
                "look it up again with peer.segment()"
            )
        if msg.op is Op.WRITE and (seg.permission != "rw" or seg.memory.readonly):
            return None, f"segment {msg.segment!r} is read-only (permission {seg.permission!r}); WRITE refused"
        if msg.length <= 0:
            return None, f"length must be positive, got {msg.length}"
        if msg.length > self.site.max_request:
            return None, f"{msg.length} bytes exceed the per-slice limit of {self.site.max_request}"
        if msg.offset + msg.length > seg.size:
            return None, (
                f"[{msg.offset}:{msg.offset + msg.length}] is outside segment {msg.segment!r} of {seg.size} bytes"
            )
        inline = msg.payload is not None or msg.inline
        if inline and (seg.memory.is_cuda or msg.length > self.site.inline_limit):
            return None, f"inline slices are for host memory up to {self.site.inline_limit} bytes"
        if msg.cma and seg.memory.is_cuda:
            return None, "direct copies are for host memory; this segment is GPU memory"
        return seg, ""

    def serve(self, link: ServerLink, msg: SliceRequest) -> None:
        mark = link.rail.progress.away()  # the header arrived now; ACK/SENT say how long we were elsewhere
        seg, reason = self._check(msg)
        stats = self.site.stats
        ch = link.channel
        conn = link.conn
        if seg is not None and link.in_flight >= len(link.slots):
            # An honest client reuses a header slot only after that slice's reply, so it never has
            # more slices in flight than slots; a client that does could keep any number of
            # receives posted (about 3 KB of UCX state each, and the segment busy) (issue 11).
            stats["protocol_errors"] += 1
            seg, reason = None, f"more than {len(link.slots)} slices in flight on this link"
        if seg is None:
            stats["rejected"] += 1
            self.log.warning(
                "rejected",
                "engine %r refused %s of %d bytes at %d in %r from %r: %s",
                self.site.engine_name,
                msg.op.name,
                msg.length,
                msg.offset,
                msg.segment,
                conn.name,
                reason,
            )
            link.refuse(msg.request, reason)
            if msg.op is Op.WRITE and msg.payload is None and not msg.cma:  # (a direct copy sends no bytes)
                self._drain(link, msg)
            return
        if msg.cma:
            self.answer_direct(link, msg.request, [seg], msg.op, msg.length, mark)
            return
        view = seg.memory.array[msg.offset : msg.offset + msg.length]
        if msg.op is Op.WRITE:
            if msg.payload is not None:
                np.copyto(view, np.frombuffer(msg.payload, dtype=np.uint8))
                stats["served_write"] += 1
                stats["bytes_written"] += msg.length
                link.reply(Ack(request=msg.request))
                return
            stashed = link.take_stashed(msg.request)
            if stashed is not None and stashed[1] != msg.length:
                stats["rejected"] += 1
                link.rail.discard(stashed[0], foreign=False)
                link.refuse(msg.request, f"WRITE announced {msg.length} bytes but {stashed[1]} were sent")
                return
            self._begin(link, seg)
            try:
                if stashed is not None:
                    req = ch.recv_with_handle(view, stashed[0])
                else:
                    req = ch.tag_recv(view, make_tag(link.ns, KIND_DATA, msg.request), bulk=True)
            except Exception as exc:
                self._end(link, seg)
                link.refuse(msg.request, f"cannot receive: {_ucxx.describe_error(exc)}")
                return
            ch.keep(req, (view, seg), self._after_recv(link, seg, msg, mark))
            return
        # READ
        if msg.inline:
            stats["served_read"] += 1
            stats["bytes_read"] += msg.length
            link.reply(Data(request=msg.request, payload=view.tobytes()))
            return
        self._begin(link, seg)
        try:
            req = ch.tag_send(view, make_tag(link.peer_ns, KIND_DATA, msg.request))
        except Exception as exc:
            self._end(link, seg)
            link.refuse(msg.request, f"cannot send: {_ucxx.describe_error(exc)}")
            return
        ch.keep(req, (view, seg), self._after_send(link, seg, msg, mark), send=True)

    def answer_direct(
        self, link: ServerLink, request: int, segs: Sequence[Segment], op: Op, nbytes: int, mark: float
    ) -> None:
        """Answer a checked direct-copy header with WHERE; ``segs`` stay busy until its DONE (cma.py).

        Only on a shared-memory link of a connection that proved it shares our host
        and user; anything else asking is a protocol violation.  A link whose DONE
        receives are cancelled (it closed) keeps the segments busy until WHERE's
        deadline plus ``cma.MARGIN``: the client may have started its copy just
        before.  A client that leaves a DONE out for ``DONE_WAIT`` seconds, or has
        more than ``MAX_DIRECT_PER_SLOT`` per header slot open, is dropped.
        """
        stats = self.site.stats
        if self.closing:  # no new copies while closing (aclose waits for the ones answered)
            link.refuse(request, f"engine {self.site.engine_name!r} is closing", retry=True)
            return
        why = ""
        if link.conn.cma_pid is None:
            why = "a direct copy asked for by a client that did not prove it shares our host"
        elif link.rail.plan.kind != "shm":
            why = f"a direct copy asked for on a {link.rail.plan.kind} rail (shared-memory rails only)"
        elif link.direct_open >= MAX_DIRECT_PER_SLOT * len(link.slots):
            why = f"{link.direct_open} direct copies and no DONE for them"
        if why:
            stats["protocol_errors"] += 1
            link.violation(f"{link.label}: {why}")
            return
        until = time.monotonic() + cma.VALID_FOR
        said = np.full(1, 0xFF, dtype=np.uint8)  # DONE's byte: 1 copied, 0 withdrawn before the copy
        try:
            req = link.channel.tag_recv(said, make_tag(link.ns, KIND_DATA, request))
        except Exception as exc:
            link.refuse(request, f"cannot receive: {_ucxx.describe_error(exc)}")
            return
        ops = self.segment_ops
        for seg in segs:
            ops[seg.name] += 1
        link.direct_open += 1
        self.direct_holds += 1
        self._no_direct_holds.clear()
        self.direct_until = max(self.direct_until, until)
        loop = asyncio.get_running_loop()

        def release() -> None:
            self.direct_holds -= 1
            if not self.direct_holds:
                self._no_direct_holds.set()
            for seg in segs:
                ops[seg.name] -= 1
                if ops[seg.name] <= 0:
                    del ops[seg.name]

        def overdue() -> None:
            if not link.closed:
                stats["protocol_errors"] += 1
                link.violation(f"{link.label}: no DONE for direct copy {request} within {DONE_WAIT:g} s")

        watch = loop.call_later(DONE_WAIT, overdue)

        def done(error: BaseException | None) -> None:
            watch.cancel()
            link.direct_open -= 1
            if error is None:
                if said[0] == 1:
                    stats["served_write" if op is Op.WRITE else "served_read"] += 1
                    stats["bytes_written" if op is Op.WRITE else "bytes_read"] += nbytes
                release()
            else:  # the link closed (or a wrong message): the client's copy may still be running
                loop.call_later(max(0.0, until + cma.MARGIN - time.monotonic()), release)

        link.channel.keep(req, said, done)
        stats["cma_slices"] += 1
        bases = tuple(seg.memory.address for seg in segs)
        link.reply(Where(request=request, bases=bases, until=until, away=link.away_since(mark)))

    def _begin(self, link: ServerLink, seg: Segment) -> None:
        link.in_flight += 1
        self.segment_ops[seg.name] += 1

    def _end(self, link: ServerLink, seg: Segment) -> None:
        link.in_flight -= 1
        self.segment_ops[seg.name] -= 1
        if self.segment_ops[seg.name] <= 0:
            del self.segment_ops[seg.name]

    def _after_recv(
        self, link: ServerLink, seg: Segment, msg: SliceRequest, mark: float
    ) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            self._end(link, seg)
            if error is None and not link.closed:
                self.site.stats["served_write"] += 1
                self.site.stats["bytes_written"] += msg.length
                link.reply(Ack(request=msg.request, away=link.away_since(mark)))
            elif error is not None and not link.closed:
                link.refuse(msg.request, f"receive failed: {_ucxx.describe_error(error)}")

        return done

    def _after_send(
        self, link: ServerLink, seg: Segment, msg: SliceRequest, mark: float
    ) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            self._end(link, seg)
            if link.closed:
                return
            if error is None:
                self.site.stats["served_read"] += 1
                self.site.stats["bytes_read"] += msg.length
                end = msg.offset + msg.length
                tail = seg.memory.array[end - min(TAIL_BYTES, msg.length) : end]
                away = link.away_since(mark)
                link.reply(Sent(request=msg.request, length=msg.length, tail=_host_bytes(tail), away=away))
            else:
                link.refuse(msg.request, f"send failed: {_ucxx.describe_error(error)}")

        return done

    def _drain(self, link: ServerLink, msg: SliceRequest | ScatterRequest) -> None:
        """Let a refused WRITE's bytes arrive without keeping them: matched into one byte, UCX drops them."""
        stashed = link.take_stashed(msg.request)
        if stashed is not None:
            link.rail.discard(stashed[0], foreign=False)
            return
        if link.drains >= MAX_DRAINS:
            self.close_link(link, f"more than {MAX_DRAINS} refused WRITEs whose bytes never came")
            return
        try:
            req = link.channel.tag_recv(self._tiny, make_tag(link.ns, KIND_DATA, msg.request))
        except Exception:
            self.close_link(link, "refused WRITE cannot be drained")
            return
        link.drains += 1

        def drained(_error: BaseException | None) -> None:
            link.drains -= 1

        link.channel.keep(req, self._tiny, drained)

    # ============================================================== closing

    async def _await_direct_copies(self) -> None:
        """Closing: let the direct copies answered with WHERE end before the application may free
        their segments.  No WHERE is answered once ``closing`` is set, and a client copies only
        before a WHERE's deadline, so this waits at most until the latest deadline plus
        ``cma.MARGIN`` (usually not at all: DONE follows WHERE at once)."""
        left = self.direct_until + cma.MARGIN - time.monotonic()
        if self.direct_holds > 0 and left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_direct_holds.wait(), left)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.verifier.aclose()
        self.closing = True
        await self._await_direct_copies()  # their DONEs, while the links are still up
        for conn in list(self.connections.values()):
            with contextlib.suppress(PeerClosedError):
                conn.send(Bye(reason="engine closing"))
            self._drop(conn, "engine closing")
        await self._await_direct_copies()  # those whose links just closed: their deadline and margin
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
