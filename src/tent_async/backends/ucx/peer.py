"""The connecting half: a :class:`Peer`, its rails (:class:`Link`) and slices in flight.

``await engine.connect("host:port")`` runs the handshake, pairs our rails
with the peer's (:mod:`.pairing`), adds one engine rail per pair to the
planner (``"decode-0/nic0"``) and returns a :class:`Peer`.  Each engine rail
is a :class:`Link`: our rail's worker, an endpoint to the peer rail's worker,
the tag namespaces both sides receive in, the peer's header slots, and the
slices in flight.  A link is set up over the authenticated control connection
(``LINK`` → ``LINKED``: worker addresses and namespaces), then wired up with
one ``BIND``/``BOUND`` round trip on UCX; after a failure or a fence it is
torn down (``UNLINK``) and set up afresh, with new namespaces, when the
planner next posts to it.

Slices (one planner attempt each), emulating one-sided operations with tags;
every header goes to a free header slot of the peer and gets exactly one
reply, into a bounded receive posted in the same call that sends the header, before the
worker is progressed again:

* WRITE, small: the header carries the bytes; the peer copies them and ACKs.
* WRITE: header, then a tagged send of the source view; the peer checks the
  header, posts a receive into the destination at the right offset, and ACKs
  once the receive completed (a completed send proves nothing).
* READ, small: the peer answers with the bytes (``DATA``).
* READ: we post a receive into our destination view, then send the header;
  the peer checks it, sends the source view, and once its send completed
  answers ``SENT`` with the length it sent.  A receive into caller memory
  never shares an endpoint with a send that can stall (a WRITE's, an extent
  list's), or parking that endpoint would have to close it mid-send: while one
  is in flight such a READ waits, or on a network rail receives into staging
  (:meth:`Link._admit`, :meth:`Link._send`).  The READ completes only when
  our receive completed *and* the peer confirmed exactly the requested
  length: a tagged receive matched by a shorter message completes without
  error and UCX does not say how much arrived.

An attempt is reported only when every UCX request of it has completed (or was
cancelled) and its outcome is known, so its buffers are never released early.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import itertools
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...core import Attempt
from ...errors import (
    PeerClosedError,
    ProtocolError,
    RemoteAccessError,
    RemoteBusyError,
    TentError,
    UnregisteredSegmentError,
)
from ...memory import Memory, copy_bytes
from ...segments import Permission, RemoteSegment, Segment
from . import _ucxx, cma, scatter
from .channel import MAX_PARKED_PER_KEY, Channel, MessageTruncated
from .control import (
    BACKLOG_SECONDS,
    MAX_BACKLOG,
    MAX_WRITE_BUFFER,
    Session,
    close_writer,
    read_message,
    write_message,
)
from .pairing import Pair
from .protocol import (
    KIND_CONTROL,
    KIND_DATA,
    MAX_U64,
    REPLY_ROOM,
    TAG_INDEX_BITS,
    TAG_INDEX_MASK,
    TAIL_BYTES,
    Ack,
    Bind,
    Bound,
    Bye,
    Data,
    Error,
    Linked,
    LookedUp,
    Lookup,
    Message,
    Notify,
    Op,
    SegmentAd,
    Sent,
    SliceRequest,
    Unlink,
    Welcome,
    Where,
    make_tag,
)
from .protocol import (
    Link as LinkMessage,
)
from .rails import LocalRail
from .site import Site

logger = logging.getLogger("tent_async.ucx")

BIND_REQUEST = MAX_U64  # the request id of a link's BIND (nothing else is in flight on a new link)
# A direct copy's end (cma.py): one byte on the slice's data tag, 1 if it copied, 0 if not
_DONE_COPIED = np.ones(1, dtype=np.uint8)
_DONE_SKIPPED = np.zeros(1, dtype=np.uint8)
# While a large READ receives straight into the caller's memory on a link, only plain READ headers
# (46 bytes for a segment named "kv", 1,070 at most) are sent on it, and only while fewer than this
# many headers are unanswered: what a peer that read that READ's header can leave unread behind it
# then fits a TCP socket's send buffer at Linux's default size (docs/ucx.md, "Closing an endpoint
# mid-send": a READ into caller memory never shares an endpoint with a send that can stall).  On
# shared-memory links direct copies' headers (up to about 1.7 KB with 64 ``reach`` entries) and
# their one-byte DONEs go too (not counted against this): no TCP socket there, and over shared
# memory the argument does not hold anyway (the docs say why).
QUIET_SLOTS = 8
CMA_LATE_LIMIT = 3  # direct copies' answers in a row past their deadline before a peer's are turned off


class RailLinkError(TentError):
    """A slice failed because the rail's link to the peer failed."""


class LinkStateError(TentError, RuntimeError):
    """A link was asked to make a move its state does not allow: a bug in the backend; please report it."""


class LinkState(enum.StrEnum):
    """Where a :class:`Link` is in its set-up: idle -> linking -> binding -> up, back to idle when torn down."""

    IDLE = "idle"  # no endpoint; the next post (or open()) starts a set-up
    LINKING = "linking"  # LINK sent on the control connection, waiting for LINKED
    BINDING = "binding"  # endpoint open, BIND sent in a header slot, waiting for BOUND
    UP = "up"  # slices may be sent


# The moves a link may make (as h11's _state.py: anything else is refused).  Every state may
# be torn down to IDLE (a failure, a fence, the peer gone), IDLE included (closing twice).
_LINK_MOVES: dict[LinkState, frozenset[LinkState]] = {
    LinkState.IDLE: frozenset({LinkState.LINKING, LinkState.IDLE}),
    LinkState.LINKING: frozenset({LinkState.BINDING, LinkState.IDLE}),
    LinkState.BINDING: frozenset({LinkState.UP, LinkState.IDLE}),
    LinkState.UP: frozenset({LinkState.IDLE}),
}


class OpStateError(TentError, RuntimeError):
    """A slice in flight was asked to make a move its state does not allow: a bug in the backend; please report it."""


class OpState(enum.StrEnum):
    """Where an :class:`_Op` is: queued -> sent -> reported, or withdrawn on the way.

    Only where the op is, not how it went: its reply, the end of a READ's bulk
    receive (``data_ok``) and any failure (``fatal``, ``violation``, ``error``)
    come in either order, each may be missing, and the report reads them all
    once the op's UCX requests are done (``pending`` is 0): they are data.
    """

    QUEUED = "queued"  # in the link's queue (no link yet, or no free slot): nothing of it reached UCX
    SENT = "sent"  # header out: its requests and the peer's one reply are awaited
    WITHDRAWN = "withdrawn"  # withdrawn while queued: nothing to wait for, reported at once
    WITHDRAWING = "withdrawing"  # withdrawn after it was sent: reported when its requests end, or its link is fenced
    REPORTED = "reported"  # the planner has its outcome; nothing more happens to it


