"""Turning user objects into flat byte arrays, and copying bytes between them.

Applications hand the engine whatever holds their data: numpy arrays,
``bytearray``, ``memoryview``, ``mmap``, torch tensors (through DLPack) or CUDA
arrays (``__cuda_array_interface__``, through cupy).  Registration turns each
into a :class:`Memory`: a flat ``uint8`` array over the *same* memory (never a
copy), its kind (``"host"`` or ``"cuda:N"``) and whether it is writable.

cupy is optional: it is imported only when a CUDA object is registered.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import UnsupportedBufferError

if TYPE_CHECKING:
    from .core.extents import BlockGrid

_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3


def _cupy() -> Any:
    try:
        return importlib.import_module("cupy")
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise UnsupportedBufferError(
            "registering CUDA memory needs cupy; install it with `pip install 'tent_async[gpu]'`"
        ) from exc


@attrs.frozen(eq=False)
class Memory:
    """A flat byte array over registered memory.

    ``array`` is a 1-D ``uint8`` numpy array for host memory, or a 1-D ``uint8``
    cupy array for CUDA memory.  ``owner`` keeps the registered object alive.
    """

    array: Any
    kind: str
    readonly: bool
    owner: Any

    @property
    def nbytes(self) -> int:
        return int(self.array.shape[0])

    @property
    def is_cuda(self) -> bool:
        return self.kind.startswith("cuda")

    @property
    def device(self) -> int | None:
        return int(self.kind.split(":", 1)[1]) if self.is_cuda else None

    @property
    def address(self) -> int:
        """Address of the first byte (host, or device under CUDA's unified addressing)."""
        if self.is_cuda:
            return int(self.array.data.ptr)
        return int(self.array.__array_interface__["data"][0])


def _flat_host(arr: np.ndarray, owner: Any, readonly: bool | None = None) -> Memory:
    if not arr.flags.c_contiguous:
        raise UnsupportedBufferError(
            f"cannot register a non-contiguous {type(owner).__name__} (shape {arr.shape}, strides {arr.strides}); "
            "register a contiguous copy (numpy.ascontiguousarray) or the base array"
        )
    flat = arr.reshape(-1).view(np.uint8)
    ro = (not arr.flags.writeable) if readonly is None else readonly
    return Memory(array=flat, kind="host", readonly=ro, owner=owner)


def _from_cuda(obj: Any) -> Memory:
    cp = _cupy()
    arr = cp.asarray(obj)
    if not arr.flags.c_contiguous:
        raise UnsupportedBufferError(
            f"cannot register a non-contiguous CUDA array (shape {arr.shape}, strides {arr.strides}); "
            "register a contiguous copy (cupy.ascontiguousarray)"
        )
    flat = arr.reshape(-1).view(cp.uint8)
    iface = getattr(obj, "__cuda_array_interface__", {}) or {}
    readonly = bool(iface.get("data", (0, False))[1])
    return Memory(array=flat, kind=f"cuda:{arr.device.id}", readonly=readonly, owner=obj)


def as_memory(obj: Any) -> Memory:
    """Wrap ``obj`` as registered memory, without copying.

    Raises :class:`UnsupportedBufferError` for objects that expose none of the
    buffer protocol, DLPack or the CUDA array interface, and for
    non-contiguous memory (slices would not map to one byte range).
    """
    if isinstance(obj, Memory):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        return _from_cuda(obj)
    if isinstance(obj, np.ndarray):
        return _flat_host(obj, obj)
    try:
        view = memoryview(obj)
    except TypeError:
        view = None
    if view is not None:
        if not view.c_contiguous:
            raise UnsupportedBufferError(
                f"cannot register a non-contiguous {type(obj).__name__}; register a contiguous buffer"
            )
        arr = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, dtype=np.uint8)
        return Memory(array=arr, kind="host", readonly=view.readonly, owner=obj)
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        device_type, _device_id = obj.__dlpack_device__()
        if device_type in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
            return _flat_host(np.from_dlpack(obj), obj, readonly=False)
        if device_type == _DLPACK_CUDA:
            cp = _cupy()
            return _from_cuda(cp.from_dlpack(obj))
        raise UnsupportedBufferError(
            f"cannot register a {type(obj).__name__} on DLPack device type {device_type}; "
            "only host and CUDA memory are supported"
        )
    raise UnsupportedBufferError(
        f"cannot register a {type(obj).__name__}: it exposes neither the buffer protocol, DLPack, nor "
        "__cuda_array_interface__. Pass a numpy array, bytearray, memoryview, mmap, torch tensor or cupy array"
    )


