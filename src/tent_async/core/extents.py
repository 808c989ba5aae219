"""A transfer's bytes as one stream over many (source, destination) extents.

Serving traffic is thousands of small scattered blocks (a KV-cache page per
layer), not one buffer.  A batch is one intent: its extents are laid end to
end as one *byte stream*, and the planner cuts slices out of that stream, so
one slice may carry many extents.  Extents are held as numpy arrays, never as
a Python object per block, so that the per-block cost is a few array elements
and the per-slice cost is what the planner budgets.

Segments are opaque to the core (the engine passes its segments, the
simulator node ids); each side refers to a small table of them by index.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .decisions import Piece

_I32 = np.int32
_I64 = np.int64

Array = np.ndarray[Any, np.dtype[Any]]
_MAX_TOTAL = 1 << 62  # bytes in one transfer's stream: prefix sums stay far from int64's limit
# A BlockGrid keeps 8 bytes per block per scattered side: at 1 KiB blocks or more that is under
# 1 % of the bytes it moves, and smaller blocks are better copied extent by extent anyway.
GRID_MIN_BLOCK = 1024


def _as_i64(values: Any, n: int, what: str, *, one_row: bool = False) -> Array:
    """``values`` as a fresh int64 array of ``n`` rows (of one row for one number, if ``one_row``)."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
        return np.full(min(n, 1) if one_row else n, int(arr), dtype=_I64)
    if arr.shape != (n,):
        raise ValueError(f"{what} must be one value or {n} values, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(_I64).max:
        raise ValueError(f"{what} do not fit in 64-bit signed integers")
    return np.array(arr, dtype=_I64)  # a copy: the caller's array is never aliased or changed


def _constant(value: Any, n: int, dtype: Any) -> Array:
    """A read-only column of ``n`` copies of ``value`` that holds one element (stride 0).

    What ``np.broadcast_to`` makes, without its Python-level argument handling: a block
    table makes three of these per transfer.
    """
    one = np.array([value], dtype=dtype)
    column: Array = np.ndarray((n,), dtype=one.dtype, buffer=one, strides=(0,))
    column.flags.writeable = False
    return column


def _pick(column: Array, rows: Array) -> Array:
    """``column[rows]``, kept a broadcast view when the column is one value."""
    if len(column) and column.strides == (0,):
        return _constant(column[0], len(rows), column.dtype)
    return column[rows]


class Extents:
    """Immutable extent list: arrays of (source, source offset, destination, destination offset, length).

    A column may be a read-only broadcast view of one value (a block table's
    segments and block size); nothing writes into the arrays.

    ``segments`` is the table that ``src_seg`` and ``dst_seg`` index into;
    ``starts`` (one longer than the list) is where each extent begins in the
    byte stream, so ``starts[-1]`` is the total.  Zero-length extents are
    dropped on construction.  A list of one block size finds an extent by
    division and builds ``starts`` only when asked for it.
    """

    __slots__ = (
        "_coalesced",
        "_grid",
        "_pairs",
        "_starts",
        "_step",
        "dst_off",
        "dst_seg",
        "length",
        "segments",
        "src_off",
        "src_seg",
    )

    def __init__(
        self,
        segments: Sequence[Hashable],
        src_seg: Array,
        src_off: Array,
        dst_seg: Array,
        dst_off: Array,
        length: Array,
    ) -> None:
        # One block size (a broadcast column): every block is kept, or none.
        uniform = len(length) > 1 and length.strides == (0,)
        if not (bool(length[0] > 0) if uniform else bool((length > 0).all())):
            keep = length > 0
            src_seg, src_off, dst_seg, dst_off, length = (
                src_seg[keep],
                src_off[keep],
                dst_seg[keep],
                dst_off[keep],
                length[keep],
            )
        self.segments = tuple(segments)
        self.src_seg = src_seg
        self.src_off = src_off
        self.dst_seg = dst_seg
        self.dst_off = dst_off
        self.length = length
        # One block size: extent i starts at i * step (starts is built only if asked for).
        self._step = int(length[0]) if uniform and len(length) else 0  # zero-length blocks were all dropped
        self._starts: Array | None = None
        if not self._step:
            starts = np.empty(len(length) + 1, dtype=_I64)
            starts[0] = 0
            np.cumsum(length, out=starts[1:])
            self._starts = starts
        self._coalesced = False  # set once coalesced() has merged (or found nothing to merge)
        self._pairs: list[tuple[int, int]] | None = None
        self._grid: BlockGrid | bool = False  # True: asked, and the list is not a grid

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pieces(cls, pieces: Sequence[Piece]) -> Extents:
        """From :class:`~tent_async.core.Piece` objects (one per (src, dst) pair)."""
        table: dict[Hashable, int] = {}
        n = len(pieces)
        src_seg = np.empty(n, dtype=_I32)
        dst_seg = np.empty(n, dtype=_I32)
        src_off = np.empty(n, dtype=_I64)
        dst_off = np.empty(n, dtype=_I64)
        length = np.empty(n, dtype=_I64)
        for i, p in enumerate(pieces):
            if p.length < 0 or p.src_offset < 0 or p.dst_offset < 0:
                raise ValueError(f"piece lengths and offsets must not be negative: {p!r}")
            src_seg[i] = table.setdefault(p.src, len(table))
            dst_seg[i] = table.setdefault(p.dst, len(table))
            src_off[i] = p.src_offset
            dst_off[i] = p.dst_offset
            length[i] = p.length
        return cls(list(table), src_seg, src_off, dst_seg, dst_off, length)

    @classmethod
    def between(cls, src: Hashable, src_offsets: Any, dst: Hashable, dst_offsets: Any, lengths: Any) -> Extents:
        """Blocks from one source segment to one destination segment, given as arrays.

        ``lengths`` may be one number (every block the same size).  Offsets
        and lengths must not be negative.
        """
        raw = np.asarray(src_offsets)
        if raw.ndim != 1:
            raise ValueError(f"source offsets must be a 1-D sequence of integers, got shape {raw.shape}")
        n = len(raw)
        src_off = _as_i64(raw, n, "source offsets")
        dst_off = _as_i64(dst_offsets, n, "destination offsets")
        length = _as_i64(lengths, n, "lengths", one_row=True)  # one row when one number was given
        if n and (src_off.min() < 0 or dst_off.min() < 0 or length.min() < 0):
            raise ValueError("block offsets and lengths must not be negative")
        if n and int(length.max()) > _MAX_TOTAL // n:
            raise ValueError(f"{n} blocks of up to {int(length.max())} bytes are more than one transfer can address")
        same = src == dst
        segments: list[Hashable] = [src] if same else [src, dst]
        # Columns that hold one value are read-only broadcast views of it (no memory
        # per block): fresh pages of a 16,384-row table cost more than the checks.
        src_seg = _constant(0, n, _I32)
        dst_seg = _constant(0 if same else 1, n, _I32)
        if np.ndim(lengths) == 0:
            length = _constant(length[0] if n else 0, n, _I64)
        ext = cls(segments, src_seg, src_off, dst_seg, dst_off, length)
        ext._pairs = [(0, 0 if same else 1)] if len(ext) else []
        return ext

    def coalesced(self) -> Extents:
        """The same bytes with every run of extents adjacent on both sides merged into one.

        Extent ``i + 1`` joins extent ``i`` when it continues it in the source
        *and* in the destination (same segments, offsets one length on).  Only
        neighbours in the list are compared, and the list's order is kept (the
        application's, or its peer side's: :meth:`in_order_of`).  Runs are merged when that removes at
        least an eighth of the list (always when it leaves one extent, and
        for lists of up to 8): a few neighbours in a big table (a random
        permutation has about one) would cost a copy of every column, and the
        table's one block size, to save nothing.
        """
        n = len(self.length)
        if n < 2 or self._coalesced:
            return self
        head = self.length[:-1]
        # Destinations first: a permuted block table has (almost) no neighbour that
        # continues the previous one there, and then the sources need no look.
        # Differences of non-negative offsets cannot wrap, as sums could.
        step = np.subtract(self.dst_off[1:], self.dst_off[:-1])
        joins = step == head
        if joins.any():
            joins &= np.subtract(self.src_off[1:], self.src_off[:-1], out=step) == head  # one scratch array
            for seg in (self.src_seg, self.dst_seg):
                if seg.strides != (0,):  # a broadcast column is one segment throughout
                    joins &= seg[1:] == seg[:-1]
        if 8 * int(np.count_nonzero(joins)) < n:  # (none at all, or too few to pay)
            self._coalesced = True  # the engine and the planner both ask: answer the second at once
            return self
        heads = np.flatnonzero(np.concatenate(([True], ~joins)))
        out = self._rows(heads, np.add.reduceat(self.length, heads).astype(_I64, copy=False))
        out._coalesced = True
        return out

    def _rows(self, rows: Array, length: Array) -> Extents:
        """Rows ``rows`` of this list, with lengths ``length``: same segments, same pairs."""
        out = Extents(
            self.segments,
            _pick(self.src_seg, rows),
            self.src_off[rows],
            _pick(self.dst_seg, rows),
            self.dst_off[rows],
            length,
        )
        out._pairs = self._pairs
        return out

    def in_order_of(self, side: str) -> Extents:
        """The same extents ordered by ``side``'s (segment, offset), ``"src"`` or ``"dst"``.

        A batch's blocks land in no particular order (destinations never overlap
        each other or a source), so any order moves the same bytes.  Blocks
        adjacent on that side then follow each other in the list: a slice's
        extents on that side form runs (the whole range, for a permuted table
        that covers it), which :meth:`coalesced` merges where the other side
        continues too.  Returns ``self`` when the list is in that order already.
        """
        if side not in ("src", "dst"):
            raise ValueError(f"side must be 'src' or 'dst', got {side!r}")
        seg, off = (self.src_seg, self.src_off) if side == "src" else (self.dst_seg, self.dst_off)
        n = len(self.length)
        if n < 2:
            return self
        one_segment = seg.strides == (0,) or bool((seg[1:] == seg[:-1]).all())
        rising = off[1:] >= off[:-1]
        if not one_segment:
            rising = (seg[1:] > seg[:-1]) | ((seg[1:] == seg[:-1]) & rising)
        if bool(rising.all()):
            return self
        order = np.argsort(off, kind="stable") if one_segment else np.lexsort((off, seg))
        return self._rows(order, _pick(self.length, order))

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self.length)

    @property
    def starts(self) -> Array:
        """Where each extent begins in the byte stream, and the total last (``len(self) + 1`` values)."""
        starts = self._starts
        if starts is None:
            step = self._step
            starts = self._starts = np.arange(0, (len(self.length) + 1) * step, step, dtype=_I64)
        return starts

    @property
    def total(self) -> int:
        step = self._step
        return len(self.length) * step if step else int(self.starts[-1])

    def start_of(self, i: int) -> int:
        """Stream offset where extent ``i`` begins (``i == len(self)``: the total)."""
        step = self._step
        return i * step if step else int(self.starts[i])

    def seg_pairs(self) -> list[tuple[int, int]]:
        """The distinct ``(source, destination)`` segment index pairs, sorted (computed once).

        The engine asks for them to find the rails and the destinations of a
        batch; a block table has one pair, found in two comparisons instead of
        a sort or hash of every row.
        """
        if self._pairs is not None:
            return self._pairs
        src, dst = self.src_seg, self.dst_seg
        if not len(src):
            pairs: list[tuple[int, int]] = []
        elif bool((src == src[0]).all()) and bool((dst == dst[0]).all()):
            pairs = [(int(src[0]), int(dst[0]))]
        else:
            nseg = len(self.segments)
            keys = src.astype(_I64) * nseg + dst
            if nseg * nseg <= 1 << 16:
                present = np.flatnonzero(np.bincount(keys, minlength=nseg * nseg))  # O(n), no sort
            else:
                present = np.unique(keys)
            pairs = [divmod(k, nseg) for k in present.tolist()]
        self._pairs = pairs
        return pairs

    def block_grid(self) -> BlockGrid | None:
        """The list as blocks of one size, or ``None`` (worked out once; see :class:`BlockGrid`).

        A grid needs one (source, destination) segment pair, extents that are
        whole blocks or runs of them (the block is the greatest common divisor
        of the lengths, at least ``GRID_MIN_BLOCK``), and on each side every
        offset on one grid of that block size.  Safe from any thread: two
        threads asking at once both work out the same grid.
        """
        grid = self._grid
        if isinstance(grid, BlockGrid):
            return grid
        if grid:
            return None
        made = _make_grid(self)
        self._grid = True if made is None else made
        return made

    def index_at(self, offset: int) -> int:
        """The extent holding stream byte ``offset`` (``0 <= offset < total``)."""
        step = self._step
        if step:
            return offset // step
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def extent_end(self, offset: int) -> int:
        """Stream offset where the extent holding byte ``offset`` ends."""
        return self.start_of(self.index_at(offset) + 1)

    def first(self, offset: int) -> tuple[Hashable, int, Hashable, int]:
        """``(src, src offset, dst, dst offset)`` of stream byte ``offset``."""
        i = self.index_at(offset)
        skip = offset - self.start_of(i)
        return (
            self.segments[self.src_seg[i]],
            int(self.src_off[i]) + skip,
            self.segments[self.dst_seg[i]],
            int(self.dst_off[i]) + skip,
        )

    def window(self, offset: int, length: int) -> SliceExtents:
        """The extents of stream bytes ``[offset, offset + length)``."""
        end = offset + length
        step = self._step
        if step:
            i0, i1 = offset // step, -(-end // step)
            return SliceExtents(self, i0, i1, offset - i0 * step, i1 * step - end)
        starts = self.starts
        i0 = int(np.searchsorted(starts, offset, side="right")) - 1
        i1 = int(np.searchsorted(starts, end, side="left"))
        return SliceExtents(self, i0, i1, offset - int(starts[i0]), int(starts[i1]) - end)

    def __repr__(self) -> str:
        return f"<Extents {len(self)} extents, {self.total} bytes, {len(self.segments)} segments>"


