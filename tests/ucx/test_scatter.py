"""Scatter-gather slices over ucx: one header per slice with its extent list (issue 9, item 2).

Two processes on loopback: random block tables WRITE and READ byte-exact
(inline, bulk, and extent tables too big for the header); crafted headers
that reach outside a segment, into a read-only or unknown segment, or whose
lengths overflow or disagree with the total are refused with nothing written;
staging beyond its bound is refused and counted.  The codec and the copy
helpers are also checked without UCX.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import anyio
import attrs
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tent_async as tent
from conftest import PeerProcess, requires_ucxx
from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx import scatter
from tent_async.errors import ProtocolError
from tent_async.memory import as_memory

MiB = 1 << 20
KV = 8 * MiB
LO = [{"name": "lo", "device": "lo"}]


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def digest(buf: np.ndarray) -> str:
    return hashlib.sha256(buf.tobytes()).hexdigest()


# ======================================================================= codec


def _header(**fields: Any) -> p.ScatterRequest:
    base: dict[str, Any] = {
        "op": p.Op.WRITE,
        "request": 7,
        "segments": (("kv", 1),),
        "count": 2,
        "total": 300,
        "table": p.pack_table([0, 0], [1000, 0], [100, 200]),
        "payload": None,
    }
    base.update(fields)
    return p.ScatterRequest(**base)


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**40), st.integers(1, 2**20)), min_size=1, max_size=50),
    st.booleans(),
    st.booleans(),
)
def test_extent_headers_round_trip(extents: list[tuple[int, int, int]], write: bool, inline: bool) -> None:
    index, offsets, lengths = (list(col) for col in zip(*extents, strict=True))
    total = sum(lengths)
    table = p.pack_table(index, offsets, lengths)
    segs = tuple((f"s{i}", i) for i in range(4))
    if write:
        payload = b"x" * total if inline and total < 4096 else None
        msg = p.ScatterRequest(p.Op.WRITE, 9, segs, len(extents), total, table, payload)
    else:
        msg = p.ScatterRequest(p.Op.READ, 9, segs, len(extents), total, table if inline else None, inline=inline)
    assert p.decode(p.encode(msg)) == msg
    got = p.unpack_table(table, len(extents), 4, total)
    assert [a.tolist() for a in got] == [index, offsets, lengths]


def _raw(fields: list[Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def test_malformed_extent_lists_are_refused_by_the_codec() -> None:
    w = int(p.Op.WRITEV)
    segs = [["kv", 1]]
    good = p.pack_table([0], [0], [10])
    p.decode(_raw([w, 1, segs, 1, 10, good, None, False, []]))
    direct = p.ScatterRequest(p.Op.READ, 3, (("kv", 1), ("x", 2)), 7, 70, cma=True, reach=(64, 1 << 40))
    assert p.decode(p.encode(direct)) == direct
    cases = {
        "index": _raw([w, 1, segs, 1, 10, p.pack_table([1], [0], [10]), None, False, []]),  # segment 1 of a table of 1
        "empty extent": _raw([w, 1, segs, 2, 10, p.pack_table([0, 0], [0, 5], [10, 0]), None, False, []]),
        "add up": _raw([w, 1, segs, 2, 10, p.pack_table([0, 0], [0, 5], [6, 6]), None, False, []]),
        # sums to 2 mod 2^64
        "wrap": _raw([w, 1, segs, 2, 2, p.pack_table([0, 0], [0, 0], [2**64 - 1, 3]), None, False, []]),
        "huge length": _raw([w, 1, segs, 1, 2**63, p.pack_table([0], [0], [2**63]), None, False, []]),
        "huge offset": _raw([w, 1, segs, 1, 10, p.pack_table([0], [2**64 - 5], [10]), None, False, []]),
        "table size": _raw([w, 1, segs, 2, 10, good, None, False, []]),
        "carries": _raw([w, 1, segs, 1, 10, good, b"abc", False, []]),
        "no segments": _raw([w, 1, [], 1, 10, good, None, False, []]),
        "count": _raw([w, 1, segs, 0, 10, b"", None, False, []]),
        "too many": _raw([w, 1, segs, p.MAX_EXTENTS + 1, 2**40, None, None, False, []]),
        "total below count": _raw([w, 1, segs, 5, 4, None, None, False, []]),
        "inline without table": _raw([int(p.Op.READV), 1, segs, 1, 10, None, True, False, []]),
        "payload without table": _raw([w, 1, segs, 1, 3, None, b"abc", False, []]),
        "old layout": _raw([w, 1, segs, 1, 10, good, None]),  # protocol 7: no cma field
        "no reach": _raw([w, 1, segs, 1, 10, good, None, False]),
        "cma not a bool": _raw([w, 1, segs, 1, 10, good, None, 1, []]),
        "cma with its bytes": _raw([w, 1, segs, 1, 10, None, b"0123456789", True, [10]]),
        "cma with a table": _raw([w, 1, segs, 1, 10, good, None, True, [10]]),
        "cma without reach": _raw([w, 1, segs, 1, 10, None, None, True, []]),
        "reach without cma": _raw([w, 1, segs, 1, 10, good, None, False, [10]]),
        "reach of 0": _raw([w, 1, segs, 1, 10, None, None, True, [0]]),
        "cma answered inline": _raw([int(p.Op.READV), 1, segs, 1, 10, None, True, True, [10]]),
    }
    for what, data in cases.items():
        with pytest.raises(ProtocolError):
            p.decode(data)
            pytest.fail(f"{what}: accepted")


@given(st.data())
def test_gather_and_scatter_are_byte_exact(data: st.DataObject) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mems = [as_memory(pattern(i, 1 << 16)) for i in range(data.draw(st.integers(1, 3)))]
    n = data.draw(st.integers(1, 40))
    equal = data.draw(st.booleans())
    lengths = np.full(n, 1024) if equal else rng.integers(1, 3000, n)
    index = np.zeros(n, dtype=np.int64) if equal else rng.integers(0, len(mems), n)
    offsets = np.array([rng.integers(0, (1 << 16) - int(k) + 1) for k in lengths], dtype=np.int64)
    lengths = lengths.astype(np.int64)
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    scatter.gather(mems, index, offsets, lengths, out)
    expected = np.concatenate([mems[i].array[b : b + k] for i, b, k in zip(index, offsets, lengths, strict=True)])
    assert np.array_equal(out, expected)
    # Scatter back to disjoint places (a permutation of slots) and read them again.
    slot = int(lengths.max())
    places = rng.permutation((1 << 16) // slot)[:n] if n <= (1 << 16) // slot else None
    if places is not None:
        dst = [as_memory(np.zeros(1 << 16, dtype=np.uint8))]
        where = (places * slot).astype(np.int64)
        scatter.scatter(out, dst, np.zeros(n, dtype=np.int64), where, lengths)
        back = np.concatenate([dst[0].array[b : b + k] for b, k in zip(where, lengths, strict=True)])
        assert np.array_equal(back, expected)


def test_staging_is_bounded_per_link_and_reused() -> None:
    pool = scatter.Staging()
    link = scatter.LinkStaging(pool, slots=2)
    a = link.take(MiB)
    b = link.take(MiB)
    assert a is not None and b is not None
    assert link.take(1) is None  # one per slot
    link.give(a)
    assert link.take(scatter.STAGING_PER_LINK) is None  # bytes
    c = link.take(MiB)
    assert c is not None and c.base is a.base  # the idle buffer again
    link.give(b)
    link.give(c)
    assert (link.count, link.bytes, pool.in_use) == (0, 0, 0)


# ================================================================ two processes

SEGMENTS = [
    {"name": "kv", "size": KV, "seed": 1},
    {"name": "ro", "size": MiB, "seed": 2, "permission": "r"},
    {"name": "other", "size": MiB, "seed": 3},
]


def copied(into: np.ndarray, src: np.ndarray, src_offsets: Any, dst_offsets: Any, lengths: Any) -> np.ndarray:
    """``into`` after each block ``src[s : s + k]`` was copied to ``dst_offsets``' place (the expected result)."""
    for a, b, k in zip(src_offsets.tolist(), dst_offsets.tolist(), lengths.tolist(), strict=True):
        into[b : b + k] = src[a : a + k]
    return into


