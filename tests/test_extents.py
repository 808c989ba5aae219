"""Extent lists: coalescing merges exactly the adjacent extents; windows carry exactly their bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tent_async.core import Piece
from tent_async.core.extents import Extents

extent = st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 64), st.sampled_from(["c", "d"]), st.integers(0, 64))


@st.composite
def piece_lists(draw: st.DrawFn) -> list[Piece]:
    """Pieces where some continue the previous one on both sides (and some only on one)."""
    pieces: list[Piece] = []
    for _ in range(draw(st.integers(0, 12))):
        length = draw(st.integers(0, 40))
        how = draw(st.sampled_from(["adjacent", "src-only", "random"]))
        if pieces and how != "random":
            p = pieces[-1]
            src_off = p.src_offset + p.length
            dst_off = p.dst_offset + p.length + (0 if how == "adjacent" else 1)
            pieces.append(Piece(p.src, src_off, p.dst, dst_off, length))
        else:
            s, so, d, do = draw(extent)
            pieces.append(Piece(s, so, d, do, length))
    return pieces


def reference_merge(pieces: list[Piece]) -> list[tuple[object, int, object, int, int]]:
    out: list[tuple[object, int, object, int, int]] = []
    for p in pieces:
        if p.length == 0:
            continue
        if out:
            s, so, d, do, n = out[-1]
            if s == p.src and d == p.dst and so + n == p.src_offset and do + n == p.dst_offset:
                out[-1] = (s, so, d, do, n + p.length)
                continue
        out.append((p.src, p.src_offset, p.dst, p.dst_offset, p.length))
    return out


def as_tuples(ext: Extents) -> list[tuple[object, int, object, int, int]]:
    return list(ext.window(0, ext.total)) if ext.total else []


@given(piece_lists())
def test_coalescing_merges_exactly_the_adjacent_extents(pieces: list[Piece]) -> None:
    """Every run is merged when that removes an eighth of the list or more; else none is."""
    ext = Extents.from_pieces(pieces).coalesced() if pieces else None
    if ext is None:
        return
    given = [(p.src, p.src_offset, p.dst, p.dst_offset, p.length) for p in pieces if p.length]
    merged = reference_merge(pieces)
    assert as_tuples(ext) == (merged if 8 * (len(given) - len(merged)) >= len(given) else given)
    assert ext.total == sum(p.length for p in pieces)


def test_a_few_neighbours_in_a_big_table_are_left_as_they_are() -> None:
    """One adjacent pair among 64 blocks: the table keeps its one block size; four pairs and
    a run of eight among 16 blocks (more than an eighth) are merged."""
    so = np.arange(64, dtype=np.int64) * 4096
    do = so[::-1].copy()
    do[10], do[11] = do[11], do[10]  # block 11 now continues block 10 on both sides
    ext = Extents.between("a", so, "b", do, 4096)
    assert ext.coalesced() is ext and len(ext) == 64
    slots = [0, 1, 9, 10, 5, 6, 20, 21, *range(30, 38)]
    small = Extents.between("a", so[:16], "b", np.array(slots) * 4096, 4096)
    assert len(small.coalesced()) == 16 - 4 - 7


@given(piece_lists(), st.data())
def test_a_window_carries_exactly_its_stream_bytes(pieces: list[Piece], data: st.DataObject) -> None:
    ext = Extents.from_pieces(pieces)
    if ext.total == 0:
        return
    offset = data.draw(st.integers(0, ext.total - 1))
    length = data.draw(st.integers(1, ext.total - offset))
    # The stream byte by byte, as (src, src byte, dst, dst byte).
    stream = [(p.src, p.src_offset + i, p.dst, p.dst_offset + i) for p in pieces for i in range(p.length)][
        offset : offset + length
    ]
    win = ext.window(offset, length)
    got = [(s, so + i, d, do + i) for s, so, d, do, n in win for i in range(n)]
    assert got == stream
    assert win.nbytes == length
    assert ext.first(offset) == stream[0]


def test_between_takes_block_tables_and_refuses_bad_ones() -> None:
    ext = Extents.between("pool", np.array([0, 4096, 8192]), "pool2", [8192, 0, 4096], 4096)
    assert ext.total == 3 * 4096
    assert len(ext) == 3
    merged = Extents.between("pool", [0, 4096], "pool2", [100, 4196], 4096).coalesced()
    assert len(merged) == 1 and merged.total == 8192
    with pytest.raises(ValueError, match="negative"):
        Extents.between("a", [-1], "b", [0], 10)
    with pytest.raises(ValueError, match="3 values"):
        Extents.between("a", [0, 1, 2], "b", [0, 1], 10)
    with pytest.raises(ValueError, match="integers"):
        Extents.between("a", [0], "b", [0.5], 10)
    with pytest.raises(ValueError, match="integers"):
        Extents.between("a", [0], "b", [0], 4096.5)  # one length for all: still an integer


@given(piece_lists())
def test_segment_pairs_are_exactly_the_pairs_used(pieces: list[Piece]) -> None:
    ext = Extents.from_pieces(pieces)
    want = sorted({(ext.segments.index(p.src), ext.segments.index(p.dst)) for p in pieces if p.length})
    assert ext.seg_pairs() == want
    merged = ext.coalesced()
    assert merged.seg_pairs() == want
    assert merged.coalesced() is merged  # asked again (the planner does): nothing recomputed


@st.composite
def aliased_blocks(draw: st.DrawFn) -> list[tuple[int, int, int, int, int]]:
    """(src segment, src offset, dst segment, dst offset, length) over segments that alias."""
    n = draw(st.integers(1, 8))
    return [
        (
            draw(st.integers(0, 2)),
            draw(st.integers(0, 200)),
            draw(st.integers(0, 2)),
            draw(st.integers(0, 200)),
            draw(st.integers(1, 60)),
        )
        for _ in range(n)
    ]


@given(aliased_blocks())
def test_overlap_check_agrees_with_brute_force_on_addresses(blocks: list[tuple[int, int, int, int, int]]) -> None:
    """Segments 0 and 2 are the same buffer, segment 1 a numpy view 100 bytes into it."""
    import anyio

    from tent_async import Engine
    from tent_async.batches import check_overlaps
    from tent_async.errors import OverlappingViewsError

    buf = np.zeros(400, dtype=np.uint8)
    base = {0: 0, 1: 100, 2: 0}

    def brute() -> bool:
        dsts = [(base[d] + do, base[d] + do + n) for _s, _so, d, do, n in blocks]
        srcs = [(base[s] + so, base[s] + so + n) for s, so, _d, _do, n in blocks]
        for i, (a0, a1) in enumerate(dsts):
            if any(a0 < b1 and b0 < a1 for j, (b0, b1) in enumerate(dsts) if j != i):
                return True
            if any(a0 < b1 and b0 < a1 for b0, b1 in srcs):
                return True
        return False

    async def main() -> bool:
        async with Engine(backend="local") as engine:
            segs = [
                engine.register(buf, name="a"),
                engine.register(buf[100:], name="b"),
                engine.register(buf, name="c"),
            ]
            ext = Extents(
                segs,
                np.array([b[0] for b in blocks], dtype=np.int32),
                np.array([b[1] for b in blocks], dtype=np.int64),
                np.array([b[2] for b in blocks], dtype=np.int32),
                np.array([b[3] for b in blocks], dtype=np.int64),
                np.array([b[4] for b in blocks], dtype=np.int64),
            )
            try:
                check_overlaps(ext)
            except OverlappingViewsError:
                return True
            return False

    assert anyio.run(main) == brute()


@given(
    blocks=st.integers(1, 40),
    block=st.sampled_from([512, 1024, 1536, 4096, 16384]),
    head=st.integers(0, 1023),
    tail=st.integers(0, 1023),
    seed=st.integers(0, 3),
    gather=st.booleans(),
    stray=st.integers(0, 3),
)
def test_copy_extents_scatter_and_gather_paths_are_byte_exact(
    blocks: int, block: int, head: int, tail: int, seed: int, gather: bool, stray: int
) -> None:
    """Equal blocks from one contiguous run to scattered places (a push), or from scattered
    places into one run (a pull), ends trimmed as a slice cuts them; the scattered side on
    one grid (a row view) or, with ``stray``, one block off it (the fallbacks)."""
    from tent_async.memory import as_memory, copy_extents

    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, blocks * block + 8192, dtype=np.uint8)
    dst = np.zeros(blocks * block + 8192, dtype=np.uint8)
    run = np.arange(blocks, dtype=np.int64) * block
    scattered = rng.permutation(blocks).astype(np.int64) * block + 4096
    if stray and blocks > 2:
        k = int(np.argmax(scattered))  # the last slot: moving it up cannot make two blocks overlap
        scattered[k] += stray * 100
    so, do = (scattered, run) if gather else (run, scattered)
    ln = np.full(blocks, block, dtype=np.int64)
    head = min(head, block - 1)
    so[0] += head
    do[0] += head
    ln[0] -= head
    ln[-1] -= min(tail, int(ln[-1]) - 1)
    for one_pair in (False, True):
        dst[:] = 0
        copy_extents(
            [as_memory(src), as_memory(dst)],
            np.zeros(blocks, np.int32),
            so,
            np.ones(blocks, np.int32),
            do,
            ln,
            one_pair=one_pair,
        )
        want = np.zeros_like(dst)
        for s, d, n in zip(so.tolist(), do.tolist(), ln.tolist(), strict=True):
            want[d : d + n] = src[s : s + n]
        assert np.array_equal(dst, want)


@given(
    block=st.sampled_from([1, 512, 4096]),
    slots=st.lists(st.integers(0, 40), min_size=1, max_size=30),
    shift=st.sampled_from([0, 0, 0, 256]),
    stray=st.booleans(),
)
def test_destination_slots_are_checked_like_brute_force(block: int, slots: list[int], shift: int, stray: bool) -> None:
    """Separate source and destination pools (the fast path: equal blocks on a grid): a slot
    used twice, or a block off the grid that overlaps another, is refused; distinct slots pass."""
    import anyio

    from tent_async import Engine
    from tent_async.batches import check_overlaps
    from tent_async.errors import OverlappingViewsError

    offsets = [s * block for s in slots]
    if stray and len(offsets) > 1:
        offsets[-1] += shift * block // 4096  # off the grid (or not, when the shift rounds to 0)
    ranges = [(o, o + block) for o in offsets]
    expect = any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(ranges) for (b0, b1) in ranges[i + 1 :])

    async def main() -> bool:
        async with Engine(backend="local") as engine:
            src = engine.register(np.zeros(64 * block, dtype=np.uint8), name="src")
            dst = engine.register(np.zeros(64 * block, dtype=np.uint8), name="dst")
            n = len(offsets)
            ext = Extents.between(src, np.arange(n, dtype=np.int64) * block, dst, np.array(offsets), block)
            try:
                check_overlaps(ext)
            except OverlappingViewsError:
                return True
            return False

    assert anyio.run(main) == expect


@given(
    offsets=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=30),
    block=st.integers(0, 64),
    data=st.data(),
)
def test_one_block_size_given_once_is_the_same_table_as_given_per_block(
    offsets: list[tuple[int, int]], block: int, data: st.DataObject
) -> None:
    """A block size given as one number is held as a broadcast column: the table, its
    stream offsets, merging and every window are those of the same size given per block."""
    so = [s for s, _ in offsets]
    do = [d for _, d in offsets]
    one = Extents.between("a", so, "b", do, block)
    each = Extents.between("a", so, "b", do, [block] * len(so))
    assert one.total == each.total and len(one) == len(each)
    assert np.array_equal(one.starts, each.starts)
    assert as_tuples(one) == as_tuples(each)
    assert as_tuples(one.coalesced()) == as_tuples(each.coalesced())
    assert one.seg_pairs() == each.seg_pairs() == ([(0, 1)] if block else [])
    if one.total:
        offset = data.draw(st.integers(0, one.total - 1))
        length = data.draw(st.integers(1, one.total - offset))
        assert list(one.window(offset, length)) == list(each.window(offset, length))


@given(
    blocks=st.integers(8, 60),
    block=st.sampled_from([1024, 4096]),
    runs=st.lists(st.integers(1, 6), min_size=1, max_size=30),
    gather=st.booleans(),
    data=st.data(),
)
def test_slices_of_merged_runs_land_byte_exact(
    blocks: int, block: int, runs: list[int], gather: bool, data: st.DataObject
) -> None:
    """A table whose scattered side has runs of adjacent blocks (merged by coalescing into
    longer extents) is copied slice by slice, any cut, exactly as block by block."""
    from tent_async.memory import as_memory, copy_extents

    # Slots of the scattered side in runs: each run is consecutive slots, the runs shuffled.
    groups, slot = [], 0
    for r in runs:
        groups.append(list(range(slot, slot + r)))
        slot += r
        if slot >= blocks:
            break
    order = data.draw(st.permutations(range(len(groups))))
    slots = [s for g in order for s in groups[g]][:blocks]
    n = len(slots)
    rng = np.random.default_rng(n)
    size = (max(slots) + 1 + n) * block
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    run = np.arange(n, dtype=np.int64) * block
    scattered = np.array(slots, dtype=np.int64) * block
    so, do = (scattered, run) if gather else (run, scattered)
    ext = Extents.between("a", so, "b", do, block).coalesced()
    want = np.zeros_like(dst)
    for s, d in zip(so.tolist(), do.tolist(), strict=True):
        want[d : d + block] = src[s : s + block]
    mems = [as_memory(src), as_memory(dst)]
    offset = 0
    while offset < ext.total:
        length = data.draw(st.integers(1, ext.total - offset))
        win = ext.window(offset, length)
        copy_extents(mems, *win.arrays(), one_pair=True)
        offset += length
    assert np.array_equal(dst, want)


@given(
    st.lists(st.integers(1, 3000), min_size=1, max_size=200),
    st.integers(1, 8),
    st.integers(64, 1024),
    st.sampled_from([0, 3, 50]),
    st.data(),
)
def test_a_slice_cut_to_the_extent_budget_fits_it_and_is_as_long_as_it_may_be(
    lengths: list[int], free: int, per: int, most: int, data: st.DataObject
) -> None:
    """fit_extents: the slice it leaves carries at most ``free + bytes // per`` extents (one
    extent always goes), is the whole request when that fits, and otherwise ends where an
    extent ends and no longer prefix ending at an extent boundary would fit."""
    from tent_async.core.planner import fit_extents

    src = np.cumsum([0, *lengths[:-1]]) * 2  # gaps: nothing coalesces
    ext = Extents.between("a", src, "b", src[::-1].copy(), np.array(lengths))
    offset = data.draw(st.integers(0, ext.total - 1))
    size = data.draw(st.integers(1, ext.total - offset))
    got = fit_extents(ext, offset, size, free, per, most)

    def count(n: int) -> int:
        return len(ext.window(offset, n))

    def fits(n: int) -> bool:
        return count(n) <= max(1, min(free + n // per, most) if most else free + n // per)

    assert 0 < got <= size
    assert fits(got) or count(got) == 1
    if fits(size):
        assert got == size
    else:
        ends = [int(e) - offset for e in ext.starts if offset < int(e) < offset + size]  # extent ends inside
        assert got in ends
        assert not any(fits(e) for e in ends if e > got)


@given(
    block=st.sampled_from([1024, 1536, 4096]),
    runs=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    sides=st.sampled_from(["scatter", "gather", "both"]),
    phases=st.tuples(st.integers(0, 5000), st.integers(0, 5000)),
    data=st.data(),
)
def test_block_grid_places_every_block_and_its_slices_land_byte_exact(
    block: int, runs: list[int], sides: str, phases: tuple[int, int], data: st.DataObject
) -> None:
    """A block table (runs of adjacent blocks merged by coalescing; the scattered side, or
    both, in shuffled runs; each side shifted off the origin) is one BlockGrid that puts
    every stream block where the table did, and slices copied through it with any cut,
    blocks cut anywhere, land exactly as the table block by block."""
    from tent_async.memory import as_memory, copy_grid

    def shuffled_slots() -> list[int]:
        groups, slot = [], 0
        for r in runs:
            groups.append(list(range(slot, slot + r)))
            slot += r
        order = data.draw(st.permutations(range(len(groups))))
        return [s for g in order for s in groups[g]]

    n = sum(runs)
    run = list(range(n))
    src_slots = shuffled_slots() if sides in ("gather", "both") else run
    dst_slots = shuffled_slots() if sides in ("scatter", "both") else run
    so = np.array(src_slots, dtype=np.int64) * block + phases[0]
    do = np.array(dst_slots, dtype=np.int64) * block + phases[1]
    ext = Extents.between("a", so, "b", do, block).coalesced()
    size = (n + 2) * block + max(phases)
    rng = np.random.default_rng(n)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)
    want = np.zeros_like(dst)
    for s, d in zip(so.tolist(), do.tolist(), strict=True):
        want[d : d + block] = src[s : s + block]
    if len(ext) == 1:  # the whole table was one run on both sides: nothing for a grid to do
        assert ext.block_grid() is None
        return
    grid = ext.block_grid()
    assert grid is not None and grid.block % block == 0  # merged runs may all be longer than one block
    per = grid.block // block
    assert [grid.src_at(k) for k in range(n // per)] == so[::per].tolist()
    assert [grid.dst_at(k) for k in range(n // per)] == do[::per].tolist()
    mems = [as_memory(src), as_memory(dst)]
    offset = 0
    while offset < ext.total:
        length = data.draw(st.integers(1, ext.total - offset))
        win = ext.window(offset, length)
        assert win.offset == offset and win.block_grid() is grid
        assert copy_grid(mems[grid.src_seg], mems[grid.dst_seg], grid, win.offset, win.nbytes)
        offset += length
    assert np.array_equal(dst, want)


def test_tables_that_are_no_grid_have_none() -> None:
    """Lengths that are not whole blocks, an offset off the grid, or two segment pairs:
    no grid (the copy then goes extent by extent); a grid's answer is kept."""
    so = np.array([0, 8192, 4096], dtype=np.int64)
    assert Extents.between("a", so, "b", so[::-1].copy(), [4096, 4096, 1000]).block_grid() is None
    assert Extents.between("a", so, "b", so[::-1].copy(), 512).block_grid() is None  # too small to pay
    assert Extents.between("a", so, "b", np.array([0, 8292, 4096]), 4096).block_grid() is None
    two_pairs = Extents.from_pieces([Piece("a", 0, "b", 4096, 4096), Piece("a", 4096, "c", 0, 4096)])
    assert two_pairs.block_grid() is None
    ext = Extents.between("a", so, "b", so[::-1].copy(), 4096)
    grid = ext.block_grid()
    assert grid is not None and grid.src_rows is not None and grid.dst_rows is not None
    assert ext.block_grid() is grid


