"""What an engine's links and its server share: the :class:`Site` the backend passes them.

A :class:`~.peer.Peer` and its links, the :class:`~.server.Server` and the
serving half of :mod:`.scatter` need a few things of the engine they belong
to: its name and host id, the timeouts and limits it was configured with, its
counters and rate-limited log, the engine context to report to, its clock and
its local rails.  They used to reach them through the backend object
(``peer.backend.stats``), which made peer.py, server.py and backend.py import
each other.  The backend now builds one :class:`Site` when it starts and hands
it to each of them; backend.py imports them, nothing here imports backend.py.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs

from ..base import BackendContext
from .control import LogLimiter
from .protocol import RailAd
from .rails import LocalRail


@attrs.frozen(eq=False)
class Site:
    """The engine as its links and server see it, built once by the backend's ``start()``.

    An object holding exactly these, rather than a ``typing.Protocol`` that the
    backend satisfies: with a Protocol the backend itself would still be behind
    ``peer.site``, one cast away from everything else it holds, and what exists
    only after ``start()`` (the context, the engine name, the host id) would be
    a property that raises before.  Here everything is set when a link or the
    server can first see it, and the type says all they may use.  Frozen: the values
    do not change after start; ``stats`` and ``local_rails`` are the backend's
    own (shared, mutable) objects.  ``eq=False``: sites compare and hash by
    identity (a peer belongs to this engine only if its site *is* this one; the
    staging pool is keyed by it, scatter.staging_of).
    """

    ctx: BackendContext
    engine_name: str  # as peers know it
    host_id: str  # pairs shared-memory rails (rails.host_id, or the host_id= option)
    clock: Callable[[], float]  # the backend's clock (Backend.clock), the one post() stamps slices with
    stats: collections.Counter[str]  # the backend's counters (engine.backend.stats)
    log: LogLimiter  # lines peers can provoke, rate-limited
    local_rails: dict[str, LocalRail]  # our rails by name (the backend's dict)
    secret: bytes | None  # the shared secret (never sent)
    connect_timeout: float  # seconds for a peer to answer (links: LINK -> BOUND; look-ups)
    handshake_timeout: float  # seconds a connecting client has for HELLO
    withdraw_grace: float  # least seconds a withdrawn slice may take before its link is fenced
    inline_limit: int  # our inline limit (a peer's is the smaller of both)
    max_request: int  # largest slice a peer may ask us to serve
    cma: bool = True  # copy directly to and from peers on this host that prove it (cma.py)

    def rail_ads(self) -> tuple[RailAd, ...]:
        """Our rails with their UCX worker addresses (sent only in WELCOME, after authentication)."""
        return tuple(rail.plan.advert(rail.address) for rail in self.local_rails.values())