def blocks(rng: np.random.Generator, n: int, sizes: Callable[[int], np.ndarray], space: int) -> tuple[Any, Any, Any]:
    """``n`` blocks laid out with gaps on both sides, in a permuted order on one side."""
    lengths = sizes(n).astype(np.int64)
    gaps = rng.integers(0, 64, n) * rng.integers(0, 2, n)  # half of them adjacent
    dst = np.concatenate(([0], np.cumsum(lengths + gaps)[:-1])).astype(np.int64)
    order = rng.permutation(n)
    src = np.empty(n, dtype=np.int64)
    src[order] = np.concatenate(([0], np.cumsum(lengths[order])[:-1]))
    assert int(dst[-1] + lengths[-1]) <= space and int(src.max() + lengths.max()) <= space
    return src, dst, lengths


CASES: dict[str, Callable[[np.random.Generator], tuple[int, Callable[[int], np.ndarray]]]] = {
    "inline": lambda rng: (12, lambda n: rng.integers(1, 900, n)),
    "mixed": lambda rng: (150, lambda n: rng.choice([512, 4096, 16384, 100_000], n)),
    "kv-16k": lambda rng: (256, lambda n: np.full(n, 16384)),
    "table-in-bulk": lambda rng: (3000, lambda n: np.full(n, 512)),  # 3000 extents: 54 KB of table
    # Blocks far below the peer's 512 bytes per extent: the planner cuts slices to its budget.
    "tiny": lambda rng: (6000, lambda n: np.full(n, 64)),
}


@pytest.fixture(scope="module")
def server() -> Any:
    peer = PeerProcess({"name": "decode-0", "segments": SEGMENTS})
    try:
        yield peer
    finally:
        peer.close()


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rails", ["default", "lo"])
async def test_random_block_tables_write_and_read_byte_exact(server: PeerProcess, case: str, rails: str) -> None:
    rng = np.random.default_rng(abs(hash((case, rails))) % 2**32)
    n, sizes = CASES[case](rng)
    options: dict[str, Any] = {} if rails == "default" else {"rails": [tent.RailSpec(**LO[0])]}
    server.cmd(cmd="fill", segment="kv", seed=1)
    before = server.cmd(cmd="stats")["stats"]
    async with tent.Engine(backend="ucx", name="prefill-0", **options) as engine:
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        src = pattern(11, KV)
        local = engine.register(src, name="src")
        s_off, d_off, lengths = blocks(rng, n, sizes, KV)
        with anyio.fail_after(60):
            await engine.transfer_blocks(local, s_off, kv, d_off, lengths)
        expected = copied(pattern(1, KV), src, s_off, d_off, lengths)
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(expected)
        # READ them back to other places (the permutation reversed).
        back = np.zeros(KV, dtype=np.uint8)
        sink = engine.register(back, name="sink")
        with anyio.fail_after(60):
            await engine.transfer_blocks(kv, d_off, sink, s_off, lengths)
        want = copied(np.zeros(KV, dtype=np.uint8), expected, d_off, s_off, lengths)
        assert np.array_equal(back, want)
    after = server.cmd(cmd="stats")["stats"]
    assert after.get("scatter_slices", 0) > before.get("scatter_slices", 0)  # the extent-list path was used
    assert after.get("rejected", 0) == before.get("rejected", 0)


# ------------------------------------------------------------ crafted headers