# The moves an op may make (as _LINK_MOVES).  A teardown reports a queued op as failed
# (QUEUED -> REPORTED); a second withdrawal (the engine withdrawing everything after a crash)
# restarts a sent op's grace (WITHDRAWING -> WITHDRAWING).  REPORTED is final.
_OP_MOVES: dict[OpState, frozenset[OpState]] = {
    OpState.QUEUED: frozenset({OpState.SENT, OpState.WITHDRAWN, OpState.REPORTED}),
    OpState.SENT: frozenset({OpState.WITHDRAWING, OpState.REPORTED}),
    OpState.WITHDRAWN: frozenset({OpState.REPORTED}),
    OpState.WITHDRAWING: frozenset({OpState.WITHDRAWING, OpState.REPORTED}),
    OpState.REPORTED: frozenset(),
}
# The states as module globals, for the per-slice path: on CPython 3.11 reading a member off
# its enum class (``OpState.SENT``) costs about 0.12 us, a global about 0.005 us (2 million
# reads in a loop, on a loaded host), and every slice makes several such reads.
OP_QUEUED, OP_SENT, OP_WITHDRAWN, OP_WITHDRAWING, OP_REPORTED = (
    OpState.QUEUED,
    OpState.SENT,
    OpState.WITHDRAWN,
    OpState.WITHDRAWING,
    OpState.REPORTED,
)
_WITHDRAWN_STATES = frozenset({OP_WITHDRAWN, OP_WITHDRAWING})


class _Op:
    """One attempt (or a link's BIND) in flight on a link."""

    __slots__ = (
        "attempt",
        "away",
        "buffer",
        "channel",
        "cma",
        "data_ok",
        "data_req",
        "direct",
        "error",
        "fatal",
        "fence_at",
        "held",
        "inline",
        "kind",
        "link",
        "loud",
        "pending",
        "redo",
        "reply",
        "request",
        "sending",
        "sg",
        "slot",
        "staged",
        "stalled",
        "state",
        "t_post",
        "tail_check",
        "violation",
    )

    def __init__(self, attempt: Attempt | None, link: Link, kind: Op, t_post: float) -> None:
        self.attempt = attempt
        self.request = attempt.id if attempt is not None else BIND_REQUEST
        self.link = link
        self.channel: Channel | None = None  # set when the header is sent
        self.kind = kind
        self.t_post = t_post
        self.away = 0.0  # at post: the loop's time on other rails so far (Link._wire_time)
        self.state = OP_QUEUED  # changed only by move() (the table above)
        self.slot: int | None = None  # the peer's header slot it occupies until its reply arrives
        self.pending = 0  # UCX requests of this op not completed yet (reply receive, bulk send/receive)
        self.data_req: Any = None  # a READ's bulk receive, dropped to cancel it
        self.buffer: Any = None  # memory the READ's receive writes into, held until it is done
        self.data_ok = False  # the READ's bulk receive completed
        self.reply: Message | None = None  # the peer's one reply (ACK, ERROR, DATA, SENT, BOUND)
        self.fatal: str | None = None  # the peer refused the slice
        self.violation: str | None = None  # the peer broke the protocol on this slice
        self.error: str | None = None  # a UCX request failed, or the link went down
        self.fence_at = 0.0  # when a withdrawn op still in flight gets its link closed
        self.stalled = False  # settled while a request of it was still UCX's (its link's endpoint parked)
        self.sending = False  # its bulk send from the caller's memory has not completed
        self.held: Segment | None = None  # that memory's segment, held (unregister refuses) while parked
        self.tail_check = False  # a large READ (host or GPU memory): compare its end with SENT's tail
        self.sg: scatter.Plan | None = None  # a scatter-gather slice: its extent list and staging
        self.inline = False  # set by Link._queue (_inline)
        self.cma = False  # answered with WHERE, copied directly (cma.py); set by Link._queue
        self.redo: tuple[str, bool] | None = None  # a direct copy not made: (why, the peer's load?) (Link._copy)
        self.direct = False  # a large READ whose receive into the caller's memory is posted (Link.direct)
        self.loud = False  # sent, not reported, and sends more than a plain READ's header (Link.loud)
        self.staged: np.ndarray | None = None  # a large READ received into staging instead (Link.stage_reads)

    def move(self, to: OpState) -> OpState:
        """Go to state ``to`` if the table allows it; returns the state left."""
        was = self.state
        if to not in _OP_MOVES[was]:
            raise OpStateError(f"rail {self.link.name}: slice {self.request} cannot go from {was} to {to}")
        self.state = to
        return was

    def _inline(self) -> bool:
        """Do the bytes travel in the header (WRITE) or the reply (READ)?  Fixed at post."""
        a = self.attempt
        if a is None:
            return False
        if self.sg is not None:
            return self.sg.inline
        local, remote = (a.src, a.dst) if self.kind is Op.WRITE else (a.dst, a.src)
        # Inline bytes are copied by the CPU on both sides: host memory at both ends only
        # (the peer refuses an inline slice into or out of its GPU memory).
        host = not local.memory.is_cuda and remote.kind == "host"  # type: ignore[attr-defined]
        return host and a.length <= self.link.peer.inline_limit

    def _cma(self) -> bool:
        """Are the bytes copied directly between the two processes (cma.py)?  Fixed at post, after ``inline``."""
        a = self.attempt
        if a is None or self.inline or not self.link.direct_copies:
            return False
        if self.sg is not None:
            return self.sg.cma
        local, remote = (a.src, a.dst) if self.kind is Op.WRITE else (a.dst, a.src)
        return not local.memory.is_cuda and remote.kind == "host"  # type: ignore[attr-defined]


