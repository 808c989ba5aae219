"""The control connection: framing over asyncio streams, the handshake's MACs, addresses.

Control traffic (handshake, catalogue look-ups, notifications) goes over a
plain TCP connection to the engine's ``listen`` address, not over UCX: a
refused connection is reported at once by the kernel (so connecting to
nothing fails fast), a dead peer shows up as end-of-stream, and the
request/response pattern of a handshake is natural on a stream.

The optional shared secret is never sent.  Each side proves it knows it with
an HMAC-SHA256 over both sides' fresh nonces (and the names and connection id
they agree on), so a recorded handshake cannot be replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket

from ...errors import ConfigError, PeerClosedError, ProtocolError
from .protocol import MAX_FRAME, Message, decode, frame, frame_length

logger = logging.getLogger("tent_async.ucx")


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


def mac(secret: bytes, label: bytes, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 of ``label`` and ``parts``, each length-prefixed so no two inputs collide."""
    h = hmac.new(secret, label, hashlib.sha256)
    for part in parts:
        if isinstance(part, int):
            data = part.to_bytes(8, "big")
        elif isinstance(part, str):
            data = part.encode()
        else:
            data = part
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.digest()


def macs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


async def read_message(reader: asyncio.StreamReader, limit: float | None = None, max_frame: int = MAX_FRAME) -> Message:
    """One framed message of at most ``max_frame`` bytes; ProtocolError if malformed or larger,
    PeerClosedError at end of stream.  ``limit``: seconds to wait for it."""

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
        return decode(body)

    if limit is None:
        return await _read()
    return await asyncio.wait_for(_read(), limit)


def write_message(writer: asyncio.StreamWriter, msg: Message) -> None:
    """Queue one framed message (no await: control messages are small and rare)."""
    if writer.is_closing():
        raise PeerClosedError("the control connection is closed")
    writer.write(frame(msg))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, TimeoutError):
        pass
    except Exception:  # pragma: no cover - best effort
        logger.debug("closing a control connection failed", exc_info=True)
