"""Every exception tent_async raises.

Errors are part of the API: each failure mode has its own class, and each
message says what to do about it.  All of them derive from :class:`TentError`,
and where a builtin exception describes the same thing (``IndexError`` for an
out-of-range view, ``TypeError`` for an object that is not a buffer) the class
derives from it too, so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Mapping


class TentError(Exception):
    """Base class of every error raised by tent_async."""


class ConfigError(TentError, ValueError):
    """A rail, policy, backend or engine option is invalid."""


class EngineClosedError(TentError, RuntimeError):
    """The engine is not running (never entered, or already closed)."""


# --------------------------------------------------------------------- segments


class SegmentError(TentError):
    """Base class for problems with registered memory."""


class UnsupportedBufferError(SegmentError, TypeError):
    """The object cannot be registered (no buffer protocol, DLPack or CUDA array interface,
    or not contiguous)."""


class DuplicateSegmentError(SegmentError, ValueError):
    """A segment with this name is already registered on the engine."""


class OutOfBoundsError(SegmentError, IndexError):
    """A view does not fit inside its segment."""


class UnregisteredSegmentError(SegmentError):
    """The segment was unregistered, belongs to another engine, or its engine is closed."""


class SegmentBusyError(SegmentError):
    """The segment still has transfers in flight."""


class ReadOnlySegmentError(SegmentError, PermissionError):
    """A transfer would write into a segment registered with permission ``"r"``."""


# -------------------------------------------------------------------- transfers


class TransferError(TentError):
    """Base class for a transfer that could not be started or did not complete."""


class LengthMismatchError(TransferError, ValueError):
    """Source and destination views have different lengths."""


class NoRailError(TransferError):
    """No usable rail can carry this transfer (none configured for the pair, or all failed)."""

    def __init__(self, message: str, rail_errors: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.rail_errors: dict[str, str] = dict(rail_errors or {})


class TransferFailedError(TransferError):
    """Slices of the transfer failed on every rail they were allowed to try.

    ``rail_errors`` maps each rail name to the last error seen on it.
    """

    def __init__(self, message: str, rail_errors: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.rail_errors: dict[str, str] = dict(rail_errors or {})


class TransferCancelledError(TransferError):
    """The transfer was cancelled through :meth:`TransferHandle.cancel`.

    Cancellation of the *caller's* task or scope raises the framework's own
    cancellation exception instead; this one is for a handle cancelled by
    someone else while you await it.
    """


class RemoteAccessError(TransferError):
    """The peer refused a slice: unknown segment, permission or bounds violation."""


class RemoteBusyError(RemoteAccessError):
    """The peer refused a slice for want of resources (staging), not for the slice itself.

    The engine retries such a slice (on the same rail after its back-off, or on another)
    without spending its retry bound; a transfer refused as busy for ``busy_wait`` without
    progress fails with this error.
    """


class OverlappingViewsError(TransferError, ValueError):
    """A destination overlaps another destination or a source of the same transfer."""


# ------------------------------------------------------------------------ peers


class PeerError(TentError):
    """Base class for problems talking to a peer engine (ucx backend)."""


class PeerConnectError(PeerError, ConnectionError):
    """The peer could not be reached: nothing listens there, or it did not answer in time."""


class HandshakeError(PeerError):
    """The handshake was refused: protocol version or shared secret mismatch."""


class ProtocolError(PeerError):
    """A peer sent a malformed, truncated or unexpected message."""


class PeerClosedError(PeerError):
    """The peer closed the connection (or its process ended)."""