class Rogue:
    """A connected engine that sends hand-made headers on its link and reads the replies."""

    def __init__(self, engine: tent.Engine, peer: Any) -> None:
        self.engine = engine
        self.peer = peer
        self.link = next(iter(peer.links.values()))
        self.request = 5000

    async def send(
        self, header: p.ScatterRequest | bytes, bulk: np.ndarray | None = None, delay: float = 0.0, wait: float = 4.0
    ) -> p.Message | None:
        """Send one header (a message, or raw msgpack) into a free slot; the reply, or None if none
        came within ``wait`` seconds."""
        link = self.link
        ch = link.channel
        assert ch is not None
        request = self.request
        self.request += 1
        if isinstance(header, p.ScatterRequest):
            header = p.encode(attrs.evolve(header, request=request))
        else:
            fields = msgpack.unpackb(header)
            fields[1] = request
            header = msgpack.packb(fields, use_bin_type=True)
        reply = np.zeros(64 * 1024, dtype=np.uint8)
        got: list[Any] = []
        ch.keep(ch.tag_recv(reply, p.make_tag(link.ns, p.KIND_CONTROL, request)), reply, got.append)
        message = np.frombuffer(len(header).to_bytes(4, "little") + header, dtype=np.uint8)
        slot = link.free_slots[-1]  # the server re-posts it before answering
        ch.keep(ch.tag_send(message, p.make_tag(link.peer_ns, p.KIND_CONTROL, slot)), message, None, send=True)
        if bulk is not None:
            if delay:
                await anyio.sleep(delay)  # the server has posted its receive by now
            ch.keep(ch.tag_send(bulk, p.make_tag(link.peer_ns, p.KIND_DATA, request)), bulk, None, send=True)
        for _ in range(int(wait * 100)):
            if got or self.peer.closed:
                break
            await anyio.sleep(0.01)
        if not got or got[0] is not None:
            return None
        return p.unpack_data(reply)[0]


async def _rogue(server: PeerProcess) -> tuple[tent.Engine, Rogue, dict[str, int]]:
    engine = tent.Engine(backend="ucx", name="rogue", rails=[tent.RailSpec(**LO[0])])
    await engine.__aenter__()
    with anyio.fail_after(30):
        peer = await engine.connect(server.address)
        ads = {name: (await peer.segment(name)).sid for name in ("kv", "ro", "other")}
    return engine, Rogue(engine, peer), ads


