"""One UCX endpoint on one rail, with the care ucxx needs.

* Every request *and* the memory it reads or writes stay referenced until the
  request completes: ucxx keeps no reference to the buffer (a freed buffer is
  sent as garbage), and dropping a ``UCXRequest`` cancels it.
* Completions arrive as asyncio futures resolved by the rail's notifier
  thread; we attach done-callbacks instead of awaiting them, so no task exists
  per message or per slice.
* Incoming active messages (headers and replies) are received one after
  another; a message that does not decode is counted, logged, and closes the
  endpoint — it never reaches the engine.
* ucxx files a waiting active-message receive under the endpoint's raw UCX
  handle, and a receive still waiting when its endpoint is closed stays filed
  there.  UCX recycles endpoint memory, so the *next* endpoint given that
  handle loses its first message to the dead one's receive (seen here: the
  BIND of a second client vanished).  A channel closed by the peer is
  therefore only *retired*: marked closed, its endpoint kept referenced and
  never closed by us, so UCX cannot recycle the handle.  Only ``abort()``
  (fencing a stuck rail, engine shutdown) really closes an endpoint.
* The endpoint's close callback (progress thread) is handed to the loop.
  ``abort()`` closes the endpoint, which cancels every request on it within
  milliseconds: the only way to stop a send once it has started.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from ...errors import ProtocolError
from . import _ucxx
from .protocol import Message, decode, encode
from .rails import LocalRail

logger = logging.getLogger("tent_async.ucx")

MessageHandler = Callable[["Channel", Message], None]
CloseHandler = Callable[["Channel", str], None]


class Channel:
    """A UCX endpoint plus the bookkeeping that keeps it safe to use from asyncio."""

    _keys = itertools.count()

    def __init__(
        self,
        rail: LocalRail,
        ep: Any,
        label: str,
        on_message: MessageHandler,
        on_close: CloseHandler,
        on_protocol_error: Callable[[Channel, ProtocolError], None] | None = None,
    ) -> None:
        self.rail = rail
        self.ep = ep
        self.label = label
        self.closed = False
        self.close_reason = ""
        self.state: Any = None  # owner's per-channel state (client link or server binding)
        self._on_message = on_message
        self._on_close = on_close
        self._on_protocol_error = on_protocol_error
        self._keep: dict[int, tuple[Any, Any]] = {}  # key -> (request, buffer) until the request completes
        self._am_req: Any = None
        self._ucx = _ucxx.loaded()
        self.handle = int(ep.handle)
        rail.channels.add(self)
        ep.set_close_callback(self._closed_from_ucx)
        self._arm()

    # ------------------------------------------------------------- receiving

    def _arm(self) -> None:
        if self.closed:
            return
        try:
            req = self.ep.am_recv()
        except self._ucx.UCXError as exc:
            self._close(f"cannot receive on {self.label}: {_ucxx.describe_error(exc)}")
            return
        self._am_req = req
        req.future.add_done_callback(self._on_am)

    def _on_am(self, future: Any) -> None:
        req = self._am_req
        self._am_req = None
        error = _ucxx.future_error(future)
        if error is not None or req is None:
            if not self.closed:
                self._close(self._reason(error))
            return
        buf = req.recv_buffer
        del req
        if self.closed:
            return
        self._arm()
        self._dispatch(buf)

    def _dispatch(self, buf: Any) -> None:
        try:
            msg = decode(memoryview(buf) if buf is not None else b"")
        except ProtocolError as exc:
            if self._on_protocol_error is not None:
                self._on_protocol_error(self, exc)
            logger.warning("%s: dropping the connection after a malformed message: %s", self.label, exc)
            self.abort(f"protocol error: {exc}")
            return
        self._on_message(self, msg)

    # --------------------------------------------------------------- sending

    def send(self, msg: Message) -> None:
        """Send one active message; its bytes stay referenced until the send completes."""
        self.send_raw(encode(msg))

    def send_raw(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            req = self.ep.am_send(self._ucx.Array(data))
        except self._ucx.UCXError as exc:
            self._close(f"cannot send on {self.label}: {_ucxx.describe_error(exc)}")
            return
        self.keep(req, data, None)

    def keep(self, req: Any, buffer: Any, then: Callable[[BaseException | None], None] | None) -> None:
        """Hold ``req`` and ``buffer`` until the request completes, then call ``then(error)``."""
        key = next(self._keys)
        self._keep[key] = (req, buffer)

        def done(future: Any) -> None:
            self._keep.pop(key, None)
            error = _ucxx.future_error(future)
            if then is not None:
                then(error)

        req.future.add_done_callback(done)

    def tag_send(self, array: Any, tag: int) -> Any:
        """Post a tagged send of ``array`` (a contiguous numpy/cupy view); returns the request."""
        L = self._ucx.L
        return self.ep.tag_send(self._ucx.Array(array), L.UCXXTag(tag))

    def tag_recv(self, array: Any, tag: int) -> Any:
        """Post a tagged receive into ``array`` (matched per worker, cancelled if the endpoint closes)."""
        L = self._ucx.L
        return self.ep.tag_recv(self._ucx.Array(array), L.UCXXTag(tag))

    @property
    def pending(self) -> int:
        """Requests (with their buffers) still held."""
        return len(self._keep)

    # --------------------------------------------------------------- closing

    def _reason(self, error: BaseException | None) -> str:
        detail = _ucxx.describe_error(error)
        try:
            self.ep.raise_on_error()
        except Exception as exc:  # the endpoint's own error says more than "Request canceled"
            detail = _ucxx.describe_error(exc)
        return f"{self.label}: {detail}"

    def _closed_from_ucx(self) -> None:
        # Progress thread: hop to the loop.
        loop = self.rail.loop
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._closed_on_loop)

    def _closed_on_loop(self) -> None:
        if not self.closed:
            self._close(self._reason(None))

    def _close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        self._on_close(self, reason)

    def retire(self, reason: str) -> None:
        """Stop using the endpoint without closing it (its handle stays ours; see the module docstring)."""
        if not self.closed:
            self._close(reason)

    def abort(self, reason: str) -> None:
        """Close the endpoint now: every request on it is cancelled (sends included)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        try:
            self.ep.close_blocking(10**9, 1)
        except Exception:  # pragma: no cover - best effort: the endpoint may be dead already
            logger.debug("%s: close_blocking failed", self.label, exc_info=True)
        self._on_close(self, reason)