class Link:
    """One engine rail: our local rail paired with one of the peer's rails."""

    def __init__(self, peer: Peer, pair: Pair, rail: LocalRail, name: str) -> None:
        self.peer = peer
        self.pair = pair
        self.rail = rail
        self.name = name
        self.state = LinkState.IDLE  # changed only by _move (the table above)
        self.link_id = 0
        self.channel: Channel | None = None
        self.ns = 0  # our namespace: the peer's replies and READ bytes
        self.peer_ns = 0  # the peer's namespace: our headers and WRITE bytes
        self.free_slots: list[int] = []
        self._buffers: list[np.ndarray] = []  # reply receive buffers to reuse (all zeros)
        self.waiting: collections.deque[_Op] = collections.deque()  # not sent: no link yet, or no free slot
        self.ops: dict[int, _Op] = {}
        # On the current channel: large READs receiving into caller memory (op.direct), and ops
        # sent but not reported that send more than a plain READ's header (op.loud: WRITEs and
        # extent lists).  Never both at once (_admit): so when an endpoint parks with a send of
        # ours stalled, no receive into caller memory is left on it (_park_ops).
        self.direct = 0
        self.loud = 0
        # A large READ sent while a loud op is in flight: into staging (copied once checked) on a
        # network rail, where the two directions are independent and alternating them would
        # waste one; it waits instead over shared memory and loopback, where they share the same
        # CPUs and the copy costs more than the overlap gains (docs/ucx.md, measured).
        self.stage_reads = rail.plan.kind == "tcp" and not rail.plan.loopback
        self.indices: set[int] = set()  # tag indices of the ops sent and not reported (_request)
        self._random: list[int] = []  # random tag indices to draw from, made 256 at a time
        self.last_done = 0.0
        self.last_away = 0.0  # progress.away() at last_done
        self._fence: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.reconnects = 0
        self.opened: asyncio.Future[None] | None = None  # resolves when the link is up (awaited by connect())

    # ----------------------------------------------------------- linking

    def _move(self, to: LinkState) -> LinkState:
        """Go to state ``to`` if the table allows it; returns the state left."""
        was = self.state
        if to not in _LINK_MOVES[was]:
            raise LinkStateError(f"rail {self.name}: a link cannot go from {was} to {to}")
        self.state = to
        return was

    def open(self) -> asyncio.Future[None]:
        """Set the link up now; the future resolves once it is up (LINKED, then BIND answered)."""
        if self.opened is None or self.opened.done():
            self.opened = asyncio.get_running_loop().create_future()
        if self.state is LinkState.IDLE:
            self._start()
        elif self.state is LinkState.UP:
            self.opened.set_result(None)
        return self.opened

    def _start(self) -> None:
        peer = self.peer
        if peer.closed:
            self._teardown(peer.closed_reason(), tell=False)
            return
        parked = self.rail.parked_by[self.park_key]
        if parked >= MAX_PARKED_PER_KEY:
            self._teardown(
                f"rail {self.name}: {parked} earlier links to peer {peer.name!r} still wait for it to read "
                "what they sent (it stopped reading); no new link on this rail until it reads or goes",
                tell=False,
            )
            return
        if self.link_id:
            self.reconnects += 1
        self._move(LinkState.LINKING)
        self.link_id = peer.register_link(self)
        self.ns = self.rail.claim_namespace(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(peer.site.connect_timeout, self._link_timeout, self.link_id)
        try:
            peer.send_control(
                LinkMessage(
                    link_id=self.link_id, rail=self.pair.remote.name, address=self.rail.address, namespace=self.ns
                )
            )
        except PeerClosedError:
            self._teardown(peer.closed_reason(), tell=False)

    def _link_timeout(self, link_id: int) -> None:
        self._timer = None
        if self.link_id == link_id and self.state in (LinkState.LINKING, LinkState.BINDING):
            self._teardown(
                f"rail {self.name}: the peer did not set the link up within {self.peer.site.connect_timeout:g} s"
            )

    def on_linked(self, msg: Linked) -> None:
        """The peer posted its header slots (control connection): open our endpoint and BIND."""
        if self.state is not LinkState.LINKING or msg.link_id != self.link_id:
            return
        try:
            ep = self.rail.connect(self.pair.remote.address, self.peer.control_ip)
            self.channel = Channel(self.rail, ep, f"rail {self.name}", self._on_close)
        except Exception as exc:
            if isinstance(exc, ProtocolError):  # the peer's worker address failed its check
                self.peer.site.stats["protocol_errors"] += 1
            self._teardown(f"rail {self.name}: cannot open an endpoint to the peer: {_ucxx.describe_error(exc)}")
            return
        self.peer_ns = msg.namespace
        self.free_slots = list(range(self.peer.slots - 1, -1, -1))
        self._move(LinkState.BINDING)
        op = _Op(None, self, Op.BIND, self.peer.site.clock())
        self.ops[-1] = op
        self._send(op)

    def on_unlink(self, msg: Unlink) -> None:
        """The peer refused or closed the link (control connection)."""
        if msg.link_id == self.link_id and self.state is not LinkState.IDLE:
            self._teardown(f"rail {self.name}: the peer closed the link: {msg.reason}", tell=False)

    def _bound(self) -> None:
        self._move(LinkState.UP)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(None)
        self._flush()

    def _teardown(self, reason: str, *, tell: bool = True) -> None:
        """Close the link: cancel everything on it, release our namespace, tell the peer.

        The ops are settled from the event loop, not from here: a teardown can
        happen inside ``post()``, and the planner takes no report from inside it.
        """
        was = self._move(LinkState.IDLE)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ns:
            self.rail.release_namespace(self.ns)
            self.ns = 0
        ch, self.channel = self.channel, None
        self.direct = self.loud = 0  # they count the channel's requests; the next channel starts afresh
        self.indices = set()
        ops = list(self.ops.values())
        for op in ops:
            if op.channel is ch:
                op.data_req = None  # the last reference: ucxx cancels a READ's bulk receive (the buffer stays)
        if ch is not None and not ch.closed:
            # Cancels every receive on it; its sends are cancelled too, or (a healthy endpoint with a
            # WRITE's bytes still going out) finish first: UCX's TCP transport cannot close an
            # endpoint mid-send safely (channel.py).  Their callbacks settle the ops; a send still
            # going out after LINGER_MAX parks the endpoint and _park_ops settles what is left.
            mine = [op for op in ops if op.channel is ch]
            ch.abort(reason, linger=True, park_key=self.park_key, on_park=lambda: self._park_ops(mine))
        for op in ops:
            if op.error is None and op.state is not OP_WITHDRAWN:
                op.error = reason
        self.waiting.clear()
        if ops:
            asyncio.get_running_loop().call_soon(self._settle_many, ops)
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(RailLinkError(reason))
        if tell and was is not LinkState.IDLE and not self.peer.closed:
            with contextlib.suppress(PeerClosedError):
                self.peer.send_control(Unlink(link_id=self.link_id, reason=reason[:1000]))

    def _park_ops(self, ops: list[_Op]) -> bool:
        """The torn-down link's endpoint parks (a send of ours stalled): settle its ops now.

        Their requests stay UCX's (the channel holds them and their buffers) and
        their callbacks still run later, into reported ops, which ignore them.
        A READ's staging is never reused (``Plan.release(reuse=False)``; a
        plain READ's ``op.staged`` is dropped, not given back), and the source
        segment of a WRITE still being sent is held: ``unregister`` refuses
        until UCX gives it back.

        A READ's receive into caller memory (``op.direct``) is never still
        posted here: it never shares an endpoint with a send that can stall
        (:meth:`_admit`, :meth:`_send`; docs/ucx.md).  Should one be, nothing is
        settled and False is returned (the endpoint is then closed, the only
        way to stop it writing there), and it is logged and counted
        (``stats["closed_mid_send"]``) as the bug it would be.
        """
        direct = [op for op in ops if op.direct]
        if direct:
            site = self.peer.site
            site.stats["closed_mid_send"] += 1
            # Over TCP the argument in docs/ucx.md rules this out (a bug); a shared-memory FIFO is the
            # receiving worker's, shared with its other senders, so there a plain READ header can be
            # left pending behind them (review): possible, and UCX's crash was seen in its TCP transport.
            tcp = self.rail.plan.kind == "tcp"
            site.log.log(
                logging.ERROR if tcp else logging.WARNING,
                "closed-mid-send",
                "rail %s: %d READ receive(s) into caller memory still posted on an endpoint whose send "
                "stalled; closing it mid-send (%s: docs/ucx.md, Closing an endpoint mid-send)",
                self.name,
                len(direct),
                "a bug over TCP" if tcp else "a plain READ header left pending in a shared FIFO",
            )
            return False
        for op in ops:
            if op.state is OP_REPORTED or not op.pending:
                continue
            op.stalled = True
            a = op.attempt
            if op.sending and a is not None and op.held is None:
                op.held = a.src  # type: ignore[assignment]
                op.held._held += 1  # type: ignore[union-attr]
            if op.error is None and op.state is not OP_WITHDRAWN:
                op.error = f"rail {self.name}: the peer stopped reading"
            self._settle(op)
        return True

    def _settle_many(self, ops: list[_Op]) -> None:
        for op in ops:
            self._settle(op)

    @property
    def park_key(self) -> tuple[str, str]:
        """What this link's parked endpoints count under on its rail: its peer (channel.py)."""
        return ("peer", self.peer.address)

    def _on_close(self, ch: Channel, reason: str) -> None:
        """Our endpoint closed (UCX error, or our own abort)."""
        if ch is self.channel:
            self._teardown(reason)

    def on_unexpected(self, probe: Any, kind: int, index: int, length: int) -> bool:
        """A message in our namespace that no receive expected: the peer broke the protocol."""
        self.peer.site.stats["protocol_errors"] += 1
        reason = f"rail {self.name}: the peer sent {length} bytes nobody asked for (tag kind {kind}, index {index})"
        self.peer.site.log.warning("unexpected", "%s; closing the link", reason)
        asyncio.get_running_loop().call_soon(self._teardown, reason)
        return False

    # --------------------------------------------------------------- slices

    def post(self, a: Attempt, now: float) -> None:
        if a.extents is not None:
            self._post_extents(a, now)
            return
        src, dst = a.src, a.dst
        if isinstance(dst, RemoteSegment):  # WRITE
            local: Segment = src  # type: ignore[assignment]
            view = local.memory.array[a.src_offset : a.src_offset + a.length]
            kind = Op.WRITE
        else:
            local = dst  # type: ignore[assignment]
            view = local.memory.array[a.dst_offset : a.dst_offset + a.length]
            if local.memory.readonly:
                raise UnregisteredSegmentError(f"{local!r} is read-only memory; nothing may be received into it")
            kind = Op.READ
        _check_contiguous(view)
        op = _Op(a, self, kind, now)
        self._queue(op)

    @property
    def direct_copies(self) -> bool:
        """Do this link's slices copy directly (cma.py)?  Shared-memory rails to a verified peer
        (not with delayed submission: the peer's receive for DONE could be posted after it came)."""
        return self.peer.cma_pid is not None and self.rail.plan.kind == "shm" and not self.rail.delayed

    def _queue(self, op: _Op) -> None:
        assert op.attempt is not None
        op.inline = op._inline()
        op.cma = op._cma()
        op.away = self.rail.progress.away()
        self.ops[op.attempt.id] = op
        if self.state is LinkState.UP and self.free_slots and not self.waiting and self._admit(op):
            self._send(op)
            return
        self.waiting.append(op)
        if self.state is LinkState.IDLE:
            self._start()

    def _post_extents(self, a: Attempt, now: float) -> None:
        """A scatter-gather slice: one header with its extent list (scatter.py)."""
        site = self.peer.site
        try:
            plan = scatter.Plan(
                a, self.peer, self.peer.inline_limit, scatter.staging_of(site), direct=self.direct_copies
            )
        except scatter.ScatterError as exc:
            fail = functools.partial(site.ctx.fail, a.id, exc, transfer_fatal=True)
            asyncio.get_running_loop().call_soon(fail)
            return
        op = _Op(a, self, plan.kind, now)
        op.sg = plan
        self._queue(op)

    def _flush(self) -> None:
        while self.waiting and self.free_slots and self.state is LinkState.UP and self._admit(self.waiting[0]):
            self._send(self.waiting.popleft())

    def _admit(self, op: _Op) -> bool:
        """May ``op`` be sent now?  It waits in the queue (in order, so nothing overtakes it) while:

        * a large READ receives into caller memory on the link (``self.direct``)
          and ``op`` would send more than a plain READ's header (a WRITE, an
          extent list; not a direct copy, which sends no bytes over UCX), or
          would leave ``QUIET_SLOTS`` headers unanswered;
        * ``op`` is a large plain READ (it would receive into caller memory) and
          a WRITE or an extent list is in flight on the link (``self.loud``),
          unless the link receives such READs into staging (``stage_reads``: a
          network rail, :meth:`_send`);
        * it is an extent-list slice and the peer's staging share is taken
          (flow control, scatter.StagingShare).

        The first two keep a receive into caller memory off any endpoint with
        a send that can stall, so a parked endpoint never holds one (docs/ucx.md,
        "Closing an endpoint mid-send").  Traffic in one direction never waits
        for them; a link carrying both alternates.  The end of the last such
        receive (:meth:`_data_done`) or op (:meth:`_settle`) flushes the queue.
        """
        if self.direct:
            sends = (op.kind is Op.WRITE or op.sg is not None) and not op.cma  # a direct copy sends no bytes
            if sends or self.peer.slots - len(self.free_slots) >= QUIET_SLOTS:
                return False
        elif (
            self.loud and op.kind is Op.READ and op.sg is None and not op.inline and not op.cma and not self.stage_reads
        ):
            return False
        return op.sg is None or self.peer.staging.admit(op.sg, self._flush)

    def _request(self, attempt: int) -> int:
        """A request id for a slice sent now: the attempt's id above a random tag index.

        The index (its low ``TAG_INDEX_BITS``) picks the tags of the slice's reply
        and bulk bytes, so a peer learns it only by reading the header: it cannot
        match a READ's receive (or answer a header) it has not read, which the
        argument that a receive into caller memory never sits beside a stalled
        send of ours relies on (docs/ucx.md, Closing an endpoint mid-send).  A
        wrong guess is a message nobody expected: the link is torn down.  Unique
        among the link's slices in flight (``self.indices``).
        """
        indices = self.indices
        while True:
            if not self._random:
                self._random = (np.frombuffer(os.urandom(1024), dtype="<u4") & TAG_INDEX_MASK).tolist()
            index = self._random.pop()
            if index not in indices and index != TAG_INDEX_MASK:  # all ones: the BIND's
                indices.add(index)
                return (attempt << TAG_INDEX_BITS) | index

    def _send(self, op: _Op) -> None:
        """Post a READ's bulk receive, the header, the reply's receive, then a WRITE's bytes."""
        ch = self.channel
        assert ch is not None
        assert self.free_slots
        op.slot = self.free_slots.pop()
        op.move(OP_SENT)
        op.channel = ch
        a = op.attempt
        header: Message
        if a is not None:
            op.request = self._request(a.id)
        if a is None:
            header = Bind(request=op.request)
        elif op.sg is not None:
            header = op.sg.header(op.request)
        elif op.kind is Op.WRITE:
            dst: RemoteSegment = a.dst  # type: ignore[assignment]
            local: Segment = a.src  # type: ignore[assignment]
            view = local.memory.array[a.src_offset : a.src_offset + a.length]
            payload = view.tobytes() if op.inline else None
            header = SliceRequest(Op.WRITE, op.request, dst.name, dst.sid, a.dst_offset, a.length, payload, cma=op.cma)
        else:
            remote: RemoteSegment = a.src  # type: ignore[assignment]
            header = SliceRequest(
                Op.READ, op.request, remote.name, remote.sid, a.src_offset, a.length, inline=op.inline, cma=op.cma
            )
        reply_tag = make_tag(self.ns, KIND_CONTROL, op.request)
        buffer = self._buffers.pop() if self._buffers else np.zeros(self.reply_room, dtype=np.uint8)
        if a is not None and (op.kind is Op.WRITE or op.sg is not None) and not op.cma:
            op.loud = True  # no large plain READ is sent on this link until it is reported (_admit)
            self.loud += 1
        try:
            if a is not None and op.kind is Op.READ and not op.inline and not op.cma:
                local = a.dst  # type: ignore[assignment]
                if op.sg is not None:  # into host staging (random tail included), scattered once checked
                    view = op.sg.landing()
                elif self.loud:
                    # A WRITE or an extent list is in flight here (a network rail: _admit): its send
                    # may stall (the peer stops reading it) while this READ's bytes stream in, and a
                    # receive into caller memory could then only be stopped by closing the endpoint
                    # mid-send.  Into staging, copied once checked (_report), abandoned if it parks.
                    op.staged = view = scatter.staging_of(self.peer.site).take(a.length)
                    t = min(TAIL_BYTES, a.length)
                    view[a.length - t :] = np.frombuffer(os.urandom(t), dtype=np.uint8)
                    self.peer.site.stats["reads_staged"] += 1
                else:
                    view = local.memory.array[a.dst_offset : a.dst_offset + a.length]
                    # Random bytes at the end, before the receive is posted: a message that
                    # stops short leaves them in place, and SENT's tail will not match.
                    t = min(TAIL_BYTES, a.length)
                    _put_bytes(view[a.length - t :], os.urandom(t))
                op.tail_check = True
                # Not ch.keep(): the op holds the only reference to this request, so that
                # dropping it (the peer refused the READ) cancels the posted receive.
                req = ch.tag_recv(view, make_tag(self.ns, KIND_DATA, op.request), bulk=True)
                op.data_req = req
                op.buffer = (view, local)
                op.pending += 1
                if op.sg is None and op.staged is None:  # into caller memory: loud slices wait (_admit)
                    op.direct = True
                    self.direct += 1
                ch.rail.progress.watch(req, self._data_done(op))
                del req
            # The reply's bounded receive goes up right after the header, in this same call:
            # nothing progresses the worker (or runs the sweeper) in between, so the reply finds
            # it however fast it comes (UCX matches one that came first from its unexpected
            # queue).  Posted first, it held every header back by a tag_recv (issue 9).  With
            # delayed submission the progress thread submits the header at once and the receive
            # later, so there the receive goes first (review).
            delayed = ch.rail.delayed
            if delayed:
                ch.recv_message(buffer, reply_tag, self._reply_done(op, buffer))
                op.pending += 1
            ch.send_message(header, make_tag(self.peer_ns, KIND_CONTROL, op.slot))
            if not delayed:
                ch.recv_message(buffer, reply_tag, self._reply_done(op, buffer))
                op.pending += 1
            bulk = None
            if op.sg is not None:
                # A WRITE's extents are gathered here, on the loop, outside any progress pass:
                # that time is this rail's, not the other rails' (their slices in flight leave it
                # out of their wire time, as they do this rail's passes; a READ's scatter runs in
                # this rail's pass already).  Unaccounted, every gather made the other rails look
                # slower than they are, WRITE only.
                t0 = time.perf_counter()
                bulk = op.sg.bulk()
                ch.rail.progress.account(time.perf_counter() - t0)
            if bulk is not None:  # a scatter WRITE's gathered bytes, or a READ's extent table
                req = ch.tag_send(bulk, make_tag(self.peer_ns, KIND_DATA, op.request))
                op.pending += 1
                ch.keep(req, bulk, self._send_done(op), send=True)
            elif a is not None and op.sg is None and op.kind is Op.WRITE and not op.inline and not op.cma:
                local = a.src  # type: ignore[assignment]
                view = local.memory.array[a.src_offset : a.src_offset + a.length]
                req = ch.tag_send(view, make_tag(self.peer_ns, KIND_DATA, op.request))
                op.pending += 1
                op.sending = True
                ch.keep(req, (view, local), self._send_done(op), send=True)
        except Exception as exc:  # UCX refused a post, or a gather or encoding failed half-way
            if op.error is None:
                op.error = f"rail {self.name}: {_ucxx.describe_error(exc)}"
            if not isinstance(exc, _ucxx.loaded().UCXError):
                self.peer.site.log.log(
                    logging.ERROR, "send-failed", "%s: sending a slice failed half-way; closing the link", op.error
                )
            # The endpoint is unusable, or the slice is half out with its counts taken (loud,
            # direct): tear the link down (never mid-send), which settles its ops and resets them.
            ch.fail(op.error)

    @property
    def reply_room(self) -> int:
        """Bytes of a reply receive: any reply, DATA with an inline payload included."""
        return 4 + REPLY_ROOM + self.peer.inline_limit

    def _reply_done(self, op: _Op, buffer: np.ndarray) -> Any:
        def done(msg: Message | None, error: BaseException | None) -> None:
            if len(self._buffers) < self.peer.slots:
                self._buffers.append(buffer)  # cleared by recv_message
            op.pending -= 1
            if op.state is OP_REPORTED:  # settled while parked (_park_ops): a late reply lands nowhere
                return
            if error is not None:
                if isinstance(error, ProtocolError):
                    truncated = isinstance(error, MessageTruncated)
                    self._violation(op, f"a malformed reply: {error}", truncated=truncated, teardown=True)
                elif op.error is None and op.fatal is None:
                    op.error = f"rail {self.name}: {_ucxx.describe_error(error)}"
            elif msg is not None:
                self._on_reply(op, msg)
            self._settle(op)

        return done

    def _on_reply(self, op: _Op, msg: Message) -> None:
        request = getattr(msg, "request", None)
        if request != op.request:
            self._violation(op, f"a reply for request {request} to request {op.request}", teardown=True)
            return
        op.reply = msg
        if op.slot is not None and op.channel is self.channel:
            self.free_slots.append(op.slot)  # the peer re-posts the slot in the call that answers
            op.slot = None
            if self.waiting:
                asyncio.get_running_loop().call_soon(self._flush)
        a = op.attempt
        if isinstance(msg, Error):
            op.fatal = msg.reason
            op.data_req = None  # the last reference: ucxx cancels a READ's posted receive
            return
        kind = op.kind
        expected: type = Ack if kind is Op.WRITE else Bound if kind is Op.BIND else Data if op.inline else Sent
        if op.cma:
            expected = Where
        if not isinstance(msg, expected):
            self._violation(op, f"{type(msg).__name__} where {expected.__name__} was due")
            return
        if a is None:
            return
        if isinstance(msg, Where):
            self._copy(op, msg)
            return
        if isinstance(msg, Data):
            if len(msg.payload) != a.length:
                self._violation(op, f"DATA of {len(msg.payload)} bytes for a {a.length}-byte READ")
            elif op.sg is not None and op.state is not OP_WITHDRAWING:
                op.sg.land(msg.payload)
            elif op.state is not OP_WITHDRAWING:
                dst: Segment = a.dst  # type: ignore[assignment]
                view = dst.memory.array[a.dst_offset : a.dst_offset + a.length]
                np.copyto(view, np.frombuffer(msg.payload, dtype=np.uint8))
        elif isinstance(msg, Sent) and msg.length != a.length:
            self._violation(op, f"the peer sent {msg.length} bytes for a {a.length}-byte READ")

    def _copy(self, op: _Op, msg: Where) -> None:
        """WHERE came: copy the slice's bytes directly, unless it was withdrawn or came too late; then DONE.

        Synchronous, in the reply's callback: a slice withdrawn before this point
        never copies, and once it is reported nothing of it moves (cma.py).  DONE
        goes whatever happened here; if it cannot, the link is torn down (its close
        frees the peer's segments).
        """
        try:
            self._copy_now(op, msg)
        finally:
            ch = op.channel
            if ch is not None and not ch.closed:
                said = _DONE_COPIED if op.data_ok else _DONE_SKIPPED
                try:
                    req = ch.tag_send(said, make_tag(self.peer_ns, KIND_DATA, op.request))
                    ch.keep(req, said, None, send=True)
                except Exception as exc:
                    ch.fail(f"rail {self.name}: a direct copy's DONE could not be sent: {_ucxx.describe_error(exc)}")

    def _copy_now(self, op: _Op, msg: Where) -> None:
        a = op.attempt
        assert a is not None
        peer = self.peer
        pid = peer.cma_pid
        want = 1 if op.sg is None else len(op.sg.remote)
        if len(msg.bases) != want:
            self._violation(op, f"WHERE gave {len(msg.bases)} segment addresses for {want} segments")
            return
        if op.state is OP_WITHDRAWING:
            return  # withdrawn: nothing moves; DONE lets the peer free the segments now
        if pid is None:
            op.redo = (f"rail {self.name}: direct copies to peer {peer.name!r} were turned off", False)
            return
        if time.monotonic() >= msg.until:
            # Nothing landed and the rail is not at fault (a loop was slow): the slice goes again.
            # A loop that is always this slow gets no good of direct copies: after LATE_LIMIT in
            # a row they are turned off for the peer.
            peer.cma_late += 1
            if peer.cma_late >= CMA_LATE_LIMIT:
                peer.cma_off(f"{peer.cma_late} answers in a row came after their deadline")
            op.redo = (f"rail {self.name}: the peer's WHERE came after its deadline; the slice is sent again", True)
            return
        peer.cma_late = 0
        write = op.kind is Op.WRITE
        try:
            if op.sg is not None:
                local, remote, lengths = op.sg.direct(msg.bases)
            else:
                mine: Segment = a.src if write else a.dst  # type: ignore[assignment]
                at, there = (a.src_offset, a.dst_offset) if write else (a.dst_offset, a.src_offset)
                local = np.array([mine.memory.address + at], dtype=np.uint64)
                remote = np.array([msg.bases[0] + there], dtype=np.uint64)
                lengths = np.array([a.length], dtype=np.uint64)
        except (OverflowError, ValueError) as exc:  # addresses past 2^64: not ones the peer has
            self._violation(op, f"WHERE gave segment addresses no copy can use ({exc})")
            return
        try:
            cma.copy(pid, local, remote, lengths, write=write)
            op.data_ok = True
        except Exception as exc:
            # The kernel refused (the peer exited, or copies are no longer allowed), or the copy could
            # not be started: this slice goes again, over UCX, and so does every later one to this
            # peer; the rail is not down.
            why = str(exc) if isinstance(exc, cma.CmaError) else f"{type(exc).__name__}: {exc}"
            op.redo = (f"rail {self.name}: {why}", False)
            peer.cma_off(why)

    def _violation(self, op: _Op, what: str, *, truncated: bool = False, teardown: bool = False) -> None:
        """The peer broke the protocol on ``op``: count it, log it, fail the slice.

        With ``teardown`` (the reply itself was unusable, so the slot's state is
        unknown) the link is closed too.
        """
        stats = self.peer.site.stats
        stats["protocol_errors"] += 1
        if truncated:
            stats["truncated"] += 1
        op.violation = f"peer {self.peer.name!r} on rail {self.name}: {what}"
        self.peer.site.log.warning("violation", "%s", op.violation)
        # A large READ's receive may still be posted (a wrong or short answer): dropping the last
        # reference cancels it, so the op can settle instead of waiting for the fence.
        op.data_req = None
        if teardown and op.channel is self.channel and self.channel is not None:
            asyncio.get_running_loop().call_soon(self._teardown, op.violation)

    def _data_done(self, op: _Op) -> Any:
        def done(future: Any) -> None:
            error = _ucxx.future_error(future)
            op.pending -= 1
            op.data_req = None
            op.buffer = None
            if op.direct:
                op.direct = False
                if op.channel is self.channel and op.channel is not None:
                    self.direct -= 1
                    if not self.direct and self.waiting:  # a WRITE may have waited for it (_admit)
                        asyncio.get_running_loop().call_soon(self._flush)
            if error is None:
                op.data_ok = True
            elif op.error is None and op.fatal is None:
                op.error = f"rail {self.name}: {_ucxx.describe_error(error)}"
            self._settle(op)

        return done

    def _send_done(self, op: _Op) -> Any:
        def done(error: BaseException | None) -> None:
            op.pending -= 1
            op.sending = False
            if op.held is not None:  # settled while parked: UCX gave the caller's memory back only now
                op.held._held -= 1
                op.held = None
            if error is not None and op.error is None and op.fatal is None:
                op.error = f"rail {self.name}: {_ucxx.describe_error(error)}"
            self._settle(op)

        return done

    def _succeeded(self, op: _Op) -> bool:
        if op.reply is None or op.error is not None or op.violation is not None or op.fatal is not None:
            return False
        if op.cma:
            return op.data_ok
        return op.kind is not Op.READ or op.inline or op.data_ok

    def _check_tail(self, op: _Op) -> None:
        """A large READ's bytes all arrived only if its destination ends with what SENT says was sent."""
        op.tail_check = False
        a = op.attempt
        if a is None or not isinstance(op.reply, Sent) or not op.data_ok or op.state is OP_WITHDRAWING:
            return
        dst: Segment = a.dst  # type: ignore[assignment]
        t = min(TAIL_BYTES, a.length)
        end = a.dst_offset + a.length
        if op.sg is not None:
            tail = op.sg.tail()
        elif op.staged is not None:
            tail = bytes(op.staged[a.length - t :].tobytes())
        else:
            tail = _get_bytes(dst.memory.array[end - t : end])
        if tail != op.reply.tail:
            self._violation(
                op,
                f"a {a.length}-byte READ's bytes did not all arrive (the peer said it sent {op.reply.length}; "
                "the end of the destination does not hold what it said it sent)",
            )

    def _settle(self, op: _Op) -> None:
        """Report ``op`` once all its requests are done (or stalled) and its outcome is known."""
        if op.state is OP_REPORTED or (op.pending and not op.stalled):
            return
        if op.tail_check and op.violation is None and op.error is None and op.fatal is None:
            self._check_tail(op)
        key = -1 if op.attempt is None else op.attempt.id
        known = op.reply is not None or op.error is not None or op.violation is not None
        if not known and op.state is not OP_WITHDRAWN:
            return
        if self.ops.get(key) is op:
            del self.ops[key]
        if op.channel is not None and op.channel is self.channel and op.attempt is not None:
            self.indices.discard(op.request & TAG_INDEX_MASK)  # its receives are done: the index is free
        if op.loud:
            op.loud = False
            if op.channel is self.channel:
                self.loud -= 1
                if not self.loud and self.waiting:  # a large READ may have waited for it (_admit)
                    asyncio.get_running_loop().call_soon(self._flush)
        if op.state is not OP_REPORTED:
            try:
                self._report(op)
            finally:  # the peer's staging share comes back even if reporting raised
                if op.sg is not None:
                    op.sg.release(reuse=not op.stalled)
                elif op.staged is not None:
                    staged, op.staged = op.staged, None
                    if not op.stalled:  # else UCX may still write into it: never back to the pool
                        scatter.staging_of(self.peer.site).give(staged)

    def _report(self, op: _Op) -> None:
        withdrawn = op.move(OP_REPORTED) in _WITHDRAWN_STATES
        a = op.attempt
        if a is None:  # the link's BIND
            if self.state is not LinkState.BINDING or op.channel is not self.channel:
                return  # a BIND of a link set-up that was torn down since
            if self._succeeded(op):
                self._bound()
            else:
                self._teardown(op.violation or op.fatal or op.error or f"rail {self.name}: BIND failed")
            return
        site = self.peer.site
        ctx = site.ctx
        if withdrawn and op.kind is Op.WRITE and self._succeeded(op):
            # Withdrawn (its deadline passed) but acknowledged all the same: the rail was slow, not
            # stuck, and its time is what the planner needs to learn that (it loosens the rail's
            # deadlines and takes the wire time).  A withdrawn READ's bytes are not checked: withdrawn.
            reply = op.reply
            peer_away = reply.away if isinstance(reply, (Ack, Sent, Where)) else 0
            ctx.complete(a.id, self._wire_time(op, site.clock(), peer_away * 1e-6))
        elif withdrawn:
            ctx.withdrawn(a.id)
        elif op.redo is not None and op.violation is None:
            # A direct copy not made (late WHERE, or the kernel refused): nothing landed; the planner
            # sends the slice again (held off briefly for a late answer, charged to the rail else).
            why, load = op.redo
            ctx.fail(a.id, RemoteBusyError(why) if load else RailLinkError(why), busy=load)
        elif op.fatal is not None and op.sg is not None and isinstance(op.reply, Error) and op.reply.retry:
            # The peer's load (no staging free), nothing written: the planner holds the rail off and
            # retries.  Only an extent-list slice takes staging, so only its refusal may say retry: a
            # peer cannot turn a permission or bounds refusal into retries.
            ctx.fail(a.id, RemoteBusyError(f"peer {self.peer.name!r} is busy: {op.fatal}"), busy=True)
        elif op.fatal is not None:
            ctx.fail(
                a.id,
                RemoteAccessError(f"peer {self.peer.name!r} refused the slice: {op.fatal}"),
                transfer_fatal=True,
            )
        elif op.violation is not None:
            ctx.fail(a.id, ProtocolError(op.violation), transfer_fatal=True)
        elif self._succeeded(op):
            if op.sg is not None and op.kind is Op.READ and not op.inline and not op.cma:
                op.sg.land()  # checked: every byte arrived (length and tail)
            elif op.staged is not None:  # checked likewise: now into the caller's memory
                dst: Segment = a.dst  # type: ignore[assignment]
                staged = Memory(array=op.staged, kind="host", readonly=False, owner=op.staged)
                copy_bytes(dst.memory, a.dst_offset, staged, 0, a.length)
            reply = op.reply
            peer_away = reply.away if isinstance(reply, (Ack, Sent, Where)) else 0
            ctx.complete(a.id, self._wire_time(op, site.clock(), peer_away * 1e-6))
        elif self.peer.closed:
            ctx.fail(a.id, PeerClosedError(self.peer.closed_reason()), transfer_fatal=True)
        else:
            ctx.fail(a.id, RailLinkError(op.error or f"rail {self.name}: link closed"), rail_down=True)

    def _wire_time(self, op: _Op, now: float, peer_away: float) -> float:
        """The slice's time on this rail: from its post (or the link's previous completion, if
        later) to now, less what an event loop spent meanwhile progressing other rails.

        With every rail progressed on one loop, a 16 MiB TCP message pushed in one
        progress call holds back a shared-memory slice's completion by as long, on
        either side; counted as shared memory's wire time, it made a fast rail beside
        slow ones look slow (0.04 GB/s learned for shm after six 64 MiB WRITEs over the
        default rails).  ``peer_away``: what the serving side says its loop spent on
        other rails while it served the slice (ACK/SENT).  The two loops' detours
        overlap (one pushes the TCP bytes the other receives), so the larger counts,
        not their sum.
        """
        away = self.rail.progress.away()
        if op.t_post >= self.last_done:
            start, start_away = op.t_post, op.away
        else:
            start, start_away = self.last_done, self.last_away
        self.last_done, self.last_away = now, away
        elapsed = now - start
        # Never below a tenth of what it took: the peer and the kernel may have moved some
        # of its bytes while a loop was elsewhere (a shared-memory copy by the peer), and a
        # peer's claim is believed only that far.
        return max(elapsed - max(away - start_away, peer_away), 0.1 * elapsed)

    # ------------------------------------------------------------- fencing

    def withdraw(self, a: Attempt) -> None:
        op = self.ops.get(a.id)
        if op is None or op.state is OP_REPORTED:
            if op is None:
                self.peer.site.ctx.withdrawn(a.id)
            return
        if op.state is OP_QUEUED:  # nothing of it reached UCX
            op.move(OP_WITHDRAWN)
            with contextlib.suppress(ValueError):
                self.waiting.remove(op)
            self._settle(op)
            if self.waiting:  # it may have been the head that held the others back (_admit)
                asyncio.get_running_loop().call_soon(self._flush)
            return
        op.move(OP_WITHDRAWING)
        # Grace: the configured minimum, or a few times what the planner expected the
        # slice to take, whichever is longer (a big slice on a loaded host is not stuck).
        grace = max(self.peer.site.withdraw_grace, 4.0 * a.expected)
        op.fence_at = self.peer.site.clock() + grace
        self._settle(op)
        if op.state is not OP_REPORTED:
            self._arm_fence()

    def _arm_fence(self) -> None:
        pending = [op.fence_at for op in self.ops.values() if op.state is OP_WITHDRAWING]
        if not pending or self._fence is not None:
            return
        delay = max(0.0, min(pending) - self.peer.site.clock())
        self._fence = asyncio.get_running_loop().call_later(delay, self._force_fence)

    def _force_fence(self) -> None:
        """Withdrawn slices did not finish within their grace: close the link (cancels them)."""
        self._fence = None
        now = self.peer.site.clock()
        stuck = [op for op in self.ops.values() if op.state is OP_WITHDRAWING and op.fence_at <= now]
        if not stuck:
            self._arm_fence()  # younger withdrawals: look again when theirs expires
            return
        if self.channel is None:
            return
        reason = (
            f"rail {self.name}: {len(stuck)} withdrawn slice(s) still in flight after their grace "
            f"period; link closed to stop them"
        )
        self.peer.site.log.info("fenced", "%s", reason)
        self.peer.site.stats["fenced_endpoints"] += 1
        self._teardown(reason)
        self.peer.site.ctx.rail_down(self.name, reason)

    def close(self, reason: str, *, tell: bool = False) -> None:
        if self._fence is not None:
            self._fence.cancel()
            self._fence = None
        self._teardown(reason, tell=tell)


def _put_bytes(view: Any, data: bytes) -> None:
    """Write ``data`` into a (numpy or cupy) view, and let that finish before UCX writes there."""
    host = np.frombuffer(data, dtype=np.uint8)
    if hasattr(view, "get"):  # pragma: no cover - cupy, needs a GPU
        import cupy

        with view.device:
            view.set(host)
            # UCX's CUDA transports copy on streams of their own (non-blocking ones do not
            # wait for the default stream): the marker must be in place before the receive.
            cupy.cuda.get_current_stream().synchronize()
        return
    view[:] = host


def _get_bytes(view: Any) -> bytes:
    """The bytes of a (numpy or cupy) view, on the host."""
    if hasattr(view, "get"):  # pragma: no cover - cupy, needs a GPU
        with view.device:
            view = view.get()
    return bytes(view.tobytes())


def _check_contiguous(view: Any) -> None:
    if not view.flags.c_contiguous:  # pragma: no cover - segments are flat, views of them contiguous
        raise UnregisteredSegmentError("a slice view is not contiguous; UCX would send the wrong bytes")


class Peer:
    """A connected peer engine.  Get one from ``await engine.connect("host:port")``.

    ``name`` is the peer engine's name, ``rails`` the engine rails that reach
    it, ``segments`` its catalogue at connect time.  ``await peer.segment(name)``
    returns a :class:`~tent_async.segments.RemoteSegment` to slice and transfer.
    """

    _link_ids = itertools.count(1)

    def __init__(
        self, site: Site, address: str, welcome: Welcome, reader: Any, writer: Any, session: Session | None
    ) -> None:
        self.site = site  # the engine it belongs to, as its links see it
        self.session = session  # with a shared secret: every control message is sealed with it
        self.address = address
        self.name = welcome.name
        self.host_id = welcome.host_id
        self.conn_id = welcome.conn_id
        self.slots = welcome.slots
        self.staging = scatter.StagingShare(welcome.staging)  # the peer staging our slices may hold
        self.inline_limit = min(site.inline_limit, welcome.inline_limit)
        # Where its TCP worker addresses may point, besides our rails' subnets: the address we
        # reached it at (what it advertises for its rails is its own claim, not a check).
        peername = writer.get_extra_info("peername") if writer is not None else None
        self.control_ip: str | None = str(peername[0]) if isinstance(peername, tuple) else None
        self.links: dict[str, Link] = {}
        self.closed = False
        self._closed_reason = ""
        self._reader = reader
        self._writer = writer
        self._catalogue: dict[str, SegmentAd] = {ad.name: ad for ad in welcome.catalogue}
        self._lookups: dict[str, list[asyncio.Future[SegmentAd | None]]] = {}
        self._by_link_id: dict[int, Link] = {}
        self._all_links: list[Link] = []  # also the ones connect() left out (closed with the peer)
        self._not_reading = False  # it left more than MAX_WRITE_BUFFER of our control bytes unread
        self.cma_pid: int | None = None  # its pid once it is verified for direct copies (cma.py, connect)
        self.cma_late = 0  # its WHEREs in a row that came after their deadline (Link._copy_now)
        self._backlog_check: asyncio.TimerHandle | None = None  # armed while more than that is queued

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

    def cma_off(self, reason: str) -> None:
        """Stop copying directly to this peer (a copy failed): its later slices go over UCX."""
        if self.cma_pid is not None:
            self.cma_pid = None
            self.site.log.warning("cma-off", "peer %r: direct copies turned off: %s", self.name, reason)

    def closed_reason(self) -> str:
        return f"peer {self.name!r} at {self.address} is gone: {self._closed_reason}"

    def add_link(self, link: Link) -> None:
        self._all_links.append(link)

    def register_link(self, link: Link) -> int:
        """A fresh link id for ``link`` (each setup of a link gets its own)."""
        for old, owner in list(self._by_link_id.items()):
            if owner is link:
                del self._by_link_id[old]
        link_id = next(self._link_ids)
        self._by_link_id[link_id] = link
        return link_id

    def send_control(self, msg: Message) -> None:
        if self.closed or self._not_reading:
            raise PeerClosedError(self.closed_reason())
        self._write(msg)

    def _write(self, msg: Message) -> None:
        if self._not_reading:
            raise PeerClosedError(self.closed_reason())
        write_message(self._writer, msg, self.session)
        queued = self._writer.transport.get_write_buffer_size()
        if queued <= MAX_WRITE_BUFFER:
            if self._backlog_check is not None:  # it read the last burst: a new one starts afresh
                self._backlog_check.cancel()
                self._backlog_check = None
            return
        # A peer that stopped reading its control connection would have every notification and
        # look-up queued for it without bound (audit, issue 11; the server bounds its clients
        # likewise).  A burst of notifications to a slow reader may queue more than
        # MAX_WRITE_BUFFER for a moment: past MAX_BACKLOG, or past MAX_WRITE_BUFFER for
        # BACKLOG_SECONDS, the peer is given up on.
        if queued > MAX_BACKLOG:
            self._not_reading_now(queued, f"more than {MAX_BACKLOG}")
        elif self._backlog_check is None:
            self._backlog_check = asyncio.get_running_loop().call_later(BACKLOG_SECONDS, self._check_backlog)

    def _check_backlog(self) -> None:
        self._backlog_check = None
        if self.closed or self._not_reading:
            return
        queued = self._writer.transport.get_write_buffer_size()
        if queued > MAX_WRITE_BUFFER:
            self._not_reading_now(queued, f"more than {MAX_WRITE_BUFFER} for {BACKLOG_SECONDS:g} s")

    def _not_reading_now(self, queued: int, how: str) -> None:
        self._not_reading = True
        self._closed_reason = f"it does not read its control connection ({queued} bytes of ours unread, {how})"
        self.site.stats["protocol_errors"] += 1
        self.site.log.warning("not-reading", "peer %r at %s: %s", self.name, self.address, self._closed_reason)
        asyncio.get_running_loop().call_soon(self._give_up, self._closed_reason)

    def _give_up(self, reason: str) -> None:
        """Drop a peer that does not read: its links close now, its control connection is cut."""
        self._gone(reason)
        with contextlib.suppress(Exception):
            self._writer.transport.abort()  # run() then ends and closes the writer

    async def segment(self, name: str, *, refresh: bool = False) -> RemoteSegment:
        """The peer's segment ``name``; asks the peer unless it is in the catalogue (or ``refresh``)."""
        if self.closed or self._not_reading:
            raise PeerClosedError(self.closed_reason())
        ad = None if refresh else self._catalogue.get(name)
        if ad is None:
            future: asyncio.Future[SegmentAd | None] = asyncio.get_running_loop().create_future()
            waiters = self._lookups.setdefault(name, [])
            waiters.append(future)
            if len(waiters) == 1:
                self._write(Lookup(name=name))
            ad = await asyncio.wait_for(future, self.site.connect_timeout)
            if ad is None:
                self._catalogue.pop(name, None)
                raise UnregisteredSegmentError(
                    f"peer {self.name!r} has no segment named {name!r}; it has {sorted(self._catalogue)}"
                )
            self._catalogue[name] = ad
        return self._remote(ad)

    def notify(self, message: str) -> None:
        if not self.closed:
            with contextlib.suppress(PeerClosedError):  # dropped with the peer, as any notification is
                self._write(Notify(message=message))

    async def run(self) -> None:
        """Read control messages until the connection ends (runs in the engine's task group)."""
        reason = "the control connection ended"
        try:
            while True:
                msg = await read_message(self._reader, session=self.session)
                if isinstance(msg, LookedUp):
                    for fut in self._lookups.pop(msg.name, []):
                        if not fut.done():
                            fut.set_result(msg.segment)
                elif isinstance(msg, Linked):
                    link = self._by_link_id.get(msg.link_id)
                    if link is not None:
                        link.on_linked(msg)
                elif isinstance(msg, Unlink):
                    link = self._by_link_id.get(msg.link_id)
                    if link is not None:
                        link.on_unlink(msg)
                elif isinstance(msg, Bye):
                    reason = f"it said goodbye ({msg.reason})"
                    return
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} on the control connection")
        except PeerClosedError:
            reason = "it closed the connection (process ended?)"
        except ProtocolError as exc:
            self.site.stats["protocol_errors"] += 1
            reason = f"protocol error: {exc}"
            self.site.log.warning("malformed", "peer %r: %s", self.name, reason)
        except (ConnectionError, OSError) as exc:
            reason = f"connection error: {exc}"
        finally:
            self._gone(reason)
            await close_writer(self._writer)

    def _gone(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._backlog_check is not None:
            self._backlog_check.cancel()
            self._backlog_check = None
        self._closed_reason = reason
        self.site.log.info("gone", "peer %r at %s: %s", self.name, self.address, reason)
        for waiters in self._lookups.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(PeerClosedError(self.closed_reason()))
        self._lookups.clear()
        for link in self._all_links:
            link.close(self.closed_reason())
        self._by_link_id.clear()

    async def close(self) -> None:
        """Say goodbye and close every link to the peer (slices in flight fail)."""
        if self.closed:
            return
        with contextlib.suppress(PeerClosedError):
            self._write(Bye(reason="closed by the application"))
        self._gone("closed by this engine")
        await close_writer(self._writer)
