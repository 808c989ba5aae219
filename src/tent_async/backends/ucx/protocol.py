"""The wire protocol between two ucx-backend engines: messages and their codec.

Two planes, one codec:

* **Control** (a TCP connection to the engine's ``listen`` address, framed by
  :func:`frame`): ``CHALLENGE`` (server's nonce) → ``HELLO`` → ``WELCOME`` or
  ``REFUSED``; afterwards ``LINK``/``LINKED``/``UNLINK`` (the data plane's
  UCX worker addresses and tag namespaces, one link per rail pair),
  ``LOOKUP``/``LOOKED_UP`` (segment catalogue), ``NOTIFY`` and ``BYE``.  With a
  shared secret everything after ``HELLO`` travels inside ``SEALED`` (control.py).
* **Data** (UCX *tagged* messages into bounded receives the receiver posted
  beforehand, framed by :func:`pack_data`): ``BIND`` (wire-up ping), slice
  headers ``WRITE``/``READ`` (one extent) and ``WRITEV``/``READV`` (an extent
  list: a scatter-gather slice, :class:`ScatterRequest`), and the replies
  ``BOUND``, ``ACK``, ``ERROR``, ``DATA`` (small READs answered inline) and
  ``SENT`` (a large READ's bytes were sent, and how many); ``WHERE`` answers a header
  that asks for a direct copy (cma.py) with the addresses to copy to or from, and
  the initiator's one-byte ``DONE`` on the slice's data tag ends it.

Tags (:func:`make_tag`): the *receiver's* random 40-bit namespace for the
link, one bit for control or bulk data, and a 23-bit slot or request index.
Tags match per UCX worker, so the namespace alone says which link (and which
direction) a message belongs to; namespaces are chosen by the receiver and
only ever travel over the authenticated control connection.

Every message is a msgpack array ``[type, field, ...]``.  :func:`decode`
checks every field by hand (type, range, length) and builds a frozen attrs
value, so the rest of the backend never sees unchecked data; anything else
(truncated, malformed, unknown type, wrong arity, out-of-range values) raises
:class:`~tent_async.errors.ProtocolError` and nothing else.

Versioning: ``CHALLENGE`` and ``HELLO`` start with a magic string and the
protocol version, and those two fields keep their place in every version, so
a peer speaking another version is refused with a message that names both
versions (:class:`VersionMismatch`) instead of a parse error.  Any change to a
message layout bumps :data:`PROTOCOL_VERSION`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import msgpack
import numpy as np

from ...errors import ProtocolError

MAGIC: Final = "tent-ucx"
# 4: WRITEV/READV (extent lists); 5: ERROR says whether a retry may succeed; 6: ACK and SENT
# carry the server's ``away``; 7: WELCOME states the connection's staging share; 8: direct copies
# between processes on one host (cma.py): WELCOME's verification socket and token, headers' ``cma``,
# WHERE
PROTOCOL_VERSION: Final = 8

NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32  # HMAC-SHA256
MAX_NAME: Final = 256  # engine, rail, device and segment names (characters)
MAX_REASON: Final = 4096
MAX_AWAY_US: Final = (1 << 32) - 1  # ACK/SENT ``away``: microseconds (71 minutes)
MAX_MESSAGE: Final = 1 << 16  # a notification's text
MAX_RAILS: Final = 64
MAX_SEGMENTS: Final = 1 << 16
MAX_OBJECTS: Final = 8 * MAX_SEGMENTS  # arrays and their elements in one message (a full catalogue fits)
MAX_INLINE: Final = 1 << 20  # payload bytes carried inside one message
MAX_FRAME: Final = 16 << 20  # a control frame (the catalogue can be long)
MAX_HELLO_FRAME: Final = 64 << 10  # what a server reads before the client authenticated (and a client: CHALLENGE)
# What a client reads as WELCOME, before the server proved the secret: 64 rails with 8 KiB
# addresses fit in well under 1 MiB; a server leaves catalogue entries out to stay below it
# (the client looks them up).  Before, a malicious server could make a client read 16 MiB.
MAX_WELCOME_FRAME: Final = 2 << 20
MAX_CLIENT_FRAME: Final = 1 << 20  # what a server reads from an authenticated client
MAX_ADDRESS: Final = 8192  # a UCX worker address
MAX_SLOTS: Final = 64  # header receives a server posts per link
MAX_U64: Final = (1 << 64) - 1
MAX_PORT: Final = 65535

TAG_INDEX_BITS: Final = 23  # slot or request index
TAG_INDEX_MASK: Final = (1 << TAG_INDEX_BITS) - 1
TAG_NAMESPACE_BITS: Final = 40
MAX_NAMESPACE: Final = (1 << TAG_NAMESPACE_BITS) - 1
KIND_CONTROL: Final = 0  # headers (slot index) and replies (request index)
KIND_DATA: Final = 1  # bulk bytes of a slice (request index)
MAX_CONN_ID: Final = (1 << 32) - 1

HEADER_ROOM: Final = 2048  # a slice header without its inline payload, with room to spare
REPLY_ROOM: Final = 2048  # a reply without DATA's payload
TAIL_BYTES: Final = 16  # the end of a large READ that SENT repeats (Sent)
MAX_DATA_REASON: Final = 1024  # bytes of an ERROR reason on the data plane
_DATA_PREFIX = struct.Struct("<I")

# Scatter-gather slices (WRITEV/READV): a table of the peer's segments the slice touches and a
# packed extent list, three little-endian arrays one after the other: segment index (u16),
# offset (u64) and length (u64) per extent.
MAX_SG_SEGMENTS: Final = 64  # remote segments one extent list may name
MAX_EXTENTS: Final = 1 << 16  # extents in one slice
EXTENT_BYTES: Final = 2 + 8 + 8  # one extent in a packed table
MAX_TABLE: Final = EXTENT_BYTES * MAX_EXTENTS
MAX_EXTENT_OFFSET: Final = 1 << 62  # offsets and lengths stay far from int64's limit ...
MAX_EXTENT_LENGTH: Final = 1 << 40  # ... and 2^16 lengths cannot sum past it
# Copying a table costs about 1.7 us per extent on the event loop whatever its length (numpy and
# memoryview per extent), so a table of 65,536 one-byte extents cost ~60 ms per header for 64 KiB.
# A slice may carry FREE_EXTENTS extents, and one more per MIN_EXTENT_BYTES of its bytes: the work
# a header can ask for then follows the bytes it moves (extents_allowed).
FREE_EXTENTS: Final = 256
MIN_EXTENT_BYTES: Final = 512

RAIL_KINDS: Final = ("tcp", "shm", "cuda")
_FRAME_HEADER = struct.Struct("!I")


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version (``.version`` is the peer's)."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


def make_tag(namespace: int, kind: int, index: int) -> int:
    """The 64-bit UCX tag: the receiver's namespace, control or data, and a slot or request index.

    Tags match per UCX *worker*, not per endpoint, so every receiver gives each
    link its own random namespace: no other link's messages can match its
    receives, and nobody who has not been told the namespace can aim at them.
    """
    return (
        ((namespace & MAX_NAMESPACE) << (TAG_INDEX_BITS + 1))
        | ((kind & 1) << TAG_INDEX_BITS)
        | (index & TAG_INDEX_MASK)
    )


def split_tag(tag: int) -> tuple[int, int, int]:
    """``(namespace, kind, index)`` of a tag made by :func:`make_tag`."""
    return tag >> (TAG_INDEX_BITS + 1), (tag >> TAG_INDEX_BITS) & 1, tag & TAG_INDEX_MASK


# ================================================================ value types


@attrs.frozen
class RailAd:
    """One rail as advertised in the handshake: what the peer may connect to."""

    name: str
    kind: str  # tcp | shm | cuda
    device: str
    ip: str
    bandwidth: float  # bytes/s, a hint
    prefix: int  # IPv4 prefix length of ``ip``'s subnet
    address: bytes = b""  # the rail's UCX worker address (WELCOME only, after authentication)


@attrs.frozen
class SegmentAd:
    """One entry of a segment catalogue."""

    name: str
    sid: int  # registration id: changes when a name is registered again
    size: int
    kind: str  # host | cuda:N
    permission: str  # r | rw


class Op(enum.IntEnum):
    """Message type codes (the first array element)."""

    CHALLENGE = 1
    HELLO = 2
    WELCOME = 3
    REFUSED = 4
    LOOKUP = 5
    LOOKED_UP = 6
    NOTIFY = 7
    BYE = 8
    LINK = 9
    LINKED = 10
    UNLINK = 11
    SEALED = 12
    BIND = 20
    WRITE = 21
    READ = 22
    ACK = 23
    ERROR = 24
    DATA = 25
    BOUND = 26
    SENT = 27
    WRITEV = 28
    READV = 29
    WHERE = 30


@attrs.frozen
class Challenge:
    """Server → client, first: the protocol version and the server's nonce."""

    version: int
    nonce: bytes


