"""One UCX endpoint on one rail, with the care ucxx needs.

* Every request *and* the memory it reads or writes stay referenced until the
  request completes: ucxx keeps no reference to the buffer (a freed buffer is
  sent as garbage), and dropping a ``UCXRequest`` cancels it.
* Completions arrive as asyncio futures resolved on the loop thread (by the
  rail's progress pass, or by its notifier thread in ``"thread"`` mode,
  :mod:`.progress`); we watch them (``rail.progress.watch``: in the loop modes
  the callback runs in the pass that resolved the future) instead of awaiting
  them, so no task exists per message or per slice.  Every post is followed by
  ``rail.progress.kick()``: a request can complete inside the call that posts it.
* Everything travels as *tagged* messages.  Receives are posted on the
  endpoint (ucxx tracks them there), so closing the endpoint cancels them
  along with its sends: ``abort()`` is the one way to stop everything of a
  link at once, sends included.  Tags still match per worker, which is why
  every tag carries the receiver's namespace for the link.
* Control messages (:func:`~.protocol.pack_data`) are received into bounded
  buffers: :meth:`recv_message` posts one and decodes what arrived.  A
  message larger than the buffer fails the receive with a truncation error
  (UCX drops it); the caller decides what a truncation means.
* The endpoint's close callback (run where the worker progresses) is handed to the loop.
* An endpoint with a send of ours still unfinished is never closed
  (``abort(..., linger=True)``): its receives are cancelled now, the endpoint is
  closed once its sends are done, or once UCX reports it failed (the peer
  closed or vanished).  UCX's TCP transport (1.21, and master as of 2026-12)
  cannot close an endpoint mid-send safely: the force close leaves the socket,
  kept for receiving, waiting for "writable" forever, and when the peer then
  closes its side, one event carries both the peer's FIN (which frees the
  endpoint) and "writable" (which UCX then handles on the freed endpoint):
  SIGSEGV or an arbiter assertion inside ``progress`` (docs/ucx.md, "Closing an
  endpoint mid-send").  After ``LINGER_MAX`` seconds such an endpoint is
  *parked*: its owner may settle what the sends belonged to (the initiator's
  fence ends), while the channel keeps the requests and their buffers, so UCX
  never reads freed or reused memory.  Lingering endpoints are counted per rail
  and per key (a peer, a source address): owners refuse new links to a key at
  ``MAX_PARKED_PER_KEY``, which bounds what one peer can leave behind.

No channel is merely "retired" any more: without active messages there is no
receive filed under a raw endpoint handle that a recycled handle could
inherit, so closed endpoints are really closed and their resources released.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import ProtocolError
from . import _ucxx
from .protocol import Message, pack_data, unpack_data
from .rails import LocalRail

logger = logging.getLogger("tent_async.ucx")

CloseHandler = Callable[["Channel", str], None]
ReceiveHandler = Callable[[Message | None, BaseException | None], None]

LINGER_MAX = 3.0  # seconds a closed channel's unfinished sends may hold up their owner; then it parks
MAX_PARKED_PER_KEY = 4  # lingering endpoints one peer or source address may have per rail; no new link past it
MAX_CACHED_ARRAYS = 128  # control receive buffers whose ucxx Array a channel keeps for reuse (recv_message)


def _closed_already(channel: Channel, reason: str) -> None:
    """The close handler of a channel that was closed (its own handler ran once already)."""


class MessageTruncated(ProtocolError):
    """A control message did not fit the bounded receive posted for it."""


class Channel:
    """A UCX endpoint plus the bookkeeping that keeps it safe to use from asyncio."""

    _keys = itertools.count()

    def __init__(self, rail: LocalRail, ep: Any, label: str, on_close: CloseHandler) -> None:
        self.rail = rail
        self.ep: Any = ep
        self.label = label
        self.closed = False
        self.close_reason = ""
        self._on_close = on_close
        self._keep: dict[int, tuple[Any, Any]] = {}  # key -> (request, buffer) until the request completes
        self._arrays: dict[int, tuple[np.ndarray, Any]] = {}  # id(buffer) -> (buffer, its ucxx Array): recv_message
        self._sends: set[int] = set()  # keys of _keep that are sends (what a linger waits for)
        self.lingering = False  # closed, but the endpoint waits for its sends (abort(linger=True))
        self.parked = False  # lingering past LINGER_MAX: counted in rail.parked
        self.park_key: Any = None  # whose lingering endpoint this is (abort(park_key=...)): rail.parked_by
        self._linger: Any = None  # the timer that parks a lingering endpoint
        self._ucx = _ucxx.loaded()
        try:
            ep.set_close_callback(self._closed_from_ucx)
        except Exception:
            # An endpoint to a dead worker can be closing already ("Endpoint is closing or has
            # already closed"): nothing may stay registered for it (issue 11, finding 7).
            self.closed = True
            self.ep = None
            with contextlib.suppress(Exception):
                ep.close_blocking(10**9, 1)
            raise
        rail.channels.add(self)

    # --------------------------------------------------------------- sending

    def send_message(self, msg: Message, tag: int, then: Callable[[BaseException | None], None] | None = None) -> bool:
        """Send one control message with ``tag``; its bytes stay referenced until the send completes.

        Returns True if the send is still going out; then ``then(error)`` runs when it ends.
        """
        if self.closed:
            return False
        data = pack_data(msg)  # bytes: ucxx sends from any buffer, and these stay referenced below
        progress = self.rail.progress
        t0 = time.perf_counter()
        try:
            req = self._endpoint().tag_send(self._ucx.Array(data), self._ucx.L.UCXXTag(tag))
        except self._ucx.UCXError as exc:
            self.fail(f"cannot send on {self.label}: {_ucxx.describe_error(exc)}")
            return False
        progress.account(time.perf_counter() - t0)
        if req.completed and req.status == 0:  # UCS_OK: an eager send, done inside the call
            # Its bytes are out and nothing waits on it: neither held nor watched (one dict
            # entry, one closure, one completion delivery and one pass's look fewer per
            # header and per reply), and not kicked either: nothing of it is left to progress
            # (what else was posted kicked for itself), so no pass, and inside a pass no
            # round, runs for it (a served 4 KiB slice: one progress round fewer on the server).
            progress.posted()
            return False
        progress.kick(req)
        self.keep(req, data, then, send=True)
        return True

    def keep(
        self, req: Any, buffer: Any, then: Callable[[BaseException | None], None] | None, *, send: bool = False
    ) -> None:
        """Hold ``req`` and ``buffer`` until the request completes, then call ``then(error)``.

        ``send``: the request is a send (a lingering close waits for those, see :meth:`abort`).
        """
        key = next(self._keys)
        self._keep[key] = (req, buffer)
        if send:
            self._sends.add(key)

        def done(future: Any) -> None:
            self._keep.pop(key, None)
            if send:
                self._sends.discard(key)
                if self.lingering and not self._sends:
                    self._close_endpoint()
            error = _ucxx.future_error(future)
            if then is not None:
                then(error)

        self.rail.progress.watch(req, done)

    def _endpoint(self) -> Any:
        if self.ep is None or self.closed:
            raise self._ucx.CanceledError(f"{self.label}: the endpoint is closed ({self.close_reason})")
        return self.ep

    def tag_send(self, array: Any, tag: int) -> Any:
        """Post a tagged send of ``array`` (a contiguous numpy/cupy view); returns the request.

        The call's time counts as this rail's (``Progress.account``): over TCP, UCX pushes
        what the socket takes from inside it.
        """
        progress = self.rail.progress
        t0 = time.perf_counter()
        req = self._endpoint().tag_send(self._ucx.Array(array), self._ucx.L.UCXXTag(tag))
        progress.account(time.perf_counter() - t0)
        progress.kick(req)
        progress.stream(req)  # a slice's bytes (control messages go through send_message)
        return req

    def tag_recv(self, array: Any, tag: int, *, bulk: bool = False) -> Any:
        """Post a tagged receive into ``array`` (matched per worker, cancelled if the endpoint closes).

        ``bulk``: a slice's bytes (not a header or a reply): the progress engine keeps
        such a receive flowing while it is unfinished (``Progress.stream``).
        """
        req = self._endpoint().tag_recv(self._ucx.Array(array), self._ucx.L.UCXXTag(tag))
        progress = self.rail.progress
        progress.kick()
        if bulk:
            progress.stream(req)
        return req

    def recv_with_handle(self, array: Any, probe: Any) -> Any:
        """Receive a message the sweeper took out of the unexpected queue (a slice's bytes), into ``array``."""
        req = self._endpoint().tag_recv_with_handle(self._ucx.Array(array), probe)
        progress = self.rail.progress
        progress.kick()
        progress.stream(req)
        return req

    def recv_message(self, buffer: np.ndarray, tag: int, then: ReceiveHandler) -> Any:
        """Post a bounded receive for one control message; ``then(message, error)`` once it arrived.

        ``error`` is :class:`MessageTruncated` for a message larger than
        ``buffer``, a :class:`~tent_async.errors.ProtocolError` for one that
        does not decode, or the UCX error (cancelled: the endpoint closed).
        The buffer is all zeros again when ``then`` runs, ready to be posted
        again.  Returns the request (held here until it completes).
        """
        array = self._arrays.get(id(buffer))
        if array is None or array[0] is not buffer:
            array = (buffer, self._ucx.Array(buffer))
            if len(self._arrays) < MAX_CACHED_ARRAYS:  # header slots and reply buffers: reused
                self._arrays[id(buffer)] = array  # the entry holds the buffer: its id stays its own
        req = self._endpoint().tag_recv(array[1], self._ucx.L.UCXXTag(tag))
        if req.completed or self.rail.delayed:
            self.rail.progress.kick()  # it matched a message UCX held already: the pass delivers it
        else:
            # Posted, nothing matched: no pass is needed for it.  A control message is never left
            # in UCX's unexpected queue (the pass's intake gate takes every unexpected message
            # out, and one of ours there is a protocol violation), so the receive matches only
            # what arrives from now on, which raises an event (LoopProgress.posted).
            self.rail.progress.posted()
        # As keep(req, buffer, ...), with the decoding in the same callback (one closure and
        # one call fewer per header and per reply).
        key = next(self._keys)
        kept = self._keep
        kept[key] = (req, buffer)

        def done(future: Any) -> None:
            kept.pop(key, None)
            error = _ucxx.future_error(future)
            if error is not None:
                buffer[:] = 0  # a truncated message may have left its first bytes
                if isinstance(error, self._ucx.L.UCXMessageTruncatedError):
                    error = MessageTruncated(
                        f"{self.label}: a control message larger than the {len(buffer)}-byte receive posted for it"
                    )
                then(None, error)
                return
            try:
                msg, used = unpack_data(buffer)
            except ProtocolError as exc:
                buffer[:] = 0
                then(None, exc)
                return
            buffer[:used] = 0
            then(msg, None)

        self.rail.progress.watch(req, done)
        return req

    @property
    def pending(self) -> int:
        """Requests (with their buffers) still held."""
        return len(self._keep)

    # --------------------------------------------------------------- closing

    def _reason(self) -> str:
        detail = "endpoint closed"
        try:
            self._endpoint().raise_on_error()
        except Exception as exc:  # the endpoint's own error says more than "Request canceled"
            detail = _ucxx.describe_error(exc)
        return f"{self.label}: {detail}"

    def _closed_from_ucx(self) -> None:
        # Wherever the worker progresses (the progress thread in "thread" mode): hop to the loop.
        loop = self.rail.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._closed_on_loop)

    def _closed_on_loop(self) -> None:
        if not self.closed:
            self.abort(self._reason())
        elif self.lingering:  # UCX gave up on it (the peer is gone): nothing is being sent any more
            self._close_endpoint()

    def fail(self, reason: str) -> None:
        """A request could not be posted on this endpoint: its owner closes it its way.

        The owner's close handler tears its link down, which closes this channel
        with the owner's linger settings (another slice's send may still be going
        out: never closed mid-send); a channel whose owner does not close it
        lingers here.
        """
        if self.closed:
            return
        self._on_close(self, reason)
        if not self.closed:
            self.abort(reason, linger=True)

    def abort(
        self,
        reason: str,
        *,
        linger: bool = False,
        park_key: Any = None,
        on_park: Callable[[], bool] | None = None,
    ) -> None:
        """Close the channel: every request on it is cancelled, its sends only once safe.

        Without ``linger`` (the rail is closing, or UCX failed the endpoint) the
        endpoint is closed now, sends included.

        ``linger``: the endpoint is healthy and may have a send of ours
        unfinished (a slice fenced on a slow rail, a READ's bytes going to a peer
        that stopped reading).  Its receives are cancelled now (their last
        reference dropped: ucxx cancels such a request), and the endpoint is
        closed once every send completed or UCX reported the endpoint failed,
        never mid-send (module docstring).  After ``LINGER_MAX`` seconds it
        *parks* (counted in ``rail.parked``); ``on_park`` is called then: the
        owner settles what it was waiting for (the requests and their buffers
        stay here, and their callbacks still run when UCX gives them back), or
        returns False when it cannot (a receive still writing into caller
        memory, which only a close stops: the initiator keeps those off any
        endpoint with a send that can stall, peer.Link._admit, so that is a bug
        it logs): then the endpoint is closed as before.
        Lingering and parked endpoints count in ``rail.parked_by[park_key]``, so
        owners can bound what one key leaves behind (``MAX_PARKED_PER_KEY``).
        The channel counts as closed at once either way (nothing more is posted
        on it, and the close handler runs now).  A plain ``abort`` of a
        lingering channel closes its endpoint now.
        """
        if self.closed:
            if self.lingering and not linger:
                self._close_endpoint()
            return
        self.closed = True
        self.close_reason = reason
        if linger and self._sends and self.ep is not None:
            self.lingering = True
            self.park_key = park_key
            self.rail.parked_by[park_key] += 1
            for key in [k for k in self._keep if k not in self._sends]:
                self._keep[key] = (None, self._keep[key][1])  # the buffer stays until UCX reports the cancel
            self._linger = self.rail.loop.call_later(LINGER_MAX, self._park, on_park)
            self.rail.progress.kick()  # the cancels complete in a pass
        else:
            self._close_endpoint()
        on_close, self._on_close = self._on_close, _closed_already
        # Dropped: the handler usually refers to the link that refers to this channel, a cycle
        # that kept every closed link (and its buffers) until the garbage collector's next full
        # pass; the security run found 10 MiB of them after an attack (issue 11 review).
        on_close(self, reason)

    def _park(self, on_park: Callable[[], bool] | None) -> None:
        """``LINGER_MAX`` passed with a send still going out: park (or, if the owner cannot, close)."""
        self._linger = None
        if not self.lingering:
            return
        settled = True
        if on_park is not None:
            try:
                settled = on_park()
            except Exception:  # never a reason to close mid-send
                logger.exception("%s: settling what a parked endpoint held failed", self.label)
        if not settled:
            self._close_endpoint()
            return
        self.parked = True
        self.rail.parked += 1

    def _close_endpoint(self) -> None:
        """Close the UCX endpoint now (once): every request still on it is cancelled."""
        if self.lingering:
            by = self.rail.parked_by
            by[self.park_key] -= 1
            if by[self.park_key] <= 0:
                del by[self.park_key]
        self.lingering = False
        if self.parked:
            self.parked = False
            self.rail.parked -= 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        ep, self.ep = self.ep, None
        self.rail.channels.discard(self)
        if ep is None:
            return
        try:
            ep.remove_close_callback()
        except Exception:  # pragma: no cover - best effort
            logger.debug("%s: remove_close_callback failed", self.label, exc_info=True)
        try:
            ep.close_blocking(10**9, 1)
        except Exception:  # pragma: no cover - best effort: the endpoint may be dead already
            logger.debug("%s: close_blocking failed", self.label, exc_info=True)
        # close_blocking cancelled the endpoint's requests and progressed the worker itself; their
        # futures resolve in the next pass (run_request_notifier), which an idle shared-memory
        # worker would otherwise leave to the safety pass: ask for it now (not once the loop closed).
        with contextlib.suppress(RuntimeError):
            self.rail.progress.kick()
        # Our last reference: the endpoint holds its worker (and the worker its descriptors and
        # sockets) until every reference is gone, and a channel can sit in a reference cycle
        # until the garbage collector runs.  Requests still completing hold their own.
