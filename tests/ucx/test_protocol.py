"""The wire codec: round trips, and no input can make the decoder raise anything but ProtocolError.

Pure Python: needs msgpack, not ucxx.
"""

from __future__ import annotations

import contextlib

import attrs
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx.control import Session, frame_length, parse_address
from tent_async.errors import ConfigError, ProtocolError

names = st.text(min_size=1, max_size=40)
u64 = st.integers(0, 2**64 - 1)
rails = st.builds(
    p.RailAd,
    name=names,
    kind=st.sampled_from(p.RAIL_KINDS),
    device=names,
    ip=st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    bandwidth=st.floats(1.0, 1e12),
    prefix=st.integers(0, 32),
    address=st.binary(max_size=200),
)
segments = st.builds(
    p.SegmentAd,
    name=names,
    sid=u64,
    size=u64,
    kind=st.sampled_from(["host", "cuda:0", "cuda:7"]),
    permission=st.sampled_from(["r", "rw"]),
)
nonce = st.binary(min_size=p.NONCE_BYTES, max_size=p.NONCE_BYTES)
auth = st.one_of(st.just(b""), st.binary(min_size=p.MAC_BYTES, max_size=p.MAC_BYTES))
namespaces = st.integers(1, p.MAX_NAMESPACE)
messages = st.one_of(
    st.builds(p.Challenge, version=st.just(p.PROTOCOL_VERSION), nonce=nonce),
    st.builds(
        p.Hello,
        version=st.just(p.PROTOCOL_VERSION),
        name=names,
        host_id=st.text(min_size=1, max_size=64),
        rails=st.lists(rails, max_size=4).map(tuple),
        nonce=nonce,
        auth=auth,
    ),
    st.builds(
        p.Welcome,
        version=st.just(p.PROTOCOL_VERSION),
        name=names,
        host_id=st.text(min_size=1, max_size=64),
        conn_id=st.integers(1, p.MAX_CONN_ID),
        rails=st.lists(rails, max_size=4).map(tuple),
        catalogue=st.lists(segments, max_size=4).map(tuple),
        auth=auth,
        slots=st.integers(1, p.MAX_SLOTS),
        inline_limit=st.integers(0, p.MAX_INLINE),
        staging=st.integers(1, p.MAX_U64),
        cma=st.just(""),
    ).flatmap(lambda w: st.sampled_from([w, attrs.evolve(w, cma="tent-ucx-1-0123456789abcdef", cma_token=b"t" * 16)])),
    st.builds(p.Refused, reason=st.text(max_size=100)),
    st.builds(p.Lookup, name=names),
    st.builds(p.LookedUp, name=names, segment=st.one_of(st.none(), segments)),
    st.builds(p.Notify, message=st.text(max_size=200)),
    st.builds(p.Bye, reason=st.text(max_size=50)),
    st.builds(p.Link, link_id=u64, rail=names, address=st.binary(max_size=200), namespace=namespaces),
    st.builds(p.Linked, link_id=u64, namespace=namespaces),
    st.builds(p.Unlink, link_id=u64, reason=st.text(max_size=50)),
    st.builds(p.Bind, request=u64),
    st.builds(p.Bound, request=u64),
    st.builds(
        p.SliceRequest,
        op=st.just(p.Op.WRITE),
        request=u64,
        segment=names,
        sid=u64,
        offset=u64,
        length=st.just(5),
        payload=st.one_of(st.none(), st.binary(min_size=5, max_size=5)),
    ).map(lambda m: attrs.evolve(m, cma=m.payload is None and m.request % 2 == 0)),
    st.builds(
        p.SliceRequest,
        op=st.just(p.Op.READ),
        request=u64,
        segment=names,
        sid=u64,
        offset=u64,
        length=u64,
        inline=st.booleans(),
    ).map(lambda m: attrs.evolve(m, cma=not m.inline and m.request % 2 == 0)),
    st.builds(
        lambda request, n, seg, inline, write: p.ScatterRequest(
            p.Op.WRITE if write else p.Op.READ,
            request,
            (("kv", seg), ("pool", seg + 1)),
            n,
            3 * n,
            p.pack_table([i % 2 for i in range(n)], range(0, 5 * n, 5), [3] * n) if inline or write else None,
            b"z" * (3 * n) if write and inline else None,
            inline=inline and not write,
        ),
        request=u64,
        n=st.integers(1, 20),
        seg=st.integers(0, 2**32),
        inline=st.booleans(),
        write=st.booleans(),
    ),
    st.builds(p.Ack, request=u64, away=st.integers(0, p.MAX_AWAY_US)),
    st.builds(
        p.Where,
        request=u64,
        bases=st.lists(st.integers(1, p.MAX_U64), min_size=1, max_size=p.MAX_SG_SEGMENTS).map(tuple),
        until=st.floats(0.0, 1e9),
        away=st.integers(0, p.MAX_AWAY_US),
    ),
    st.builds(p.Error, request=u64, reason=st.text(max_size=100), retry=st.booleans()),
    st.builds(p.Data, request=u64, payload=st.binary(max_size=100)),
    st.builds(
        lambda request, length, tail, away: p.Sent(
            request, length, tail[: min(p.TAIL_BYTES, length)].ljust(min(p.TAIL_BYTES, length), b"x"), away
        ),
        request=u64,
        length=u64,
        tail=st.binary(max_size=p.TAIL_BYTES),
        away=st.integers(0, p.MAX_AWAY_US),
    ),
)