@attrs.frozen
class Hello:
    """Client → server: who we are, our rails, our nonce and (with a secret) our MAC."""

    version: int
    name: str
    host_id: str
    rails: tuple[RailAd, ...]
    nonce: bytes
    auth: bytes  # b"" without a secret


@attrs.frozen
class Welcome:
    """Server → client: accepted; the connection id, rails (with worker addresses) and catalogue.

    ``slots`` header receives are posted per link, each with room for an inline
    payload of up to ``inline_limit`` bytes.  ``staging``: the bytes of staging
    this connection's extent-list slices may hold on the server at once (its
    bound; the client keeps within it, :class:`~.scatter.StagingShare`).
    ``cma``: the server's verification socket for direct copies (an abstract
    Unix socket name, "" when it offers none) and ``cma_token`` this
    connection's token for it (cma.py).
    """

    version: int
    name: str
    host_id: str
    conn_id: int
    rails: tuple[RailAd, ...]
    catalogue: tuple[SegmentAd, ...]
    auth: bytes
    slots: int
    inline_limit: int
    staging: int
    cma: str = ""
    cma_token: bytes = b""


@attrs.frozen
class Refused:
    """Either side: the handshake is refused, with the reason."""

    reason: str


@attrs.frozen
class Lookup:
    """Client → server: describe the segment called ``name``."""

    name: str