class SliceExtents:
    """The extents one slice carries: a window of its transfer's :class:`Extents`.

    Cheap to make (no copy until :meth:`arrays` is called).  ``head`` bytes are
    skipped at the start of the first extent and ``tail`` bytes dropped at the
    end of the last one.
    """

    __slots__ = ("_ext", "head", "i0", "i1", "tail")

    def __init__(self, ext: Extents, i0: int, i1: int, head: int, tail: int) -> None:
        self._ext = ext
        self.i0 = i0
        self.i1 = i1
        self.head = head
        self.tail = tail

    def __len__(self) -> int:
        return self.i1 - self.i0

    def first(self) -> tuple[Hashable, int, Hashable, int]:
        """``(src, src offset, dst, dst offset)`` of the slice's first byte."""
        e = self._ext
        i, skip = self.i0, self.head
        return (
            e.segments[e.src_seg[i]],
            int(e.src_off[i]) + skip,
            e.segments[e.dst_seg[i]],
            int(e.dst_off[i]) + skip,
        )

    @property
    def segments(self) -> tuple[Hashable, ...]:
        return self._ext.segments

    @property
    def one_pair(self) -> bool:
        """Every extent of the transfer goes from one segment to one segment (a block table)."""
        return len(self._ext.seg_pairs()) == 1

    @property
    def offset(self) -> int:
        """Where the slice starts in its transfer's byte stream."""
        return self._ext.start_of(self.i0) + self.head

    def block_grid(self) -> BlockGrid | None:
        """The transfer's :class:`BlockGrid` (:meth:`Extents.block_grid`)."""
        return self._ext.block_grid()

    @property
    def nbytes(self) -> int:
        e = self._ext
        return e.start_of(self.i1) - e.start_of(self.i0) - self.head - self.tail

    def arrays(self) -> tuple[Array, Array, Array, Array, Array]:
        """``(src_seg, src_off, dst_seg, dst_off, length)`` of this slice, trimmed (fresh arrays)."""
        e = self._ext
        s = slice(self.i0, self.i1)
        src_off = e.src_off[s].copy()
        dst_off = e.dst_off[s].copy()
        length = e.length[s].copy()
        if self.head:
            src_off[0] += self.head
            dst_off[0] += self.head
            length[0] -= self.head
        if self.tail:
            length[-1] -= self.tail
        return e.src_seg[s], src_off, e.dst_seg[s], dst_off, length

    def __iter__(self) -> Iterator[tuple[Hashable, int, Hashable, int, int]]:
        """``(src, src offset, dst, dst offset, length)`` per extent, as Python values."""
        segs = self._ext.segments
        src_seg, src_off, dst_seg, dst_off, length = self.arrays()
        for a, b, c, d, n in zip(
            src_seg.tolist(), src_off.tolist(), dst_seg.tolist(), dst_off.tolist(), length.tolist(), strict=True
        ):
            yield segs[a], b, segs[c], d, n

    def __repr__(self) -> str:
        return f"<SliceExtents {len(self)} extents, {self.nbytes} bytes>"


