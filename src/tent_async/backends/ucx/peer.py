"""The connecting half: a :class:`Peer`, its rails (:class:`Link`) and slices in flight.

``await engine.connect("host:port")`` runs the handshake, pairs our rails
with the peer's (:mod:`.pairing`), adds one engine rail per pair to the
planner (``"decode-0/nic0"``) and returns a :class:`Peer`.  Each engine rail
is a :class:`Link`: our rail's worker, an endpoint to the peer's rail
listener (opened lazily, re-opened after a failure), and the slices in flight
on it.

Slices (one planner attempt each), emulating one-sided operations with tags:

* WRITE, small: the header carries the bytes; the peer copies them and ACKs.
* WRITE: header, then a tagged send of the source view; the peer checks the
  header, posts a receive into the destination at the right offset, and ACKs
  once the receive completed (a completed send proves nothing).
* READ, small: the peer answers with the bytes (``DATA``).
* READ: we post a receive into our destination view, then send the header; the
  peer checks it and sends the source view with our tag.

An attempt is reported only when every UCX request of it has completed (or was
cancelled) and its outcome is known, so its buffers are never released early.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ...core import Attempt
from ...errors import PeerClosedError, ProtocolError, RemoteAccessError, TentError, UnregisteredSegmentError
from ...segments import Permission, RemoteSegment, Segment
from . import _ucxx
from .channel import Channel
from .control import close_writer, read_message, write_message
from .pairing import Pair
from .protocol import (
    MAX_NAMESPACE,
    Ack,
    Bind,
    Bound,
    Bye,
    Data,
    Error,
    LookedUp,
    Lookup,
    Message,
    Op,
    SegmentAd,
    SliceRequest,
    Welcome,
    encode,
    make_tag,
)
from .rails import LocalRail

if TYPE_CHECKING:
    from .backend import UcxBackend

logger = logging.getLogger("tent_async.ucx")

_ids = itertools.count(1)


class RailLinkError(TentError):
    """A slice failed because the rail's endpoint to the peer failed."""


class _Op:
    """One attempt in flight on a link."""

    __slots__ = (
        "attempt",
        "buffer",
        "channel",
        "error",
        "fatal",
        "fence_at",
        "kind",
        "link",
        "pending",
        "recv_req",
        "reply",
        "t_post",
        "withdrawing",
    )

    def __init__(self, attempt: Attempt, link: Link, channel: Channel, kind: Op, t_post: float) -> None:
        self.attempt = attempt
        self.link = link
        self.channel = channel
        self.buffer: Any = None  # memory a READ's receive writes into, held until it is done
        self.kind = kind
        self.t_post = t_post
        self.pending = 0  # UCX requests of this op not completed yet
        self.recv_req: Any = None  # a READ's receive, dropped to cancel it
        self.reply: bool = False  # success known (ACK, DATA copied, or receive completed)
        self.fatal: str | None = None  # the peer refused the slice
        self.error: str | None = None  # a UCX request failed
        self.withdrawing = False
        self.fence_at = 0.0  # when a withdrawn op still in flight gets its endpoint closed