@attrs.frozen
class LookedUp:
    """Server → client: the answer to :class:`Lookup` (``segment`` None: not registered)."""

    name: str
    segment: SegmentAd | None


@attrs.frozen
class Notify:
    """Client → server: a transfer's notification, sent after all its slices were acknowledged."""

    message: str


@attrs.frozen
class Bye:
    """Either side: the connection is closing on purpose."""

    reason: str


@attrs.frozen
class Link:
    """Client → server: open (or reopen) the data plane on the server's rail ``rail``.

    ``address`` is the client rail's UCX worker address (the server opens its
    endpoint for replies to it), ``namespace`` the client's tag namespace for
    this link's replies and READ data.
    """

    link_id: int
    rail: str
    address: bytes
    namespace: int


@attrs.frozen
class Linked:
    """Server → client: the link is ready; its header slots are posted in ``namespace``."""

    link_id: int
    namespace: int


@attrs.frozen
class Unlink:
    """Either side: the link is gone (refused, failed, fenced or closed) and why."""

    link_id: int
    reason: str


@attrs.frozen
class Sealed:
    """Control, with a shared secret: another message, encrypted and authenticated with the session key.

    Everything after ``HELLO`` travels sealed (``WELCOME`` included), see control.py.
    """

    box: bytes


@attrs.frozen
class Bind:
    """Data plane, the first header on a new link: a wire-up round trip."""

    request: int


@attrs.frozen
class Bound:
    """Data plane, the answer to :class:`Bind`."""

    request: int


@attrs.frozen
class SliceRequest:
    """A slice header: WRITE (``payload`` inline, or a tagged send follows) or READ."""

    op: Op  # Op.WRITE or Op.READ
    request: int
    segment: str
    sid: int
    offset: int
    length: int
    payload: bytes | None = None  # WRITE: the bytes themselves, for small slices
    inline: bool = False  # READ: answer with DATA instead of a tagged send
    cma: bool = False  # answer with WHERE: the initiator copies directly (cma.py)


@attrs.frozen
class ScatterRequest:
    """A scatter-gather slice header: WRITE or READ of an extent list (``WRITEV``/``READV``).

    ``segments`` are the receiver's segments the slice touches, ``(name, sid)``;
    the extent list has ``count`` extents of ``total`` bytes in all.  ``table``
    is the packed list (:func:`pack_table`), or None when it does not fit the
    header: it then leads the slice's bulk message (WRITE: table, then the
    bytes; READ: the table alone, sent by the reader after the header).  A WRITE
    small enough carries its bytes, gathered in stream order, in ``payload``
    (``table`` is then present); a READ with ``inline`` is answered with DATA.
    With ``cma`` neither the bytes nor the table travel: the answer is WHERE
    and the initiator copies directly (cma.py).  ``reach`` then says, per
    segment of ``segments``, where the slice's furthest extent in it ends: the
    server checks it against the segment's size (the initiator copies with its
    own table, so the server cannot check more than the initiator declares).
    """

    op: Op  # Op.WRITE or Op.READ
    request: int
    segments: tuple[tuple[str, int], ...]
    count: int
    total: int
    table: bytes | None = None
    payload: bytes | None = None  # WRITE: the bytes themselves, for small slices
    inline: bool = False  # READ: answer with DATA instead of a tagged send
    cma: bool = False  # answer with WHERE: the initiator copies directly (cma.py)
    reach: tuple[int, ...] = ()  # cma: per segment, the end of the furthest extent in it

    @property
    def bulk_length(self) -> int:
        """Bytes of the bulk message that follows the header (0: none)."""
        if self.cma:
            return 0
        table = 0 if self.table is not None else self.count * EXTENT_BYTES
        if self.op is Op.WRITE:
            return 0 if self.payload is not None else table + self.total
        return table


@attrs.frozen
class Ack:
    """The slice landed (WRITE: the receive completed).

    ``away``: microseconds the server's event loop spent progressing its *other*
    rails between the header's arrival and this reply (see ``Progress.away``).
    The initiator does not count that time as this rail's wire time; it trusts it
    only up to what it measured itself (peer.py, ``Link._wire_time``).
    """

    request: int
    away: int = 0


@attrs.frozen
class Error:
    """The slice was refused; nothing of it was written.

    ``retry``: the refusal was the server's load (no staging free), not the
    slice's fault, so the same slice may succeed later.
    """

    request: int
    reason: str
    retry: bool = False


@attrs.frozen
class Where:
    """The answer to a header with ``cma``: checked; copy directly, then say ``DONE``.

    ``bases``: the address of each segment the header named, in its order (one
    for a one-extent slice); ``until``: the server's ``time.monotonic()`` after
    which the initiator must not start the copy (cma.py).
    """

    request: int
    bases: tuple[int, ...]
    until: float
    away: int = 0  # as in :class:`Ack`


@attrs.frozen
class Data:
    """A small READ's bytes."""

    request: int
    payload: bytes


@attrs.frozen
class Sent:
    """A large READ's tagged send completed on the serving side, with ``length`` bytes.

    ``tail`` is the last ``min(TAIL_BYTES, length)`` bytes that were sent.  A tagged
    receive matched by a shorter message completes without error and UCX does not
    say how many bytes arrived, so the reader fills the end of its destination with
    random bytes before it posts the receive and compares them with ``tail`` after:
    a message that stopped short leaves the random bytes in place (see peer.py).
    """

    request: int
    length: int
    tail: bytes = b""
    away: int = 0  # as in :class:`Ack`


