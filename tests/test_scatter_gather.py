"""Scatter-gather transfers end to end: block tables and view batches land byte-exact on the
local and sim backends, through failover; aliased memory is refused; cancels report what landed;
medium transfers spray and small ones do not; the engine's own lag is not a rail fault."""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tent_async as tent
from tent_async.backends.local import LocalBackend
from tent_async.backends.sim import SimRail

KiB = 1 << 10
MiB = 1 << 20


@st.composite
def block_tables(draw: st.DrawFn) -> tuple[int, list[int], list[int], list[int]]:
    """(pool size, src offsets, dst offsets, lengths): disjoint destinations, mixed sizes,
    some runs adjacent on both sides, the rest permuted."""
    sizes = draw(st.lists(st.sampled_from([512, 4 * KiB, 16 * KiB, 100 * KiB + 3]), min_size=1, max_size=60))
    src, pos = [], 0
    for n in sizes:
        src.append(pos)
        pos += n
    order = draw(st.permutations(range(len(sizes))))
    if draw(st.booleans()):
        order = sorted(order)  # adjacent on both sides: the whole table coalesces
    dst_pos = {}
    p = 0
    for i in order:
        dst_pos[i] = p
        p += sizes[i]
    return pos, src, [dst_pos[i] for i in range(len(sizes))], sizes


def expected(src: np.ndarray, size: int, so: list[int], do: list[int], ln: list[int]) -> np.ndarray:
    out = np.zeros(size, dtype=np.uint8)
    for s, d, n in zip(so, do, ln, strict=True):
        out[d : d + n] = src[s : s + n]
    return out


def engine_for(kind: str, **kw: Any) -> tent.Engine:
    if kind == "local":
        rails = [tent.RailSpec(name="r0"), tent.RailSpec(name="r1", bandwidth="2GB/s")]
        return tent.Engine(backend="local", rails=rails, **kw)
    fabric = [SimRail(name=f"nic{i}", capacity="100Gb/s") for i in range(4)]
    return tent.Engine(backend="sim", fabric=fabric, **kw)


