"""Direct copies between two engines on one host: Linux cross-memory attach (CMA).

UCX's shared-memory transport moves a large message by copying it into a
small FIFO and out again, in 8 KiB fragments, and ucxx's Python API has no
receive that lands an extent list in place: an extent-list slice was gathered
into staging, sent, received into staging and scattered, four copies of every
byte on two event loops.  ``process_vm_readv``/``process_vm_writev`` copy
between two processes' address spaces in one kernel call, each side an
``iovec`` list of up to ``IOV_MAX`` entries with its own cuts: one copy, no
staging, and the kernel walks the extent lists (measured on this VM, 64 MiB
from one process into another: 20 GB/s contiguous; 16-18 GB/s in 4-16 KiB
blocks to permuted places in our memory from one range of the other's, but
6-11 GB/s with the blocks scattered in the other process, whose pages the
kernel pins iovec by iovec: see :func:`copy` and ``Backend.remote_order``).

**Who copies.**  Always the slice's initiator, synchronously, on its event
loop, in the callback that receives the peer's answer (``WHERE``: the base
addresses of the segments the peer checked the slice against).  A WRITE is
``process_vm_writev`` into the peer, a READ ``process_vm_readv`` from it.  So
the initiator's fencing holds as on every other path: a slice withdrawn before
its answer never copies, and nothing lands after it was reported.  The peer
keeps the segments busy (unregister refuses) until the initiator says it is
done (a one-byte ``DONE`` message on the slice's data tag).

**Who may.**  The kernel lets a process read and write another's memory this
way only where it could ``ptrace`` it: the same user, on the same host (and no
Yama restriction).  Such a process can already read and write every byte of
ours, so handing it our segments' addresses gives it nothing it lacked; a peer
on another host, or of another user, gets nothing from this path.  The server
therefore enables it for a connection only after the client proved both, to
the kernel's satisfaction: the client connects to the server's abstract
Unix socket (named in ``WELCOME``, so only within the same network namespace),
the server checks the socket's peer credentials (``SO_PEERCRED``: the uid the
kernel saw) before it reads anything, and the client presents the
connection's random token and names the control connection it came with (so
a token relayed by a peer in the middle verifies nothing).  The client in
turn takes the server's pid from the same socket's credentials (it must be
the one the socket's name says), reads a probe back from the server's memory
(proving the pid and that the kernel allows the copy), and checks that both
processes share one monotonic clock.  A header asking for a direct copy on a
connection that did not pass this, or on a rail other than shared memory, is
a protocol violation.

**Time bound.**  ``WHERE`` says until when (the server's ``time.monotonic()``,
one clock for the whole host) the initiator may still copy; it does not start
a copy after that.  When a link closes with such slices open (its ``DONE``
receives are cancelled), the server keeps their segments busy until that time
plus :data:`MARGIN`, for a copy that had just started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import hmac
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import TentError

IOV_BATCH = 1024  # iovecs per side per call (Linux's IOV_MAX)
TOKEN_BYTES = 16
VALID_FOR = 1.0  # seconds after WHERE that an initiator may still start its copy
MARGIN = 2.0  # ... and the server keeps a closed link's segments busy this much longer
CLOCK_SKEW = 0.5  # seconds two processes' monotonic clocks may differ (they should not at all)
VERIFY_TIMEOUT = 2.0

Array = np.ndarray[Any, np.dtype[Any]]

_ANSWER = struct.Struct("<BdQ")  # ok, server's monotonic clock, address of the probe (the token's bytes)
_UCRED = struct.Struct("3i")  # pid, uid, gid


class CmaError(TentError):
    """A direct copy between two processes failed, or the peer could not be verified for one."""


def _libc_calls() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        read, write = libc.process_vm_readv, libc.process_vm_writev
    except (OSError, AttributeError):
        return None
    for call in (read, write):
        call.restype = ctypes.c_ssize_t
        call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    return read, write


_CALLS = _libc_calls()


def available() -> bool:
    """Can this process make direct copies at all (Linux, a libc with ``process_vm_readv``)?"""
    return _CALLS is not None


def address(array: Any) -> int:
    """The address of a host array's first byte (a contiguous numpy array)."""
    return int(array.__array_interface__["data"][0])


