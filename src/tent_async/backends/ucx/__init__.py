"""``backend="ucx"``: multi-rail transfers between engines over ucxx.

Importing this package does not import ucxx; the backend loads it when an
engine starts.  See ``docs/ucx.md`` for the architecture, wire protocol,
rail discovery and pairing, fencing guarantees and failure behaviour.
"""

from .backend import UcxBackend
from .peer import Peer
from .protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "Peer", "UcxBackend"]
