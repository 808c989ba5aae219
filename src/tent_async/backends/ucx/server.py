"""Serving peers: the handshake, segment look-ups, and inbound slice requests.

A listening engine accepts control connections on its ``listen`` address and
data endpoints on each rail's listener.  A data endpoint must first say which
connection it belongs to (``BIND`` with the connection's token); after that
every slice header is checked **before** any byte moves:

* the segment is registered and is the registration the client looked up;
* WRITE needs permission ``"rw"`` (and writable memory); nothing is ever
  received into a read-only segment;
* ``0 <= offset``, ``0 < length <= max_request``, ``offset + length <= size``;
* a WRITE's tag is in the connection's own tag namespace.

A violation is answered with ``ERROR`` (the reason), counted in
``backend.stats["rejected"]``, logged, and never writes a byte.  The rejected
WRITE's data is still on its way (a send cannot be cancelled); it is drained
into scratch memory so that the client's send completes, or, if it is too
large or in a foreign tag namespace, the endpoint is closed, which stops it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import PeerClosedError, ProtocolError
from ...segments import Segment
from . import _ucxx
from .channel import Channel
from .control import close_writer, mac, macs_equal, read_message, write_message
from .protocol import (
    MAX_INLINE,
    MAX_NAMESPACE,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    TOKEN_BYTES,
    Ack,
    Bind,
    Bound,
    Bye,
    Challenge,
    Data,
    Error,
    Hello,
    LookedUp,
    Lookup,
    Message,
    Notify,
    Op,
    Refused,
    SegmentAd,
    SliceRequest,
    VersionMismatch,
    Welcome,
    make_tag,
)
from .rails import LocalRail

if TYPE_CHECKING:
    from .backend import UcxBackend

logger = logging.getLogger("tent_async.ucx")

MAX_DRAINS = 4  # rejected WRITEs being drained at once per endpoint; more closes the endpoint
BIND_TIMEOUT = 10.0


class Connection:
    """One client engine connected to us: its control stream and its data endpoints."""

    def __init__(self, conn_id: int, token: bytes, name: str, host_id: str, writer: asyncio.StreamWriter) -> None:
        self.conn_id = conn_id
        self.token = token
        self.name = name
        self.host_id = host_id
        self.writer = writer
        self.channels: set[Channel] = set()
        self.closed = False


class _Binding:
    """Server-side state of one data endpoint."""

    __slots__ = ("conn", "drains", "early", "ops")

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.early: list[Message] = []  # requests that overtook the BIND (see Channel: stale receives)
        self.drains = 0
        self.ops = 0


class Server:
    """The serving half of a ucx backend."""

    def __init__(self, backend: UcxBackend) -> None:
        self.backend = backend
        self.connections: dict[int, Connection] = {}
        self._conn_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._unbound: set[Channel] = set()
        self.segment_ops: collections.Counter[str] = collections.Counter()
        self._sids: dict[str, tuple[Segment, int]] = {}
        self._sid_counter = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None

    # ============================================================ catalogue

    def register(self, seg: Segment) -> None:
        self._sids[seg.name] = (seg, next(self._sid_counter))

    def unregister(self, seg: Segment) -> None:
        entry = self._sids.get(seg.name)
        if entry is not None and entry[0] is seg:
            del self._sids[seg.name]

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
        return int(sock.getsockname()[1])

    def _accept_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve_control(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refuse(self, writer: asyncio.StreamWriter, peer: str, reason: str) -> None:
        self.backend.stats["handshake_refused"] += 1
        logger.warning("engine %r refused a connection from %s: %s", self.backend.engine_name, peer, reason)
        with contextlib.suppress(PeerClosedError):
            write_message(writer, Refused(reason=reason))

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self.backend
        peername = writer.get_extra_info("peername")
        where = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn: Connection | None = None
        try:
            nonce = os.urandom(NONCE_BYTES)
            write_message(writer, Challenge(version=PROTOCOL_VERSION, nonce=nonce))
            try:
                hello = await read_message(reader, limit=backend.handshake_timeout)
            except VersionMismatch as exc:
                self._refuse(writer, where, str(exc))
                return
            except (ProtocolError, TimeoutError) as exc:
                self._refuse(writer, where, f"bad handshake: {exc or 'timed out'}")
                return
            if not isinstance(hello, Hello):
                self._refuse(writer, where, f"expected HELLO, got {type(hello).__name__}")
                return
            who = f"engine {hello.name!r} at {where}"
            secret = backend.secret
            if secret is not None:
                expected = mac(secret, b"hello", nonce, hello.nonce, hello.name)
                if not hello.auth:
                    self._refuse(writer, who, "this engine requires a shared secret; pass the same secret= to both")
                    return
                if not macs_equal(hello.auth, expected):
                    self._refuse(writer, who, "shared secret mismatch; pass the same secret= to both engines")
                    return
            elif hello.auth:
                self._refuse(writer, who, "the client uses a shared secret but this engine has none; set both")
                return
            conn_id = self._next_conn_id()
            token = os.urandom(TOKEN_BYTES)
            auth = mac(secret, b"welcome", hello.nonce, nonce, backend.engine_name, conn_id) if secret else b""
            conn = Connection(conn_id, token, hello.name, hello.host_id, writer)
            self.connections[conn_id] = conn
            write_message(
                writer,
                Welcome(
                    version=PROTOCOL_VERSION,
                    name=backend.engine_name,
                    host_id=backend.host_id,
                    conn_id=conn_id,
                    token=token,
                    rails=backend.rail_ads(),
                    catalogue=self.catalogue(),
                    auth=auth,
                ),
            )
            logger.info("engine %r: %s connected (connection %d)", backend.engine_name, who, conn_id)
            await self._control_loop(conn, reader, who)
        except (PeerClosedError, ConnectionError):
            pass
        except ProtocolError as exc:
            backend.stats["protocol_errors"] += 1
            logger.warning(
                "engine %r: dropping %s after a malformed control message: %s", backend.engine_name, where, exc
            )
        except Exception:
            logger.exception("engine %r: serving %s failed", backend.engine_name, where)
        finally:
            if conn is not None:
                self._drop(conn, "the client closed the control connection")
            await close_writer(writer)

    async def _control_loop(self, conn: Connection, reader: asyncio.StreamReader, who: str) -> None:
        ctx = self.backend.ctx
        while True:
            msg = await read_message(reader)
            if isinstance(msg, Lookup):
                write_message(conn.writer, LookedUp(name=msg.name, segment=self.advert(msg.name)))
            elif isinstance(msg, Notify):
                ctx.deliver_notification(msg.message, conn.name)
            elif isinstance(msg, Bye):
                return
            elif isinstance(msg, Refused):
                self.backend.stats["handshake_refused"] += 1
                logger.warning("engine %r: %s refused our WELCOME: %s", self.backend.engine_name, who, msg.reason)
                return
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} on the control connection")

    def _next_conn_id(self) -> int:
        while True:
            cid = next(self._conn_ids)
            if cid > MAX_NAMESPACE:
                self._conn_ids = itertools.count(1)
                continue
            if cid not in self.connections:
                return cid

    def _drop(self, conn: Connection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.pop(conn.conn_id, None)
        for ch in list(conn.channels):
            # Retire, not close: the client closes its side (which cancels the receives
            # posted for it), and closing ours would let UCX recycle the handle.
            ch.retire(reason)
        conn.channels.clear()

    # ================================================================= data

    def accept(self, rail: LocalRail, ep: Any) -> None:
        """A peer opened a data endpoint to one of our rails; it must BIND first."""
        ch = Channel(rail, ep, f"rail {rail.name} (inbound)", self._on_message, self._on_close, self._on_bad)
        logger.debug("%s: accepted endpoint %#x", ch.label, ep.handle)
        ch.state = _Binding()
        self._unbound.add(ch)
        loop = asyncio.get_running_loop()
        loop.call_later(BIND_TIMEOUT, self._bind_timeout, ch)

    def _bind_timeout(self, ch: Channel) -> None:
        if ch in self._unbound and not ch.closed:
            self._unbound.discard(ch)
            ch.retire("no BIND within the timeout")

    def _on_bad(self, ch: Channel, exc: ProtocolError) -> None:
        self.backend.stats["protocol_errors"] += 1

    def _on_close(self, ch: Channel, reason: str) -> None:
        self._unbound.discard(ch)
        binding: _Binding = ch.state
        if binding.conn is not None:
            binding.conn.channels.discard(ch)
        logger.debug("%s closed: %s", ch.label, reason)

    def _on_message(self, ch: Channel, msg: Message) -> None:
        binding: _Binding = ch.state
        if isinstance(msg, SliceRequest) and binding.conn is not None:
            self._serve(ch, binding, binding.conn, msg)
        elif isinstance(msg, SliceRequest) and len(binding.early) < 64:
            binding.early.append(msg)
        elif isinstance(msg, Bind) and binding.conn is None:
            conn = self.connections.get(msg.conn_id)
            if conn is None or conn.closed or not macs_equal(conn.token, msg.token) or msg.rail != ch.rail.name:
                self.backend.stats["rejected"] += 1
                logger.warning("%s: refusing a BIND for unknown connection %d", ch.label, msg.conn_id)
                ch.abort("bad BIND")
                return
            binding.conn = conn
            self._unbound.discard(ch)
            conn.channels.add(ch)
            ch.label = f"rail {ch.rail.name} <- {conn.name!r}"
            ch.send(Bound(rail=ch.rail.name))
            early, binding.early = binding.early, []
            for request in early:
                self._on_message(ch, request)
        else:
            self.backend.stats["protocol_errors"] += 1
            logger.warning("%s: unexpected %s; closing the endpoint", ch.label, type(msg).__name__)
            ch.abort(f"unexpected {type(msg).__name__}")

    def _check(self, conn: Connection, msg: SliceRequest) -> tuple[Segment | None, str]:
        """The segment a request may touch, or the reason it may not."""
        entry = self._sids.get(msg.segment)
        if entry is None or not entry[0].registered:
            return None, f"unknown segment {msg.segment!r} (not registered on engine {self.backend.engine_name!r})"
        seg, sid = entry
        if sid != msg.sid:
            return None, (
                f"segment {msg.segment!r} was registered again since it was looked up; "
                "look it up again with peer.segment()"
            )
        if msg.op is Op.WRITE:
            if seg.permission != "rw" or seg.memory.readonly:
                return None, f"segment {msg.segment!r} is read-only (permission {seg.permission!r}); WRITE refused"
            if msg.tag != make_tag(conn.conn_id, msg.request):
                return None, "WRITE tag outside the connection's namespace"
        if msg.length <= 0:
            return None, f"length must be positive, got {msg.length}"
        if msg.length > self.backend.max_request:
            return None, f"{msg.length} bytes exceed the per-slice limit of {self.backend.max_request}"
        if msg.offset + msg.length > seg.size:
            return None, (
                f"[{msg.offset}:{msg.offset + msg.length}] is outside segment {msg.segment!r} of {seg.size} bytes"
            )
        inline = msg.payload is not None or msg.inline
        if inline and (seg.memory.is_cuda or msg.length > MAX_INLINE):
            return None, "inline slices are for host memory up to 1 MiB"
        return seg, ""

    def _serve(self, ch: Channel, binding: _Binding, conn: Connection, msg: SliceRequest) -> None:
        seg, reason = self._check(conn, msg)
        stats = self.backend.stats
        if seg is None:
            stats["rejected"] += 1
            logger.warning(
                "engine %r refused %s of %d bytes at %d in %r from %r: %s",
                self.backend.engine_name,
                msg.op.name,
                msg.length,
                msg.offset,
                msg.segment,
                conn.name,
                reason,
            )
            ch.send(Error(request=msg.request, reason=reason))
            if msg.op is Op.WRITE and msg.payload is None:
                self._drain(ch, binding, conn, msg)
            return
        view = seg.memory.array[msg.offset : msg.offset + msg.length]
        if msg.op is Op.WRITE:
            if msg.payload is not None:
                np.copyto(view, np.frombuffer(msg.payload, dtype=np.uint8))
                stats["served_write"] += 1
                stats["bytes_written"] += msg.length
                ch.send(Ack(request=msg.request))
                return
            self._begin(seg, binding)
            try:
                req = ch.tag_recv(view, msg.tag)
            except Exception as exc:
                self._end(seg, binding)
                ch.send(Error(request=msg.request, reason=f"cannot receive: {_ucxx.describe_error(exc)}"))
                return
            ch.keep(req, (view, seg), self._after_recv(ch, binding, seg, msg))
            return
        # READ
        if msg.inline:
            stats["served_read"] += 1
            stats["bytes_read"] += msg.length
            ch.send(Data(request=msg.request, payload=view.tobytes()))
            return
        self._begin(seg, binding)
        try:
            req = ch.tag_send(view, msg.tag)
        except Exception as exc:
            self._end(seg, binding)
            ch.send(Error(request=msg.request, reason=f"cannot send: {_ucxx.describe_error(exc)}"))
            return
        ch.keep(req, (view, seg), self._after_send(binding, seg, msg))

    def _begin(self, seg: Segment, binding: _Binding) -> None:
        self.segment_ops[seg.name] += 1
        binding.ops += 1

    def _end(self, seg: Segment, binding: _Binding) -> None:
        self.segment_ops[seg.name] -= 1
        if self.segment_ops[seg.name] <= 0:
            del self.segment_ops[seg.name]
        binding.ops -= 1

    def _after_recv(
        self, ch: Channel, binding: _Binding, seg: Segment, msg: SliceRequest
    ) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            self._end(seg, binding)
            if error is None and not ch.closed:
                self.backend.stats["served_write"] += 1
                self.backend.stats["bytes_written"] += msg.length
                ch.send(Ack(request=msg.request))
            elif error is not None:
                logger.debug("%s: receive of request %d ended: %s", ch.label, msg.request, error)

        return done

    def _after_send(self, binding: _Binding, seg: Segment, msg: SliceRequest) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            self._end(seg, binding)
            if error is None:
                self.backend.stats["served_read"] += 1
                self.backend.stats["bytes_read"] += msg.length

        return done

    def _drain(self, ch: Channel, binding: _Binding, conn: Connection, msg: SliceRequest) -> None:
        """Receive a refused WRITE's bytes into scratch memory so the client's send completes."""
        if (
            msg.tag != make_tag(conn.conn_id, msg.request)
            or msg.length > self.backend.drain_limit
            or binding.drains >= MAX_DRAINS
        ):
            ch.abort("refused WRITE cannot be drained")
            return
        scratch = np.empty(msg.length, dtype=np.uint8)
        binding.drains += 1
        try:
            req = ch.tag_recv(scratch, msg.tag)
        except Exception:
            binding.drains -= 1
            ch.abort("refused WRITE cannot be drained")
            return

        def drained(_error: BaseException | None) -> None:
            binding.drains -= 1

        ch.keep(req, scratch, drained)

    # ============================================================== closing

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections.values()):
            with contextlib.suppress(PeerClosedError):
                write_message(conn.writer, Bye(reason="engine closing"))
            self._drop(conn, "engine closing")
        for ch in list(self._unbound):
            ch.retire("engine closing")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