class BlockGrid:
    """A one-pair extent list seen as blocks of one size: where stream block ``k`` lies.

    Stream block ``k`` is stream bytes ``[k * block, (k + 1) * block)``.  On
    each side it starts at ``base + k * block`` when that side is one run
    (``rows`` is ``None``), else at ``base + rows[k] * block``: ``base`` is the
    grid's phase and ``rows`` the row of a ``(rows, block)`` view of the
    segment.  Worked out once per transfer, so that copying a slice is a
    slice of ``rows`` and one numpy call (the local rails' scatter and gather)
    instead of index arithmetic per slice.  ``src_end`` and ``dst_end`` are
    one past the last byte any block touches on each side.
    """

    __slots__ = ("block", "dst_base", "dst_end", "dst_rows", "dst_seg", "src_base", "src_end", "src_rows", "src_seg")

    def __init__(
        self,
        block: int,
        src_seg: int,
        src_base: int,
        src_rows: Array | None,
        src_end: int,
        dst_seg: int,
        dst_base: int,
        dst_rows: Array | None,
        dst_end: int,
    ) -> None:
        self.block = block
        self.src_seg = src_seg
        self.src_base = src_base
        self.src_rows = src_rows
        self.src_end = src_end
        self.dst_seg = dst_seg
        self.dst_base = dst_base
        self.dst_rows = dst_rows
        self.dst_end = dst_end

    def src_at(self, k: int) -> int:
        """Source byte offset of stream block ``k``."""
        rows = self.src_rows
        return self.src_base + (k if rows is None else int(rows[k])) * self.block

    def dst_at(self, k: int) -> int:
        """Destination byte offset of stream block ``k``."""
        rows = self.dst_rows
        return self.dst_base + (k if rows is None else int(rows[k])) * self.block

    def __repr__(self) -> str:
        kind = {True: "run", False: "rows"}
        return (
            f"<BlockGrid {self.block}-byte blocks, source {kind[self.src_rows is None]}, "
            f"destination {kind[self.dst_rows is None]}>"
        )