def _digests(server: PeerProcess) -> dict[str, str]:
    return {s["name"]: server.cmd(cmd="digest", segment=s["name"])["digest"] for s in SEGMENTS}


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@pytest.mark.parametrize("inline", [True, False])
async def test_extent_lists_outside_what_was_granted_are_refused_with_nothing_written(
    spawn_peer: Any, inline: bool
) -> None:
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS)
    before = _digests(server)
    engine, rogue, sid = await _rogue(server)
    try:
        size = 64 if inline else 64 * 1024  # inline: bytes in the header; else one bulk message

        def header(segs: tuple[tuple[str, int], ...], index: list[int], offsets: list[int]) -> tuple[Any, Any]:
            lengths = [size] * len(index)
            total = size * len(index)
            table = p.pack_table(index, offsets, lengths)
            if inline:
                payload = bytes([0xEE]) * total
                return p.ScatterRequest(p.Op.WRITE, 0, segs, len(index), total, table, payload), None
            return (
                p.ScatterRequest(p.Op.WRITE, 0, segs, len(index), total, table),
                np.full(total, 0xEE, dtype=np.uint8),
            )

        kv, ro, other = ("kv", sid["kv"]), ("ro", sid["ro"]), ("other", sid["other"])
        refusals = {
            # every extent but the last is fine: nothing of the slice may land
            "outside": header((kv,), [0, 0, 0], [0, 4096, KV - size + 1]),
            "read-only": header((kv, ro), [0, 1], [0, 0]),
            "unknown": header((kv, ("nope", 1)), [0, 1], [0, 0]),
            "stale sid": header((kv, ("other", sid["other"] + 100)), [0, 1], [0, 0]),
            "other ok, kv outside": header((other, kv), [0, 1, 1], [0, 0, KV]),
        }
        for what, (msg, bulk) in refusals.items():
            reply = await rogue.send(msg, bulk)
            assert isinstance(reply, p.Error), (what, reply)
        # READs of what is not there are refused as well (nothing sent).
        table = p.pack_table([0, 0], [0, KV], [size, size])
        reply = await rogue.send(p.ScatterRequest(p.Op.READ, 0, (kv,), 2, 2 * size, table, inline=inline))
        assert isinstance(reply, p.Error)
        assert _digests(server) == before
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["rejected"] >= len(refusals) + 1
        assert not rogue.peer.closed  # refused, not a protocol violation
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@pytest.mark.parametrize("how", ["overflow", "total", "index", "bulk-table"])
async def test_malformed_extent_lists_drop_the_connection_with_nothing_written(spawn_peer: Any, how: str) -> None:
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS)
    before = _digests(server)
    engine, rogue, sid = await _rogue(server)
    try:
        w, segs = int(p.Op.WRITEV), [["kv", sid["kv"]]]
        bulk: np.ndarray | None = None
        if how == "overflow":  # two lengths that wrap to 2 in 64 bits
            raw = _raw([w, 0, segs, 2, 2, p.pack_table([0, 0], [0, 0], [2**64 - 1, 3]), None])
        elif how == "total":  # lengths that disagree with the total
            raw = _raw([w, 0, segs, 2, 8192, p.pack_table([0, 0], [0, 8192], [4096, 8192]), None])
        elif how == "index":
            raw = _raw([w, 0, segs, 1, 4096, p.pack_table([3], [0], [4096]), None])
        else:  # the table leads the bulk message, and it is wrong there
            count = 2000
            raw = _raw([w, 0, segs, count, count * 512, None, None])
            table = p.pack_table(np.zeros(count), np.arange(count) * 512, np.full(count, 512))
            bad = bytearray(table)
            bad[-8:] = (2**63).to_bytes(8, "little")  # the last length is absurd
            bulk = np.concatenate([np.frombuffer(bytes(bad), np.uint8), np.full(count * 512, 0xEE, np.uint8)])
        await rogue.send(raw, bulk)
        for _ in range(500):
            if rogue.peer.closed:
                break
            await anyio.sleep(0.01)
        assert rogue.peer.closed and "protocol violation" in rogue.peer.closed_reason()
        assert _digests(server) == before
        assert server.cmd(cmd="stats")["stats"]["protocol_errors"] >= 1
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_staging_beyond_its_bound_is_refused_and_counted(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS, staging_per_link=MiB)
    before = _digests(server)
    engine, rogue, sid = await _rogue(server)
    try:
        count = 64
        table = p.pack_table(np.zeros(count), np.arange(count) * 2 * 32768, np.full(count, 32768))
        msg = p.ScatterRequest(p.Op.WRITE, 0, (("kv", sid["kv"]),), count, count * 32768, table)
        reply = await rogue.send(msg, np.full(count * 32768, 0xEE, np.uint8))  # 2 MiB: over the 1 MiB bound
        assert isinstance(reply, p.Error) and "bound" in reply.reason
        # It can never fit, so it must not tell the user to retry (nor flag it retryable).
        assert not reply.retry and "retry" not in reply.reason and "max_slice" in reply.reason
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["staging_refused"] == 1 and stats["protocol_errors"] >= 1
        assert _digests(server) == before
        # The connection is still usable: an honest batch within the bound goes through.
        src = rogue.engine.register(np.full(KV, 7, dtype=np.uint8), name="src")
        kv = await rogue.peer.segment("kv")
        offsets = np.arange(16) * 8192
        with anyio.fail_after(30):
            await rogue.engine.transfer_blocks(src, offsets, kv, offsets[::-1].copy(), 4096)
        assert server.cmd(cmd="read", segment="kv", start=0, stop=2)["hex"] == "0707"
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_one_slice_spans_several_peer_segments_and_mixed_directions_fail_cleanly(server: PeerProcess) -> None:
    server.cmd(cmd="fill", segment="kv", seed=1)
    server.cmd(cmd="fill", segment="other", seed=3)
    async with tent.Engine(backend="ucx", name="prefill-0", rails=[tent.RailSpec(**LO[0])]) as engine:
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            kv, other = await peer.segment("kv"), await peer.segment("other")
        src = pattern(21, MiB)
        local = engine.register(src, name="src")
        kv_want, other_want = pattern(1, KV), pattern(3, MiB)
        pairs = []
        for i in range(64):  # 2 KiB blocks alternating between two peer segments, out of order
            s, d = i * 2048, (63 - i) * 4096
            if i % 2:
                pairs.append((local[s : s + 2048], kv[d : d + 2048]))
                kv_want[d : d + 2048] = src[s : s + 2048]
            else:
                pairs.append((local[s : s + 2048], other[d : d + 2048]))
                other_want[d : d + 2048] = src[s : s + 2048]
        with anyio.fail_after(60):
            await engine.transfer_batch(pairs)
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(kv_want)
        assert server.cmd(cmd="digest", segment="other")["digest"] == digest(other_want)
        # To and from the peer in one batch: refused as a whole, with the reason.
        sink = engine.register(np.zeros(MiB, dtype=np.uint8), name="sink")
        with anyio.fail_after(60), pytest.raises(tent.TentError, match="one way"):
            await engine.transfer_batch([(local[0:2048], kv[0:2048]), (kv[8192:10240], sink[0:2048])])


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_short_bulk_message_never_carries_old_memory_into_a_segment(spawn_peer: Any) -> None:
    """A WRITEV that announces N bulk bytes and sends fewer (after the server posted its receive):
    the rest of the range must not be whatever the staging buffer held before (malloc'd heap,
    or an earlier slice's bytes from the pool); it was found carrying heap pointers and
    another slice's data.  Then the staging was zeroed before every such receive (zeros
    landed); now random bytes end it, a message that stops short leaves them, and the slice
    is refused with nothing written (counted as ``short_bulk``); one that stops within them
    leaves only those random bytes, never old memory."""
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS)
    engine, rogue, sid = await _rogue(server)
    kv = ("kv", sid["kv"])

    def read(off: int, size: int) -> np.ndarray:
        return np.frombuffer(
            bytes.fromhex(server.cmd(cmd="read", segment="kv", start=off, stop=off + size)["hex"]), np.uint8
        )

    try:
        n = 1 * MiB
        full = p.ScatterRequest(p.Op.WRITE, 0, (kv,), 1, n, p.pack_table([0], [0], [n]))
        assert isinstance(await rogue.send(full, np.full(n, 0xAB, np.uint8)), p.Ack)  # a pooled buffer of 0xAB
        for size, off in ((4096, 4 * MiB), (n, 2 * MiB)):
            before = read(off, size)
            short = p.ScatterRequest(p.Op.WRITE, 0, (kv,), 1, size, p.pack_table([0], [off], [size]))
            reply = await rogue.send(short, np.full(16, 0xEE, np.uint8), delay=0.3)
            assert isinstance(reply, p.Error) and "shorter" in reply.reason, reply
            assert (read(off, size) == before).all(), size  # nothing written: no old memory, no 0xEE
        assert server.cmd(cmd="stats")["stats"]["short_bulk"] == 2
        # Short by exactly the random end: refused, nothing written (the boundary, review).
        off, size = 5 * MiB, n
        before = read(off, size)
        short = p.ScatterRequest(p.Op.WRITE, 0, (kv,), 1, size, p.pack_table([0], [off], [size]))
        reply = await rogue.send(short, np.full(n - p.TAIL_BYTES, 0xEE, np.uint8), delay=0.3)
        assert isinstance(reply, p.Error) and "shorter" in reply.reason, reply
        assert (read(off, size) == before).all()
        assert server.cmd(cmd="stats")["stats"]["short_bulk"] == 3
        # Short by fewer bytes than the random end: only those random bytes are left, never old memory.
        for missing, off in ((4, 6 * MiB), (p.TAIL_BYTES - 1, 7 * MiB)):
            short = p.ScatterRequest(p.Op.WRITE, 0, (kv,), 1, size, p.pack_table([0], [off], [size]))
            assert isinstance(await rogue.send(short, np.full(n - missing, 0xEE, np.uint8), delay=0.3), p.Ack)
            got = read(off, size)
            assert (got[: n - missing] == 0xEE).all() and not (got[n - missing :] == 0xAB).all(), missing
        assert not rogue.peer.closed
    finally:
        await engine.__aexit__(None, None, None)