def _iovecs(base: Array, lengths: Array, breaks: Array, lo: int, hi: int) -> Array:
    """Pieces ``lo..hi`` as an iovec array (base, length), runs of adjacent pieces merged into one."""
    starts = lo + np.flatnonzero(breaks[lo:hi])
    if not len(starts) or starts[0] != lo:
        starts = np.concatenate(([lo], starts))
    iov = np.empty((len(starts), 2), dtype=np.uint64)
    iov[:, 0] = base[starts]
    iov[:, 1] = np.add.reduceat(lengths[lo:hi], starts - lo)
    return iov


def copy(pid: int, local: Array, remote: Array, lengths: Array, *, write: bool) -> None:
    """Copy ``lengths[i]`` bytes between our ``local[i]`` and process ``pid``'s ``remote[i]``, for each ``i``.

    ``write``: ours into theirs (``process_vm_writev``), else theirs into ours.
    Pieces that follow one another in memory travel as one iovec, on each side
    on its own: the kernel pins the other process's pages iovec by iovec, so a
    remote side cut into 4 KiB iovecs copies at a third of the rate of one
    contiguous iovec here (6 against 18 GB/s), while cuts on our side cost little.
    Each call takes at most :data:`IOV_BATCH` iovecs per side.

    From :data:`SPLIT_MIN` bytes on, with a second CPU, the second half is copied
    by a helper thread while this one copies the first (the system call releases
    the GIL): the kernel's copy runs on one CPU, and the peer's loop is idle
    meanwhile.  Either way the copy is over when this returns.  Raises
    :class:`CmaError` if the kernel refuses or copies less than asked.
    """
    if _CALLS is None:
        raise CmaError("direct copies need Linux's process_vm_readv/process_vm_writev")
    local = np.asarray(local, dtype=np.uint64)
    remote = np.asarray(remote, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.uint64)
    total = int(lengths.sum())
    helper = _helper() if total >= SPLIT_MIN else None
    if helper is None:
        _copy_pieces(pid, local, remote, lengths, write)
        return
    first, second = _halves(local, remote, lengths, total // 2)
    later = helper.submit(_copy_pieces, pid, *second, write)
    try:
        _copy_pieces(pid, *first, write)
    finally:
        later.result()  # the copy is whole (or has failed) before this returns, whatever happened here


SPLIT_MIN = 4 << 20  # bytes from which a copy is split between two threads
_HELPER: list[concurrent.futures.ThreadPoolExecutor] = []
if hasattr(os, "register_at_fork"):  # a forked child has no helper thread: it starts its own
    os.register_at_fork(after_in_child=_HELPER.clear)


def _helper() -> concurrent.futures.ThreadPoolExecutor | None:
    """The one helper thread (started on first use), or None on a one-CPU machine."""
    if not _HELPER:
        if len(os.sched_getaffinity(0)) < 2:
            return None
        _HELPER.append(concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tent-cma"))
    return _HELPER[0]


def _halves(local: Array, remote: Array, lengths: Array, at: int) -> tuple[tuple[Array, Array, Array], ...]:
    """The pieces cut at byte ``at`` of their stream (the piece across it split in two)."""
    ends = np.cumsum(lengths, dtype=np.uint64)
    i = int(np.searchsorted(ends, at, side="right"))  # the piece holding byte ``at``
    start = int(ends[i]) - int(lengths[i])
    if at == start:
        return (local[:i], remote[:i], lengths[:i]), (local[i:], remote[i:], lengths[i:])
    head = np.uint64(at - start)
    first = (
        np.append(local[:i], local[i]),
        np.append(remote[:i], remote[i]),
        np.append(lengths[:i], head),
    )
    second = (
        np.concatenate(([local[i] + head], local[i + 1 :])),
        np.concatenate(([remote[i] + head], remote[i + 1 :])),
        np.concatenate(([lengths[i] - head], lengths[i + 1 :])),
    )
    return first, second


def _copy_pieces(pid: int, local: Array, remote: Array, lengths: Array, write: bool) -> None:
    assert _CALLS is not None
    call = _CALLS[1] if write else _CALLS[0]
    n = len(lengths)
    if not n:
        return
    # breaks[i]: piece i does not continue piece i - 1 on that side (a new iovec starts there)
    lbreak = np.ones(n, dtype=bool)
    rbreak = np.ones(n, dtype=bool)
    lbreak[1:] = local[1:] != local[:-1] + lengths[:-1]
    rbreak[1:] = remote[1:] != remote[:-1] + lengths[:-1]
    lcount = np.cumsum(lbreak)  # iovecs from piece 0 through piece i
    rcount = np.cumsum(rbreak)
    lo = 0
    while lo < n:
        # the furthest piece such that pieces lo.. need at most IOV_BATCH iovecs on either side
        lbase = int(lcount[lo]) - 1
        rbase = int(rcount[lo]) - 1
        hi = min(
            int(np.searchsorted(lcount, lbase + IOV_BATCH, side="right")),
            int(np.searchsorted(rcount, rbase + IOV_BATCH, side="right")),
        )
        ours = _iovecs(local, lengths, lbreak, lo, hi)
        theirs = _iovecs(remote, lengths, rbreak, lo, hi)
        want = int(ours[:, 1].sum())
        got = call(pid, address(ours), len(ours), address(theirs), len(theirs), 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else 0
            what = os.strerror(err) if err else f"{got} of {want} bytes"
            raise CmaError(f"a direct {'write into' if write else 'read from'} process {pid} failed: {what}")
        lo = hi


# ================================================================ verification


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


Endpoints = tuple[tuple[str, int], tuple[str, int]]  # a TCP connection as one side sees it: (ours, theirs)
NAME_PREFIX = "tent-ucx-"
MAX_VERIFYING = 16  # verifications in progress at once; more are closed at once
_HELLO = struct.Struct("!I16sH")  # connection id, token, length of the control connection's endpoints (text)
MAX_ENDPOINTS_TEXT = 256


def endpoints(writer: Any) -> Endpoints | None:
    """``(ours, theirs)`` of a TCP stream as ``(host, port)`` pairs, or None if it has none."""
    ours, theirs = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    if not isinstance(ours, tuple) or not isinstance(theirs, tuple):
        return None
    return (str(ours[0]), int(ours[1])), (str(theirs[0]), int(theirs[1]))


def _text(pair: Endpoints) -> bytes:
    (a, b), (c, d) = pair
    return f"{a} {b} {c} {d}".encode()


class Grant:
    """A connection's standing invitation to prove it runs on this host as this user.

    ``control`` is the connection's control stream as the server sees it: the
    client must name the same TCP connection from its side, so a token relayed
    by a peer in the middle (who connected to us itself, and forwards our
    WELCOME to a client of ours on this host) verifies nothing.
    """

    __slots__ = ("control", "on_verified", "probe", "token")

    def __init__(self, control: Endpoints, on_verified: Callable[[int], None]) -> None:
        self.token = os.urandom(TOKEN_BYTES)
        self.probe = np.frombuffer(self.token, dtype=np.uint8).copy()  # read back by the client
        self.control = control
        self.on_verified = on_verified


class Verifier:
    """The server's abstract Unix socket where clients prove they share host and user (SO_PEERCRED)."""

    def __init__(self) -> None:
        self.name = ""  # the socket's abstract name, without the leading NUL ("" until started)
        self._server: asyncio.base_events.Server | None = None
        self._grants: dict[int, Grant] = {}
        self._busy = 0  # verifications in progress
        self.refused = 0

    async def start(self) -> bool:
        """Listen; False where direct copies are not possible here (then nothing is advertised)."""
        if not available():
            return False
        name = f"{NAME_PREFIX}{os.getpid()}-{os.urandom(8).hex()}"
        try:
            self._server = await asyncio.start_unix_server(self._serve, path="\0" + name)
        except OSError:
            return False
        self.name = name
        return True

    def grant(self, conn_id: int, control: Endpoints, on_verified: Callable[[int], None]) -> bytes:
        """Invite connection ``conn_id`` (its control stream ``control``, our side first); its token
        (sent in WELCOME).  ``on_verified(pid)`` once it proved itself."""
        g = self._grants[conn_id] = Grant(control, on_verified)
        return g.token

    def revoke(self, conn_id: int) -> None:
        self._grants.pop(conn_id, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ok = False
        self._busy += 1
        try:
            # Another user's process learns nothing and holds nothing: its credentials are
            # checked before anything is read, and at most MAX_VERIFYING are served at once.
            pid, uid = _peer_credentials(writer.get_extra_info("socket"))
            if uid != os.getuid() or self._busy > MAX_VERIFYING:
                return
            data = await asyncio.wait_for(reader.readexactly(_HELLO.size), VERIFY_TIMEOUT)
            conn_id, token, n = _HELLO.unpack(data)
            if n > MAX_ENDPOINTS_TEXT:
                return
            named = await asyncio.wait_for(reader.readexactly(n), VERIFY_TIMEOUT)
            grant = self._grants.get(conn_id)
            if grant is None or not hmac.compare_digest(token, grant.token):
                return
            ours, theirs = grant.control
            if named != _text((theirs, ours)):  # the client's side of the same TCP connection
                return
            del self._grants[conn_id]  # used: one verification per connection
            # Verified: from now on its headers may ask for direct copies (before the answer,
            # so that none it sends right after can arrive first).
            grant.on_verified(pid)
            ok = True
            writer.write(_ANSWER.pack(1, time.monotonic(), address(grant.probe)))
            await writer.drain()
            # The client reads the probe back now; the grant keeps it alive until it is done.
            await asyncio.wait_for(reader.readexactly(1), VERIFY_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, struct.error, UnicodeError):
            pass
        finally:
            self._busy -= 1
            if not ok:
                self.refused += 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def aclose(self) -> None:
        self._grants.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


def valid_name(name: str) -> bool:
    """Is ``name`` one :meth:`Verifier.start` makes (so a server cannot aim the client elsewhere)?"""
    if not name.startswith(NAME_PREFIX):
        return False
    pid, _, salt = name[len(NAME_PREFIX) :].partition("-")
    return pid.isdigit() and pid.isascii() and len(salt) == 16 and all(c in "0123456789abcdef" for c in salt)


async def _connect_abstract(name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to the abstract Unix socket ``name``, connected by a socket of our own.

    uvloop's ``open_unix_connection(path=...)`` cannot reach an abstract name (EINVAL:
    direct copies were silently off for a client on uvloop); every loop's ``sock_connect``
    can, and the connected socket is then handed over.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, "\0" + name)
        return await asyncio.open_unix_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def verify(name: str, conn_id: int, token: bytes, control: Endpoints, limit: float = VERIFY_TIMEOUT) -> int:
    """Prove to the server at abstract socket ``name`` that we share its host and user; its pid.

    ``control`` is our control connection to that server, our side first: the
    server checks that it is the connection it gave ``token`` to.  Raises
    :class:`CmaError` when the server is not reachable that way, is another
    user or another process than the name says, refuses, does not hold the
    token where it said, or keeps another clock.
    """
    if not available():
        raise CmaError("direct copies need Linux's process_vm_readv/process_vm_writev")
    if not valid_name(name):
        raise CmaError(f"{name!r} is not a tent_async verification socket")
    try:
        reader, writer = await asyncio.wait_for(_connect_abstract(name), limit)
    except (OSError, TimeoutError) as exc:
        raise CmaError(f"the peer's verification socket is not reachable from here: {exc}") from None
    try:
        pid, uid = _peer_credentials(writer.get_extra_info("socket"))
        if uid != os.getuid() or pid <= 0:
            raise CmaError(f"the peer runs as uid {uid} (pid {pid}), this process as {os.getuid()}")
        if name[len(NAME_PREFIX) :].partition("-")[0] != str(pid):
            raise CmaError(f"the verification socket {name!r} is held by process {pid}, not the one it names")
        named = _text(control)
        writer.write(_HELLO.pack(conn_id, token, len(named)) + named)
        await writer.drain()
        try:
            ok, clock, probe = _ANSWER.unpack(await asyncio.wait_for(reader.readexactly(_ANSWER.size), limit))
        except (asyncio.IncompleteReadError, TimeoutError):
            raise CmaError("the peer refused the verification (wrong token or connection, or another user)") from None
        if not ok:
            raise CmaError("the peer refused the verification")
        if abs(clock - time.monotonic()) > CLOCK_SKEW:
            raise CmaError("the peer's monotonic clock is not ours (another time namespace?)")
        seen = np.zeros(TOKEN_BYTES, dtype=np.uint8)
        try:
            copy(pid, np.array([address(seen)]), np.array([probe]), np.array([TOKEN_BYTES]), write=False)
        except CmaError as exc:
            raise CmaError(f"the kernel does not let this process read the peer's memory: {exc}") from None
        if not hmac.compare_digest(seen.tobytes(), token):
            raise CmaError("the peer's memory does not hold its token where it said")
        writer.write(b"\x01")
        await writer.drain()
        return pid
    except OSError as exc:
        raise CmaError(f"the verification failed: {exc}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