@pytest.mark.parametrize("kind", ["local", "sim"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=block_tables(), as_pairs=st.booleans(), priority=st.sampled_from(["high", "normal", "background"]))
def test_block_tables_land_byte_exact(
    kind: str, table: tuple[int, list[int], list[int], list[int]], as_pairs: bool, priority: Any
) -> None:
    size, so, do, ln = table
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros(size, dtype=np.uint8)

    async def main() -> None:
        async with engine_for(kind, config=tent.SchedulerConfig(min_slice="8KiB", max_slice="64KiB")) as engine:
            a = engine.register(src, name="a", permission="r")
            b = engine.register(dst, name="b")
            if as_pairs:
                pairs = [(a[s : s + n], b[d : d + n]) for s, d, n in zip(so, do, ln, strict=True)]
                result = await engine.transfer_batch(pairs, priority=priority)
            else:
                result = await engine.transfer_blocks(a, so, b, do, ln, priority=priority)
            assert result.bytes == sum(ln)
            assert sum(result.bytes_per_rail.values()) == sum(ln)

    anyio.run(main)
    assert np.array_equal(dst, expected(src, size, so, do, ln))


def test_scatter_slices_survive_a_failing_rail() -> None:
    n, block = 2048, 4 * KiB
    src = np.random.default_rng(1).integers(0, 256, n * block, dtype=np.uint8)
    dst = np.zeros_like(src)
    perm = np.random.default_rng(2).permutation(n)

    async def main() -> None:
        rails = [tent.RailSpec(name=f"r{i}", bandwidth="200MB/s") for i in range(3)]
        async with tent.Engine(backend="local", rails=rails) as engine:
            backend = engine.backend
            assert isinstance(backend, LocalBackend)
            a = engine.register(src, name="a", permission="r")
            b = engine.register(dst, name="b")
            handle = engine.submit_blocks(a, np.arange(n) * block, b, perm * block, block)
            await anyio.sleep(0.005)
            backend.inject_fault("r1", "error")
            result = await handle
            assert result.reroutes >= 1
            assert engine.telemetry()["r1"].errors >= 1

    anyio.run(main)
    assert np.array_equal(dst.reshape(n, block)[perm], src.reshape(n, block))


def test_block_tables_are_checked_before_anything_moves() -> None:
    async def main() -> None:
        async with tent.Engine(backend="local") as engine:
            a = engine.register(np.zeros(64 * KiB, dtype=np.uint8), name="a")
            b = engine.register(np.zeros(64 * KiB, dtype=np.uint8), name="b")
            ro = engine.register(bytes(64 * KiB), name="ro", permission="r")
            with pytest.raises(tent.OutOfBoundsError, match="block 1"):
                engine.submit_blocks(a, [0, 60 * KiB], b, [0, 4 * KiB], 8 * KiB)
            with pytest.raises(tent.OutOfBoundsError, match="negative"):
                engine.submit_blocks(a, [-4096], b, [0], 4 * KiB)
            with pytest.raises(tent.ReadOnlySegmentError, match="permission='rw'"):
                engine.submit_blocks(a, [0], ro, [0], 4 * KiB)
            with pytest.raises(tent.OverlappingViewsError, match="overlaps destination"):
                engine.submit_blocks(a, [0, 8 * KiB], b, [0, 2 * KiB], 4 * KiB)
            with pytest.raises(tent.OverlappingViewsError, match="overlaps source"):
                engine.submit_blocks(a, [0], a, [2 * KiB], 4 * KiB)
            with pytest.raises(tent.ConfigError, match="priority"):
                engine.submit(a[:10], b[:10], priority="urgent")  # type: ignore[arg-type]

    anyio.run(main)


def test_aliased_memory_is_compared_by_address() -> None:
    """A buffer and a numpy view of part of it, registered as two segments: overlap in memory."""
    buf = np.arange(1 * MiB, dtype=np.uint8)

    async def main() -> None:
        async with tent.Engine(backend="local") as engine:
            whole = engine.register(buf, name="whole")
            tail = engine.register(buf[512 * KiB :], name="tail")
            again = engine.register(buf, name="again")  # the same memory twice is allowed ...
            with pytest.raises(tent.OverlappingViewsError, match="in memory"):
                await engine.transfer(whole[400 * KiB : 700 * KiB], tail[0 : 300 * KiB])  # ... overlaps are not
            with pytest.raises(tent.OverlappingViewsError, match="in memory"):
                await engine.transfer(whole[0:4096], again[2048:6144])
            with pytest.raises(tent.OverlappingViewsError, match="in memory"):
                await engine.transfer_batch(
                    [(whole[0:100], tail[0:100]), (whole[0:100], again[512 * KiB + 50 : 512 * KiB + 150])]
                )
            # Disjoint in memory although the segments alias: fine, and right.
            await engine.transfer(whole[0:4096], tail[100 * KiB : 100 * KiB + 4096])
            assert np.array_equal(buf[612 * KiB : 612 * KiB + 4096], (np.arange(4096) % 256).astype(np.uint8))

    anyio.run(main)


def test_a_cancelled_transfer_reports_what_landed() -> None:
    src = np.ones(64 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)

    async def main() -> None:
        async with tent.Engine(backend="local", rails=[tent.RailSpec(name="r0", bandwidth="400MB/s")]) as engine:
            a = engine.register(src, name="a", permission="r")
            b = engine.register(dst, name="b")
            handle = engine.submit(a[:], b[:])
            await anyio.sleep(0.05)
            handle.cancel()
            with pytest.raises(tent.TransferCancelledError, match="bytes landed"):
                await handle
            landed = handle.bytes_done
            assert 0 < landed < src.size
            assert int(dst.sum()) >= landed  # at least what was acknowledged is there

    anyio.run(main)


def test_medium_transfers_spray_and_small_ones_do_not() -> None:
    fabric = [SimRail(name=f"nic{i}", capacity="400Gb/s") for i in range(8)]

    async def main() -> None:
        async with tent.Engine(backend="sim", fabric=fabric, copy=False) as engine:
            a = engine.register(np.zeros(64 * MiB, dtype=np.uint8), name="a")
            b = engine.register(np.zeros(64 * MiB, dtype=np.uint8), name="b")
            for size in (1 * MiB, 16 * MiB):
                result = await engine.transfer(a[:size], b[:size])
                assert len(result.bytes_per_rail) == 8, (size, result.bytes_per_rail)
            small = await engine.transfer(a[: 4 * KiB], b[: 4 * KiB])
            assert small.slices == 1 and len(small.bytes_per_rail) == 1

    anyio.run(main)


def test_a_blocked_event_loop_is_not_a_rail_fault() -> None:
    """The loop is blocked for 150 ms while slices are in flight: every deadline passes, no rail is blamed."""
    src = np.ones(16 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)

    async def main() -> None:
        rails = [tent.RailSpec(name=f"r{i}", bandwidth="200MB/s") for i in range(2)]
        async with tent.Engine(backend="local", rails=rails) as engine:
            a = engine.register(src, name="a", permission="r")
            b = engine.register(dst, name="b")
            handle = engine.submit(a[:], b[:])
            await anyio.sleep(0.01)
            time.sleep(0.15)  # noqa: ASYNC251 - the point: the application blocks the loop
            await handle
            snap = engine.telemetry()
            assert sum(r.deadline_misses for r in snap.rails) == 0
            assert all(r.health == "healthy" for r in snap.rails)
            assert snap.loop_lag_max >= 0.1

    anyio.run(main)
    assert np.array_equal(src, dst)


@settings(max_examples=60, deadline=None)
@given(
    block=st.sampled_from([512, 1536, 4096]),
    slots=st.lists(st.integers(0, 24), min_size=1, max_size=40),
    runs=st.booleans(),
)
def test_block_tables_with_repeated_destinations_are_refused(block: int, slots: list[int], runs: bool) -> None:
    """The engine checks a block table either as given or as merged runs (whichever is
    shorter): a destination slot used twice is refused either way, distinct slots pass."""
    if runs:
        slots = sorted(slots)  # mostly adjacent runs: merging shrinks the table
    so = [i * block for i in range(len(slots))]
    do = [s * block for s in slots]
    repeated = len(set(slots)) < len(slots)

    async def main() -> bool:
        async with tent.Engine(backend="local") as engine:
            a = engine.register(np.zeros(64 * block, dtype=np.uint8), name="a")
            b = engine.register(np.zeros(32 * block, dtype=np.uint8), name="b")
            try:
                await engine.transfer_blocks(a, so, b, do, block)
            except tent.OverlappingViewsError:
                return True
            return False

    assert anyio.run(main) == repeated


def test_a_table_that_is_one_run_is_checked_like_any_other() -> None:
    """Blocks in order on both sides become one extent at once: they land, a run that
    leaves its view names the first block outside, and a run onto its own source is refused."""

    async def main() -> None:
        async with tent.Engine(backend="local") as engine:
            data = np.random.default_rng(5).integers(0, 256, 64 * KiB, dtype=np.uint8)
            a = engine.register(data, name="a", permission="r")
            out = np.zeros(64 * KiB, dtype=np.uint8)
            b = engine.register(out, name="b")
            so = np.arange(8, dtype=np.int64) * 4 * KiB
            result = await engine.transfer_blocks(a[4 * KiB :], so, b[8 * KiB :], so + 4 * KiB, 4 * KiB)
            assert result.bytes == 32 * KiB and result.slices == 1
            assert np.array_equal(out[12 * KiB : 44 * KiB], data[4 * KiB : 36 * KiB])
            assert not out[: 12 * KiB].any() and not out[44 * KiB :].any()
            with pytest.raises(tent.OutOfBoundsError, match="destination block 7 "):
                engine.submit_blocks(a, so, b[36 * KiB :], so, 4 * KiB)
            with pytest.raises(tent.OutOfBoundsError, match="source block 6 "):
                engine.submit_blocks(a[40 * KiB :], so, b, so, 4 * KiB)
            near = np.array([2**63 - 32, 2**63 - 16], dtype=np.int64)  # a run whose end passes int64
            with pytest.raises(tent.OutOfBoundsError, match="outside"):
                engine.submit_blocks(a, near, b, near, 16)
            c = engine.register(np.zeros(64 * KiB, dtype=np.uint8), name="c")
            with pytest.raises(tent.OverlappingViewsError, match="overlaps source"):
                engine.submit_blocks(c, so, c, so + 2 * KiB, 4 * KiB)

    anyio.run(main)


def test_block_tables_refuse_wrapping_offsets_and_honour_views() -> None:
    async def main() -> None:
        async with tent.Engine(backend="local") as engine:
            a = engine.register(np.arange(8192, dtype=np.uint16).view(np.uint8)[:8192].copy(), name="a")
            out = np.zeros(8192, dtype=np.uint8)
            b = engine.register(out, name="b")
            huge = 2**63 - 8  # offset + length wraps around int64
            with pytest.raises(tent.OutOfBoundsError, match="outside"):
                await engine.transfer_blocks(a, [huge], b, [huge], 16)
            with pytest.raises(tent.OutOfBoundsError, match="integers"):
                await engine.transfer_blocks(a, [0.9, 100.7], b, [0, 200], 16)
            with pytest.raises(tent.OutOfBoundsError, match="1-D"):
                await engine.transfer_blocks(a, [[0, 16]], b, [0, 16], 16)
            # Views: offsets count from the view, and blocks must stay inside it.
            await engine.transfer_blocks(a[4096:], [0, 100], b[4096:], [200, 0], 16)
            assert np.array_equal(out[4096 + 200 : 4096 + 216], np.asarray(a.memory.array[4096:4112]))
            assert np.array_equal(out[4096:4112], np.asarray(a.memory.array[4196:4212]))
            assert not out[:4096].any()
            with pytest.raises(tent.OutOfBoundsError, match="outside"):
                await engine.transfer_blocks(a[4096:], [4090], b[4096:], [0], 16)

    anyio.run(main)


@pytest.mark.parametrize("side", ["scatter", "gather", "both"])
def test_blocks_within_one_segment_land_byte_exact(side: str) -> None:
    """Blocks moved inside one registered buffer, from its first half to permuted slots of its
    second (or back, or permuted on both sides), in slices that cut blocks: byte-exact."""
    n, block = 96, 16 * KiB
    rng = np.random.default_rng(11)
    buf = rng.integers(0, 256, 2 * n * block, dtype=np.uint8)
    before = buf.copy()
    run = np.arange(n, dtype=np.int64) * block
    so = rng.permutation(n).astype(np.int64) * block if side != "scatter" else run
    do = n * block + (rng.permutation(n).astype(np.int64) * block if side != "gather" else run)

    async def main() -> None:
        config = tent.SchedulerConfig(min_slice="20KiB", max_slice="100KiB", slice_align="4KiB")
        async with tent.Engine(backend="local", config=config) as engine:
            seg = engine.register(buf, name="pool")
            result = await engine.transfer_blocks(seg, so, seg, do, block)
            assert result.bytes == n * block and result.slices > 1

    anyio.run(main)
    want = before.copy()
    for s, d in zip(so.tolist(), do.tolist(), strict=True):
        want[d : d + block] = before[s : s + block]
    assert np.array_equal(buf, want)
