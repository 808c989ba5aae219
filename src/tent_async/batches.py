"""Turning what the application asks to move into one checked extent list.

A transfer is one intent however many blocks it has: ``(src, dst)`` view
pairs (``engine.submit_batch``) or block arrays between two segments
(``engine.submit_blocks``, the shape of a KV-cache block table) become one
:class:`~tent_async.core.extents.Extents`.  Every check happens here, before
anything moves, and is vectorised for block arrays so that a 40,000-block
request costs arrays, not 40,000 Python objects:

* bounds (every block inside its segment), equal lengths, write permission;
* no destination overlapping another destination or any source *in memory*:
  views of the same buffer registered twice, or a numpy view of a registered
  buffer registered as a second segment, are compared by address, not by
  segment (remote segments by segment: their addresses are the peer's).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from .core.extents import Extents
from .errors import LengthMismatchError, OutOfBoundsError, OverlappingViewsError, ReadOnlySegmentError
from .segments import Segment, SegmentBase, View

Array = np.ndarray[Any, np.dtype[Any]]


def read_only_error(view: object, segment: SegmentBase) -> ReadOnlySegmentError:
    if segment.is_remote:
        return ReadOnlySegmentError(
            f"destination {view!r} is in the peer's segment {segment.name!r}, which the peer granted read-only; "
            "ask the peer to register it with permission='rw', or write somewhere else"
        )
    return ReadOnlySegmentError(
        f"destination {view!r} is in segment {segment.name!r}, registered read-only; "
        "register the destination with permission='rw'"
    )


def check_pair(s: View, d: View) -> None:
    """Equal lengths and a writable destination."""
    if s.length != d.length:
        raise LengthMismatchError(
            f"source {s!r} has {s.length} bytes but destination {d!r} has {d.length}; slice them to the same length"
        )
    if not d.segment.writable:
        raise read_only_error(d, d.segment)


def _space(seg: Hashable) -> tuple[int, int]:
    """``(address space, base address)`` of a segment: local memory shares one space."""
    if isinstance(seg, Segment):
        return 0, seg.address
    return id(seg), 0


def check_overlap_pair(s: View, d: View) -> None:
    """The one-pair case of :func:`check_overlaps`, without arrays."""
    if not d.length:
        return
    s_space, s_base = _space(s.segment)
    d_space, d_base = _space(d.segment)
    if s_space == d_space and s_base + s.offset < d_base + d.end and d_base + d.offset < s_base + s.end:
        raise OverlappingViewsError(
            f"destination {d!r} overlaps source {s!r} in memory; copy through a separate buffer"
        )


def check_overlaps(ext: Extents) -> None:
    """Refuse destinations that overlap each other or any source, comparing real memory.

    The usual KV case, blocks between two pools that share no memory, checks
    only the destinations, by their offsets in the one destination segment,
    and touches no array it does not need.
    """
    n = len(ext)
    if n == 0:
        return
    if n == 1:  # one extent (a merged run): only its source can overlap its destination
        _check_one(ext)
        return
    pairs = ext.seg_pairs()
    segments = ext.segments
    # Sources need checking only where some source segment shares memory with some
    # destination segment (the usual KV case, two separate pools, skips it).
    src_i = sorted({s for s, _d in pairs})
    dst_j = sorted({d for _s, d in pairs})
    if len(src_i) * len(dst_j) > 4096:
        sources_may_overlap = True  # many segments: the extent-level check below is the cheaper one
    else:
        sources_may_overlap = any(_shares(segments[i], segments[j]) for i in src_i for j in dst_j)
    if not sources_may_overlap and len(dst_j) == 1 and _disjoint_equal_blocks(ext.dst_off, ext.length):
        return  # one destination segment: offsets in it compare as addresses do
    nseg = len(segments)
    spaces = np.empty(nseg, dtype=np.int64)
    bases = np.empty(nseg, dtype=np.int64)
    for i, seg in enumerate(segments):
        spaces[i], bases[i] = _space(seg)
    d_start = bases[ext.dst_seg] + ext.dst_off
    d_end = d_start + ext.length
    uniform = bool((spaces == spaces[0]).all())  # the usual case: every segment local (one address space)
    d_space = None if uniform else spaces[ext.dst_seg]
    for space in [int(spaces[0])] if d_space is None else np.unique(d_space).tolist():
        dsel = None if d_space is None else np.flatnonzero(d_space == space)
        starts = d_start if dsel is None else d_start[dsel]
        if not sources_may_overlap and _disjoint_equal_blocks(starts, ext.length if dsel is None else ext.length[dsel]):
            continue  # destinations are whole, distinct slots of one block size: nothing to sort
        if len(starts) > 1 and bool((starts[1:] < starts[:-1]).any()):
            order = np.argsort(starts)
            if dsel is not None:
                order = dsel[order]
        else:
            order = np.arange(n) if dsel is None else dsel
        starts = d_start[order]
        ends = d_end[order]
        if len(order) > 1:
            reach = np.maximum.accumulate(ends)[:-1]
            bad = np.flatnonzero(starts[1:] < reach)
            if len(bad):
                j = int(order[bad[0] + 1])
                prev = order[: bad[0] + 1][np.argmax(ends[: bad[0] + 1] > starts[bad[0] + 1])]
                raise OverlappingViewsError(
                    f"destination {_describe(ext, j, 'dst')} overlaps destination {_describe(ext, int(prev), 'dst')} "
                    "in memory in the same transfer; destinations must not overlap each other or the sources"
                )
        if not sources_may_overlap:
            continue
        s_start = bases[ext.src_seg] + ext.src_off
        s_end = s_start + ext.length
        ssel = None if d_space is None else np.flatnonzero(spaces[ext.src_seg] == space)
        src_start = s_start if ssel is None else s_start[ssel]
        src_end = s_end if ssel is None else s_end[ssel]
        if not len(src_start):
            continue
        # Destinations of one space are disjoint now and sorted: the last one starting
        # before a source ends is the only one that can overlap it.
        idx = np.searchsorted(starts, src_end, side="left") - 1
        hit = (idx >= 0) & (ends[np.maximum(idx, 0)] > src_start)
        if hit.any():
            k = int(np.argmax(hit))
            src = k if ssel is None else int(ssel[k])
            dst = int(order[idx[k]])
            raise OverlappingViewsError(
                f"destination {_describe(ext, dst, 'dst')} overlaps source {_describe(ext, src, 'src')} in memory "
                "in the same transfer; copy through a separate buffer"
            )


def _size(seg: Hashable) -> int:
    return len(seg) if isinstance(seg, SegmentBase) else 1 << 61


def _shares(a: Hashable, b: Hashable) -> bool:
    """Whether segments ``a`` and ``b`` may share memory (the same space, address ranges meeting)."""
    a_space, a_base = _space(a)
    b_space, b_base = _space(b)
    return a_space == b_space and a_base < b_base + _size(b) and b_base < a_base + _size(a)


def _check_one(ext: Extents) -> None:
    """:func:`check_overlaps` for a one-extent list, in Python integers."""
    src, dst = ext.segments[int(ext.src_seg[0])], ext.segments[int(ext.dst_seg[0])]
    s_space, s_base = _space(src)
    d_space, d_base = _space(dst)
    s0, d0, length = int(ext.src_off[0]) + s_base, int(ext.dst_off[0]) + d_base, int(ext.length[0])
    if s_space == d_space and s0 < d0 + length and d0 < s0 + length:
        raise OverlappingViewsError(
            f"destination {_describe(ext, 0, 'dst')} overlaps source {_describe(ext, 0, 'src')} in memory "
            "in the same transfer; copy through a separate buffer"
        )


def _disjoint_equal_blocks(starts: Array, lengths: Array) -> bool:
    """True when the extents are blocks of one size on one grid, each slot used once.

    A block table's destinations (KV pages of one pool): then overlap means a
    repeated slot, which a bitmap over the slots finds in O(n) instead of a
    sort.  False means "not shown disjoint this way", never "overlapping".
    """
    n = len(starts)
    if n < 2:
        return True
    block = int(lengths[0])
    if block <= 0 or (lengths.strides != (0,) and not bool((lengths == block).all())):  # (0,): one size
        return False
    lo = int(starts.min())
    rel = starts - lo if lo else starts
    if block & (block - 1) == 0:  # a power of two (the usual page): a mask and a shift, no division
        if bool((rel & (block - 1)).any()):
            return False
        slots = rel >> (block.bit_length() - 1)
    else:
        slots = rel // block
        if bool((slots * block != rel).any()):
            return False
    span = int(slots.max()) + 1
    if span > 8 * n:  # a sparse grid: the bitmap would cost more than the sort
        return False
    seen = np.zeros(span, dtype=np.bool_)
    seen[slots] = True
    return int(np.count_nonzero(seen)) == n


def _describe(ext: Extents, i: int, side: str) -> str:
    seg = ext.segments[int(ext.dst_seg[i] if side == "dst" else ext.src_seg[i])]
    off = int(ext.dst_off[i] if side == "dst" else ext.src_off[i])
    name = getattr(seg, "name", repr(seg))
    return f"{name}[{off}:{off + int(ext.length[i])}]"


def one_run(src: View, src_offsets: Any, dst: View, dst_offsets: Any, lengths: Any) -> tuple[View, View] | None:
    """The table as one (source, destination) pair of views when it is one run on both sides.

    Blocks of one size that follow each other in the source and in the
    destination (a KV prefix laid out in order) are one contiguous copy: the
    engine submits it as :meth:`~tent_async.Engine.submit` would, with no
    extent list at all.  Found on the caller's arrays, without copying them,
    in O(1) for any other table (its last block is not where a run would
    end).  ``None`` otherwise, and for anything the general path
    (:func:`from_blocks`) must check and explain: negative offsets, odd
    dtypes, absurd sizes, a run that leaves a view.
    """
    if np.ndim(lengths) != 0:
        return None
    s, d, size = np.asarray(src_offsets), np.asarray(dst_offsets), np.asarray(lengths)
    if s.ndim != 1 or d.shape != s.shape or len(s) < 2 or s.dtype.kind != "i" or d.dtype.kind != "i":
        return None
    if size.dtype.kind not in "iu":
        return None
    n, block = len(s), int(size)
    s0, d0 = int(s[0]), int(d[0])
    if block <= 0 or s0 < 0 or d0 < 0 or n * block > _MAX_RUN:
        return None
    total = n * block
    if s0 + total > src.length or d0 + total > dst.length:
        return None
    # Exact (Python) ends first: with them in range, steps of `block` cannot have wrapped.
    if int(s[-1]) != s0 + total - block or int(d[-1]) != d0 + total - block:
        return None
    if not bool((s[1:] - s[:-1] == block).all()) or not bool((d[1:] - d[:-1] == block).all()):
        return None
    a, b = src.offset + s0, dst.offset + d0
    return src.segment[a : a + total], dst.segment[b : b + total]


_MAX_RUN = 1 << 62


def from_blocks(src: View, src_offsets: Any, dst: View, dst_offsets: Any, lengths: Any) -> Extents:
    """An extent list of blocks from ``src`` to ``dst``, bounds-checked as arrays.

    Offsets are relative to the views; every block must lie inside its view.
    The checks never add an offset to a length (int64 would wrap for
    absurd values and let a block through).  (The engine takes a table that
    is one run on both sides as one pair first: :func:`one_run`.)
    """
    try:
        ext = Extents.between(src.segment, src_offsets, dst.segment, dst_offsets, lengths)
    except ValueError as exc:
        raise OutOfBoundsError(f"bad block list: {exc}") from None
    if len(ext):
        # One block size (the KV case): the largest offset decides, without an array per side.
        block = int(lengths) if np.ndim(lengths) == 0 else None
        for view, off, what in ((src, ext.src_off, "source"), (dst, ext.dst_off, "destination")):
            size = view.length
            if block is not None and int(off.max()) <= size - block:
                bad = None
            else:
                bad = (off > size) | (ext.length > size - off)
            if bad is not None and bad.any():
                i = int(np.argmax(bad))
                start, n = int(off[i]), int(ext.length[i])
                raise OutOfBoundsError(
                    f"{what} block {i} [{start}:{start + n}] is outside {view!r} of {size} bytes; "
                    f"every block must lie within [0:{size}] of it"
                )
            if view.offset:
                off += view.offset  # fresh arrays of this extent list: shifting in place is safe
    return ext
