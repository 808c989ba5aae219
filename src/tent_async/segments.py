"""Registered memory, addressed by name: segments and views of them.

A :class:`Segment` is memory registered with an engine (``engine.register``);
a :class:`View` is a byte range of a segment, made by slicing
(``seg[0:4096]``).  Views are bounds-checked when they are made, so a bad
offset fails at the line that computed it, not somewhere inside a transfer.

Remote segments (a peer's memory, in the UCX backend) share the
:class:`SegmentBase` interface, so local and remote views slice and transfer
the same way.
"""

from __future__ import annotations

import operator
from typing import Any, Literal

import attrs
import numpy as np

from .errors import OutOfBoundsError, UnregisteredSegmentError
from .memory import Memory

Permission = Literal["r", "rw"]
PERMISSIONS: tuple[Permission, ...] = ("r", "rw")


def _resolve(key: Any, size: int, what: str) -> tuple[int, int]:
    """``slice`` -> ``(start, stop)`` with Python's negative indices, but no clamping."""
    if not isinstance(key, slice):
        raise TypeError(f"index {what} with a slice such as [0:4096] to get a view; got {type(key).__name__} {key!r}")
    if key.step not in (None, 1):
        raise OutOfBoundsError(f"views of {what} must be contiguous; step {key.step} is not supported")
    try:
        # operator.index accepts numpy integers, which index arithmetic often produces.
        start = 0 if key.start is None else operator.index(key.start)
        stop = size if key.stop is None else operator.index(key.stop)
    except TypeError:
        raise TypeError(f"slice bounds of {what} must be integers, got {key.start!r}:{key.stop!r}") from None
    if isinstance(key.start, bool) or isinstance(key.stop, bool):
        raise TypeError(f"slice bounds of {what} must be integers, not booleans: {key.start!r}:{key.stop!r}")
    if start < 0:
        start += size
    if stop < 0:
        stop += size
    if not (0 <= start <= stop <= size):
        raise OutOfBoundsError(
            f"view [{key.start}:{key.stop}] is outside {what} of {size} bytes "
            f"(resolved to [{start}:{stop}]); valid views lie within [0:{size}]"
        )
    return start, stop


class SegmentBase:
    """What local and remote segments have in common: a name, a size, a kind, a permission."""

    __slots__ = ("__weakref__", "kind", "name", "permission", "size")

    def __init__(self, name: str, size: int, kind: str, permission: Permission) -> None:
        self.name = name
        self.size = size
        self.kind = kind
        self.permission = permission

    @property
    def writable(self) -> bool:
        return self.permission == "rw"

    @property
    def is_remote(self) -> bool:
        return False

    def describe(self) -> str:
        return f"segment {self.name!r}"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> View:
        start, stop = _resolve(key, self.size, self.describe())
        return View(self, start, stop - start)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.size} B {self.kind} {self.permission}>"


class Segment(SegmentBase):
    """Local memory registered with an engine.

    Obtain one from :meth:`Engine.register`; slice it to get views.  A segment
    stays valid until :meth:`Engine.unregister` or the engine closes.
    """

    __slots__ = ("_busy", "_held", "_owner", "_registered", "address", "memory")

    def __init__(self, name: str, memory: Memory, permission: Permission, owner: object) -> None:
        super().__init__(name, memory.nbytes, memory.kind, permission)
        self.memory = memory
        self.address = memory.address  # where its first byte is, to compare memory across segments
        self._owner = owner  # the engine this segment belongs to
        self._registered = True
        self._busy = 0  # open transfers that read or write it
        self._held = 0  # sends of ended transfers a backend still has in flight from it (ucx: a parked endpoint)

    @property
    def registered(self) -> bool:
        return self._registered

    def _release(self) -> None:
        """Forget the memory, so the application can free it (close an mmap, drop a tensor)."""
        self._registered = False
        self.memory = Memory(array=np.empty(0, dtype=np.uint8), kind=self.kind, readonly=True, owner=None)

    @property
    def busy(self) -> int:
        """How many open transfers use this segment."""
        return self._busy

    @property
    def held(self) -> int:
        """Sends of transfers that already ended which still read this memory.

        A ucx link whose peer stopped reading cannot be closed mid-send (UCX's
        TCP transport would crash later), so the send stays UCX's after its
        transfer was failed over; ``unregister`` refuses until it is given back.
        """
        return self._held

    def check_owner(self, owner: object) -> None:
        """Raise unless this segment is registered with ``owner``."""
        if not self._registered:
            raise UnregisteredSegmentError(
                f"segment {self.name!r} was unregistered (or its engine closed); register the buffer again"
            )
        if self._owner is not owner:
            raise UnregisteredSegmentError(
                f"segment {self.name!r} belongs to another engine; register the buffer with this engine"
            )


class RemoteSegment(SegmentBase):
    """A segment registered with a peer engine, as this engine knows it.

    Get one from ``await peer.segment(name)`` (ucx backend) and slice it like a
    local segment: ``remote[off:off + n]``.  Size, kind and permission come from
    the peer's catalogue and are checked again by the peer for every slice;
    ``sid`` identifies this registration, so a segment the peer unregistered and
    registered again under the same name is refused instead of written blindly.
    """

    __slots__ = ("peer", "sid")

    def __init__(self, peer: Any, name: str, size: int, kind: str, permission: Permission, sid: int) -> None:
        super().__init__(name, size, kind, permission)
        self.peer = peer
        self.sid = sid

    @property
    def is_remote(self) -> bool:
        return True

    def describe(self) -> str:
        return f"segment {self.name!r} of peer {getattr(self.peer, 'name', '?')!r}"


@attrs.frozen(repr=False)
class View:
    """Bytes ``[offset, offset + length)`` of a segment.

    Slicing a view slices within it: ``seg[100:200][10:20]`` is ``seg[110:120]``.
    """

    segment: SegmentBase
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> View:
        start, stop = _resolve(key, self.length, f"a {self.length}-byte view of {self.segment.describe()}")
        return View(self.segment, self.offset + start, stop - start)

    def overlaps(self, other: View) -> bool:
        return (
            self.segment is other.segment
            and self.length > 0
            and other.length > 0
            and self.offset < other.end
            and other.offset < self.end
        )

    def __repr__(self) -> str:
        return f"{self.segment.name}[{self.offset}:{self.end}]"