class Link:
    """One engine rail: our local rail paired with one of the peer's rails."""

    def __init__(self, peer: Peer, pair: Pair, rail: LocalRail, name: str) -> None:
        self.peer = peer
        self.pair = pair
        self.rail = rail
        self.name = name
        self.channel: Channel | None = None
        self.ops: dict[int, _Op] = {}
        self.last_done = 0.0
        self._fence: asyncio.TimerHandle | None = None
        self.reconnects = 0
        self.bound: asyncio.Future[None] | None = None  # the first endpoint's BOUND, awaited by connect()

    # ----------------------------------------------------------- connecting

    def channel_for_post(self) -> Channel:
        ch = self.channel
        if ch is None or ch.closed:
            ch = self._open()
        return ch

    def open(self) -> asyncio.Future[None]:
        """Open the endpoint now; the future resolves when the peer accepted it (BOUND)."""
        self.bound = asyncio.get_running_loop().create_future()
        self._open()
        return self.bound

    def _open(self) -> Channel:
        peer = self.peer
        try:
            ep = self.rail.connect(self.pair.dial, self.pair.remote.port)
        except Exception as exc:
            raise RailLinkError(
                f"rail {self.name}: cannot open an endpoint to {self.pair.dial}:{self.pair.remote.port}: "
                f"{_ucxx.describe_error(exc)}"
            ) from exc
        ch = Channel(self.rail, ep, f"rail {self.name}", self._on_message, self._on_close, self._on_bad)
        ch.state = self
        if self.channel is not None:
            self.reconnects += 1
        self.channel = ch
        ch.send(Bind(conn_id=peer.conn_id, token=peer.token, rail=self.pair.remote.name))
        return ch

    # ------------------------------------------------------------ messages

    def _on_bad(self, ch: Channel, exc: ProtocolError) -> None:
        self.peer.backend.stats["protocol_errors"] += 1

    def _on_message(self, ch: Channel, msg: Message) -> None:
        if isinstance(msg, Bound):
            if self.bound is not None and not self.bound.done():
                self.bound.set_result(None)
        elif isinstance(msg, Ack):
            op = self.ops.get(msg.request)
            if op is not None:
                op.reply = True
                self._settle(op)
        elif isinstance(msg, Error):
            op = self.ops.get(msg.request)
            if op is not None:
                op.fatal = msg.reason
                if op.recv_req is not None:
                    op.recv_req = None  # the last reference: ucxx cancels the posted receive
                self._settle(op)
        elif isinstance(msg, Data):
            op = self.ops.get(msg.request)
            if op is not None:
                a = op.attempt
                if not op.withdrawing and len(msg.payload) == a.length:
                    dst: Segment = a.dst  # type: ignore[assignment]
                    view = dst.memory.array[a.dst_offset : a.dst_offset + a.length]
                    np.copyto(view, np.frombuffer(msg.payload, dtype=np.uint8))
                    op.reply = True
                elif len(msg.payload) != a.length:
                    op.error = f"DATA of {len(msg.payload)} bytes for a {a.length}-byte READ"
                self._settle(op)
        else:
            self.peer.backend.stats["protocol_errors"] += 1
            logger.warning("rail %s: unexpected %s from the peer; closing the endpoint", self.name, type(msg).__name__)
            ch.abort(f"unexpected {type(msg).__name__}")

    def _on_close(self, ch: Channel, reason: str) -> None:
        if self.bound is not None and not self.bound.done():
            self.bound.set_exception(RailLinkError(reason))
        for op in list(self.ops.values()):
            if op.channel is not ch:
                continue
            if op.error is None:
                op.error = reason
            self._settle(op)

    # --------------------------------------------------------------- slices

    def post(self, a: Attempt, now: float) -> None:
        backend = self.peer.backend
        ch = self.channel_for_post()
        src, dst = a.src, a.dst
        limit = backend.inline_limit
        if isinstance(dst, RemoteSegment):  # WRITE
            local: Segment = src  # type: ignore[assignment]
            view = local.memory.array[a.src_offset : a.src_offset + a.length]
            _check_contiguous(view)
            tag = make_tag(self.peer.conn_id, a.id)
            host = not local.memory.is_cuda
            op = _Op(a, self, ch, Op.WRITE, now)
            self.ops[a.id] = op
            if host and a.length <= limit:
                ch.send(SliceRequest(Op.WRITE, a.id, dst.name, dst.sid, a.dst_offset, a.length, tag, view.tobytes()))
                return
            ch.send(SliceRequest(Op.WRITE, a.id, dst.name, dst.sid, a.dst_offset, a.length, tag))
            req = ch.tag_send(view, tag)
            op.pending += 1
            ch.keep(req, (view, local), self._req_done(op))
            return
        # READ
        remote: RemoteSegment = src  # type: ignore[assignment]
        local = dst  # type: ignore[assignment]
        view = local.memory.array[a.dst_offset : a.dst_offset + a.length]
        _check_contiguous(view)
        if local.memory.readonly:
            raise UnregisteredSegmentError(f"{local!r} is read-only memory; nothing may be received into it")
        tag = make_tag(self.peer.read_ns, a.id)
        op = _Op(a, self, ch, Op.READ, now)
        self.ops[a.id] = op
        if not local.memory.is_cuda and a.length <= limit:
            ch.send(SliceRequest(Op.READ, a.id, remote.name, remote.sid, a.src_offset, a.length, tag, inline=True))
            return
        # Not ch.keep(): the op holds the only reference to this request, so that
        # dropping it (the peer refused the READ) cancels the posted receive.
        req = ch.tag_recv(view, tag)
        op.recv_req = req
        op.buffer = (view, local)
        op.pending += 1
        req.future.add_done_callback(self._recv_done(op))
        del req
        ch.send(SliceRequest(Op.READ, a.id, remote.name, remote.sid, a.src_offset, a.length, tag))

    def _req_done(self, op: _Op) -> Any:
        def done(error: BaseException | None) -> None:
            op.pending -= 1
            if error is not None and op.error is None and op.fatal is None:
                op.error = f"rail {self.name}: {_ucxx.describe_error(error)}"
            self._settle(op)

        return done

    def _recv_done(self, op: _Op) -> Any:
        def done(future: Any) -> None:
            error = _ucxx.future_error(future)
            op.pending -= 1
            op.recv_req = None
            op.buffer = None
            if error is None:
                op.reply = True
            elif op.error is None and op.fatal is None:
                op.error = f"rail {self.name}: {_ucxx.describe_error(error)}"
            self._settle(op)

        return done

    def _settle(self, op: _Op) -> None:
        """Report ``op`` once all its requests are done and its outcome is known."""
        if op.pending:
            return
        ch = op.channel
        closed = ch.closed
        if op.fatal is None and op.error is None and not op.reply and not closed:
            if op.withdrawing and op.kind is Op.READ and op.recv_req is None:
                pass  # a small READ: the reply will be ignored, nothing of it can land
            else:
                return
        aid = op.attempt.id
        if self.ops.pop(aid, None) is None:
            return
        backend = self.peer.backend
        ctx = backend.ctx
        if op.withdrawing:
            ctx.withdrawn(aid)
        elif op.fatal is not None:
            ctx.fail(
                aid,
                RemoteAccessError(f"peer {self.peer.name!r} refused the slice: {op.fatal}"),
                transfer_fatal=True,
            )
        elif op.error is None and op.reply:
            now = backend.clock()
            wire = now - max(op.t_post, self.last_done)
            self.last_done = now
            ctx.complete(aid, wire)
        elif self.peer.closed:
            ctx.fail(aid, PeerClosedError(self.peer.closed_reason()), transfer_fatal=True)
        else:
            reason = op.error or ch.close_reason or "endpoint closed"
            ctx.fail(aid, RailLinkError(reason), rail_down=True)

    # ------------------------------------------------------------- fencing

    def withdraw(self, a: Attempt) -> None:
        op = self.ops.get(a.id)
        if op is None:
            self.peer.backend.ctx.withdrawn(a.id)
            return
        op.withdrawing = True
        # Grace: the configured minimum, or a few times what the planner expected the
        # slice to take, whichever is longer (a big slice on a loaded host is not stuck).
        grace = max(self.peer.backend.withdraw_grace, 4.0 * a.expected)
        op.fence_at = self.peer.backend.clock() + grace
        self._settle(op)
        if a.id in self.ops:
            self._arm_fence()

    def _arm_fence(self) -> None:
        pending = [op.fence_at for op in self.ops.values() if op.withdrawing]
        if not pending or self._fence is not None:
            return
        delay = max(0.0, min(pending) - self.peer.backend.clock())
        self._fence = asyncio.get_running_loop().call_later(delay, self._force_fence)

    def _force_fence(self) -> None:
        """Withdrawn slices did not finish within their grace: close the endpoint (cancels them)."""
        self._fence = None
        now = self.peer.backend.clock()
        stuck = [op for op in self.ops.values() if op.withdrawing and op.fence_at <= now]
        ch = self.channel
        if not stuck:
            self._arm_fence()  # younger withdrawals: look again when theirs expires
            return
        if ch is None or ch.closed:
            return
        reason = (
            f"rail {self.name}: {len(stuck)} withdrawn slice(s) still in flight after their grace "
            f"period; endpoint closed to stop them"
        )
        logger.info("%s", reason)
        ch.abort(reason)
        self.peer.backend.stats["fenced_endpoints"] += 1
        self.peer.backend.ctx.rail_down(self.name, reason)

    def close(self, reason: str) -> None:
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        ch = self.channel
        if ch is not None:
            # Close (cancelling what is in flight) only if something is; otherwise retire
            # the endpoint so that UCX cannot recycle its handle (see channel.py).
            if any(op.channel is ch for op in self.ops.values()):
                ch.abort(reason)
            else:
                ch.retire(reason)


