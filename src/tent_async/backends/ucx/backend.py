"""``backend="ucx"``: real transfers between engines over ucxx, one UCX context per rail.

The backend owns this host's local rails (:mod:`.rails`), serves peers that
connect to it (:mod:`.server`) and connects to peers (:mod:`.peer`).  The
planner sees one rail per (local rail, peer rail) pair, added when the peer
connects, and alone decides which rail carries which slice; UCX's own
multi-rail is off in every context.

Options (``tent.Engine(backend="ucx", ...)``):

``listen``
    ``"host:port"`` to accept peers on (port 0: any free port; read the real
    one from ``engine.address``).  Without it the engine only connects out.
``secret``
    A shared secret both engines must know (never sent).  With it, session keys are
    derived from the handshake and every control message after HELLO is encrypted
    and authenticated (control.py).
``connect_timeout``
    Seconds to wait for a peer that does not answer (default 5; a refused
    connection fails at once).
``withdraw_grace``
    Seconds a withdrawn slice may take to finish by itself before its rail's
    endpoint is closed to stop it (default 0.1).
``inline_limit``
    Slices up to this many bytes travel inside the header (default 16 KiB, at
    most 1 MiB).  A serving engine also accepts inline slices up to its own
    limit only, and sizes the receives it posts for headers by it; two
    engines use the smaller of their limits.
``max_request``
    Largest slice a peer may ask this engine to serve (default 1 GiB).
``host_id``
    Override the host identity used to pair shared-memory rails.
``delayed_submission``
    ucxx's delayed submission: requests posted by the progress thread instead
    of the caller (default False: posting from the event loop saves a thread
    wake-up per message; measured ~10-30 % lower 4 KiB round trips for raw
    ucxx and the engine alike, throughput unchanged within noise).  Only
    meaningful with ``progress="thread"``.
``cma``
    Copy slices directly between this process and a peer on the same host
    (Linux cross-memory attach, :mod:`.cma`), on shared-memory rails, once the
    peer proved it runs on this host as this user (default True).  One kernel
    copy per slice instead of UCX's copy into and out of its FIFO, and extent
    lists land in place instead of through staging.  False keeps every byte
    on UCX.
``progress``
    How each rail's UCX worker progresses (:mod:`.progress`): ``"loop"``
    (default: the worker's event fd on the event loop, no thread per
    completion), ``"poll"`` (the same, spinning briefly after activity) or
    ``"thread"`` (ucxx's progress and notifier threads, the original way).
    CUDA rails always use the thread.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio
import attrs

from ...core import Attempt, RailInfo, SchedulerConfig
from ...errors import (
    ConfigError,
    HandshakeError,
    PeerClosedError,
    PeerConnectError,
    ProtocolError,
    SegmentBusyError,
    SegmentError,
    UnregisteredSegmentError,
)
from ...rails import RailSpec
from ...segments import RemoteSegment, Segment, SegmentBase
from ...units import parse_duration, parse_size
from ..base import Backend, BackendContext
from . import _ucxx, cma
from .control import (
    LogLimiter,
    Session,
    advertised_host,
    close_writer,
    parse_address,
    read_message,
    secret_bytes,
    write_message,
)
from .pairing import pair_rails, standby_links
from .peer import Link, Peer, RailLinkError
from .progress import DEFAULT_PROGRESS, PROGRESS_MODES
from .protocol import (
    FREE_EXTENTS,
    MAX_EXTENTS,
    MAX_HELLO_FRAME,
    MAX_INLINE,
    MAX_WELCOME_FRAME,
    MIN_EXTENT_BYTES,
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Refused,
    Sealed,
    VersionMismatch,
    Welcome,
)
from .rails import LocalRail, RailPlan, host_id, resolve_plans
from .server import Server
from .site import Site

logger = logging.getLogger("tent_async.ucx")


class UcxBackend(Backend):
    """Rails over ucxx to peer engines in other processes or on other machines."""

    name: ClassVar[str] = "ucx"
    scatter_gather: ClassVar[bool] = True  # one header per slice with its extent list (scatter.py)
    posts_inline: ClassVar[bool] = True  # post() never reports before it returns (peer.py defers)
    remote_order: ClassVar[bool] = True  # direct copies pin the peer's pages per iovec (cma.py)

    def __init__(
        self,
        rails: Sequence[RailSpec] | None = None,
        *,
        listen: str | None = None,
        secret: str | bytes | None = None,
        connect_timeout: float | str = 5.0,
        handshake_timeout: float | str = 5.0,
        withdraw_grace: float | str = 0.1,
        inline_limit: int | str = 16 * 1024,
        max_request: int | str = 1 << 30,
        host_id: str | None = None,
        delayed_submission: bool = False,
        progress: str = DEFAULT_PROGRESS,
        cma: bool = True,
    ) -> None:
        self._specs = list(rails) if rails is not None else None
        self._listen = parse_address(listen, default_host="0.0.0.0") if listen is not None else None
        self.secret = secret_bytes(secret)
        self.connect_timeout = parse_duration(connect_timeout)
        self.handshake_timeout = parse_duration(handshake_timeout)
        self.withdraw_grace = parse_duration(withdraw_grace)
        self.inline_limit = parse_size(inline_limit)
        self.max_request = parse_size(max_request)
        if self.connect_timeout <= 0 or self.handshake_timeout <= 0 or self.withdraw_grace < 0:
            raise ConfigError("timeouts must be positive and withdraw_grace not negative")
        if not 0 <= self.inline_limit <= MAX_INLINE:
            raise ConfigError(f"inline_limit must be between 0 and {MAX_INLINE} bytes, got {self.inline_limit}")
        self._host_id_override = host_id
        self.host_id = host_id or ""
        self._delayed = delayed_submission
        if progress not in PROGRESS_MODES:
            raise ConfigError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {progress!r}")
        self.progress = progress
        if not isinstance(cma, bool):
            raise ConfigError(f"cma must be True or False, got {cma!r}")
        self.cma = cma
        self.stats: collections.Counter[str] = collections.Counter()
        self.log = LogLimiter()  # lines that peers can provoke, at most one per kind every 10 s
        self.plans: list[RailPlan] = []
        self.local_rails: dict[str, LocalRail] = {}
        self.peers: list[Peer] = []
        self._links: dict[str, Link] = {}
        self._reserved: set[str] = set()  # rail names picked by a connect() still wiring its links up
        self._server: Server | None = None
        self._address: str | None = None
        self._ctx: BackendContext | None = None
        self._site: Site | None = None

    # ============================================================ lifecycle

    @property
    def ctx(self) -> BackendContext:
        if self._ctx is None:
            raise RuntimeError("the ucx backend is not started")
        return self._ctx

    @property
    def engine_name(self) -> str:
        return self.ctx.engine_name

    @property
    def site(self) -> Site:
        """What this engine's peers, links and server share (site.py); built by ``start()``."""
        if self._site is None:
            raise RuntimeError("the ucx backend is not started")
        return self._site

    def counters(self) -> Mapping[str, int]:
        """``stats`` (docs/ucx.md, Counters), for telemetry and metrics."""
        return dict(self.stats)

    def rail_specs(self) -> Sequence[RailSpec]:
        return list(self._specs or [])

    def default_config(self) -> SchedulerConfig:
        """4 ms slices and three in flight per rail, instead of 1 ms and two.

        Every slice over UCX costs a header, a check on the peer and an ACK, each
        crossing a progress thread, a notifier thread and an event loop on both
        sides: 0.1-0.3 ms on a busy host.  With 1 ms slices and a window of two
        that overhead showed as ~15-50 % less throughput than raw ucxx on one
        rail (docs/benchmarks.md); 4 ms slices amortise it and a third slice in
        flight hides the round trip.  Failover is unaffected in kind: deadlines
        scale with the expected time of each slice.

        ``min_slice`` 256 KiB, not 64 KiB: a slice's size follows the learned
        bandwidth, and when the per-slice cost outgrows ``target_slice_time``
        (a loaded host: several ms per slice) that cost shows as a lower
        bandwidth, which cuts smaller slices, which cost more per byte: slices
        fell to the floor and stayed there.  KV batches over the veth testbed
        (800 + 200 Mbit/s), as recorded on a loaded host: with a 64 KiB floor
        0.29-0.86 of the links' rate (load average 2.2-4.0), 59-76 % on the
        fast rail, as low as ~50 % when both rails looked too slow for
        ``min_slice``; with 256 KiB 0.40-0.93 (load average 1.9-4.2), 58-80 %
        on the fast rail.  Runs collapsed at either floor: the floor bounds the
        loop, it does not remove it, and the figures depend on load
        (docs/benchmarks.md, "examples/pd_disagg.py over the veth testbed").
        """
        # 8: the peer's header slots
        return SchedulerConfig(target_slice_time=4e-3, window=3, max_window=8, min_slice=256 * 1024)

    def rail_infos(self) -> list[RailInfo]:
        """No rail before a peer connects: engine rails are (local rail, peer rail) pairs."""
        return []

    async def start(self, ctx: BackendContext) -> None:
        self._ctx = ctx
        try:
            await anyio.to_thread.run_sync(_ucxx.load)
        except ImportError as exc:
            raise ConfigError(f"backend 'ucx' is not available: {exc}") from exc
        self.plans = resolve_plans(self._specs)
        self.host_id = self._host_id_override or host_id()
        self._site = Site(
            ctx=ctx,
            engine_name=ctx.engine_name,
            host_id=self.host_id,
            clock=self.clock,
            stats=self.stats,
            log=self.log,
            local_rails=self.local_rails,
            secret=self.secret,
            connect_timeout=self.connect_timeout,
            handshake_timeout=self.handshake_timeout,
            withdraw_grace=self.withdraw_grace,
            inline_limit=self.inline_limit,
            max_request=self.max_request,
            cma=self.cma,
        )
        loop = asyncio.get_running_loop()
        try:
            for plan in self.plans:
                rail = self.local_rails[plan.name] = LocalRail(
                    plan, loop, delayed_submission=self._delayed, stats=self.stats, progress=self.progress
                )
                rail.progress.on_batch = ctx.flush  # a pass's completions settle in that pass
            if self._listen is not None:
                self._server = Server(self.site)
                host, port = self._listen
                try:
                    real_port = await self._server.start(host, port)
                except OSError as exc:  # unknown host, address not on this machine, port in use
                    raise ConfigError(
                        f"cannot listen on {host}:{port}: {exc.strerror or exc}; give an address of this "
                        "machine (or 0.0.0.0) and a free port (0 picks one)"
                    ) from exc
                self._address = f"{advertised_host(host, [p.ip for p in self.plans])}:{real_port}"
        except BaseException:
            await self.aclose()
            raise
        logger.info(
            "engine %r: ucx %s rails %s%s",
            ctx.engine_name,
            _ucxx.loaded().version,
            {name: rail.resources() for name, rail in self.local_rails.items()},
            f", listening on {self._address}" if self._address else "",
        )

    async def aclose(self) -> None:
        for peer in list(self.peers):
            await peer.close()
        if self._server is not None:
            await self._server.aclose()
        for rail in self.local_rails.values():
            rail.close()
        # Drop every reference to UCX objects, so that the workers and contexts (and their
        # descriptors and sockets) are released now, not when the engine object is.
        self.local_rails.clear()
        self.peers.clear()
        self._links.clear()
        self._reserved.clear()
        self._server = None

    @property
    def address(self) -> str | None:
        return self._address

    # ================================================================ peers

    async def connect(self, address: str, **options: Any) -> Peer:
        """Handshake with the engine listening at ``address`` and pair rails with it."""
        timeout = parse_duration(options.pop("timeout", self.connect_timeout))
        expect_name = options.pop("expect_name", None)
        if options:
            raise ConfigError(f"unknown connect options {sorted(options)}; supported: timeout=, expect_name=")
        if expect_name is not None and not isinstance(expect_name, str):
            raise ConfigError(f"expect_name must be the peer engine's name (a str), got {expect_name!r}")
        host, port = parse_address(address)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except ConnectionRefusedError:
            raise PeerConnectError(
                f"nothing listens at {address} (connection refused); start the peer engine with "
                f"listen='{host}:{port}' or check the address"
            ) from None
        except TimeoutError:
            raise PeerConnectError(f"no answer from {address} within {timeout:g} s; is the host reachable?") from None
        except OSError as exc:
            raise PeerConnectError(f"cannot connect to {address}: {exc}") from None
        try:
            welcome, session = await self._handshake(address, reader, writer, limit=timeout)
            # WELCOME is authenticated, but the session does not say which engine the client
            # meant to reach: a relay can forward the handshake to another engine that knows
            # the secret, or back to this one.  Refuse both when we can tell.
            if welcome.name == self.engine_name and welcome.host_id == self.host_id:
                raise HandshakeError(
                    f"{address} is this engine itself ({self.engine_name!r}); a relay may have sent the "
                    "connection back, or the address is this engine's own"
                )
            if expect_name is not None and welcome.name != expect_name:
                raise HandshakeError(
                    f"the engine at {address} is {welcome.name!r}, not {expect_name!r}: the address is wrong or "
                    "something between the hosts relays the connection to another engine"
                )
        except BaseException:
            await close_writer(writer)
            raise
        peer = Peer(self.site, address, welcome, reader, writer, session)
        # The control reader runs from now on: links are set up over it (LINK -> LINKED).
        self.ctx.spawn(self._run_peer, peer, name=f"tent-ucx-peer-{peer.name}")
        try:
            control = cma.endpoints(writer)
            if self.cma and welcome.cma and welcome.host_id == self.host_id and control is not None:
                await self._verify_cma(peer, welcome, control)
            return await self._link_peer(peer, address, welcome, timeout)
        except BaseException:
            await peer.close()
            raise

    async def _verify_cma(self, peer: Peer, welcome: Welcome, control: cma.Endpoints) -> None:
        """Prove to a peer on this host that we share it (cma.py); on success its slices copy directly.

        ``control``: our control connection to it, which the peer checks is the one it
        gave the token to."""
        try:
            peer.cma_pid = await cma.verify(welcome.cma, welcome.conn_id, welcome.cma_token, control)
        except cma.CmaError as exc:
            self.stats["cma_unverified"] += 1
            self.log.info("cma", "engine %r: no direct copies with %r: %s", self.engine_name, welcome.name, exc)
        else:
            logger.debug("engine %r: direct copies with %r (pid %d)", self.engine_name, welcome.name, peer.cma_pid)

    async def _link_peer(self, peer: Peer, address: str, welcome: Welcome, limit: float) -> Peer:
        same_host = welcome.host_id == self.host_id
        pairs = pair_rails(self.plans, [r for r in welcome.rails if r.address], same_host)
        if not pairs:
            await peer.close()
            raise PeerConnectError(
                f"no rail of this engine can reach peer {welcome.name!r} at {address}: ours "
                f"{[(p.name, p.kind, p.ip) for p in self.plans]}, theirs "
                f"{[(r.name, r.kind, r.ip) for r in welcome.rails]} (same host: {same_host}); "
                "give rails that share a subnet, or pair them explicitly with RailSpec(options={'pair': ...})"
            )
        links = []
        for pair in pairs:
            # Rail names are this engine's identity for a (peer connection, rail pair): two
            # peers with the same engine name, connected one after the other or at the same
            # time, get distinct rails ("decode-0/lo", "decode-0/lo#2").  A name is reserved
            # here, before the awaits below, so that a concurrent connect() cannot pick it too
            # (it did: the later link overwrote the earlier one and slices went to the wrong
            # peer, issue 11).
            name = pair.rail_name(peer.name)
            base, n = name, 2
            # Never reuse a name, even of a peer that closed: a transfer still queued for the
            # old peer's rail must not be posted to a new peer that took its name.
            while name in self._reserved or name in self._links:
                name, n = f"{base}#{n}", n + 1
            self._reserved.add(name)
            link = Link(peer, pair, self.local_rails[pair.local.name], name)
            peer.add_link(link)
            links.append(link)
        try:
            return await self._wire_links(peer, address, links, limit)
        finally:
            for link in links:
                self._reserved.discard(link.name)

    async def _wire_links(self, peer: Peer, address: str, links: list[Link], limit: float) -> Peer:
        # Set every link up now and wait until the peer answered its BIND: the first message
        # of a connection pays UCX's wire-up, which must not count against the first slice's
        # deadline.  A rail that cannot be wired up is left out rather than quarantined at
        # the first transfer.
        results = await asyncio.gather(
            *(asyncio.wait_for(link.open(), limit) for link in links), return_exceptions=True
        )
        wired = [link.pair for link, res in zip(links, results, strict=True) if not isinstance(res, BaseException)]
        standby = standby_links(wired, same_host=peer.host_id == self.host_id, discovered=self._specs is None)
        link_of = {link.pair.local.name: link.name for link in links}
        for link, result in zip(links, results, strict=True):
            if isinstance(result, BaseException):
                self.log.warning(
                    "unusable",
                    "engine %r: rail %s to %r is not usable: %s",
                    self.engine_name,
                    link.name,
                    peer.name,
                    result,
                )
                link.close(f"not usable: {result}", tell=True)
                continue
            peer.links[link.name] = link
            if link.name not in self._links:
                info = RailInfo(
                    name=link.name,
                    bandwidth=link.pair.bandwidth,
                    latency=link.pair.local.latency,
                    tier=link.pair.local.tier,
                    # The peer's bound on one header's work (protocol.extents_allowed).
                    extents_free=FREE_EXTENTS,
                    extent_bytes=MIN_EXTENT_BYTES,
                    extents_max=MAX_EXTENTS,
                    standby_for=link_of[standby[link.pair.local.name]] if link.pair.local.name in standby else "",
                )
                self.ctx.add_rail(info)
            self._links[link.name] = link
        if not peer.links:
            await peer.close()
            raise PeerConnectError(
                f"none of the rails paired with peer {peer.name!r} at {address} could be wired up: "
                + "; ".join(f"{link.name}: {result}" for link, result in zip(links, results, strict=True))
            )
        self.peers.append(peer)
        logger.info("engine %r connected to %r at %s: rails %s", self.engine_name, peer.name, address, peer.rails)
        return peer

    async def _run_peer(self, peer: Peer) -> None:
        try:
            await peer.run()
        finally:
            if peer in self.peers:
                self.peers.remove(peer)

    async def _handshake(
        self, address: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: float
    ) -> tuple[Welcome, Session | None]:
        timeout = limit
        try:
            challenge = await read_message(reader, limit=timeout, max_frame=MAX_HELLO_FRAME)
        except VersionMismatch as exc:
            write_message(writer, Refused(reason=str(exc)))
            raise HandshakeError(f"peer at {address}: {exc}") from None
        except TimeoutError:
            raise PeerConnectError(f"peer at {address} did not start the handshake within {timeout:g} s") from None
        except (ProtocolError, PeerClosedError) as exc:
            raise HandshakeError(f"{address} does not speak the tent_async ucx protocol: {exc}") from None
        if isinstance(challenge, Refused):
            raise HandshakeError(f"peer at {address} refused the connection: {challenge.reason}")
        if not isinstance(challenge, Challenge):
            raise HandshakeError(f"peer at {address} opened with {type(challenge).__name__}, not CHALLENGE")
        hello = Hello(
            version=PROTOCOL_VERSION,
            name=self.engine_name,
            host_id=self.host_id,
            rails=tuple(p.advert() for p in self.plans),  # no worker addresses before authentication
            nonce=os.urandom(NONCE_BYTES),
            auth=b"",
        )
        session = None
        if self.secret is not None:
            session = Session(self.secret, challenge, hello, server=False)
            hello = attrs.evolve(hello, auth=session.auth)
        write_message(writer, hello)
        try:
            reply = await read_message(reader, limit=timeout, max_frame=MAX_WELCOME_FRAME)
        except TimeoutError:
            raise PeerConnectError(f"peer at {address} did not answer HELLO within {timeout:g} s") from None
        except PeerClosedError:
            raise HandshakeError(f"peer at {address} closed the connection during the handshake") from None
        except ProtocolError as exc:
            raise HandshakeError(f"peer at {address} answered with a malformed message: {exc}") from None
        if isinstance(reply, Refused):
            raise HandshakeError(f"peer at {address} refused the handshake: {reply.reason}")
        if session is not None:
            # WELCOME comes sealed with the session key: only an engine that knows the secret
            # (and saw exactly our HELLO) can have sealed it.
            try:
                reply = session.open(reply)
            except ProtocolError:
                self.stats["handshake_refused"] += 1
                write_message(writer, Refused(reason="shared secret mismatch"))
                raise HandshakeError(
                    f"peer at {address} did not prove it knows the shared secret; pass the same secret= to both engines"
                ) from None
        elif isinstance(reply, Sealed):
            raise HandshakeError(f"peer at {address} uses a shared secret; pass the same secret= to this engine")
        if not isinstance(reply, Welcome):
            raise HandshakeError(f"peer at {address} answered HELLO with {type(reply).__name__}")
        return reply, session

    # ============================================================ segments

    def on_register(self, segment: Segment) -> None:
        if self._server is not None:
            self._server.register(segment)

    def on_unregister(self, segment: Segment) -> None:
        if self._server is None:
            return
        busy = self._server.segment_ops.get(segment.name, 0)
        if busy:
            raise SegmentBusyError(
                f"segment {segment.name!r} has {busy} slice(s) of peers in flight; retry once they finished "
                "(a READ's bytes still going to a peer that stopped reading keep it busy until that peer "
                "reads or disconnects, or this engine closes: UCX may still be sending from this memory)"
            )
        self._server.unregister(segment)

    def _peer_of(self, seg: SegmentBase) -> Peer:
        if not isinstance(seg, RemoteSegment) or not isinstance(seg.peer, Peer) or seg.peer.site is not self._site:
            raise UnregisteredSegmentError(
                f"{seg!r} is neither a segment of this engine nor of a peer it connected to; "
                "get remote segments from `await peer.segment(name)` of this engine's peers"
            )
        peer = seg.peer
        if peer.closed:
            raise PeerClosedError(peer.closed_reason())
        return peer

    def check_remote(self, segment: SegmentBase) -> None:
        self._peer_of(segment)

    def check_pair(self, src: SegmentBase, dst: SegmentBase) -> None:
        remote_src = isinstance(src, RemoteSegment)
        remote_dst = isinstance(dst, RemoteSegment)
        if remote_src == remote_dst:
            where = "two peer segments" if remote_src else "two local segments"
            raise SegmentError(
                f"the ucx backend moves bytes between this engine and a peer; {src!r} -> {dst!r} are {where}. "
                "Copy local memory with numpy (or backend='local'); ask the peer to move its own bytes"
            )

    def rails_for(self, src: SegmentBase, dst: SegmentBase) -> Sequence[str] | None:
        remote = src if isinstance(src, RemoteSegment) else dst
        local = dst if remote is src else src
        peer = self._peer_of(remote)
        cuda = local.kind.startswith("cuda") or remote.kind.startswith("cuda")
        if not cuda:
            return list(peer.links)
        names = [name for name, link in peer.links.items() if link.pair.local.kind == "cuda"]
        if not names:
            raise ConfigError(
                f"no CUDA rail reaches peer {peer.name!r}; GPU segments need rails with CUDA transports "
                "(RailSpec(device='cuda:N')) on both engines"
            )
        return names

    def send_notification(self, destinations: Sequence[SegmentBase], message: str) -> bool:
        peers = {id(seg.peer): seg.peer for seg in destinations if isinstance(seg, RemoteSegment)}
        if not peers:
            return False
        for peer in peers.values():
            if not isinstance(peer, Peer):
                continue
            try:
                peer.notify(message)
            except PeerClosedError:
                self.log.warning("notify-gone", "notification %r to %r dropped: the peer is gone", message, peer.name)
        return True

    # ========================================================= data movement

    def post(self, attempt: Attempt) -> None:
        link = self._links.get(attempt.rail_name)
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        if link is None:  # pragma: no cover - the planner only posts to rails we added
            loop.call_soon(ctx.fail, attempt.id, RailLinkError(f"unknown rail {attempt.rail_name!r}"))
            return
        if link.peer.closed:
            loop.call_soon(
                lambda: ctx.fail(attempt.id, PeerClosedError(link.peer.closed_reason()), transfer_fatal=True)
            )
            return
        remote = attempt.dst if isinstance(attempt.dst, RemoteSegment) else attempt.src
        if isinstance(remote, RemoteSegment) and remote.peer is not link.peer:  # pragma: no cover - defence
            error = RailLinkError(
                f"rail {link.name} leads to peer {link.peer.name!r}, not to the owner of {remote.name!r}; "
                "refusing to send its bytes there"
            )
            loop.call_soon(functools.partial(ctx.fail, attempt.id, error, transfer_fatal=True))
            return
        try:
            link.post(attempt, self.clock())
        except (RailLinkError, _ucxx.loaded().UCXError) as exc:
            link.ops.pop(attempt.id, None)
            err = (
                exc
                if isinstance(exc, RailLinkError)
                else RailLinkError(f"rail {link.name}: {_ucxx.describe_error(exc)}")
            )
            loop.call_soon(functools.partial(ctx.fail, attempt.id, err, rail_down=True))

    def withdraw(self, attempt: Attempt) -> None:
        link = self._links.get(attempt.rail_name)
        if link is None:  # pragma: no cover
            self.ctx.withdrawn(attempt.id)
            return
        link.withdraw(attempt)