def test_a_slice_may_carry_as_many_extents_as_its_bytes_allow() -> None:
    """Honest tables always fit: runs of blocks of 512 bytes or more (equal or mixed), cut
    anywhere by the planner (its two end extents may be a byte long); 65,536 one-byte
    extents (~60 ms of copying per header for 64 KiB) do not."""
    rng = np.random.default_rng(11)
    for sizes in ([512], [4096], [16384], [512, 4096, 16384, 100_000], [600, 700, 5000]):
        for _ in range(300):
            n = int(rng.integers(0, 20_000))
            inner = rng.choice(sizes, n).astype(np.int64)
            ends = rng.integers(1, 4096, 2)  # what the slice boundaries left of two blocks
            count, total = n + 2, int(inner.sum() + ends.sum())
            if count <= p.MAX_EXTENTS:
                assert count <= p.extents_allowed(total), (sizes, count, total)
    assert p.extents_allowed(1 << 16) < 1 << 16  # 65,536 one-byte extents
    assert p.extents_allowed(300) == p.FREE_EXTENTS  # a short table of small blocks is fine
    assert p.extents_allowed(1 << 40) == p.MAX_EXTENTS


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
@pytest.mark.parametrize("op", ["WRITE", "READ"])
async def test_a_table_of_tiny_extents_is_refused_and_counted_with_nothing_written(spawn_peer: Any, op: str) -> None:
    """A table of many one-byte extents would cost the serving loop ~1.7 us per extent for a
    byte each: refused (ERROR, counted), nothing written or read, the connection stays; an
    honest engine cuts such a table into slices the peer accepts."""
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS)
    before = _digests(server)
    engine, rogue, sid = await _rogue(server)
    kv = ("kv", sid["kv"])
    try:
        count = 4096  # 72 KiB of table: it travels in the bulk message
        table = p.pack_table(np.zeros(count), np.arange(count) * 2, np.ones(count))
        if op == "WRITE":
            msg = p.ScatterRequest(p.Op.WRITE, 0, (kv,), count, count)
            bulk = np.concatenate([np.frombuffer(table, np.uint8), np.full(count, 0xEE, np.uint8)])
        else:
            msg = p.ScatterRequest(p.Op.READ, 0, (kv,), count, count)
            bulk = np.frombuffer(table, np.uint8).copy()
        reply = await rogue.send(msg, bulk)
        assert isinstance(reply, p.Error) and "extents" in reply.reason and not reply.retry, reply
        # The table in the header: 300 one-byte extents (256 are allowed whatever their length).
        small = p.pack_table(np.zeros(300), np.arange(300) * 2, np.ones(300))
        reply = await rogue.send(p.ScatterRequest(p.Op[op], 0, (kv,), 300, 300, small, inline=op == "READ"))
        assert isinstance(reply, p.Error) and "extents" in reply.reason, reply
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["extents_refused"] == 2 and stats["protocol_errors"] >= 2
        assert stats.get("scatter_slices", 0) == 0
        assert _digests(server) == before
        assert not rogue.peer.closed
        # An honest engine does not send such a slice: its planner cuts a table of one-byte
        # blocks into slices within the peer's budget, and they land.
        kvseg = await rogue.peer.segment("kv")
        src = rogue.engine.register(np.full(MiB, 7, dtype=np.uint8), name="src")
        with anyio.fail_after(30):
            await rogue.engine.transfer_blocks(src, np.arange(1000) * 2, kvseg, np.arange(1000) * 4, 1)
        assert server.cmd(cmd="read", segment="kv", start=3996, stop=3997)["hex"] == "07"
        assert server.cmd(cmd="stats")["stats"]["extents_refused"] == 2  # none of its slices refused
        # Honest 4 KiB blocks still go through on the same connection.
        offsets = np.arange(64) * 8192
        with anyio.fail_after(30):
            await rogue.engine.transfer_blocks(src, offsets, kvseg, offsets[::-1].copy(), 4096)
        assert server.cmd(cmd="read", segment="kv", start=0, stop=2)["hex"] == "0707"
    finally:
        await engine.__aexit__(None, None, None)


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_staging_refusal_is_retried_and_the_transfer_completes(spawn_peer: Any) -> None:
    """A peer whose staging is full refuses a slice for its load, not the slice's fault: the
    honest transfer is retried after a short hold of the rail (RemoteBusyError, ``busy`` to the
    planner, the rail keeps its health) and completes once staging is free, instead of failing
    with RemoteAccessError at the first refusal."""
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS, staging_per_engine=2 * MiB, bulk_wait=60)
    server.cmd(cmd="fill", segment="kv", seed=1)
    hog, rogue, sid = await _rogue(server)
    # The ucx defaults (2 attempts per rail: a busy refusal must not spend them; the default
    # no_rail_wait, which a busy rail never reaches), and a busy_wait long enough for a loaded
    # host to see the refusal and free the staging.
    config = tent.SchedulerConfig(target_slice_time=4e-3, window=3, max_window=8, busy_wait=20.0)
    try:
        # The rogue announces 2 MiB of bulk bytes and never sends them: the engine's staging is full.
        n = 2 * MiB
        held = p.ScatterRequest(p.Op.WRITE, 0, (("kv", sid["kv"]),), 1, n, p.pack_table([0], [0], [n]))
        assert await rogue.send(held, wait=0.2) is None
        async with tent.Engine(backend="ucx", name="prefill-0", rails=[tent.RailSpec(**LO[0])], config=config) as eng:
            with anyio.fail_after(30):
                peer = await eng.connect(server.address)
                kv = await peer.segment("kv")
            src = pattern(5, MiB)
            local = eng.register(src, name="src")
            s_off = np.arange(16, dtype=np.int64) * 4096
            d_off = (4 * MiB + s_off[::-1] * 2).copy()
            want = pattern(1, KV)
            for s, d in zip(s_off.tolist(), d_off.tolist(), strict=True):
                want[d : d + 4096] = src[s : s + 4096]
            done: list[BaseException | None] = []

            async def run() -> None:
                try:
                    await eng.transfer_blocks(local, s_off, kv, d_off, 4096)
                    done.append(None)
                except Exception as exc:  # the test reports it below
                    done.append(exc)

            task = asyncio.get_running_loop().create_task(run())
            for _ in range(1500):  # until the server refused a slice for want of staging
                if done or server.cmd(cmd="stats")["stats"].get("staging_refused", 0):
                    break
                await anyio.sleep(0.02)
            await rogue.peer.close()  # its connection ends: the staging is released
            with anyio.fail_after(60):
                await task
            assert done == [None], done
            assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(want)
            stats = server.cmd(cmd="stats")["stats"]
            assert stats["staging_refused"] >= 1
    finally:
        await hog.__aexit__(None, None, None)


