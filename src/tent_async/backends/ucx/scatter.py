"""Scatter-gather slices over ucx: one header per slice, with its extent list.

The planner cuts a batch's byte stream into slices that may carry many
extents (:class:`~tent_async.core.extents.SliceExtents`).  Over UCX each such
slice is **one** header (``WRITEV``/``READV``, :class:`~.protocol.ScatterRequest`)
and exactly one reply, like a one-extent slice; only the bytes travel
differently:

* **Inline** (the extent table and the bytes fit the peer's inline limit): the
  header carries the table and, for a WRITE, the bytes gathered in stream
  order; a READ is answered with ``DATA``.
* **Bulk**: the initiator gathers the extents' bytes into one staging buffer
  and sends them as one tagged message (WRITE); the target receives them into
  a bounded staging buffer of its own, checks, and scatters.  A READ is the
  same reversed: the target gathers into staging and sends one message, the
  initiator receives into staging and scatters (after the length and tail
  checks of a one-extent READ).  An extent table too big for the header leads
  the bulk message (WRITE) or travels alone after the header (READ).

**Checks on the target, before any byte reaches a segment**: every segment of
the header's table is registered, is the registration the client looked up
(sid), and is writable for a WRITE; the slice is within ``max_request``; it
carries no more extents than its bytes allow
(:func:`~.protocol.extents_allowed`: 256, plus one per 512 bytes, so the
copying a header causes follows the bytes it moves; refused and counted in
``stats["extents_refused"]``); the staging it needs fits the bounds below; every extent lies inside its segment
(``offset + length <= size``, computed without overflow: the codec bounds
offsets and lengths); the lengths add up to the header's total (the codec).
Semantic violations are answered with ``ERROR`` (``stats["rejected"]``), a
malformed table is a protocol violation that drops the connection; either way
nothing is written.

**Staging bounds (target)**: per link at most one staging buffer per header
slot and :data:`STAGING_PER_LINK` bytes, per peer connection
:data:`STAGING_PER_CONNECTION`, per engine :data:`STAGING_PER_ENGINE` bytes; a
header beyond any is refused with ``ERROR`` and counted
(``stats["protocol_errors"]``, ``stats["staging_refused"]``).  That ``ERROR``
says ``retry`` when the slice could fit once staging is free: it is the
server's load, not the slice's fault, and the client lets the planner retry it.  Buffers are
released when their slice ends or its link closes (every request on a closed
endpoint is cancelled, and its completion releases what it held).  Idle
buffers are kept for reuse up to :data:`POOL_BYTES` per engine (page faults
on a fresh 16 MiB buffer cost about as much as copying it), in power-of-two
sizes so that one serves every slice from half its size up: slices' sizes
follow the rails' learned rates and vary from one to the next, and with
buffers cut to each size (and 64 MiB kept) a 64 MiB KV batch over shared
memory still took 600-1,300 page faults per transfer on the client.

The initiator's own staging is bounded by what it keeps in flight: one buffer
per slice, at most one slice per header slot of each link.  It also keeps the
peer's within bounds: WELCOME states the connection's share (:func:`share`),
and a slice that would take the connection past it waits in its link's queue
(:class:`StagingShare`), so an honest client alone is not refused as busy.

GPU memory: extents in CUDA memory are staged through host memory, copied
extent by extent (:func:`~tent_async.memory.copy_bytes`); this has not run on
a GPU.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ...core import Attempt
from ...errors import ProtocolError, TentError
from ...memory import Memory, copy_bytes, copy_extents
from ...segments import RemoteSegment, Segment
from . import _ucxx
from .protocol import (
    EXTENT_BYTES,
    KIND_DATA,
    MAX_EXTENTS,
    MAX_SG_SEGMENTS,
    MIN_EXTENT_BYTES,
    TAIL_BYTES,
    Ack,
    Data,
    Op,
    ScatterRequest,
    Sent,
    Where,
    extents_allowed,
    make_tag,
    pack_table,
    unpack_table,
)

if TYPE_CHECKING:
    from .channel import Channel
    from .control import LogLimiter
    from .rails import LocalRail
    from .site import Site

logger = logging.getLogger("tent_async.ucx")

STAGING_PER_LINK = 128 << 20  # staging bytes one link's slices may hold on the target ...
STAGING_PER_ENGINE = 512 << 20  # ... and all links of an engine together
STAGING_PER_CONNECTION = STAGING_PER_ENGINE // 4  # one peer connection's links together
PARKED_FACTOR = 2  # staging being served and parked (LinkStaging.park) together: at most this x the engine's
BULK_WAIT = 10.0  # seconds a served slice's bulk bytes may take to move, plus ...
BULK_RATE = 1e6  # ... one second per this many bytes: then the peer's connection is dropped
POOL_BYTES = 256 << 20  # idle staging kept for reuse, per engine
POOL_MIN = 64 << 10  # smaller buffers are allocated fresh (cheap)
SEGMENT_ROOM = 1024  # bytes of segment names one header may carry

Array = np.ndarray[Any, np.dtype[Any]]


class ScatterError(TentError):
    """A scatter-gather slice this backend cannot carry (mixed directions, too many extents)."""


# ================================================================= copying


def _starts(length: Array) -> Array:
    starts = np.empty(len(length) + 1, dtype=np.int64)
    starts[0] = 0
    np.cumsum(length, out=starts[1:])
    return starts


def _host(out: Array) -> Memory:
    return Memory(array=out, kind="host", readonly=False, owner=out)


def gather(mems: Sequence[Memory], index: Array, offsets: Array, lengths: Array, out: Array) -> None:
    """Copy extents ``(mems[index[i]], offsets[i], lengths[i])``, in order, into ``out`` (host)."""
    n = len(lengths)
    if any(m.is_cuda for m in mems):
        staging, pos = _host(out), 0
        for i, b, k in zip(index.tolist(), offsets.tolist(), lengths.tolist(), strict=True):
            copy_bytes(staging, pos, mems[i], b, k)
            pos += k
        return
    starts = _starts(lengths)
    lo = hi = 0
    if n >= 8 and (index == index[0]).all():
        lo, hi = _gather_run(mems[int(index[0])].array, offsets, lengths, out, starts)
    views = [memoryview(m.array) for m in mems]
    dst = memoryview(out)  # type: ignore[arg-type]
    for part in (slice(0, lo), slice(hi, n)):
        for i, b, k, s in zip(
            index[part].tolist(), offsets[part].tolist(), lengths[part].tolist(), starts[part].tolist(), strict=True
        ):
            dst[s : s + k] = views[i][b : b + k]


def _gather_run(src: Array, offsets: Array, lengths: Array, out: Array, starts: Array) -> tuple[int, int]:
    """Gather the middle extents in one numpy ``take`` when they are equal blocks of 1 KiB or more.

    The mirror of :func:`tent_async.memory._equal_blocks`: row ``r`` of a
    byte-strided view of the source is bytes ``[r, r + block)``.
    """
    n = len(lengths)
    lo, hi = 1, n - 1
    block = int(lengths[lo])
    if block < 1024 or not (lengths[lo:hi] == block).all():
        return 0, 0
    rows = hi - lo
    first = int(starts[lo])
    target = out[first : first + rows * block].reshape(rows, block)
    where = offsets[lo:hi]
    if not (where % block).any():  # blocks on a grid (a KV pool): rows of a plain 2-D view, no temporary
        grid = src[: src.shape[0] - src.shape[0] % block].reshape(-1, block)
        np.take(grid, where // block, axis=0, out=target, mode="clip")  # offsets checked: within bounds
    else:  # np.take would copy a strided source whole: fancy indexing (one temporary of the rows)
        target[...] = as_strided(src, shape=(src.shape[0] - block + 1, block), strides=(1, 1))[where]
    return lo, hi


def scatter(data: Array, mems: Sequence[Memory], index: Array, offsets: Array, lengths: Array) -> None:
    """Copy ``data`` (the extents' bytes in stream order) to ``(mems[index[i]], offsets[i], lengths[i])``."""
    table = [_host(data), *mems]
    n = len(lengths)
    copy_extents(table, np.zeros(n, dtype=np.int32), _starts(lengths)[:-1], index + 1, offsets, lengths)


# ================================================================= staging


class Staging:
    """An engine's staging buffers: idle ones kept for reuse, and the bytes in use on the serving side."""

    def __init__(self) -> None:
        self.in_use = 0  # serving side: bytes of staging held by slices of all links
        self.parked = 0  # ... by closed links whose endpoint parked (outside in_use: LinkStaging.park)
        self.by_connection: dict[int, int] = {}  # serving side: bytes held per peer connection
        self.parked_by_source: dict[str, int] = {}  # ... and parked per source address (LinkStaging.source)
        self._free: dict[int, list[Array]] = {}  # idle buffers by size (a power of two), last given on top
        self._ages: collections.OrderedDict[int, int] = collections.OrderedDict()  # id(buffer) -> size, oldest first
        self._idle = 0

    def take(self, n: int) -> Array:
        """A host buffer of exactly ``n`` bytes (contents undefined): an idle one of the next power of
        two, or a new one of that size (smaller than ``POOL_MIN``: a new one of ``n`` bytes)."""
        if n < POOL_MIN:
            return np.empty(n, dtype=np.uint8)
        size = 1 << (n - 1).bit_length()
        idle = self._free.get(size)
        if idle:
            base = idle.pop()
            del self._ages[id(base)]
            self._idle -= size
            return base[:n]
        return np.empty(size, dtype=np.uint8)[:n]

    def give(self, buf: Array) -> None:
        """``buf`` (from :meth:`take`) is no longer used by anything, UCX included.

        Kept idle for reuse, the oldest idle buffers dropped to make room: within
        ``POOL_BYTES`` the pool follows the sizes slices have now, not the ones
        they had (a pool full of small buffers would otherwise turn large ones
        away for ever).
        """
        base = buf.base if isinstance(buf.base, np.ndarray) else buf
        size = int(base.shape[0])
        if size < POOL_MIN or size > POOL_BYTES or size & (size - 1) or id(base) in self._ages:
            return  # not one of ours to keep (a small or odd-sized buffer), or given twice
        while self._idle + size > POOL_BYTES:
            _key, old = self._ages.popitem(last=False)
            self._free[old].pop(0)  # the oldest of its size: the bottom of that stack
            self._idle -= old
        self._free.setdefault(size, []).append(base)
        self._ages[id(base)] = size
        self._idle += size

    def clear(self) -> None:
        self._free.clear()
        self._ages.clear()
        self._idle = 0


_STAGING: weakref.WeakKeyDictionary[Site, Staging] = weakref.WeakKeyDictionary()


def staging_of(site: Site) -> Staging:
    """The staging pool of the engine ``site`` belongs to (one per engine: its peers and server share it)."""
    pool = _STAGING.get(site)
    if pool is None:
        pool = _STAGING[site] = Staging()
    return pool


def share() -> int:
    """The staging one connection's slices may hold on this engine at once: the smallest of the
    bounds they all meet (per link, per connection, per engine); WELCOME states it to clients."""
    return min(STAGING_PER_LINK, STAGING_PER_CONNECTION, STAGING_PER_ENGINE)


def _deduct(counts: dict[Any, int], key: Any, n: int) -> None:
    """``counts[key] -= n``, the entry gone once nothing is left (the bounds read absent keys as 0)."""
    left = counts.get(key, 0) - n
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class LinkStaging:
    """The staging one serving link holds: bounded in count and bytes, per link and per engine."""

    def __init__(self, pool: Staging, slots: int, connection: int = 0, source: str = "") -> None:
        self.pool = pool
        self.slots = slots
        self.connection = connection  # the peer connection's serial: its links share one quarter
        self.source = source  # what per-source bounds count the peer under (its address, or its /64)
        self.count = 0
        self.bytes = 0
        self.parked = False  # the link closed with staging still UCX's: counted in pool.parked

    def park(self) -> None:
        """The link closed while a send of its staging still goes out (its endpoint lingers).

        That staging no longer counts against the engine's and the connection's
        bounds, which are for slices being served: a peer that stops reading
        would otherwise keep every other peer's extent lists refused as busy.
        It counts in ``pool.parked`` (and per source) instead, which :meth:`take`
        bounds: staging is held by slices being served and by parked links
        together up to twice the engine's bound, and a source with a
        connection's share parked gets no more until it reads or goes.
        """
        if self.parked:
            return
        self.parked = True
        pool = self.pool
        pool.in_use -= self.bytes
        pool.parked += self.bytes
        if self.bytes:
            pool.parked_by_source[self.source] = pool.parked_by_source.get(self.source, 0) + self.bytes
        _deduct(pool.by_connection, self.connection, self.bytes)

    def take(self, n: int) -> Array | None:
        """A staging buffer of ``n`` bytes, or None when a bound would be exceeded.

        Bounds: per link, per peer connection (a quarter of the engine's, so one
        peer cannot hold it all), per engine; with parked staging (:meth:`park`)
        at most ``PARKED_FACTOR`` times the engine's bound in all, and none for a
        source that has a connection's share parked.
        """
        pool = self.pool
        held = pool.by_connection.get(self.connection, 0)
        if (
            self.count >= self.slots
            or self.bytes + n > STAGING_PER_LINK
            or held + n > STAGING_PER_CONNECTION
            or pool.in_use + n > STAGING_PER_ENGINE
            or pool.in_use + pool.parked + n > PARKED_FACTOR * STAGING_PER_ENGINE
            or pool.parked_by_source.get(self.source, 0) >= STAGING_PER_CONNECTION
        ):
            return None
        self.count += 1
        self.bytes += n
        pool.in_use += n
        pool.by_connection[self.connection] = held + n
        return pool.take(n)

    def give(self, buf: Array) -> None:
        n = int(buf.shape[0])
        self.count -= 1
        self.bytes -= n
        pool = self.pool
        if self.parked:
            pool.parked -= n
            _deduct(pool.parked_by_source, self.source, n)
            pool.give(buf)
            return
        pool.in_use -= n
        _deduct(pool.by_connection, self.connection, n)
        pool.give(buf)


# =============================================================== initiator


def _used(index: Array) -> tuple[list[int], Array]:
    """The distinct segment indices of ``index`` (sorted) and ``index`` renumbered into that list."""
    first = int(index[0])
    if (index == first).all():  # the usual case: one segment on this side
        return [first], np.zeros(len(index), dtype=np.int64)
    used, inverse = np.unique(index, return_inverse=True)
    return used.tolist(), inverse.astype(np.int64)


class Plan:
    """The initiator's side of one scatter-gather slice: its header, staging, and landing."""

    __slots__ = (
        "cma",
        "count",
        "inline",
        "kind",
        "lengths",
        "local",
        "local_index",
        "local_offsets",
        "pool",
        "remote",
        "remote_index",
        "remote_offsets",
        "reserved",
        "share",
        "staging",
        "table",
        "table_inline",
        "total",
    )

    def __init__(self, a: Attempt, peer: Any, inline_limit: int, pool: Staging, *, direct: bool = False) -> None:
        ext = a.extents
        assert ext is not None
        segs = ext.segments
        src_seg, src_off, dst_seg, dst_off, lengths = ext.arrays()
        src_used, src_index = _used(src_seg)
        dst_used, dst_index = _used(dst_seg)
        remote = [isinstance(s, RemoteSegment) for s in segs]
        if all(remote[i] for i in dst_used) and not any(remote[i] for i in src_used):
            self.kind = Op.WRITE
            l_used, l_index, l_off, r_used, r_index, r_off = src_used, src_index, src_off, dst_used, dst_index, dst_off
        elif all(remote[i] for i in src_used) and not any(remote[i] for i in dst_used):
            self.kind = Op.READ
            l_used, l_index, l_off, r_used, r_index, r_off = dst_used, dst_index, dst_off, src_used, src_index, src_off
        else:
            raise ScatterError(
                "a scatter-gather slice over ucx moves bytes one way: this batch mixes blocks to and from "
                "the peer; submit its WRITE and READ blocks as separate batches"
            )
        n = len(lengths)
        if n > MAX_EXTENTS:
            raise ScatterError(
                f"a slice of {n} extents exceeds the {MAX_EXTENTS} one header may carry; use larger blocks "
                "or a smaller max_slice"
            )
        if n > extents_allowed(int(a.length)):
            raise ScatterError(
                f"a slice of {n} extents in {int(a.length)} bytes is too fragmented for the peer (at most "
                f"{extents_allowed(int(a.length))}: blocks must average {MIN_EXTENT_BYTES} bytes or more); "
                "use larger blocks, or place small ones next to each other on both sides so they coalesce"
            )
        if len(r_used) > MAX_SG_SEGMENTS:
            raise ScatterError(f"a slice touches {len(r_used)} peer segments; at most {MAX_SG_SEGMENTS} per slice")
        table: list[tuple[str, int]] = []
        for i in r_used:
            seg = segs[i]
            assert isinstance(seg, RemoteSegment)
            if seg.peer is not peer:
                raise ScatterError(f"{seg!r} belongs to another peer than this rail's; refusing to send there")
            table.append((seg.name, seg.sid))
        if sum(len(name.encode()) + 10 for name, _ in table) > SEGMENT_ROOM:
            raise ScatterError(
                f"the names of the {len(table)} peer segments of one slice exceed {SEGMENT_ROOM} bytes; "
                "use shorter segment names or fewer segments per batch"
            )
        local: list[Memory] = []
        for i in l_used:
            seg = segs[i]
            assert isinstance(seg, Segment)
            if self.kind is Op.READ and seg.memory.readonly:
                raise ScatterError(f"{seg!r} is read-only memory; nothing may be received into it")
            local.append(seg.memory)
        self.remote = tuple(table)
        self.local = local
        self.local_index = l_index
        self.local_offsets = l_off
        self.lengths = lengths
        self.count = n
        self.total = int(a.length)
        self.remote_index = r_index
        self.remote_offsets = r_off
        self.table = pack_table(r_index, r_off, lengths)
        self.table_inline = len(self.table) <= inline_limit
        host = all(getattr(segs[i], "kind", "host") == "host" for i in r_used)  # the peer's side: host memory
        self.inline = host and self.table_inline and self.total + len(self.table) <= inline_limit
        # ``direct``: the link may copy directly (cma.py); host memory on both sides, and not inline
        self.cma = direct and host and not self.inline and not any(m.is_cuda for m in local)
        self.pool = pool
        self.staging: Array | None = None
        self.share: StagingShare | None = None  # the peer staging it holds (flow control) ...
        self.reserved = 0  # ... and how much

    @property
    def need(self) -> int:
        """The peer's staging for this slice, by :func:`serve`'s rule: its bulk message (WRITE) or
        its table and bytes (READ), exact (the pool's rounding up is not counted); 0 when inline."""
        if self.inline or self.cma:
            return 0
        return (0 if self.table_inline else self.count * EXTENT_BYTES) + self.total

    def _gathered(self, prefix: bytes = b"") -> Array:
        buf = self.pool.take(len(prefix) + self.total)
        if prefix:
            buf[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        gather(self.local, self.local_index, self.local_offsets, self.lengths, buf[len(prefix) :])
        return buf

    def header(self, request: int) -> ScatterRequest:
        table = self.table if self.table_inline else None
        if self.cma:
            reach = np.zeros(len(self.remote), dtype=np.int64)
            np.maximum.at(reach, self.remote_index, self.remote_offsets + self.lengths)
            ends = tuple(reach.tolist())
            return ScatterRequest(self.kind, request, self.remote, self.count, self.total, cma=True, reach=ends)
        if self.kind is Op.READ:
            return ScatterRequest(Op.READ, request, self.remote, self.count, self.total, table, inline=self.inline)
        payload = None
        if self.inline:
            buf = self._gathered()
            payload = buf.tobytes()
            self.pool.give(buf)
        return ScatterRequest(Op.WRITE, request, self.remote, self.count, self.total, table, payload)

    def bulk(self) -> Array | None:
        """The message to send after the header (WRITE: [table] + bytes; READ: a table too big for it)."""
        if self.cma:
            return None
        if self.kind is Op.WRITE:
            if self.inline:
                return None
            self.staging = self._gathered(b"" if self.table_inline else self.table)
            return self.staging
        if self.table_inline:
            return None
        return np.frombuffer(self.table, dtype=np.uint8)

    def direct(self, bases: Sequence[int]) -> tuple[Array, Array, Array]:
        """The extents as ``(our addresses, the peer's, lengths)``, the peer's segments at ``bases`` (WHERE)."""
        ours = np.fromiter((m.address for m in self.local), dtype=np.uint64, count=len(self.local))
        theirs = np.asarray(bases, dtype=np.uint64)
        lengths = self.lengths.astype(np.uint64)
        local = ours[self.local_index] + self.local_offsets.astype(np.uint64)
        remote = theirs[self.remote_index] + self.remote_offsets.astype(np.uint64)
        return local, remote, lengths

    def landing(self) -> Array:
        """A large READ's receive buffer (host staging), its last bytes random (the tail check)."""
        self.staging = buf = self.pool.take(self.total)
        t = min(TAIL_BYTES, self.total)
        buf[self.total - t :] = np.frombuffer(os.urandom(t), dtype=np.uint8)
        return buf

    def tail(self) -> bytes:
        assert self.staging is not None
        return bytes(self.staging[self.total - min(TAIL_BYTES, self.total) :].tobytes())

    def land(self, data: Any = None) -> None:
        """Scatter a READ's bytes (``data``: DATA's payload; None: the staging buffer) to the destinations."""
        src = self.staging if data is None else np.frombuffer(data, dtype=np.uint8)
        assert src is not None
        scatter(src, self.local, self.local_index, self.local_offsets, self.lengths)

    def release(self, *, reuse: bool = True) -> None:
        """The slice ended: the peer's staging is free, and ours may be reused.

        ``reuse=False``: a send of ours may still read our staging (its endpoint
        parked, channel.py); the buffer stays with that request and never goes
        back to the pool, or another peer's bytes could follow it out.
        """
        buf, self.staging = self.staging, None
        if buf is not None and reuse:
            self.pool.give(buf)
        if self.share is not None:
            self.share.release(self)


class StagingShare:
    """Client-side flow control: the peer staging one connection's extent-list slices hold.

    The server refuses a slice whose staging would take its connection past
    the share stated in WELCOME (``ERROR`` with ``retry``: busy to the planner).
    An honest client with a few rails and full windows went past it routinely,
    so a slice that would exceed the share waits in its link's queue (before
    its header is sent) until earlier slices to the peer end, whatever their
    outcome (:meth:`Plan.release`).  Links wait their turn in order, so a rail
    with big slices is not starved by rails with small ones; a slice is always
    admitted when the connection holds nothing, so one larger than the share
    still goes (and the server refuses it, not for load, as before).  Sans-IO
    but for one ``call_soon``: wakes run from the loop, not from inside a
    report or a withdraw.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # bytes of peer staging admitted slices may hold
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()  # links' flush, in turn
        self._waking = False

    def admit(self, plan: Plan, wake: Callable[[], None]) -> bool:
        """Hold ``plan``'s staging now (True: send it), or queue ``wake`` to be called once some is freed."""
        n = plan.need
        if not n or plan.share is not None:
            return True
        waiting = self._waiting
        if (not waiting or waiting[0] == wake) and (not self.held or self.held + n <= self.limit):
            if waiting:
                waiting.popleft()
            self.held += n
            plan.share, plan.reserved = self, n
            return True
        if wake not in waiting:
            waiting.append(wake)
        return False

    def release(self, plan: Plan) -> None:
        """``plan`` ended (done, failed, withdrawn, its link closed): its staging is the peer's again."""
        if plan.share is not self:
            return
        self.held -= plan.reserved
        plan.share, plan.reserved = None, 0
        if self._waiting and not self._waking:
            self._waking = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        """Let every waiting link try again, first come first: the first that cannot fit queues
        first again, and those after it queue behind it."""
        self._waking = False
        waiting = list(self._waiting)
        self._waiting.clear()
        for wake in waiting:
            wake()


# ================================================================== target


class ServingClient(Protocol):
    """What the serving half uses of a client's connection (server.Connection): its name, for logs."""

    @property
    def name(self) -> str: ...


class ServingLink(Protocol):
    """What the serving half below uses of a link to a client (server.ServerLink).

    Named here rather than imported: server.py serves these slices through this
    module, and importing it back would make the two modules a cycle
    (tests/ucx/test_module_graph.py); mypy checks that ServerLink fits where
    server.py passes one in.
    """

    in_flight: int  # slices with a receive or send posted on the link

    @property
    def rail(self) -> LocalRail: ...
    @property
    def channel(self) -> Channel: ...
    @property
    def conn(self) -> ServingClient: ...
    @property
    def slots(self) -> Sequence[Array]: ...
    @property
    def staging(self) -> LinkStaging: ...
    @property
    def ns(self) -> int: ...
    @property
    def peer_ns(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def label(self) -> str: ...
    def reply(self, msg: Ack | Data | Sent | Where) -> None: ...
    def refuse(self, request: int, reason: str, *, retry: bool = False) -> None: ...
    def away_since(self, mark: float) -> int: ...
    def take_stashed(self, request: int) -> tuple[Any, int] | None: ...
    def violation(self, reason: str) -> None: ...
    def drain(self, msg: ScatterRequest) -> None: ...


class Serving(Protocol):
    """What the serving half uses of the server (server.Server): the engine, its catalogue and counts."""

    @property
    def site(self) -> Site: ...
    @property
    def log(self) -> LogLimiter: ...
    @property
    def segment_ops(self) -> collections.Counter[str]: ...
    def registration(self, name: str) -> tuple[Segment, int] | None: ...
    def answer_direct(
        self, link: Any, request: int, segs: Sequence[Segment], op: Op, nbytes: int, mark: float
    ) -> None: ...


def _resolve(server: Serving, link: ServingLink, msg: ScatterRequest) -> tuple[list[Segment], str]:
    """The segments a header may touch, or the reason it may not (everything but extent bounds)."""
    site = server.site
    segs: list[Segment] = []
    for name, sid in msg.segments:
        entry = server.registration(name)
        if entry is None or not entry[0].registered:
            return [], f"unknown segment {name!r} (not registered on engine {site.engine_name!r})"
        seg = entry[0]
        if entry[1] != sid:
            again = "look it up again with peer.segment()"
            return [], f"segment {name!r} was registered again since it was looked up; {again}"
        if msg.op is Op.WRITE and (seg.permission != "rw" or seg.memory.readonly):
            return [], f"segment {name!r} is read-only (permission {seg.permission!r}); WRITE refused"
        segs.append(seg)
    if msg.total > site.max_request:
        return [], f"{msg.total} bytes exceed the per-slice limit of {site.max_request}"
    inline = msg.payload is not None or msg.inline
    if inline and (msg.total > site.inline_limit or msg.count * EXTENT_BYTES > site.inline_limit):
        return [], f"inline slices are for extent lists and bytes up to {site.inline_limit} bytes"
    if msg.count > extents_allowed(msg.total):  # bounds the copying one header can ask for
        site.stats["protocol_errors"] += 1
        site.stats["extents_refused"] += 1
        return [], (
            f"{msg.count} extents in {msg.total} bytes: at most {extents_allowed(msg.total)} (blocks must "
            f"average {MIN_EXTENT_BYTES} bytes or more)"
        )
    if inline and any(seg.memory.is_cuda for seg in segs):  # as on the one-extent path: no GPU copy on the loop
        return [], "inline slices are for host memory; this slice touches GPU memory"
    if msg.cma:
        if any(seg.memory.is_cuda for seg in segs):
            return [], "direct copies are for host memory; this slice touches GPU memory"
        for seg, end in zip(segs, msg.reach, strict=True):
            if end > seg.size:
                return [], f"the slice reaches byte {end} of segment {seg.name!r} of {seg.size} bytes"
    if link.in_flight >= len(link.slots):
        site.stats["protocol_errors"] += 1
        return [], f"more than {len(link.slots)} slices in flight on this link"
    return segs, ""


def _bounds(segs: Sequence[Segment], index: Array, offsets: Array, lengths: Array) -> str:
    """Why an extent lies outside its segment, or "" when all lie inside."""
    sizes = np.fromiter((s.size for s in segs), dtype=np.int64, count=len(segs))
    ends = offsets + lengths  # no overflow: the codec bounds both far below 2^63
    bad = np.flatnonzero(ends > sizes[index])
    if not len(bad):
        return ""
    i = int(bad[0])
    seg = segs[int(index[i])]
    return (
        f"extent {i} [{int(offsets[i])}:{int(ends[i])}] is outside segment {seg.name!r} of {seg.size} bytes "
        f"({len(bad)} extent(s) outside)"
    )


class _Served:
    """One scatter-gather slice being served: its segments, staging and extents."""

    __slots__ = ("buf", "extents", "link", "mark", "marker", "msg", "segs", "server", "watch")

    def __init__(self, server: Serving, link: ServingLink, msg: ScatterRequest, segs: list[Segment]) -> None:
        self.server = server
        self.link = link
        self.mark = link.rail.progress.away()  # for ACK/SENT's ``away``
        self.msg = msg
        self.segs = segs
        self.buf: Array | None = None
        self.marker = b""  # random bytes at the end of the bulk receive's staging (serve): still there = short
        self.watch: asyncio.TimerHandle | None = None  # the deadline of the bulk bytes (_watch)
        self.extents: tuple[Array, Array, Array] | None = None
        if msg.table is not None:
            self.extents = unpack_table(msg.table, msg.count, len(msg.segments), msg.total)

    def begin(self) -> None:
        self.link.in_flight += 1
        for seg in self.segs:
            self.server.segment_ops[seg.name] += 1

    def end(self) -> None:
        self.link.in_flight -= 1
        ops = self.server.segment_ops
        for seg in self.segs:
            ops[seg.name] -= 1
            if ops[seg.name] <= 0:
                del ops[seg.name]
        self.release()

    def release(self) -> None:
        buf, self.buf = self.buf, None
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if buf is not None:
            self.link.staging.give(buf)

    def refuse(self, reason: str, *, retry: bool = False) -> None:
        server, msg = self.server, self.msg
        server.site.stats["rejected"] += 1
        server.log.warning(
            "rejected",
            "engine %r refused %sV of %d bytes in %d extents from %r: %s",
            server.site.engine_name,
            msg.op.name,
            msg.total,
            msg.count,
            self.link.conn.name,
            reason,
        )
        self.link.refuse(msg.request, reason, retry=retry)

    def checked(self) -> bool:
        """Check every extent against its segment; refuse the slice (and say False) if one is outside."""
        assert self.extents is not None
        reason = _bounds(self.segs, *self.extents)
        if reason:
            self.refuse(reason)
            return False
        return True

    def mems(self) -> list[Memory]:
        return [s.memory for s in self.segs]

    def write(self, data: Array) -> None:
        assert self.extents is not None
        scatter(data, self.mems(), *self.extents)
        stats = self.server.site.stats
        stats["served_write"] += 1
        stats["bytes_written"] += self.msg.total
        self.count()
        self.link.reply(Ack(request=self.msg.request, away=self.link.away_since(self.mark)))

    def count(self) -> None:
        stats = self.server.site.stats
        stats["scatter_slices"] += 1
        stats["scatter_extents"] += self.msg.count

    def read(self, out: Array) -> None:
        assert self.extents is not None
        gather(self.mems(), *self.extents, out)


def staging_need(msg: ScatterRequest) -> int:
    """The staging a header takes on the server: a WRITE's bulk message ([table] + bytes) or a
    READ's [table] + bytes; 0 when the bytes travel inline or are copied directly (cma.py)."""
    table = 0 if msg.table is not None else msg.count * EXTENT_BYTES
    if msg.op is Op.WRITE or msg.cma:
        return msg.bulk_length  # a direct copy: 0
    return table + (0 if msg.inline else msg.total)


def serve(server: Serving, link: ServingLink, msg: ScatterRequest) -> None:
    """Serve a WRITEV/READV header: check it all, then move bytes (see the module docstring)."""
    stats = server.site.stats
    segs, reason = _resolve(server, link, msg)
    bulk = msg.bulk_length
    need = staging_need(msg)
    served = _Served(server, link, msg, segs)
    busy = False  # refused for want of staging: the server's load, not the slice's fault
    if not reason and need:
        buf = link.staging.take(need)
        if buf is None:
            stats["protocol_errors"] += 1
            stats["staging_refused"] += 1
            busy = need <= share()  # can fit later
            reason = (
                f"staging for {need} bytes is beyond the bound (per link {link.staging.slots} slices and "
                f"{STAGING_PER_LINK} bytes, per connection {STAGING_PER_CONNECTION} bytes, per engine "
                f"{STAGING_PER_ENGINE} bytes)"
            )
            # Only a slice that fits once staging frees up is worth retrying; a larger one never will be.
            reason += "; retry later" if busy else "; it never fits: use a smaller max_slice"
        served.buf = buf
    if reason:
        served.refuse(reason, retry=busy)
        if bulk:
            link.drain(msg)
        return
    if served.extents is not None and not served.checked():
        served.release()
        if bulk:
            link.drain(msg)
        return
    if msg.cma:
        _direct(served)
        return
    if msg.op is Op.WRITE and msg.payload is not None:
        served.write(np.frombuffer(msg.payload, dtype=np.uint8))
        return
    if msg.op is Op.READ and msg.inline:
        out = np.empty(msg.total, dtype=np.uint8)
        served.read(out)
        stats["served_read"] += 1
        stats["bytes_read"] += msg.total
        served.count()
        link.reply(Data(request=msg.request, payload=out.tobytes()))
        return
    served.begin()
    if not bulk:  # a READ whose table came in the header: gather and send now
        _send(served)
        return
    assert served.buf is not None
    ch = link.channel
    target = served.buf[:bulk]
    stashed = link.take_stashed(msg.request)
    try:
        if stashed is not None:
            if stashed[1] != bulk:
                link.rail.discard(stashed[0], foreign=False)
                served.end()
                served.refuse(f"{msg.op.name}V announced {bulk} bulk bytes but {stashed[1]} were sent")
                return
            req = ch.recv_with_handle(target, stashed[0])
        else:
            # A tagged receive matched by a shorter message completes without error, and
            # staging (fresh from malloc, or reused) must never carry this process's old bytes
            # into a segment or a table.  Random bytes at its end, before the receive is
            # posted: a message that stops short leaves them there and is refused before
            # anything of it is used (_received); one that stops within them leaves only
            # those random bytes.  (It was zeroed whole before: a memset of every bulk byte,
            # on WRITE only, at 60-70 % of a copy's cost here.)
            t = min(TAIL_BYTES, bulk)
            served.marker = os.urandom(t)
            target[bulk - t :] = np.frombuffer(served.marker, dtype=np.uint8)
            req = ch.tag_recv(target, make_tag(link.ns, KIND_DATA, msg.request), bulk=True)
    except Exception as exc:
        served.end()
        link.refuse(msg.request, f"cannot receive: {_ucxx.describe_error(exc)}")
        return
    ch.keep(req, target, _received(served))
    _watch(served, bulk)


def _watch(served: _Served, nbytes: int) -> None:
    """Give a served slice's bulk bytes a deadline: a peer that announces them and never
    moves them (or never receives a READ's) would hold staging for ever."""
    limit = BULK_WAIT + nbytes / BULK_RATE

    def overdue() -> None:
        link = served.link
        served.watch = None
        if served.buf is None or link.closed:
            return  # finished, or already gone
        stats = served.server.site.stats
        stats["protocol_errors"] += 1
        stats["staging_overdue"] += 1
        link.violation(
            f"{link.label}: the {nbytes} bulk bytes of {served.msg.op.name}V request {served.msg.request} "
            f"did not move within {limit:.0f} s",
        )

    if served.watch is not None:
        served.watch.cancel()  # a READV whose table came in the bulk: now its send is watched
    served.watch = asyncio.get_running_loop().call_later(limit, overdue)


def _received(served: _Served) -> Callable[[BaseException | None], None]:
    def done(error: BaseException | None) -> None:
        link, msg = served.link, served.msg
        if link.closed:
            served.end()
            return
        if error is not None:
            served.end()
            link.refuse(msg.request, f"receive failed: {_ucxx.describe_error(error)}")
            return
        buf = served.buf
        assert buf is not None
        marker = served.marker
        bulk = msg.bulk_length
        if marker and buf[bulk - len(marker) : bulk].tobytes() == marker:
            served.end()  # the message stopped short: the rest of the staging is old memory, unused
            stats = served.server.site.stats
            stats["protocol_errors"] += 1
            stats["short_bulk"] += 1
            served.refuse(f"{msg.op.name}V's bulk message was shorter than the {bulk} bytes it announced")
            return
        offset = 0
        if msg.table is None:
            offset = msg.count * EXTENT_BYTES
            try:
                served.extents = unpack_table(buf[:offset], msg.count, len(msg.segments), msg.total)
            except ProtocolError as exc:
                served.end()
                served.server.site.stats["protocol_errors"] += 1
                link.violation(f"{link.label}: a malformed extent table: {exc}")
                return
            if not served.checked():
                served.end()
                return
        if msg.op is Op.WRITE:
            served.write(buf[offset : offset + msg.total])
            served.end()
            return
        _send(served)

    return done


def _direct(served: _Served) -> None:
    """A checked direct-copy extent list: WHERE, the segments busy until DONE (Server.answer_direct)."""
    served.count()
    msg = served.msg
    served.server.answer_direct(served.link, msg.request, served.segs, msg.op, msg.total, served.mark)


def _send(served: _Served) -> None:
    """A large READV: gather into staging and send it as one tagged message; SENT once it left."""
    link, msg = served.link, served.msg
    buf = served.buf
    assert buf is not None
    out = buf[buf.shape[0] - msg.total :]
    served.read(out)
    try:
        req = link.channel.tag_send(out, make_tag(link.peer_ns, KIND_DATA, msg.request))
    except Exception as exc:
        served.end()
        link.refuse(msg.request, f"cannot send: {_ucxx.describe_error(exc)}")
        return

    def done(error: BaseException | None) -> None:
        tail = bytes(out[msg.total - min(TAIL_BYTES, msg.total) :].tobytes())
        served.end()
        if link.closed:
            return
        if error is None:
            stats = served.server.site.stats
            stats["served_read"] += 1
            stats["bytes_read"] += msg.total
            served.count()
            link.reply(Sent(request=msg.request, length=msg.total, tail=tail, away=link.away_since(served.mark)))
        else:
            link.refuse(msg.request, f"send failed: {_ucxx.describe_error(error)}")

    link.channel.keep(req, out, done, send=True)
    _watch(served, msg.total)
