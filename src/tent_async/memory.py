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
from typing import Any

import attrs
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .errors import UnsupportedBufferError

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
) -> None:
    """Copy many extents between registered memories (a scatter-gather slice).

    ``memories`` is the slice's segment table; the five arrays index into it.
    Host to host is one Python-level loop of buffer slice assignments, the
    fastest way found to move 4-64 KiB blocks from Python (faster than numpy
    fancy indexing, which gathers then scatters, and than ctypes.memmove per
    block; docs/benchmarks.md).  Anything touching CUDA goes extent by extent
    through :func:`copy_bytes`.
    """
    if any(m.is_cuda for m in memories):
        for a, b, c, d, n in zip(
            src_seg.tolist(), src_off.tolist(), dst_seg.tolist(), dst_off.tolist(), length.tolist(), strict=True
        ):
            copy_bytes(memories[c], d, memories[a], b, n)
        return
    views = [memoryview(m.array) for m in memories]
    if len(views) <= 2 and (src_seg == src_seg[0]).all() and (dst_seg == dst_seg[0]).all():
        src_mem = memories[int(src_seg[0])]
        dst_mem = memories[int(dst_seg[0])]
        lo, hi = _scatter_run(src_mem, src_off, dst_mem, dst_off, length)
        sv = views[int(src_seg[0])]
        dv = views[int(dst_seg[0])]
        for b, d, n in zip(src_off[:lo].tolist(), dst_off[:lo].tolist(), length[:lo].tolist(), strict=True):
            dv[d : d + n] = sv[b : b + n]
        for b, d, n in zip(src_off[hi:].tolist(), dst_off[hi:].tolist(), length[hi:].tolist(), strict=True):
            dv[d : d + n] = sv[b : b + n]
        return
    for a, b, c, d, n in zip(
        src_seg.tolist(), src_off.tolist(), dst_seg.tolist(), dst_off.tolist(), length.tolist(), strict=True
    ):
        views[c][d : d + n] = views[a][b : b + n]


_SCATTER_MIN_BLOCK = 1024
_SCATTER_MIN_COUNT = 8


def _scatter_run(src: Memory, src_off: Any, dst: Memory, dst_off: Any, length: Any) -> tuple[int, int]:
    """Copy the extents ``[lo, hi)`` in one numpy scatter when they allow it; returns ``(lo, hi)``.

    The shape of a KV-cache write: equal blocks read from one contiguous run
    of the source and written to scattered places.  All but the first and
    last extent of a slice are whole blocks (the slice's ends may cut one),
    so the middle is checked: equal lengths of at least 1 KiB, sources one
    after the other.  It is then one fancy assignment into a byte-strided
    view of the destination (row ``r`` is bytes ``[r, r + block)``), which
    numpy performs in C without the GIL: 0.8x of a contiguous copy for 4 KiB
    blocks, 1x for 16 KiB, against 0.45x and 0.75x for the per-block loop
    (docs/benchmarks.md).  Returns ``(0, 0)`` when it does not apply.
    """
    n = len(length)
    if n < _SCATTER_MIN_COUNT:
        return 0, 0
    lo, hi = 1, n - 1
    block = int(length[lo])
    body = length[lo:hi]
    if block < _SCATTER_MIN_BLOCK or not (body == block).all():
        return 0, 0
    starts = src_off[lo:hi]
    if not (starts[1:] - starts[:-1] == block).all():
        return 0, 0
    first = int(starts[0])
    rows = hi - lo
    source = src.array[first : first + rows * block].reshape(rows, block)
    flat = dst.array
    target = as_strided(flat, shape=(flat.shape[0] - block + 1, block), strides=(1, 1))
    target[dst_off[lo:hi]] = source
    return lo, hi