def copy_bytes(dst: Memory, dst_offset: int, src: Memory, src_offset: int, length: int) -> None:
    """Copy ``length`` bytes between registered memories of any kind, synchronously.

    Host to host is a numpy copy (which releases the GIL, so rails copy in
    parallel threads).  Anything touching CUDA goes through cupy and waits for
    the copy to finish before returning, so completion means the bytes landed.
    """
    if length <= 0:
        return
    d = dst.array[dst_offset : dst_offset + length]
    s = src.array[src_offset : src_offset + length]
    if not dst.is_cuda and not src.is_cuda:
        np.copyto(d, s)
        return
    cp = _cupy()
    device = dst.device if dst.is_cuda else src.device
    with cp.cuda.Device(device):
        stream = cp.cuda.Stream(non_blocking=True)
        with stream:
            if dst.is_cuda and src.is_cuda and dst.device != src.device:
                cp.cuda.runtime.memcpyPeerAsync(d.data.ptr, dst.device, s.data.ptr, src.device, length, stream.ptr)
            elif dst.is_cuda and src.is_cuda:
                d[...] = s
            elif dst.is_cuda:
                d.set(s, stream=stream)
            else:
                s.get(out=d, stream=stream)
        stream.synchronize()


def copy_extents(
    memories: Sequence[Memory],
    src_seg: Any,
    src_off: Any,
    dst_seg: Any,
    dst_off: Any,
    length: Any,
    *,
    one_pair: bool = False,
) -> None:
    """Copy many extents between registered memories (a scatter-gather slice).

    ``memories`` is the slice's segment table; the five arrays index into it.
    ``one_pair``: the caller knows every extent goes from one segment to one
    other (a block table), so the segment columns need no look.
    Host to host, equal blocks read from one run and written to scattered
    places (or read from scattered places into one run) are one numpy call
    (:func:`_equal_blocks`); what is left is a Python loop of buffer slice
    assignments, the fastest way found to move odd 4-64 KiB blocks from
    Python (docs/benchmarks.md).  Anything touching CUDA goes extent by
    extent through :func:`copy_bytes`.
    """
    if any(m.is_cuda for m in memories):
        for a, b, c, d, n in zip(
            src_seg.tolist(), src_off.tolist(), dst_seg.tolist(), dst_off.tolist(), length.tolist(), strict=True
        ):
            copy_bytes(memories[c], d, memories[a], b, n)
        return
    n = len(length)
    lo = hi = 0
    if n >= _SCATTER_MIN_COUNT:
        s0, d0 = int(src_seg[0]), int(dst_seg[0])
        if one_pair or (bool((src_seg == s0).all()) and bool((dst_seg == d0).all())):
            lo, hi = _equal_blocks(memories[s0], src_off, memories[d0], dst_off, length)
    if lo == 0 and hi == n:
        return
    views = [memoryview(m.array) for m in memories]
    for part in (slice(0, lo), slice(hi, n)) if hi else (slice(0, n),):
        for a, b, c, d, k in zip(
            src_seg[part].tolist(),
            src_off[part].tolist(),
            dst_seg[part].tolist(),
            dst_off[part].tolist(),
            length[part].tolist(),
            strict=True,
        ):
            views[c][d : d + k] = views[a][b : b + k]