def _check_contiguous(view: Any) -> None:
    if not view.flags.c_contiguous:  # pragma: no cover - segments are flat, views of them contiguous
        raise UnregisteredSegmentError("a slice view is not contiguous; UCX would send the wrong bytes")


class Peer:
    """A connected peer engine.  Get one from ``await engine.connect("host:port")``.

    ``name`` is the peer engine's name, ``rails`` the engine rails that reach
    it, ``segments`` its catalogue at connect time.  ``await peer.segment(name)``
    returns a :class:`~tent_async.segments.RemoteSegment` to slice and transfer.
    """

    def __init__(self, backend: UcxBackend, address: str, welcome: Welcome, reader: Any, writer: Any) -> None:
        self.backend = backend
        self.address = address
        self.name = welcome.name
        self.host_id = welcome.host_id
        self.conn_id = welcome.conn_id
        self.token = welcome.token
        self.read_ns = next(_ids) % MAX_NAMESPACE or 1  # our tag namespace for this peer's READ replies
        self.links: dict[str, Link] = {}
        self.closed = False
        self._closed_reason = ""
        self._reader = reader
        self._writer = writer
        self._catalogue: dict[str, SegmentAd] = {ad.name: ad for ad in welcome.catalogue}
        self._lookups: dict[str, list[asyncio.Future[SegmentAd | None]]] = {}

    def __repr__(self) -> str:
        state = "closed" if self.closed else "connected"
        return f"<Peer {self.name!r} at {self.address} {state}, rails {list(self.links)}>"

    @property
    def rails(self) -> list[str]:
        return list(self.links)

    @property
    def segments(self) -> Mapping[str, RemoteSegment]:
        """The peer's segments as of the handshake (and later look-ups)."""
        return {name: self._remote(ad) for name, ad in self._catalogue.items()}

    def _remote(self, ad: SegmentAd) -> RemoteSegment:
        permission: Permission = "rw" if ad.permission == "rw" else "r"
        return RemoteSegment(self, ad.name, ad.size, ad.kind, permission, ad.sid)

    def closed_reason(self) -> str:
        return f"peer {self.name!r} at {self.address} is gone: {self._closed_reason}"

    async def segment(self, name: str, *, refresh: bool = False) -> RemoteSegment:
        """The peer's segment ``name``; asks the peer unless it is in the catalogue (or ``refresh``)."""
        if self.closed:
            raise PeerClosedError(self.closed_reason())
        ad = None if refresh else self._catalogue.get(name)
        if ad is None:
            future: asyncio.Future[SegmentAd | None] = asyncio.get_running_loop().create_future()
            waiters = self._lookups.setdefault(name, [])
            waiters.append(future)
            if len(waiters) == 1:
                write_message(self._writer, Lookup(name=name))
            ad = await asyncio.wait_for(future, self.backend.connect_timeout)
            if ad is None:
                self._catalogue.pop(name, None)
                raise UnregisteredSegmentError(
                    f"peer {self.name!r} has no segment named {name!r}; it has {sorted(self._catalogue)}"
                )
            self._catalogue[name] = ad
        return self._remote(ad)

    def notify(self, message: str) -> None:
        from .protocol import Notify

        if not self.closed:
            write_message(self._writer, Notify(message=message))

    async def run(self) -> None:
        """Read control messages until the connection ends (runs in the engine's task group)."""
        reason = "the control connection ended"
        try:
            while True:
                msg = await read_message(self._reader)
                if isinstance(msg, LookedUp):
                    for fut in self._lookups.pop(msg.name, []):
                        if not fut.done():
                            fut.set_result(msg.segment)
                elif isinstance(msg, Bye):
                    reason = f"it said goodbye ({msg.reason})"
                    return
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} on the control connection")
        except PeerClosedError:
            reason = "it closed the connection (process ended?)"
        except ProtocolError as exc:
            self.backend.stats["protocol_errors"] += 1
            reason = f"protocol error: {exc}"
            logger.warning("peer %r: %s", self.name, reason)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            self._gone(reason)
            await close_writer(self._writer)

    def _gone(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._closed_reason = reason
        logger.info("peer %r at %s: %s", self.name, self.address, reason)
        for waiters in self._lookups.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(PeerClosedError(self.closed_reason()))
        self._lookups.clear()
        for link in self.links.values():
            link.close(self.closed_reason())

    async def close(self) -> None:
        """Say goodbye and close every endpoint to the peer (slices in flight fail)."""
        if self.closed:
            return
        with contextlib.suppress(PeerClosedError):
            write_message(self._writer, Bye(reason="closed by the application"))
        self._gone("closed by this engine")
        await close_writer(self._writer)


def encoded_size(msg: Message) -> int:  # pragma: no cover - debugging aid
    return len(encode(msg))