def test_one_connection_holds_at_most_a_quarter_of_the_engines_staging() -> None:
    pool = scatter.Staging()
    mine = [scatter.LinkStaging(pool, 64, connection=1) for _ in range(4)]  # one peer, four rails
    other = scatter.LinkStaging(pool, 64, connection=2)
    chunk = 16 << 20
    held = []
    for link in mine:
        while (buf := link.take(chunk)) is not None:
            held.append((link, buf))
    assert sum(b.shape[0] for _, b in held) == scatter.STAGING_PER_CONNECTION
    assert other.take(chunk) is not None  # the next peer still gets staging
    for link, buf in held:
        link.give(buf)
    assert pool.by_connection == {2: chunk}


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_peer_that_announces_bulk_bytes_and_never_sends_them_is_dropped(spawn_peer: Any) -> None:
    """Staging is taken when the header arrives; bulk bytes that never come must not hold it:
    past its deadline the peer's connection is dropped and the staging released."""
    server = spawn_peer(name="decode-0", rails=LO, segments=SEGMENTS, bulk_wait=0.5)
    engine, rogue, sid = await _rogue(server)
    try:
        n = 1 * MiB
        header = p.ScatterRequest(p.Op.WRITE, 0, (("kv", sid["kv"]),), 1, n, p.pack_table([0], [0], [n]))
        await rogue.send(header)  # no bulk: no reply comes, the staging is held
        for _ in range(400):
            if rogue.peer.closed:
                break
            await anyio.sleep(0.05)
        assert rogue.peer.closed
        stats = server.cmd(cmd="stats")["stats"]
        assert stats.get("staging_overdue", 0) >= 1
    finally:
        await engine.__aexit__(None, None, None)


def test_an_inline_extent_list_into_gpu_memory_is_refused_as_on_the_one_extent_path() -> None:
    import collections
    from types import SimpleNamespace

    gpu = SimpleNamespace(registered=True, permission="rw", memory=SimpleNamespace(readonly=False, is_cuda=True))
    host = SimpleNamespace(registered=True, permission="rw", memory=SimpleNamespace(readonly=False, is_cuda=False))
    site = SimpleNamespace(engine_name="e", max_request=1 << 30, inline_limit=1 << 20, stats=collections.Counter())
    server = SimpleNamespace(site=site, registration={"gpu": (gpu, 1), "host": (host, 2)}.get)
    link = SimpleNamespace(in_flight=0, slots=[None] * 8)
    for name, sid, refused in (("gpu", 1, True), ("host", 2, False)):
        msg = p.ScatterRequest(p.Op.WRITE, 0, ((name, sid),), 1, 64, p.pack_table([0], [0], [64]), payload=bytes(64))
        _segs, reason = scatter._resolve(server, link, msg)  # type: ignore[arg-type]
        assert ("GPU memory" in reason) is refused, reason


# ============================================================== flow control


@attrs.define
class _Plan:
    """What StagingShare reads of a :class:`scatter.Plan`."""

    need: int
    share: Any = None
    reserved: int = 0


@pytest.mark.anyio
async def test_a_connections_staging_share_admits_in_turn_and_is_released_on_every_outcome() -> None:
    share = scatter.StagingShare(10)
    woken: list[str] = []
    rail_a, rail_b = (lambda: woken.append("a")), (lambda: woken.append("b"))
    first, second, big = _Plan(6), _Plan(4), _Plan(6)
    assert share.admit(first, rail_a) and share.admit(second, rail_b)  # 10 of 10
    assert share.admit(_Plan(0), rail_b)  # inline: takes no staging, never waits
    assert not share.admit(big, rail_a)  # 16 > 10: waits in its link's queue
    assert not share.admit(_Plan(1), rail_b)  # fits, but rail a waits first: b queues behind it
    assert share.held == 10
    share.release(first)  # rail a's slice ended (completed, failed, withdrawn or its link closed)
    share.release(first)  # released once only
    assert share.held == 4 and first.share is None and first.reserved == 0
    await asyncio.sleep(0)  # wakes run from the loop, in turn
    assert woken == ["a", "b"]
    woken.clear()
    assert share.admit(big, rail_a) and share.held == 10  # 4 + 6: fits now
    share.release(second)
    share.release(big)
    assert share.held == 0
    # One slice larger than the whole share still goes when nothing is held (the server refuses
    # it, not for load): flow control never stalls it for ever.
    huge = _Plan(25)
    assert share.admit(huge, rail_b) and share.held == 25
    assert not share.admit(_Plan(1), rail_a)
    share.release(huge)
    await asyncio.sleep(0)
    assert woken == ["a"] and share.held == 0
    # A waiter that no longer asks (its link went down, its slice was withdrawn) holds no one up.
    hog = _Plan(10)
    assert share.admit(hog, rail_a)
    assert not share.admit(_Plan(5), rail_a)
    share.release(hog)
    await asyncio.sleep(0)  # rail a is woken and does not ask again
    assert share.admit(_Plan(5), rail_b)