def copy_grid(src: Memory, dst: Memory, grid: BlockGrid, offset: int, length: int) -> bool:
    """Copy stream bytes ``[offset, offset + length)`` of a block table laid out as ``grid``.

    The whole blocks of the slice are one numpy call on a slice of the grid's
    precomputed rows (a scatter into a row view, a gather with ``np.take``, or
    both), worked out once per transfer instead of once per slice; a block
    the slice cuts at either end is a plain copy of its part.  Host memory
    only, blocks of at least 1 KiB; returns False, having copied nothing,
    when that does not hold.
    """
    block = grid.block
    if block < _SCATTER_MIN_BLOCK or src.is_cuda or dst.is_cuda or length <= 0:
        return False
    sf, df = src.array, dst.array
    if grid.src_end > sf.shape[0] or grid.dst_end > df.shape[0]:
        return False  # cannot happen for checked extents; never let numpy raise mid-copy
    end = offset + length
    k0 = -(-offset // block)  # the first block that starts inside the slice
    k1 = end // block  # one past the last block that ends inside it
    if k0 > k1:  # the slice lies inside one block
        skip = offset - k1 * block
        d, s = grid.dst_at(k1) + skip, grid.src_at(k1) + skip
        np.copyto(df[d : d + length], sf[s : s + length])
        return True
    if offset < k0 * block:  # the tail of the block before k0
        skip = offset - (k0 - 1) * block
        n = k0 * block - offset
        d, s = grid.dst_at(k0 - 1) + skip, grid.src_at(k0 - 1) + skip
        np.copyto(df[d : d + n], sf[s : s + n])
    if k1 > k0:
        _copy_rows(sf, df, grid, k0, k1)
    if end > k1 * block:  # the head of block k1
        n = end - k1 * block
        d, s = grid.dst_at(k1), grid.src_at(k1)
        np.copyto(df[d : d + n], sf[s : s + n])
    return True


def _copy_rows(sf: Any, df: Any, grid: BlockGrid, k0: int, k1: int) -> None:
    """Whole stream blocks ``[k0, k1)`` of ``grid``, from flat ``sf`` to flat ``df``, in one numpy call."""
    block = grid.block
    count = k1 - k0
    s_rows, d_rows = grid.src_rows, grid.dst_rows
    if s_rows is None:
        s0 = grid.src_base + k0 * block
        source = sf[s0 : s0 + count * block].reshape(count, block)
    else:
        base = grid.src_base
        nrows = (sf.shape[0] - base) // block
        rows_in = sf[base : base + nrows * block].reshape(nrows, block)
    if d_rows is None:
        d0 = grid.dst_base + k0 * block
        target = df[d0 : d0 + count * block].reshape(count, block)
        if s_rows is None:
            np.copyto(target, source)
        else:
            np.take(rows_in, s_rows[k0:k1], axis=0, out=target, mode="clip")  # "raise" buffers the copy
        return
    base = grid.dst_base
    nrows = (df.shape[0] - base) // block
    rows_out = df[base : base + nrows * block].reshape(nrows, block)
    rows_out[d_rows[k0:k1]] = source if s_rows is None else rows_in[s_rows[k0:k1]]


_SCATTER_MIN_BLOCK = 1024
_SCATTER_MIN_COUNT = 8


def _rows(flat: Any, offsets: Any, block: int) -> tuple[Any, Any] | None:
    """``(view, index)``: a ``(rows, block)`` view of ``flat`` and the row of each offset.

    Rows start at ``offsets[0] % block`` and follow each other, so a row view
    of aligned, equal-stride memory (numpy copies such rows fastest) serves
    when every offset lies on that grid; ``None`` when one does not.
    """
    r = int(offsets[0]) % block
    idx, rem = np.divmod(offsets - r if r else offsets, block)
    if bool(rem.any()):
        return None
    nrows = (flat.shape[0] - r) // block
    if int(idx.max()) >= nrows:  # cannot happen for checked extents; never let numpy clip or raise mid-copy
        return None
    return flat[r : r + nrows * block].reshape(nrows, block), idx


def _equal_blocks(src: Memory, src_off: Any, dst: Memory, dst_off: Any, length: Any) -> tuple[int, int]:
    """Copy the extents ``[lo, hi)`` in one numpy call when they allow it; returns ``(lo, hi)``.

    The shapes of KV-cache traffic: equal blocks read from one contiguous
    run and written to scattered places (a push into a paged pool), or read
    from scattered places into one run (a pull).  All but the first and last
    extent of a slice are whole blocks or runs of them (the slice's ends may
    cut one, which is then left to the caller), so the middle is checked:
    lengths that are multiples of the shortest, at least 1 KiB, one side one
    run once the runs are cut back into blocks.
    The scattered side is a row view of its memory, so the copy is one fancy
    assignment (scatter) or one ``np.take`` into the run (gather), performed
    by numpy in C without the GIL; offsets off any one grid fall back to a
    byte-strided view (row ``r`` is bytes ``[r, r + block)``), slower by about
    a tenth.  Returns ``(0, 0)`` when none of this applies.
    """
    n = len(length)
    mid = length[1 : n - 1]
    block = int(mid.min())
    if block < _SCATTER_MIN_BLOCK:
        return 0, 0
    if not bool((mid == block).all()) and bool((mid % block).any()):
        return 0, 0
    lo = 0 if int(length[0]) % block == 0 else 1  # the ends join the middle when the slice kept them whole
    hi = n if int(length[-1]) % block == 0 else n - 1
    s, d, ln = src_off[lo:hi], dst_off[lo:hi], length[lo:hi]
    counts = ln // block
    rows = int(counts.sum())
    if rows != hi - lo:
        # Runs of blocks that coalescing merged (pages a KV allocator handed out
        # together) are cut back into blocks, so the slice stays one call.
        within = np.arange(rows, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        s = np.repeat(s, counts) + within * block
        d = np.repeat(d, counts) + within * block
    if bool((s[1:] - s[:-1] == block).all()):
        first = int(s[0])
        source = src.array[first : first + rows * block].reshape(rows, block)
        grid = _rows(dst.array, d, block)
        if grid is None:
            flat = dst.array
            as_strided(flat, shape=(flat.shape[0] - block + 1, block), strides=(1, 1))[d] = source
        else:
            view, idx = grid
            view[idx] = source
        return lo, hi
    if bool((d[1:] - d[:-1] == block).all()):
        first = int(d[0])
        target = dst.array[first : first + rows * block].reshape(rows, block)
        grid = _rows(src.array, s, block)
        if grid is None:
            return 0, 0
        view, idx = grid
        np.take(view, idx, axis=0, out=target, mode="clip")  # "raise" would buffer the whole copy
        return lo, hi
    return 0, 0
