"""The control connection: framing over asyncio streams, the handshake's MACs, addresses.

Control traffic (handshake, catalogue look-ups, notifications) goes over a
plain TCP connection to the engine's ``listen`` address, not over UCX: a
refused connection is reported at once by the kernel (so connecting to
nothing fails fast), a dead peer shows up as end-of-stream, and the
request/response pattern of a handshake is natural on a stream.

The optional shared secret is never sent.  With one, both sides derive a
session (:class:`Session`) from the secret, both fresh nonces and the whole
handshake so far (``CHALLENGE`` and ``HELLO``): HKDF-SHA256 gives a key that
authenticates ``HELLO`` and one AES-256-GCM key per direction.  Everything
after ``HELLO`` -- ``WELCOME`` (worker addresses, catalogue, limits), link
set-up (worker addresses, tag namespaces), look-ups, notifications -- travels
sealed (``SEALED``), with a per-direction message counter as the nonce, so it
is secret, authenticated, and cannot be replayed, reordered or dropped
unnoticed.  A host that relays a handshake between two engines without
knowing the secret forwards bytes it can neither read nor forge: it learns no
worker address, namespace or catalogue, and cannot send a single message of
its own on the session (issue 11, finding 3).  The primitives come from the
``cryptography`` package (OpenSSL), not from this code.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import socket
import time
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ...errors import ConfigError, PeerClosedError, ProtocolError
from .protocol import MAX_FRAME, Challenge, Hello, Message, Refused, Sealed, decode, encode, frame, frame_length

logger = logging.getLogger("tent_async.ucx")


class LogLimiter:
    """Warnings that peers can provoke, at most one line per kind every ``every`` seconds.

    Every refused connection or slice used to log a WARNING (18 MB of log in one
    fuzz run, issue 11, finding 7).  Lines held back are counted into the next one.
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.INFO, kind, fmt, *args)

    def exception(self, kind: str, fmt: str, *args: Any) -> None:
        """An ERROR with the traceback being handled (a bug a peer may be able to trigger)."""
        self.log(logging.ERROR, kind, fmt, *args, exc_info=True)

    def log(self, level: int, kind: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        if not logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] += 1
            return
        if len(self._last) > 4096:  # kinds are ours, but keep the table small whatever happens
            self._last.clear()
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        if held:
            fmt += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - last if last is not None else self.every)
        logger.log(level, fmt, *args, exc_info=exc_info)