def _rows(ext: Extents) -> list[tuple[object, int, object, int, int]]:
    return [(s, so, d, do, n) for s, so, d, do, n in ext.window(0, ext.total)]


@given(piece_lists(), st.sampled_from(["src", "dst"]))
def test_in_order_of_a_side_moves_the_same_blocks_in_that_sides_address_order(pieces: list[Piece], side: str) -> None:
    """Backend.remote_order: any order moves a batch's bytes; the one asked for is the side's."""
    ext = Extents.from_pieces(pieces)
    if not len(ext):
        return
    ordered = ext.in_order_of(side)
    assert sorted(_rows(ordered), key=repr) == sorted(_rows(ext), key=repr)
    seg = ordered.src_seg if side == "src" else ordered.dst_seg
    off = ordered.src_off if side == "src" else ordered.dst_off
    keys = list(zip(np.broadcast_to(seg, off.shape).tolist(), off.tolist(), strict=True))
    assert keys == sorted(keys)
    assert ordered.in_order_of(side) is ordered  # in order already: the same list back


def test_in_order_of_a_block_table_makes_the_sides_runs_one_extent() -> None:
    n, block = 64, 4096
    perm = np.random.default_rng(5).permutation(n).astype(np.int64) * block
    ext = Extents.between("pool", perm, "peer", np.arange(n, dtype=np.int64) * block, block)
    assert ext.in_order_of("dst") is ext
    ordered = ext.in_order_of("src")
    assert ordered.src_off.tolist() == list(range(0, n * block, block))
    assert len(ordered.coalesced()) == n  # the other side is permuted: nothing continues on both
    with pytest.raises(ValueError, match="side"):
        ext.in_order_of("remote")