Message = (
    Challenge
    | Hello
    | Welcome
    | Refused
    | Lookup
    | LookedUp
    | Notify
    | Bye
    | Link
    | Linked
    | Unlink
    | Sealed
    | Bind
    | Bound
    | SliceRequest
    | ScatterRequest
    | Ack
    | Error
    | Data
    | Sent
    | Where
)


# ====================================================================== encode


def _rail(r: RailAd) -> list[Any]:
    return [r.name, r.kind, r.device, r.ip, float(r.bandwidth), r.prefix, r.address]


def _segment(s: SegmentAd) -> list[Any]:
    return [s.name, s.sid, s.size, s.kind, s.permission]


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg`` (one msgpack array)."""
    if isinstance(msg, SliceRequest):
        if msg.op is Op.WRITE:
            fields: list[Any] = [Op.WRITE, msg.request, msg.segment, msg.sid, msg.offset, msg.length, msg.payload]
        else:
            fields = [Op.READ, msg.request, msg.segment, msg.sid, msg.offset, msg.length, msg.inline]
        fields.append(msg.cma)
    elif isinstance(msg, ScatterRequest):
        segs = [[name, sid] for name, sid in msg.segments]
        last = msg.payload if msg.op is Op.WRITE else msg.inline
        code = Op.WRITEV if msg.op is Op.WRITE else Op.READV
        fields = [code, msg.request, segs, msg.count, msg.total, msg.table, last, msg.cma, list(msg.reach)]
    elif isinstance(msg, Ack):
        fields = [Op.ACK, msg.request, msg.away]
    elif isinstance(msg, Error):
        fields = [Op.ERROR, msg.request, msg.reason, msg.retry]
    elif isinstance(msg, Data):
        fields = [Op.DATA, msg.request, msg.payload]
    elif isinstance(msg, Sent):
        fields = [Op.SENT, msg.request, msg.length, msg.tail, msg.away]
    elif isinstance(msg, Where):
        fields = [Op.WHERE, msg.request, list(msg.bases), float(msg.until), msg.away]
    elif isinstance(msg, Bind):
        fields = [Op.BIND, msg.request]
    elif isinstance(msg, Bound):
        fields = [Op.BOUND, msg.request]
    elif isinstance(msg, Link):
        fields = [Op.LINK, msg.link_id, msg.rail, msg.address, msg.namespace]
    elif isinstance(msg, Linked):
        fields = [Op.LINKED, msg.link_id, msg.namespace]
    elif isinstance(msg, Unlink):
        fields = [Op.UNLINK, msg.link_id, msg.reason]
    elif isinstance(msg, Sealed):
        fields = [Op.SEALED, msg.box]
    elif isinstance(msg, Challenge):
        fields = [Op.CHALLENGE, MAGIC, msg.version, msg.nonce]
    elif isinstance(msg, Hello):
        fields = [Op.HELLO, MAGIC, msg.version, msg.name, msg.host_id, [_rail(r) for r in msg.rails]]
        fields += [msg.nonce, msg.auth]
    elif isinstance(msg, Welcome):
        fields = [Op.WELCOME, msg.version, msg.name, msg.host_id, msg.conn_id]
        fields += [[_rail(r) for r in msg.rails], [_segment(s) for s in msg.catalogue], msg.auth]
        fields += [msg.slots, msg.inline_limit, msg.staging, msg.cma, msg.cma_token]
    elif isinstance(msg, Refused):
        fields = [Op.REFUSED, msg.reason]
    elif isinstance(msg, Lookup):
        fields = [Op.LOOKUP, msg.name]
    elif isinstance(msg, LookedUp):
        fields = [Op.LOOKED_UP, msg.name, None if msg.segment is None else _segment(msg.segment)]
    elif isinstance(msg, Notify):
        fields = [Op.NOTIFY, msg.message]
    elif isinstance(msg, Bye):
        fields = [Op.BYE, msg.reason]
    else:  # pragma: no cover - guarded by the Message union
        raise TypeError(f"not a protocol message: {msg!r}")
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def frame(msg: Message) -> bytes:
    """``msg`` with its 4-byte length prefix, for the control connection."""
    body = encode(msg)
    return _FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    """The body length announced by a 4-byte frame header; refuses frames over ``limit`` bytes."""
    if len(header) != _FRAME_HEADER.size:
        raise ProtocolError(f"truncated frame header ({len(header)} of {_FRAME_HEADER.size} bytes)")
    (length,) = _FRAME_HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
    return int(length)


def pack_data(msg: Message) -> bytes:
    """``msg`` as a data-plane message: a 4-byte little-endian length, then the body.

    A tagged receive does not report how many bytes arrived, so the length
    travels in front of the body.
    """
    body = encode(msg)
    return _DATA_PREFIX.pack(len(body)) + body


def unpack_data(buf: Any) -> tuple[Message, int]:
    """Decode a data-plane message from the start of a receive buffer (a uint8 array).

    Returns the message and the number of bytes it used (prefix included), so
    that the caller can clear exactly those before reusing the buffer.
    """
    view = memoryview(buf).cast("B")
    if len(view) < _DATA_PREFIX.size:
        raise ProtocolError(f"a receive buffer of {len(view)} bytes cannot hold a message")
    (length,) = _DATA_PREFIX.unpack_from(view)
    used = _DATA_PREFIX.size + length
    if length == 0 or used > len(view):
        raise ProtocolError(f"a message announces {length} bytes in a {len(view)}-byte receive")
    return decode(view[_DATA_PREFIX.size : used]), used


def pack_table(index: Any, offsets: Any, lengths: Any) -> bytes:
    """The packed extent list of a scatter-gather header (segment index, offset, length per extent)."""
    return (
        np.asarray(index, dtype="<u2").tobytes()
        + np.asarray(offsets, dtype="<u8").tobytes()
        + np.asarray(lengths, dtype="<u8").tobytes()
    )


def extents_allowed(total: int) -> int:
    """The most extents a slice of ``total`` bytes may carry (both sides apply it).

    Blocks of ``MIN_EXTENT_BYTES`` or more always fit: a slice cut out of a run
    of such blocks has at most two shorter extents, at its ends.
    """
    return min(MAX_EXTENTS, FREE_EXTENTS + total // MIN_EXTENT_BYTES)


def unpack_table(table: Any, count: int, segments: int, total: int) -> tuple[Any, Any, Any]:
    """``(index, offsets, lengths)`` (int64 arrays) of a packed extent list, checked.

    Refuses (:class:`ProtocolError`) a table of the wrong size, a segment index
    outside the header's table, an empty extent, an offset or length beyond
    :data:`MAX_EXTENT_OFFSET`/:data:`MAX_EXTENT_LENGTH` (so no sum or end below
    can overflow), and lengths that do not add up to ``total``.  Bounds against
    the segments themselves are the server's check.
    """
    view = memoryview(table).cast("B")
    if len(view) != count * EXTENT_BYTES:
        raise ProtocolError(f"an extent table of {count} extents must be {count * EXTENT_BYTES} bytes, got {len(view)}")
    index = np.frombuffer(view, dtype="<u2", count=count)
    offsets = np.frombuffer(view, dtype="<u8", count=count, offset=2 * count)
    lengths = np.frombuffer(view, dtype="<u8", count=count, offset=10 * count)
    if count and int(index.max()) >= segments:
        raise ProtocolError(f"an extent names segment {int(index.max())} of a table of {segments}")
    if count and int(offsets.max()) > MAX_EXTENT_OFFSET:
        raise ProtocolError(f"an extent offset {int(offsets.max())} is beyond {MAX_EXTENT_OFFSET}")
    if count and (int(lengths.min()) == 0 or int(lengths.max()) > MAX_EXTENT_LENGTH):
        raise ProtocolError(f"extent lengths must be between 1 and {MAX_EXTENT_LENGTH}")
    lengths64 = lengths.astype(np.int64)
    if int(lengths64.sum()) != total:
        raise ProtocolError(f"extent lengths add up to {int(lengths64.sum())}, the header says {total}")
    return index.astype(np.int64), offsets.astype(np.int64), lengths64


def clip_reason(reason: str, limit: int = MAX_DATA_REASON) -> str:
    """``reason`` cut to at most ``limit`` bytes of UTF-8 (data-plane replies have bounded room)."""
    data = reason.encode()
    if len(data) <= limit:
        return reason
    return data[: limit - 3].decode(errors="ignore") + "..."


# ====================================================================== decode


def _int(value: Any, what: str, lo: int = 0, hi: int = MAX_U64) -> int:
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise ProtocolError(f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} = {value} is outside [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, limit: int = MAX_NAME, *, empty: bool = False) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is {len(value)} characters long; the limit is {limit}")
    if not empty and not value:
        raise ProtocolError(f"{what} must not be empty")
    return value


def _bytes(value: Any, what: str, sizes: Sequence[int] | None = None, limit: int = MAX_INLINE) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"{what} must be bytes, got {type(value).__name__}")
    if sizes is not None and len(value) not in sizes:
        raise ProtocolError(f"{what} must be {' or '.join(map(str, sizes))} bytes long, got {len(value)}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is {len(value)} bytes long; the limit is {limit}")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise ProtocolError(f"{what} must be a boolean, got {type(value).__name__}")
    return value


def _float(value: Any, what: str) -> float:
    if type(value) not in (int, float):
        raise ProtocolError(f"{what} must be a number, got {type(value).__name__}")
    number = float(value)
    if not 0.0 < number < 1e15:  # also refuses NaN and infinities
        raise ProtocolError(f"{what} = {value!r} is not a plausible bandwidth in bytes/s")
    return number


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if type(value) is not list:
        raise ProtocolError(f"{what} must be an array, got {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} has {len(value)} entries; the limit is {limit}")
    return value


def _fields(value: Any, what: str, arity: int) -> list[Any]:
    items = _list(value, what, arity)
    if len(items) != arity:
        raise ProtocolError(f"{what} must have {arity} fields, got {len(items)}")
    return items


def _ip(value: Any, what: str) -> str:
    text = _str(value, what, 15)
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and p.isascii() and len(p) <= 3 and int(p) <= 255 for p in parts):
        raise ProtocolError(f"{what} = {text!r} is not an IPv4 address")
    return text


def _rail_ad(value: Any) -> RailAd:
    name, kind, device, ip, bandwidth, prefix, address = _fields(value, "rail", 7)
    kind = _str(kind, "rail kind", 8)
    if kind not in RAIL_KINDS:
        raise ProtocolError(f"rail kind {kind!r} is not one of {RAIL_KINDS}")
    return RailAd(
        name=_str(name, "rail name"),
        kind=kind,
        device=_str(device, "rail device"),
        ip=_ip(ip, "rail ip"),
        bandwidth=_float(bandwidth, "rail bandwidth"),
        prefix=_int(prefix, "rail prefix", 0, 32),
        address=_bytes(address, "worker address", limit=MAX_ADDRESS),
    )


def _segment_ad(value: Any) -> SegmentAd:
    name, sid, size, kind, permission = _fields(value, "segment", 5)
    permission = _str(permission, "segment permission", 2)
    if permission not in ("r", "rw"):
        raise ProtocolError(f"segment permission {permission!r} is not 'r' or 'rw'")
    kind = _str(kind, "segment kind", 32)
    if kind != "host" and not (kind.startswith("cuda:") and kind[5:].isdigit() and kind[5:].isascii()):
        raise ProtocolError(f"segment kind {kind!r} is not 'host' or 'cuda:N'")
    return SegmentAd(
        name=_str(name, "segment name"),
        sid=_int(sid, "segment id"),
        size=_int(size, "segment size"),
        kind=kind,
        permission=permission,
    )


def _magic_version(f: list[Any], what: str) -> int:
    if len(f) < 3 or f[1] != MAGIC:
        raise ProtocolError(f"{what} does not start with the tent-ucx magic; is this a tent_async ucx engine?")
    version = _int(f[2], f"{what} protocol version", 0, 1 << 31)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"the peer speaks tent_async ucx protocol version {version}, this engine speaks "
            f"{PROTOCOL_VERSION}; run the same tent_async release on both sides",
            version,
        )
    return version


def _d_challenge(f: list[Any]) -> Challenge:
    version = _magic_version(f, "CHALLENGE")
    _fields(f, "CHALLENGE", 4)
    return Challenge(version=version, nonce=_bytes(f[3], "nonce", (NONCE_BYTES,)))


def _d_hello(f: list[Any]) -> Hello:
    version = _magic_version(f, "HELLO")
    _, _, _, name, host_id, rails, nonce, auth = _fields(f, "HELLO", 8)
    return Hello(
        version=version,
        name=_str(name, "engine name"),
        host_id=_str(host_id, "host id", 64),
        rails=tuple(_rail_ad(r) for r in _list(rails, "rails", MAX_RAILS)),
        nonce=_bytes(nonce, "nonce", (NONCE_BYTES,)),
        auth=_bytes(auth, "auth", (0, MAC_BYTES)),
    )


def _d_welcome(f: list[Any]) -> Welcome:
    version = _int(f[1] if len(f) > 1 else None, "WELCOME protocol version", 0, 1 << 31)
    if version != PROTOCOL_VERSION:  # before the arity: another version may have other fields
        raise VersionMismatch(
            f"the peer answered with protocol version {version}, expected {PROTOCOL_VERSION}", version
        )
    _, _, name, host_id, conn_id, rails, catalogue, auth, slots, inline_limit, staging, cma, token = _fields(
        f, "WELCOME", 13
    )
    welcome = Welcome(
        version=version,
        name=_str(name, "engine name"),
        host_id=_str(host_id, "host id", 64),
        conn_id=_int(conn_id, "connection id", 1, MAX_CONN_ID),
        rails=tuple(_rail_ad(r) for r in _list(rails, "rails", MAX_RAILS)),
        catalogue=tuple(_segment_ad(s) for s in _list(catalogue, "catalogue", MAX_SEGMENTS)),
        auth=_bytes(auth, "auth", (0, MAC_BYTES)),
        slots=_int(slots, "header slots", 1, MAX_SLOTS),
        inline_limit=_int(inline_limit, "inline limit", 0, MAX_INLINE),
        staging=_int(staging, "staging share", 1),
        cma=_str(cma, "verification socket", 100, empty=True),
        cma_token=_bytes(token, "verification token", (0, 16)),
    )
    if bool(welcome.cma) != bool(welcome.cma_token):
        raise ProtocolError("WELCOME's verification socket and token come together or not at all")
    return welcome


def _d_refused(f: list[Any]) -> Refused:
    return Refused(reason=_str(_fields(f, "REFUSED", 2)[1], "reason", MAX_REASON, empty=True))


def _d_lookup(f: list[Any]) -> Lookup:
    return Lookup(name=_str(_fields(f, "LOOKUP", 2)[1], "segment name"))


def _d_looked_up(f: list[Any]) -> LookedUp:
    _, name, seg = _fields(f, "LOOKED_UP", 3)
    return LookedUp(name=_str(name, "segment name"), segment=None if seg is None else _segment_ad(seg))


def _d_notify(f: list[Any]) -> Notify:
    return Notify(message=_str(_fields(f, "NOTIFY", 2)[1], "notification", MAX_MESSAGE, empty=True))


def _d_bye(f: list[Any]) -> Bye:
    return Bye(reason=_str(_fields(f, "BYE", 2)[1], "reason", MAX_REASON, empty=True))


def _d_link(f: list[Any]) -> Link:
    _, link_id, rail, address, namespace = _fields(f, "LINK", 5)
    return Link(
        link_id=_int(link_id, "link id"),
        rail=_str(rail, "rail name"),
        address=_bytes(address, "worker address", limit=MAX_ADDRESS),
        namespace=_int(namespace, "namespace", 1, MAX_NAMESPACE),
    )


def _d_linked(f: list[Any]) -> Linked:
    _, link_id, namespace = _fields(f, "LINKED", 3)
    return Linked(link_id=_int(link_id, "link id"), namespace=_int(namespace, "namespace", 1, MAX_NAMESPACE))


def _d_unlink(f: list[Any]) -> Unlink:
    _, link_id, reason = _fields(f, "UNLINK", 3)
    return Unlink(link_id=_int(link_id, "link id"), reason=_str(reason, "reason", MAX_REASON, empty=True))


def _d_sealed(f: list[Any]) -> Sealed:
    return Sealed(box=_bytes(_fields(f, "SEALED", 2)[1], "sealed message", limit=MAX_FRAME))


def _d_bind(f: list[Any]) -> Bind:
    return Bind(request=_int(_fields(f, "BIND", 2)[1], "request id"))


def _d_bound(f: list[Any]) -> Bound:
    return Bound(request=_int(_fields(f, "BOUND", 2)[1], "request id"))


def _d_write(f: list[Any]) -> SliceRequest:
    _, request, segment, sid, offset, length, payload, cma = _fields(f, "WRITE", 8)
    length = _int(length, "length")
    cma = _bool(cma, "cma")
    body = None
    if payload is not None:
        body = _bytes(payload, "payload")
        if len(body) != length:
            raise ProtocolError(f"WRITE announces {length} bytes but carries {len(body)}")
        if cma:
            raise ProtocolError("a WRITE with its bytes inline cannot ask for a direct copy too")
    return SliceRequest(
        op=Op.WRITE,
        request=_int(request, "request id"),
        segment=_str(segment, "segment name"),
        sid=_int(sid, "segment id"),
        offset=_int(offset, "offset"),
        length=length,
        payload=body,
        cma=cma,
    )


def _d_read(f: list[Any]) -> SliceRequest:
    _, request, segment, sid, offset, length, inline, cma = _fields(f, "READ", 8)
    inline, cma = _bool(inline, "inline"), _bool(cma, "cma")
    if inline and cma:
        raise ProtocolError("a READ cannot be answered inline and by a direct copy")
    return SliceRequest(
        op=Op.READ,
        request=_int(request, "request id"),
        segment=_str(segment, "segment name"),
        sid=_int(sid, "segment id"),
        offset=_int(offset, "offset"),
        length=_int(length, "length"),
        inline=inline,
        cma=cma,
    )


def _d_scatter(f: list[Any]) -> ScatterRequest:
    code, request, segs, count, total, table, last, cma, reach = _fields(f, "WRITEV/READV", 9)
    cma = _bool(cma, "cma")
    ends = tuple(
        _int(r, "reach", 1, MAX_EXTENT_OFFSET + MAX_EXTENT_LENGTH) for r in _list(reach, "reach", MAX_SG_SEGMENTS)
    )
    op = Op.WRITE if code == Op.WRITEV else Op.READ
    segments = []
    for entry in _list(segs, "segment table", MAX_SG_SEGMENTS):
        name, sid = _fields(entry, "segment table entry", 2)
        segments.append((_str(name, "segment name"), _int(sid, "segment id")))
    if not segments:
        raise ProtocolError("an extent list must name at least one segment")
    count = _int(count, "extent count", 1, MAX_EXTENTS)
    total = _int(total, "total length", count, MAX_U64)
    body = None if table is None else _bytes(table, "extent table", limit=MAX_TABLE)
    if body is not None:
        unpack_table(body, count, len(segments), total)
    payload = None
    inline = False
    if op is Op.WRITE:
        if last is not None:
            payload = _bytes(last, "payload")
            if len(payload) != total:
                raise ProtocolError(f"WRITEV announces {total} bytes but carries {len(payload)}")
            if body is None:
                raise ProtocolError("a WRITEV with its bytes inline must carry its extent table too")
    else:
        inline = _bool(last, "inline")
        if inline and body is None:
            raise ProtocolError("an inline READV must carry its extent table")
    if cma and (payload is not None or inline or body is not None):
        raise ProtocolError("a direct-copy extent list carries no bytes and no table, and is not answered inline")
    if len(ends) != (len(segments) if cma else 0):
        raise ProtocolError(
            f"a {'direct-copy ' if cma else ''}extent list with {len(segments)} segments and "
            f"{len(ends)} reaches (one per segment with cma, none without)"
        )
    return ScatterRequest(
        op=op,
        request=_int(request, "request id"),
        segments=tuple(segments),
        count=count,
        total=total,
        table=body,
        payload=payload,
        inline=inline,
        cma=cma,
        reach=ends,
    )


def _d_ack(f: list[Any]) -> Ack:
    _, request, away = _fields(f, "ACK", 3)
    return Ack(request=_int(request, "request id"), away=_int(away, "away", hi=MAX_AWAY_US))


def _d_error(f: list[Any]) -> Error:
    _, request, reason, retry = _fields(f, "ERROR", 4)
    return Error(
        request=_int(request, "request id"),
        reason=_str(reason, "reason", MAX_REASON, empty=True),
        retry=_bool(retry, "retry"),
    )


def _d_data(f: list[Any]) -> Data:
    _, request, payload = _fields(f, "DATA", 3)
    return Data(request=_int(request, "request id"), payload=_bytes(payload, "payload"))


def _d_sent(f: list[Any]) -> Sent:
    _, request, length, tail, away = _fields(f, "SENT", 5)
    length = _int(length, "length")
    tail = _bytes(tail, "tail", (min(TAIL_BYTES, length),))
    return Sent(request=_int(request, "request id"), length=length, tail=tail, away=_int(away, "away", hi=MAX_AWAY_US))


def _d_where(f: list[Any]) -> Where:
    _, request, bases, until, away = _fields(f, "WHERE", 5)
    items = _list(bases, "segment addresses", MAX_SG_SEGMENTS)
    if not items:
        raise ProtocolError("WHERE must give at least one segment address")
    if type(until) is not float or not 0.0 <= until < 1e12:
        raise ProtocolError(f"WHERE's deadline must be a plausible monotonic time, got {until!r}")
    return Where(
        request=_int(request, "request id"),
        bases=tuple(_int(b, "segment address", 1) for b in items),
        until=until,
        away=_int(away, "away", hi=MAX_AWAY_US),
    )


_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    Op.CHALLENGE: _d_challenge,
    Op.HELLO: _d_hello,
    Op.WELCOME: _d_welcome,
    Op.REFUSED: _d_refused,
    Op.LOOKUP: _d_lookup,
    Op.LOOKED_UP: _d_looked_up,
    Op.NOTIFY: _d_notify,
    Op.BYE: _d_bye,
    Op.LINK: _d_link,
    Op.LINKED: _d_linked,
    Op.UNLINK: _d_unlink,
    Op.SEALED: _d_sealed,
    Op.BIND: _d_bind,
    Op.BOUND: _d_bound,
    Op.WRITE: _d_write,
    Op.READ: _d_read,
    Op.WRITEV: _d_scatter,
    Op.READV: _d_scatter,
    Op.ACK: _d_ack,
    Op.ERROR: _d_error,
    Op.DATA: _d_data,
    Op.SENT: _d_sent,
    Op.WHERE: _d_where,
}


class _TooManyObjects(Exception):
    pass


_UNPACK: Final[dict[str, Any]] = {
    "raw": False,
    "use_list": True,
    "strict_map_key": True,
    "max_str_len": MAX_MESSAGE,
    "max_bin_len": MAX_FRAME,  # a SEALED catalogue; every bytes field has its own limit below
    "max_array_len": MAX_SEGMENTS,
    "max_map_len": 64,
    "max_ext_len": 0,
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse and validate one message; raises :class:`ProtocolError` for anything malformed.

    Besides the per-field limits, the number of arrays and of their elements is
    bounded (:data:`MAX_OBJECTS`): 16 MiB of one-byte empty arrays would otherwise
    become 16 million Python lists (over a gigabyte) before any field is checked.
    """
    try:
        if 2 * len(data) <= MAX_OBJECTS:
            # Every value takes at least one byte and the count below is at most two per
            # value (an array counts as its parent's element and as itself), so a message
            # this short cannot break the bound: no per-array callback (data-plane messages).
            fields = msgpack.unpackb(data, **_UNPACK)
        else:
            budget = [MAX_OBJECTS]

            def count(items: list[Any]) -> list[Any]:
                budget[0] -= 1 + len(items)
                if budget[0] < 0:
                    raise _TooManyObjects
                return items

            fields = msgpack.unpackb(data, list_hook=count, **_UNPACK)
    except ProtocolError:  # pragma: no cover - msgpack never raises ours
        raise
    except _TooManyObjects:
        raise ProtocolError(f"a message of {len(data)} bytes holds more than {MAX_OBJECTS} values") from None
    except Exception as exc:  # msgpack raises a zoo of ValueError/TypeError subclasses
        raise ProtocolError(f"undecodable message ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    if type(fields) is not list or not fields:
        raise ProtocolError(f"a message must be a non-empty array, got {type(fields).__name__}")
    code = fields[0]
    decoder = _DECODERS.get(code) if type(code) is int else None
    if decoder is None:
        raise ProtocolError(f"unknown message type {code!r}")
    return decoder(fields)


CONTROL_TYPES: Final = (Challenge, Hello, Welcome, Refused, Lookup, LookedUp, Notify, Bye, Link, Linked, Unlink, Sealed)
DATA_TYPES: Final = (Bind, Bound, SliceRequest, ScatterRequest, Ack, Error, Data, Sent, Where)
