"""tent_async: declarative, multi-rail slice spraying for asyncio.

Say what to move and where; the engine slices it and sends each slice down the
rail expected to finish it first, rerouting around failed or slow rails::

    async with tent.Engine(backend="local", rails=[...], policy="eft") as engine:
        a = engine.register(src, name="kv-src")
        b = engine.register(dst, name="kv-dst")
        result = await engine.transfer(a[0:n], b[0:n])
"""

import logging as _logging
from typing import TYPE_CHECKING, Any

from .core import EventKind, Health, RailEvent, SchedulerConfig
from .engine import (
    Engine,
    EventSubscription,
    Notification,
    TransferHandle,
    TransferResult,
    TransferStatus,
)
from .errors import (
    ConfigError,
    DuplicateSegmentError,
    EngineClosedError,
    HandshakeError,
    LengthMismatchError,
    NoRailError,
    OutOfBoundsError,
    OverlappingViewsError,
    PeerClosedError,
    PeerConnectError,
    PeerError,
    ProtocolError,
    ReadOnlySegmentError,
    RemoteAccessError,
    RemoteBusyError,
    SegmentBusyError,
    SegmentError,
    TentError,
    TransferCancelledError,
    TransferError,
    TransferFailedError,
    UnregisteredSegmentError,
    UnsupportedBufferError,
)
from .rails import RailSpec, Tier
from .segments import RemoteSegment, Segment, SegmentBase, View
from .telemetry import RailTelemetry, Telemetry
from .units import parse_bandwidth, parse_duration, parse_size

if TYPE_CHECKING:
    from .backends.ucx.peer import Peer

__version__ = "0.1.0"

# A library does not configure logging; without this, rail events at WARNING
# would reach stderr through logging's last-resort handler.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def __getattr__(name: str) -> Any:
    # ``tent.Peer`` is the ucx backend's class; importing it pulls in the whole
    # backend and msgpack, so it is loaded on first use, not at ``import tent_async``.
    if name == "Peer":
        from .backends.ucx.peer import Peer

        globals()["Peer"] = Peer
        return Peer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DuplicateSegmentError",
    "Engine",
    "EngineClosedError",
    "EventKind",
    "EventSubscription",
    "HandshakeError",
    "Health",
    "LengthMismatchError",
    "NoRailError",
    "Notification",
    "OutOfBoundsError",
    "OverlappingViewsError",
    "Peer",
    "PeerClosedError",
    "PeerConnectError",
    "PeerError",
    "ProtocolError",
    "RailEvent",
    "RailSpec",
    "RailTelemetry",
    "ReadOnlySegmentError",
    "RemoteAccessError",
    "RemoteBusyError",
    "RemoteSegment",
    "SchedulerConfig",
    "Segment",
    "SegmentBase",
    "SegmentBusyError",
    "SegmentError",
    "Telemetry",
    "TentError",
    "Tier",
    "TransferCancelledError",
    "TransferError",
    "TransferFailedError",
    "TransferHandle",
    "TransferResult",
    "TransferStatus",
    "UnregisteredSegmentError",
    "UnsupportedBufferError",
    "View",
    "__version__",
    "parse_bandwidth",
    "parse_duration",
    "parse_size",
]