def _is_run(off: Array, first: int, step: int) -> bool:
    """Whether ``off`` is ``first, first + step, first + 2 * step, ...`` (ends compared first, exactly)."""
    n = len(off)
    if int(off[-1]) != first + (n - 1) * step:
        return False
    return bool((off[1:] - off[:-1] == step).all())


def _make_grid(ext: Extents) -> BlockGrid | None:
    n = len(ext)
    pairs = ext.seg_pairs()
    if n < 2 or len(pairs) != 1:
        return None
    length = ext.length
    uniform = length.strides == (0,)
    block = int(length[0]) if uniform else int(np.gcd.reduce(length))
    if block < GRID_MIN_BLOCK:
        return None
    counts: Array | None = None
    if not uniform:
        counts = length // block
        if int(counts.max()) == 1:
            counts = None
    blocks = ext.total // block
    expand: tuple[Array, Array] | None = None
    if counts is not None:
        # Runs that coalescing merged are cut back into blocks: block j of extent i is row
        # rows[i] + j, and ``within`` is that j for every stream block.
        firsts = np.cumsum(counts) - counts
        expand = counts, np.arange(blocks, dtype=_I64) - np.repeat(firsts, counts)
    sides: list[tuple[int, Array | None, int]] = []
    for off in (ext.src_off, ext.dst_off):
        first = int(off[0])
        if expand is None and _is_run(off, first, block):  # the usual side of a push or a pull
            sides.append((first, None, first + blocks * block))
            continue
        phase = first % block
        rel = off - phase if phase else off
        if block & (block - 1) == 0:
            if bool((rel & (block - 1)).any()):
                return None
            rows = rel >> (block.bit_length() - 1)
        else:
            rows, rem = np.divmod(rel, block)
            if bool(rem.any()):
                return None
        if expand is not None:
            rows = np.repeat(rows, expand[0]) + expand[1]
        first, last = int(rows[0]), int(rows[-1])
        if last - first == blocks - 1 and bool((rows[1:] - rows[:-1] == 1).all()):
            sides.append((phase + first * block, None, phase + (last + 1) * block))
        else:
            rows = np.ascontiguousarray(rows, dtype=_I64)
            sides.append((phase, rows, phase + (int(rows.max()) + 1) * block))
    (s_base, s_rows, s_end), (d_base, d_rows, d_end) = sides
    s_seg, d_seg = pairs[0]
    return BlockGrid(block, s_seg, s_base, s_rows, s_end, d_seg, d_base, d_rows, d_end)