def test_a_plan_needs_the_staging_the_server_takes_for_it() -> None:
    """The client's accounting follows serve(): the bulk message (WRITE: [table] + bytes) or the
    READ's [table] + bytes, exact; nothing for an inline slice; a direct copy's table only."""

    def plan(op: p.Op, count: int, total: int, table_inline: bool, inline: bool, direct: bool) -> scatter.Plan:
        plan = scatter.Plan.__new__(scatter.Plan)
        plan.kind, plan.count, plan.total, plan.table_inline, plan.inline = op, count, total, table_inline, inline
        plan.cma, plan.remote = direct, (("kv", 1),)
        plan.table = p.pack_table(np.zeros(count), np.zeros(count), np.full(count, total // count))
        plan.pool, plan.local = scatter.Staging(), [as_memory(pattern(0, total))]
        plan.lengths = np.full(count, total // count)
        plan.local_index, plan.local_offsets = np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
        plan.remote_index, plan.remote_offsets = plan.local_index, plan.local_offsets
        return plan

    for op in (p.Op.WRITE, p.Op.READ):
        for count, total, table_inline, inline, direct in (
            (4, 4096, True, True, False),
            (4, 1 << 20, True, False, False),
            (3000, 3000 * 512, False, False, False),
            (4, 1 << 20, True, False, True),
            (3000, 3000 * 512, False, False, True),
        ):
            made = plan(op, count, total, table_inline, inline, direct)
            header = made.header(1)
            assert header.cma is direct and len(header.reach) == direct  # one per segment
            assert made.bulk() is None or not direct
            assert made.need == scatter.staging_need(header), (op, count, total, table_inline, inline, direct)


RAILS3 = [{"name": "lo0", "device": "lo"}, {"name": "lo1", "device": "lo"}, {"name": "shm", "device": "shm"}]


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_an_honest_client_keeps_within_its_staging_share(spawn_peer: Any) -> None:
    """Three rails with windows of 1 MiB extent-list slices would hold several MiB of the peer's
    staging at once; the peer states a 2 MiB share in WELCOME and the client keeps within it:
    slices wait in their link's queue instead of being refused as busy, and land byte-exact."""
    share = 2 * MiB
    server = spawn_peer(name="decode-0", rails=RAILS3, segments=SEGMENTS, staging_per_engine=share)
    server.cmd(cmd="fill", segment="kv", seed=1)
    config = tent.SchedulerConfig(min_slice=MiB, max_slice=MiB, window=3, max_window=8, busy_wait=20.0)
    rails = [tent.RailSpec(**r) for r in RAILS3]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config) as engine:
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        assert len(peer.rails) == 3 and peer.staging.limit == share
        rng = np.random.default_rng(7)
        s_off, d_off, lengths = blocks(rng, 448, lambda n: np.full(n, 16384), KV)  # 7 MiB
        src = pattern(21, KV)
        local = engine.register(src, name="src")
        back = np.zeros(KV, dtype=np.uint8)
        sink = engine.register(back, name="sink")
        expected = copied(pattern(1, KV), src, s_off, d_off, lengths)
        want = copied(np.zeros(KV, dtype=np.uint8), expected, d_off, s_off, lengths)
        for _ in range(2):
            with anyio.fail_after(60):
                await engine.transfer_blocks(local, s_off, kv, d_off, lengths)
            assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(expected)
            back[:] = 0
            with anyio.fail_after(60):
                await engine.transfer_blocks(kv, d_off, sink, s_off, lengths)
            assert np.array_equal(back, want)
        assert peer.staging.held == 0  # every slice's share was released
    stats = server.cmd(cmd="stats")["stats"]
    assert stats.get("scatter_slices", 0) > 0  # the extent-list path was used
    assert stats.get("staging_refused", 0) == 0, stats
    assert stats.get("rejected", 0) == 0, stats


@pytest.mark.ucx
@pytest.mark.anyio
@requires_ucxx
async def test_a_closed_link_or_peer_gives_its_slices_staging_share_back(spawn_peer: Any) -> None:
    """The share held by slices in flight is released when their link is torn down (the batch
    completes on the other rails, byte-exact) and when the peer is closed under them."""
    server = spawn_peer(name="decode-0", rails=RAILS3, segments=SEGMENTS, staging_per_engine=2 * MiB)
    server.cmd(cmd="fill", segment="kv", seed=1)
    config = tent.SchedulerConfig(min_slice=MiB, max_slice=MiB, window=3, max_window=8, busy_wait=20.0)
    rails = [tent.RailSpec(**r) for r in RAILS3]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config) as engine:
        with anyio.fail_after(60):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        s_off, d_off, lengths = blocks(np.random.default_rng(8), 448, lambda n: np.full(n, 16384), KV)
        src = pattern(22, KV)
        local = engine.register(src, name="src")
        expected = copied(pattern(1, KV), src, s_off, d_off, lengths)

        async def until_held() -> list[Any]:
            for _ in range(2000):
                busy = [link for link in peer.links.values() if any(op.sg is not None for op in link.ops.values())]
                if busy and peer.staging.held:
                    return busy
                await asyncio.sleep(0.001)
            pytest.fail("no extent-list slice was ever in flight")

        task = asyncio.get_running_loop().create_task(engine.transfer_blocks(local, s_off, kv, d_off, lengths))
        (await until_held())[0].close("test: the link goes down under its slices", tell=True)
        with anyio.fail_after(60):
            await task
        assert server.cmd(cmd="digest", segment="kv")["digest"] == digest(expected)
        assert peer.staging.held == 0
        task = asyncio.get_running_loop().create_task(engine.transfer_blocks(local, s_off, kv, d_off, lengths))
        await until_held()
        await peer.close()
        with anyio.fail_after(60), pytest.raises(tent.TentError):
            await task
        await asyncio.sleep(0.05)  # the links' slices settle from the loop
        assert peer.staging.held == 0


def test_staging_a_parked_send_may_still_read_never_goes_back_to_the_pool() -> None:
    """Issue 11: a WRITE's gathered staging whose send outlived LINGER_MAX (endpoint parked,
    channel.py) stays with UCX's request: were it reused, another slice's bytes, maybe for
    another peer, would follow it out to the peer that stopped reading."""
    from tent_async.backends.ucx.scatter import POOL_MIN, Plan, Staging

    pool = Staging()

    def plan_with_staging() -> tuple[Plan, Any]:
        plan = object.__new__(Plan)
        plan.pool = pool
        plan.share = None
        plan.staging = buf = pool.take(POOL_MIN)
        return plan, buf

    plan, buf = plan_with_staging()
    plan.release(reuse=False)
    assert plan.staging is None and pool.take(POOL_MIN).base is not buf.base  # not handed out again
    plan, buf = plan_with_staging()
    plan.release()
    assert pool.take(POOL_MIN).base is buf.base  # an ordinary end: reused


def test_staging_buffers_come_in_power_of_two_sizes_and_serve_every_slice_from_half_their_size() -> None:
    """Slices' sizes follow the learned rates and vary; an idle buffer serves any slice above half its
    size, so a KV batch's slices reuse the pool instead of faulting in fresh pages."""
    from tent_async.backends.ucx.scatter import POOL_BYTES, Staging

    pool = Staging()
    first = pool.take(5 * MiB + 123)
    assert len(first) == 5 * MiB + 123 and first.base.shape[0] == 8 * MiB
    pool.give(first)
    for n in (4 * MiB + 1, 7 * MiB + 1, 8 * MiB):  # all in (half, whole] of the idle 8 MiB buffer
        again = pool.take(n)
        assert again.base is first.base and len(again) == n
        pool.give(again)
    assert pool.take(4 * MiB).base.shape[0] == 4 * MiB  # half of it: a 4 MiB buffer of its own
    assert pool.take(8 * MiB + 1).base.shape[0] == 16 * MiB
    pool.give(first)
    pool.give(first)  # given twice: kept once
    assert pool._idle == 8 * MiB
    # What is kept idle stays within POOL_BYTES; the oldest idle buffers make room for new ones, so a
    # pool full of small buffers still keeps a large one.
    small = [pool.take(MiB) for _ in range(POOL_BYTES // MiB)]
    for buf in small:
        pool.give(buf)
    assert pool._idle == POOL_BYTES and pool.take(8 * MiB).base is not first.base  # evicted, oldest
    big = pool.take(64 * MiB)
    pool.give(big)
    assert pool._idle <= POOL_BYTES and pool.take(64 * MiB).base is big.base
    assert pool.take(MiB).base is small[-1].base  # the newest small ones stayed
    pool.give(np.empty(POOL_BYTES * 2, dtype=np.uint8))  # larger than the whole pool: not kept
    assert pool._idle <= POOL_BYTES


def test_staging_of_a_parked_serving_link_leaves_the_bounds_for_serving_slices() -> None:
    """Issue 11 review: a closed serving link whose READ staging is still being sent to a peer that
    stopped reading must not keep every other peer's extent lists refused as busy: its bytes move
    from the engine's and the connection's in-use bounds to ``pool.parked``.  The source that parked
    a connection's share gets no more staging until it reads (audit), others go on."""
    from tent_async.backends.ucx.scatter import STAGING_PER_CONNECTION, LinkStaging, Staging

    pool = Staging()
    link = LinkStaging(pool, slots=8, connection=7, source="10.0.0.7")
    same = LinkStaging(pool, slots=8, connection=7, source="10.0.0.7")  # the same peer connection, another rail
    other = LinkStaging(pool, slots=8, connection=8, source="10.0.0.8")  # another peer
    buf = link.take(STAGING_PER_CONNECTION)
    assert buf is not None and pool.in_use == STAGING_PER_CONNECTION
    assert same.take(1) is None  # the connection's share is used up
    link.park()
    link.park()  # once
    assert pool.in_use == 0 and pool.parked == STAGING_PER_CONNECTION and 7 not in pool.by_connection
    assert pool.parked_by_source == {"10.0.0.7": STAGING_PER_CONNECTION}
    assert same.take(1) is None  # it parked a whole share: nothing more until it reads
    small = other.take(1)
    assert small is not None  # served slices of other peers have their bounds back
    link.give(buf)  # UCX is done with it
    assert pool.parked == 0 and pool.in_use == 1 and not pool.parked_by_source
    again = same.take(1)
    assert again is not None  # it read: its staging comes back
    other.give(small)
    same.give(again)
    assert pool.in_use == 0 and not pool.by_connection


def test_staging_being_served_and_parked_together_stay_within_twice_the_engines_bound() -> None:
    """Audit (issue 11): parked staging was bounded only by refusing new links, which links already up
    got past; now taking staging stops where served and parked staging reach ``PARKED_FACTOR`` x the
    engine's bound, whichever sources parked it."""
    from tent_async.backends.ucx.scatter import (
        PARKED_FACTOR,
        STAGING_PER_CONNECTION,
        STAGING_PER_ENGINE,
        LinkStaging,
        Staging,
    )

    pool = Staging()
    held = []
    for i in range(2 * PARKED_FACTOR * STAGING_PER_ENGINE // STAGING_PER_CONNECTION):  # more than fits
        link = LinkStaging(pool, slots=8, connection=i, source=f"10.0.1.{i}")  # a new address each
        buf = link.take(STAGING_PER_CONNECTION)
        if buf is None:
            break
        held.append((link, buf))
        link.park()
        assert pool.in_use + pool.parked <= PARKED_FACTOR * STAGING_PER_ENGINE
    assert pool.parked == PARKED_FACTOR * STAGING_PER_ENGINE  # it filled, and stopped there
    late = LinkStaging(pool, slots=8, connection=99, source="10.0.2.1")
    assert late.take(1) is None  # a slice past the bound is refused (the server answers busy)
    link, buf = held.pop()
    link.give(buf)  # one parked peer read at last
    assert late.take(1) is not None