@given(messages)
def test_every_message_round_trips(msg: p.Message) -> None:
    assert p.decode(p.encode(msg)) == msg


@given(messages, st.integers(0, 64))
def test_data_plane_framing_round_trips_in_a_larger_buffer(msg: p.Message, spare: int) -> None:
    data = p.pack_data(msg)
    buf = np.zeros(len(data) + spare, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    got, used = p.unpack_data(buf)
    assert got == msg and used == len(data)


@given(st.binary(max_size=64), st.integers(0, 64))
def test_data_plane_framing_refuses_what_does_not_fit(data: bytes, spare: int) -> None:
    buf = np.zeros(len(data) + spare, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    with contextlib.suppress(ProtocolError):
        p.unpack_data(buf)


def test_data_plane_framing_specific_refusals() -> None:
    with pytest.raises(ProtocolError, match="announces"):
        p.unpack_data(np.frombuffer((100).to_bytes(4, "little") + b"x" * 10, dtype=np.uint8))
    with pytest.raises(ProtocolError, match="announces"):
        p.unpack_data(np.zeros(16, dtype=np.uint8))  # nothing arrived: length 0
    with pytest.raises(ProtocolError, match="cannot hold"):
        p.unpack_data(np.zeros(2, dtype=np.uint8))
    assert len(p.clip_reason("é" * 2000).encode()) <= p.MAX_DATA_REASON
    assert p.clip_reason("short") == "short"


@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        p.decode(data)


@given(messages, st.data())
def test_mutated_and_truncated_messages_only_raise_protocol_error(msg: p.Message, data: st.DataObject) -> None:
    raw = bytearray(p.encode(msg))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "flip" and raw:
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    else:
        i = data.draw(st.integers(0, len(raw)))
        raw[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    with contextlib.suppress(ProtocolError):
        p.decode(bytes(raw))


@given(
    st.lists(
        st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(), st.binary(), st.booleans(), st.none(), st.floats()),
        max_size=10,
    )
)
def test_well_formed_msgpack_with_wrong_fields_is_refused_cleanly(fields: list[object]) -> None:
    for code in list(p.Op):
        with contextlib.suppress(ProtocolError):
            p.decode(msgpack.packb([int(code), *fields], use_bin_type=True))


def test_specific_refusals() -> None:
    with pytest.raises(ProtocolError, match="unknown message type"):
        p.decode(msgpack.packb([99]))
    with pytest.raises(ProtocolError, match="magic"):
        p.decode(msgpack.packb([int(p.Op.HELLO), "other", 1]))
    with pytest.raises(p.VersionMismatch, match="version 6") as info:
        p.decode(msgpack.packb([int(p.Op.CHALLENGE), p.MAGIC, 6, b"x" * 32]))
    assert info.value.version == 6
    # A version-6 WELCOME (no staging share) is named as another version, not as a malformed message.
    with pytest.raises(p.VersionMismatch, match="version 6"):
        p.decode(msgpack.packb([int(p.Op.WELCOME), 6, "n", "h", 1, [], [], b"", 8, 0], use_bin_type=True))
    with pytest.raises(ProtocolError, match="13 fields"):
        p.decode(msgpack.packb([int(p.Op.WELCOME), p.PROTOCOL_VERSION, "n", "h", 1, [], [], b"", 8, 0]))
    welcome = [int(p.Op.WELCOME), p.PROTOCOL_VERSION, "n", "h", 1, [], [], b"", 8, 0]
    with pytest.raises(ProtocolError, match="staging share"):  # at least one byte
        p.decode(msgpack.packb([*welcome, 0, "", b""], use_bin_type=True))
    with pytest.raises(ProtocolError, match="verification token"):
        p.decode(msgpack.packb([*welcome, 1, "s", b"short"], use_bin_type=True))
    with pytest.raises(ProtocolError, match="together"):
        p.decode(msgpack.packb([*welcome, 1, "tent-ucx-1-0123456789abcdef", b""], use_bin_type=True))
    with pytest.raises(ProtocolError, match="carries"):
        p.decode(msgpack.packb([int(p.Op.WRITE), 1, "kv", 1, 0, 10, b"abc", False], use_bin_type=True))
    with pytest.raises(ProtocolError, match="direct copy"):
        p.decode(msgpack.packb([int(p.Op.WRITE), 1, "kv", 1, 0, 3, b"abc", True], use_bin_type=True))
    with pytest.raises(ProtocolError, match="direct copy"):
        p.decode(msgpack.packb([int(p.Op.READ), 1, "kv", 1, 0, 3, True, True], use_bin_type=True))
    with pytest.raises(ProtocolError, match="8 fields"):  # a version-7 READ
        p.decode(msgpack.packb([int(p.Op.READ), 1, "kv", 1, 0, 3, False], use_bin_type=True))
    with pytest.raises(ProtocolError, match="at least one"):
        p.decode(msgpack.packb([int(p.Op.WHERE), 1, [], 1.0, 0]))
    with pytest.raises(ProtocolError, match="segment address"):
        p.decode(msgpack.packb([int(p.Op.WHERE), 1, [0], 1.0, 0]))
    with pytest.raises(ProtocolError, match="deadline"):
        p.decode(msgpack.packb([int(p.Op.WHERE), 1, [4096], float("nan"), 0]))
    with pytest.raises(ProtocolError, match="limit"):
        p.decode(msgpack.packb([int(p.Op.WHERE), 1, [4096] * (p.MAX_SG_SEGMENTS + 1), 1.0, 0]))
    with pytest.raises(ProtocolError, match="integer"):
        p.decode(msgpack.packb([int(p.Op.ACK), True, 0]))
    with pytest.raises(ProtocolError, match="outside"):
        p.decode(msgpack.packb([int(p.Op.ACK), -1, 0]))
    with pytest.raises(ProtocolError, match="3 fields"):  # a version-4 ACK
        p.decode(msgpack.packb([int(p.Op.ACK), 1]))
    with pytest.raises(ProtocolError, match="away"):  # the server's time elsewhere is bounded
        p.decode(msgpack.packb([int(p.Op.ACK), 1, p.MAX_AWAY_US + 1]))
    with pytest.raises(ProtocolError, match="away"):
        p.decode(msgpack.packb([int(p.Op.SENT), 1, 1, b"x", -1], use_bin_type=True))
    with pytest.raises(ProtocolError, match="limit"):
        frame_length((p.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match="limit"):
        frame_length((p.MAX_HELLO_FRAME + 1).to_bytes(4, "big"), p.MAX_HELLO_FRAME)
    with pytest.raises(ProtocolError, match="outside"):
        p.decode(msgpack.packb([int(p.Op.LINK), 1, "lo", b"addr", 0], use_bin_type=True))  # namespace 0
    with pytest.raises(ProtocolError, match="limit"):
        p.decode(msgpack.packb([int(p.Op.LINK), 1, "lo", b"a" * (p.MAX_ADDRESS + 1), 5], use_bin_type=True))


def test_tags_keep_namespaces_and_kinds_apart() -> None:
    assert p.make_tag(1, p.KIND_CONTROL, 5) != p.make_tag(2, p.KIND_CONTROL, 5)
    assert p.make_tag(1, p.KIND_CONTROL, 5) != p.make_tag(1, p.KIND_DATA, 5)
    assert p.make_tag(3, p.KIND_DATA, 2**23 + 5) == p.make_tag(3, p.KIND_DATA, 5)  # indices wrap in their field
    assert p.make_tag(p.MAX_NAMESPACE, p.KIND_DATA, p.TAG_INDEX_MASK) == 2**64 - 1
    assert p.split_tag(p.make_tag(0xABCDE12345, p.KIND_DATA, 77)) == (0xABCDE12345, p.KIND_DATA, 77)


def test_addresses() -> None:
    assert parse_address("decode-0:7100") == ("decode-0", 7100)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address(":0", default_host="0.0.0.0") == ("0.0.0.0", 0)
    for bad in ("decode-0", "h:x", "h:70000"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def _sessions(secret: bytes = b"s3cret", name: str = "prefill-0") -> tuple[Session, Session, p.Hello]:
    challenge = p.Challenge(version=p.PROTOCOL_VERSION, nonce=bytes(range(32)))
    hello = p.Hello(p.PROTOCOL_VERSION, name, "h", (), bytes(32), b"")
    return Session(b"s3cret", challenge, hello, server=True), Session(secret, challenge, hello, server=False), hello


def test_sessions_seal_authenticate_and_order_every_control_message() -> None:
    server, client, _ = _sessions()
    assert server.auth == client.auth
    msgs = [p.Link(link_id=1, rail="lo", address=b"addr", namespace=5), p.Notify(message="hi")]
    sealed = [client.seal(m) for m in msgs]
    assert b"addr" not in sealed[0].box  # worker addresses and namespaces are encrypted
    assert [server.open(s) for s in sealed] == msgs
    with pytest.raises(ProtocolError, match="does not authenticate"):
        server.open(sealed[1])  # replayed
    with pytest.raises(ProtocolError, match="in the clear"):
        server.open(p.Notify(message="injected"))
    reply = server.seal(p.Linked(link_id=1, namespace=9))
    forged = p.Sealed(box=bytes([reply.box[0] ^ 1]) + reply.box[1:])
    with pytest.raises(ProtocolError, match="does not authenticate"):
        client.open(forged)
    assert client.open(reply) == p.Linked(link_id=1, namespace=9)
    # Another secret, or a HELLO changed on the way (a relay rewriting a field), gives other keys.
    assert _sessions(secret=b"other")[1].auth != server.auth
    assert _sessions(name="prefill-1")[1].auth != server.auth


@pytest.mark.parametrize(
    ("local_cuda", "remote_kind", "length", "inline"),
    [
        (False, "host", 4096, True),
        (False, "host", 1 << 20, False),  # over the negotiated inline limit
        (True, "host", 4096, False),  # our GPU memory
        (False, "cuda:0", 4096, False),  # the peer's GPU memory: it refuses inline slices there
    ],
)
@pytest.mark.parametrize("kind", ["WRITE", "READ"])
def test_only_small_host_to_host_slices_travel_inline(
    local_cuda: bool, remote_kind: str, length: int, inline: bool, kind: str
) -> None:
    from types import SimpleNamespace

    from tent_async.backends.ucx.peer import Op, _Op

    local = SimpleNamespace(memory=SimpleNamespace(is_cuda=local_cuda))
    remote = SimpleNamespace(kind=remote_kind)
    op_kind = Op[kind]
    src, dst = (local, remote) if op_kind is Op.WRITE else (remote, local)
    attempt = SimpleNamespace(id=1, src=src, dst=dst, length=length)
    link = SimpleNamespace(peer=SimpleNamespace(inline_limit=16 << 10))
    assert _Op(attempt, link, op_kind, 0.0)._inline() is inline  # type: ignore[arg-type]


def test_a_frame_of_nested_empty_arrays_is_refused_before_it_becomes_a_gigabyte() -> None:
    """16 MiB of one-byte arrays would decode into 16 million Python lists (issue 11, finding 7)."""
    bomb = b"\xdc\xff\xff" + b"\xdc\xff\xff" * 255 + bytes([0x90]) * (p.MAX_FRAME - 1024)
    with pytest.raises(ProtocolError, match="more than"):
        p.decode(bomb)
    catalogue = tuple(p.SegmentAd(f"s{i}", i, 1, "host", "rw") for i in range(p.MAX_SEGMENTS))
    welcome = p.Welcome(p.PROTOCOL_VERSION, "n", "h", 1, (), catalogue, b"", 8, 0, 1 << 27)
    assert p.decode(p.encode(welcome)) == welcome  # a full catalogue still fits