def parse_address(address: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; a bare ``":port"`` means ``default_host``."""
    if not isinstance(address, str) or ":" not in address:
        raise ConfigError(f"an address looks like 'host:port' (e.g. 'decode-0:7100'), got {address!r}")
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"the port of address {address!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"the port of address {address!r} is outside 0-65535")
    return host, port


def advertised_host(bound: str, fallback_ips: list[str]) -> str:
    """What peers should dial when we listen on ``bound`` (a wildcard is replaced by a real address)."""
    if bound not in ("", "0.0.0.0", "::"):
        return bound
    for ip in fallback_ips:
        if not ip.startswith("127."):
            return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def secret_bytes(secret: str | bytes | None) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes) or not secret:
        raise ConfigError("secret must be a non-empty str or bytes (the same on both engines)")
    return secret


def macs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


_CLIENT, _SERVER = b"c2s\0", b"s2c\0"


class Session:
    """The keys of one authenticated control connection (only with a shared secret).

    Derived by both sides from the secret, the server's and the client's nonce
    and the encoded ``CHALLENGE`` and ``HELLO`` (``HELLO`` without its MAC): a
    relay that changes any byte of the handshake, or one that does not know the
    secret, ends up with other keys.  ``auth`` is ``HELLO``'s MAC.  Every later
    message is sealed with AES-256-GCM under the sender's direction key, the
    nonce being the direction and a message counter that both sides keep.
    """

    def __init__(self, secret: bytes, challenge: Challenge, hello: Hello, *, server: bool) -> None:
        transcript = hashlib.sha256(encode(challenge) + encode(attrs.evolve(hello, auth=b""))).digest()
        keys = HKDF(
            algorithm=hashes.SHA256(),
            length=96,
            salt=challenge.nonce + hello.nonce,
            info=b"tent-ucx/3 session " + transcript,
        ).derive(secret)
        self.auth = hmac.new(keys[:32], b"hello", hashlib.sha256).digest()
        c2s, s2c = AESGCM(keys[32:64]), AESGCM(keys[64:])
        self._send, self._recv = (s2c, c2s) if server else (c2s, s2c)
        self._send_label, self._recv_label = (_SERVER, _CLIENT) if server else (_CLIENT, _SERVER)
        self._sent = 0
        self._received = 0

    @property
    def received(self) -> int:
        """Sealed messages opened so far."""
        return self._received

    def seal(self, msg: Message) -> Sealed:
        nonce = self._send_label + self._sent.to_bytes(8, "big")
        self._sent += 1
        return Sealed(box=self._send.encrypt(nonce, encode(msg), None))

    def open(self, msg: Message) -> Message:
        """The message inside ``msg``; ProtocolError for anything not sealed with the peer's key, in order."""
        if not isinstance(msg, Sealed):
            raise ProtocolError(f"a {type(msg).__name__} in the clear on an authenticated connection")
        nonce = self._recv_label + self._received.to_bytes(8, "big")
        try:
            data = self._recv.decrypt(nonce, msg.box, None)
        except InvalidTag:
            raise ProtocolError("a sealed message that does not authenticate (forged, replayed or reordered)") from None
        self._received += 1
        inner = decode(data)
        if isinstance(inner, Sealed):
            raise ProtocolError("a sealed message inside a sealed message")
        return inner


async def read_message(
    reader: asyncio.StreamReader,
    limit: float | None = None,
    max_frame: int = MAX_FRAME,
    session: Session | None = None,
) -> Message:
    """One framed message of at most ``max_frame`` bytes; ProtocolError if malformed or larger,
    PeerClosedError at end of stream.  ``limit``: seconds to wait for it.  With a
    ``session`` the message must be sealed with it, and the one inside is returned;
    the one exception is a ``REFUSED`` in the clear before anything sealed came (the
    peer refused the handshake), returned as it is."""

    async def _read() -> Message:
        try:
            header = await reader.readexactly(4)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ProtocolError("the connection ended inside a frame header") from None
            raise PeerClosedError("the peer closed the control connection") from None
        length = frame_length(header, max_frame)
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"the connection ended inside a frame ({len(exc.partial)} of {length} bytes)") from None
        msg = decode(body)
        if session is None:
            return msg
        if isinstance(msg, Refused) and session.received == 0:
            # The peer refused the handshake: it could not open our first sealed message (another
            # secret), so it cannot seal its answer.  A refusal, not a malformed message (review).
            return msg
        return session.open(msg)

    if limit is None:
        return await _read()
    return await asyncio.wait_for(_read(), limit)


MAX_WRITE_BUFFER = 4 << 20  # control bytes queued to a peer that does not read them before we give up on it
# A client's peer (peer.py) may be slow to read a burst of notifications: it is given up on when more
# than MAX_WRITE_BUFFER stays queued for BACKLOG_SECONDS, or at once past MAX_BACKLOG.
BACKLOG_SECONDS = 10.0
MAX_BACKLOG = 16 * MAX_WRITE_BUFFER


def write_message(writer: asyncio.StreamWriter, msg: Message, session: Session | None = None) -> None:
    """Queue one framed message (no await: control messages are small and rare); sealed with ``session``."""
    if writer.is_closing():
        raise PeerClosedError("the control connection is closed")
    writer.write(frame(msg if session is None else session.seal(msg)))


def forget_traceback(exc: BaseException) -> None:
    """Drop the frames a handled exception keeps alive, and with them the reference cycle.

    asyncio keeps a failed read's or write's exception in the task or stream that
    raised it, and its traceback holds the frames that hold that task or stream: a
    cycle only the cyclic garbage collector frees, at its own pace.  A pre-auth
    fuzzing run left about 5,500 such objects (sockets, transports, frames) alive
    for seconds after the attack (issue 11, resident memory after an attack).
    Called where the server has handled a peer's error and keeps nothing of it.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        cur.__traceback__ = None
        cur = cur.__cause__ or cur.__context__


async def close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, TimeoutError) as exc:
        forget_traceback(exc)
    except Exception:  # pragma: no cover - best effort
        logger.debug("closing a control connection failed", exc_info=True)
