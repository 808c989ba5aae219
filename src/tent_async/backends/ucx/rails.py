"""Local rails: what this host can send over, and one UCX context per rail.

A *local rail* is one device: a NIC (UCX's ``tcp`` transport pinned with
``NET_DEVICES``), shared memory for peers on the same host, or a GPU (CUDA
transports).  Each gets its own UCX context (tagged messages only: no active
messages, no streams), worker, progress (on the event loop by default,
:mod:`.progress`) and unexpected-message sweeper, with UCX's own multi-rail off
(``MAX_RNDV_RAILS=1``): the planner alone decides which rail carries which
slice.  An *engine rail* is a local rail paired with a peer's rail in the
handshake (:mod:`.pairing`).

There is no UCX listener: peers learn a rail's UCX worker address only over
the authenticated control connection and open endpoints to it
(:meth:`LocalRail.connect`).  Whatever still reaches the worker without
having been told an address (see docs/ucx.md, "Threat model") can only leave
tagged messages that no receive expects; the sweeper (:meth:`LocalRail.sweep`)
takes them out of UCX's unexpected queue and drops them unread.

Discovery (``rails=None``): every interface that is up and has an IPv4
address (link speed from the OS through psutil), a shared-memory rail, and
one rail per GPU that NVML reports when nvidia-ml-py is installed.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

from ...core import standby_error
from ...errors import ConfigError
from ...rails import RailSpec, Tier
from . import _ucxx
from .address import check_peer_address
from .progress import DEFAULT_PROGRESS, Progress, make_progress
from .protocol import MAX_NAMESPACE, RailAd, split_tag

logger = logging.getLogger("tent_async.ucx")

SHM_DEVICE = "shm"
LOOPBACK_IP = "127.0.0.1"

# Starting hints only: telemetry replaces them after the first slices.
DEFAULT_NIC_BANDWIDTH = 1.25e9  # a NIC whose speed the OS does not know (veth, virtio): 10 Gbit/s
DEFAULT_LOOPBACK_BANDWIDTH = 1.5e9  # UCX tcp over lo (measured here: ~1.3-1.7 GB/s)
DEFAULT_SHM_BANDWIDTH = 8e9  # UCX posix shm (measured here: 7-15 GB/s)
DEFAULT_CUDA_BANDWIDTH = 20e9
LATENCY = {"tcp": 50e-6, "shm": 10e-6, "cuda": 20e-6}

_PAIR_OPTION = "pair"  # RailSpec.options key (not a UCX setting): pair with the peer's rail of this name
_STANDBY_OPTION = "standby_for"  # RailSpec.options key (not a UCX setting): carry only while this rail cannot
_RAIL_NAME = re.compile(r"[^A-Za-z0-9_.:\-]")

SWEEP_INTERVAL = 0.01  # seconds between looks into UCX's unexpected-message queue
SWEEP_BUSY = 0.001  # ... while it keeps finding something
SWEEP_BUDGET = 256  # messages taken out per look (keeps the event loop responsive)
MAX_DISCARDS = 4096  # discarding receives in flight per rail; beyond that the sweeper waits
LOG_EVERY = 10.0  # seconds between warnings about dropped unexpected messages


@attrs.frozen
class RailPlan:
    """A local rail before it is opened: device, addresses, UCX settings."""

    name: str
    kind: str  # tcp | shm | cuda
    device: str  # interface name, "shm" or "cuda:N"
    ip: str  # IPv4 address peers dial for this rail
    prefix: int  # subnet prefix length of ``ip``
    bandwidth: float
    latency: float
    tier: int
    ucx_config: Mapping[str, str]
    gpu: int | None = None
    pair: str | None = None  # explicit pairing: the peer's rail name
    standby_for: str | None = None  # a local rail whose capacity this one shares (pairing.standby_links)

    @property
    def loopback(self) -> bool:
        return self.ip.startswith("127.")

    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.prefix}", strict=False)

    def advert(self, address: bytes = b"") -> RailAd:
        return RailAd(
            name=self.name,
            kind=self.kind,
            device=self.device,
            ip=self.ip,
            bandwidth=self.bandwidth,
            prefix=self.prefix,
            address=address,
        )


# ================================================================== discovery


def host_id() -> str:
    """Same value ⇔ same machine, boot and network namespace ⇔ 127.0.0.1 and shm reach each other.

    The network namespace matters: two engines in different namespaces of one
    machine (the veth testbed) cannot reach each other's loopback listeners.
    """
    parts = []
    for path in ("/etc/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(path) as fh:
                parts.append(fh.read().strip())
        except OSError:
            parts.append(socket.gethostname())
    try:
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    except OSError:
        parts.append("no-netns")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _interfaces() -> dict[str, tuple[str, int, bool, float]]:
    """name -> (IPv4 address, prefix length, is up, speed in bytes/s or 0) for interfaces with IPv4."""
    import psutil

    addrs = psutil.net_if_addrs()
    stats = psutil.net_if_stats()
    out: dict[str, tuple[str, int, bool, float]] = {}
    for name, entries in addrs.items():
        for entry in entries:
            if entry.family != socket.AF_INET or not entry.address:
                continue
            try:
                prefix = ipaddress.IPv4Network(f"0.0.0.0/{entry.netmask or '255.255.255.255'}").prefixlen
            except ValueError:
                prefix = 32
            st = stats.get(name)
            up = bool(st.isup) if st is not None else False
            speed = float(st.speed) * 1e6 / 8 if st is not None and st.speed and st.speed > 0 else 0.0
            out[name] = (entry.address, prefix, up, speed)
            break
    return out


def _gpu_count() -> int:
    """GPUs NVML reports, or 0 without nvidia-ml-py, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return 0


def _rail_name(text: str) -> str:
    return _RAIL_NAME.sub("_", text) or "rail"


def _config(base: Mapping[str, str], options: Mapping[str, str]) -> dict[str, str]:
    config = dict(base)
    for key, value in options.items():
        if key in (_PAIR_OPTION, _STANDBY_OPTION):
            continue
        config[key[4:] if key.upper().startswith("UCX_") else key] = str(value)
    return config


# UCX keeps an unexpected eager message in a receive descriptor from size-bucketed pools
# (UCX_RX_MPOOL_SIZES, default "64,1K") that grow to the largest backlog and are never shrunk
# until the worker closes.  With the default buckets every small message (64 bytes of payload
# plus UCX's header) took a 1 KiB descriptor: a two-sender flood left 86 MiB of pools behind.
# Finer buckets make a backlog cost about what its messages weigh (16 MiB in the same run).
RX_MPOOL_SIZES = "64,128,256,512,1K"


def tcp_config(device: str) -> dict[str, str]:
    # TCP_CONN_NB: UCX's tcp transport connects with a *blocking* connect() by
    # default, on the worker's progress thread, while ucxx's endpoint creation
    # waits for it on the event loop.  To a peer whose link is down that is a
    # SYN timeout (minutes): the event loop stood still and every other rail
    # missed its deadlines (found by the link-down test).  Non-blocking connects
    # return at once; a connection that never completes is caught by the link
    # timeout and the slices' deadlines like any other dead rail.
    return {
        "TLS": "tcp",
        "NET_DEVICES": device,
        "MAX_RNDV_RAILS": "1",
        "TCP_CONN_NB": "y",
        "RX_MPOOL_SIZES": RX_MPOOL_SIZES,
    }


def shm_config() -> dict[str, str]:
    # Endpoints are opened from worker addresses (no listener), so shared memory
    # needs no tcp lane for wire-up and the rail opens no network port at all.
    # Endpoints use error handling, which drops shared memory unless
    # POSIX_ERROR_HANDLING=y (verified by experiment).
    return {"TLS": "posix,self", "POSIX_ERROR_HANDLING": "y", "MAX_RNDV_RAILS": "1", "RX_MPOOL_SIZES": RX_MPOOL_SIZES}


def cuda_config() -> dict[str, str]:
    config = shm_config()
    config["TLS"] = "cuda_copy,cuda_ipc,posix,self"
    return config


def plan_from_spec(spec: RailSpec, interfaces: Mapping[str, tuple[str, int, bool, float]] | None = None) -> RailPlan:
    """A rail plan from an explicit :class:`RailSpec` (``device``: interface, ``"shm"`` or ``"cuda:N"``)."""
    if spec.backend not in (None, "ucx"):
        raise ConfigError(f"rail {spec.name!r} asks for backend {spec.backend!r}, but this is 'ucx'")
    device = spec.device or spec.name
    pair = spec.options.get(_PAIR_OPTION)
    tier = int(spec.tier)
    if device == SHM_DEVICE:
        return RailPlan(
            name=spec.name,
            kind="shm",
            device=SHM_DEVICE,
            ip=LOOPBACK_IP,
            prefix=8,
            bandwidth=spec.bandwidth or DEFAULT_SHM_BANDWIDTH,
            latency=spec.latency,
            tier=tier,
            ucx_config=_config(shm_config(), spec.options),
            pair=pair,
            standby_for=spec.options.get(_STANDBY_OPTION),
        )
    if device.startswith("cuda:"):
        index = device[5:]
        if not index.isdigit():
            raise ConfigError(f"rail {spec.name!r}: device {device!r} should be 'cuda:N' with N a GPU index")
        return RailPlan(
            name=spec.name,
            kind="cuda",
            device=device,
            ip=LOOPBACK_IP,
            prefix=8,
            bandwidth=spec.bandwidth or DEFAULT_CUDA_BANDWIDTH,
            latency=spec.latency,
            tier=tier,
            ucx_config=_config(cuda_config(), spec.options),
            gpu=int(index),
            pair=pair,
            standby_for=spec.options.get(_STANDBY_OPTION),
        )
    interfaces = _interfaces() if interfaces is None else interfaces
    found = interfaces.get(device)
    if found is None:
        known = sorted(interfaces)
        raise ConfigError(
            f"rail {spec.name!r}: network interface {device!r} has no IPv4 address here (interfaces with "
            f"IPv4: {known}); give device='shm', 'cuda:N' or one of those"
        )
    ip, prefix, _up, speed = found
    default = DEFAULT_LOOPBACK_BANDWIDTH if ip.startswith("127.") else (speed or DEFAULT_NIC_BANDWIDTH)
    return RailPlan(
        name=spec.name,
        kind="tcp",
        device=device,
        ip=ip,
        prefix=prefix,
        bandwidth=spec.bandwidth or default,
        latency=spec.latency,
        tier=tier,
        ucx_config=_config(tcp_config(device), spec.options),
        pair=pair,
        standby_for=spec.options.get(_STANDBY_OPTION),
    )


def discover() -> list[RailPlan]:
    """This host's rails: shared memory, every IPv4 interface that is up, and every GPU."""
    plans = [plan_from_spec(RailSpec(name="shm", device=SHM_DEVICE, latency=LATENCY["shm"]))]
    interfaces = _interfaces()
    for name, (_ip, _prefix, up, _speed) in sorted(interfaces.items()):
        if not up:
            continue
        plans.append(plan_from_spec(RailSpec(name=_rail_name(name), device=name, latency=LATENCY["tcp"]), interfaces))
    for gpu in range(_gpu_count()):
        plans.append(
            plan_from_spec(RailSpec(name=f"cuda{gpu}", device=f"cuda:{gpu}", latency=LATENCY["cuda"]), interfaces)
        )
    return plans


def plans_from_specs(specs: Sequence[RailSpec]) -> list[RailPlan]:
    interfaces = None
    plans = []
    for spec in specs:
        if interfaces is None and spec.device not in (SHM_DEVICE,) and not (spec.device or "").startswith("cuda:"):
            interfaces = _interfaces()
        plans.append(plan_from_spec(spec, interfaces))
    if not plans:
        raise ConfigError("the ucx backend needs at least one rail; pass rails=None to discover them")
    problem = standby_error(plans)
    if problem:
        raise ConfigError(f"options['{_STANDBY_OPTION}']: {problem}")
    return plans


# ==================================================================== runtime

# An unexpected message's handle (``ucp_tag_message_h``) is UCX's receive descriptor,
# ``ucp_recv_desc_t``: in UCX 1.21 a 32-byte union of list links, then ``uint32 length``
# (bytes in this descriptor), ``uint32 payload_offset`` and ``uint16 flags``.  An eager
# message holds its bytes in UCX's memory until it is received; a rendezvous one holds
# only its request-to-send (about 50 bytes here), the bytes wait at the sender.  The
# layout is private to UCX, so it is read only for the release it was checked against
# (``test_limits.py`` sends both kinds and checks the figures); elsewhere every message
# counts with its whole length, as before.
_RDESC_LAYOUT = {(1, 21): (32, 40, 0x02, 0x40)}  # (length offset, flags offset, EAGER, RNDV)
_RNDV_HEADER_MAX = 4096  # a rendezvous descriptor longer than this is not believed


def held_bytes(probe: Any) -> int:
    """Bytes UCX keeps in memory for the unexpected message ``probe`` until it is received.

    The whole message for an eager one; the rendezvous request alone (tens of bytes) for
    a rendezvous one.  Counted at its full length where the descriptor layout is unknown.
    """
    length = int(probe.length)
    layout = _RDESC_LAYOUT.get(_ucx_release())
    handle = probe.handle
    if layout is None or not handle:
        return length
    length_at, flags_at, eager, rndv = layout
    flags = ctypes.c_uint16.from_address(int(handle) + flags_at).value
    if flags & rndv and not flags & eager:
        held = ctypes.c_uint32.from_address(int(handle) + length_at).value
        if 0 < held <= _RNDV_HEADER_MAX:
            return min(length, held)
    return length


def _ucx_release() -> tuple[int, int]:
    major, minor, *_ = (int(x) for x in _ucxx.loaded().version.split("."))
    return major, minor


TRIM_DELAY = 1.0  # seconds after a large release before the heap's free pages go back to the OS
TRIM_AFTER_DROPPED = 1024  # unexpected messages dropped in one busy period that make it large


def _libc_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _libc_malloc_trim()


class HeapTrimmer:
    """Gives the C heap's free pages back to the OS a second after something large was released.

    After an attack ends (25,000 endpoints opened and closed, a flood of unexpected
    messages, a connection dropped with its early WRITE bytes) the memory UCX and
    ucxx freed stays in glibc's heap: free, but resident (the security run measured
    +24 MiB after the LINK phase with only 1.8 MiB more in use).  ``malloc_trim(0)``
    returns those pages; it runs in a thread, at most once per ``TRIM_DELAY``, and
    only where glibc provides it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending = False
        self.trims = 0

    def soon(self) -> None:
        if self._pending or _MALLOC_TRIM is None or self.loop.is_closed():
            return
        self._pending = True
        self.loop.call_later(TRIM_DELAY, self._start)

    def _start(self) -> None:
        try:
            future = self.loop.run_in_executor(None, _MALLOC_TRIM, 0)
        except RuntimeError:  # the loop's executor is shutting down
            self._pending = False
            return
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._pending = False
        if not future.cancelled() and future.exception() is None:
            self.trims += 1


class NamespaceOwner(Protocol):
    """What owns a tag namespace on a rail: one direction of one link."""

    def on_unexpected(self, probe: Any, kind: int, index: int, length: int) -> bool:
        """A message in this namespace that no receive expected; True if the owner took ``probe``."""
        ...


class LocalRail:
    """One UCX context + worker + its progress (:mod:`.progress`) + unexpected-message sweeper.

    Create it on the event loop thread.  UCX callbacks (an endpoint failing)
    run wherever the worker progresses (the loop thread, or the progress
    thread in ``"thread"`` mode); they only hand work to the loop with
    ``call_soon_threadsafe``.
    """

    def __init__(
        self,
        plan: RailPlan,
        loop: asyncio.AbstractEventLoop,
        *,
        delayed_submission: bool = False,
        stats: Any = None,
        sweep: bool = True,
        progress: str = DEFAULT_PROGRESS,
    ) -> None:
        """``sweep=False`` leaves UCX's unexpected queue alone (raw ucxx in the benchmark, which
        relies on messages that arrive before their receive was posted).  ``progress``: how the
        worker progresses (:mod:`.progress`; CUDA rails always use the progress thread)."""
        ucx = _ucxx.loaded()
        L = ucx.L
        self.plan = plan
        self.name = plan.name
        self.loop = loop
        self.stats = stats  # the backend's counters (``unexpected_dropped``), or None
        self.delayed = delayed_submission  # the progress thread submits requests (ordering, peer.py)
        self.channels: set[Any] = set()  # open Channels (closed with the rail)
        self.parked = 0  # closed channels whose endpoint waits past LINGER_MAX for a send to finish (channel.py)
        self.parked_by: collections.Counter[Any] = collections.Counter()  # ... per park key (peer, source address)
        self.owners: dict[int, NamespaceOwner] = {}  # tag namespace -> who receives in it
        # Receives that drop messages, oldest first; pruned by the sweeper, not by a done-callback
        # each (one loop callback per dropped message less, which matters in a flood).
        self._discards: collections.deque[Any] = collections.deque()
        self._scratch = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._dropped = 0  # unexpected messages dropped since the last warning
        self._dropped_bytes = 0
        self._warned_at = -LOG_EVERY
        self.trimmer = HeapTrimmer(loop)
        self._dropped_since_trim = 0  # unexpected messages dropped in this busy period
        # Tagged messages only: with active messages, ucxx allocates every incoming one
        # (any size, from anyone holding an endpoint) before we could look at it, and
        # UCX buffers unrequested stream data the same way.
        features = (L.Feature.TAG, L.Feature.WAKEUP)
        try:
            self.context: Any = L.UCXContext(dict(plan.ucx_config), feature_flags=features)
        except ucx.UCXError as exc:
            raise ConfigError(
                f"rail {plan.name!r}: UCX cannot open {plan.device!r} with {dict(plan.ucx_config)}: "
                f"{_ucxx.describe_error(exc)} (is the device up? for RDMA see docs/ucx.md)"
            ) from exc
        self.worker: Any = L.UCXWorker(
            self.context, enable_delayed_submission=delayed_submission, enable_python_future=True
        )
        self.progress: Progress = make_progress(progress, self.worker, loop, plan.name, kind=plan.kind, gpu=plan.gpu)
        self.address: bytes = bytes(self.worker.address.tobytes())
        self._scratch = np.empty(1, dtype=np.uint8)  # dropped messages are "received" into this byte
        self._scratch_array = _ucxx.loaded().Array(self._scratch)
        self._any_tag = (L.UCXXTag(0), L.UCXXTagMask(0))  # a probe for any message
        self.progress.intake = self.drain if sweep else None
        if sweep:
            self._sweep_handle = loop.call_later(SWEEP_INTERVAL, self.sweep)

    def resources(self) -> list[str]:
        """Transports and devices this context really opened, e.g. ``['tcp/eth0']``."""
        out = []
        for line in self.context.info.splitlines():
            if "resource" in line:
                out.append(line.split("flags")[-1].strip().lstrip("-").strip())
        return out

    def connect(self, address: bytes, control_ip: str | None = None) -> Any:
        """A new endpoint to the peer worker at ``address`` (returns at once; wire-up happens on progress).

        ``address`` came from a peer: it is checked first (:mod:`.address`), because UCX
        unpacks it without knowing its length and a malformed one can crash the process.
        Raises :class:`~.address.AddressError` (a ProtocolError) for one that fails.
        A TCP address must point into this rail's subnet or at ``control_ip``, the
        remote address of the peer's control connection (not what the peer advertised).
        """
        check_peer_address(address, self.address, kind=self.plan.kind, allowed=self.allowed_networks(control_ip))
        L = _ucxx.loaded().L
        ep = self.worker.create_endpoint_from_worker_address(L.UCXAddress.create_from_buffer(address), True)
        self.progress.kick()  # wire-up happens on progress
        return ep

    def allowed_networks(self, control_ip: str | None) -> list[ipaddress.IPv4Network]:
        """Where a peer's TCP worker address may point: our subnet, and its control connection's address."""
        nets = [self.plan.subnet()]
        if control_ip:
            try:
                ip = ipaddress.ip_address(control_ip)
            except ValueError:
                ip = None
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if isinstance(ip, ipaddress.IPv4Address):
                nets.append(ipaddress.IPv4Network(ip))
        return nets

    # ------------------------------------------------------------ namespaces

    def claim_namespace(self, owner: NamespaceOwner) -> int:
        """A fresh random tag namespace for ``owner`` (unguessable: 40 random bits)."""
        while True:
            ns = secrets.randbits(MAX_NAMESPACE.bit_length())
            if ns and ns not in self.owners:
                self.owners[ns] = owner
                return ns

    def release_namespace(self, ns: int) -> None:
        """Messages that still arrive in ``ns`` are dropped by the sweeper from now on."""
        self.owners.pop(ns, None)

    # ---------------------------------------------------------------- sweeper

    def sweep(self) -> int:
        """The sweeper's timer: take unexpected messages out of UCX's queue (:meth:`take`), then look again later.

        In the loop progress modes the progress pass drains the queue itself
        (:meth:`drain`) after every call that took something from the wire; the
        timer catches what arrives through the progress thread (CUDA rails) and
        what an owner left for later.  Returns how many were found.
        """
        self._sweep_handle = None
        found = self.take(SWEEP_BUDGET)
        if self.worker is not None and not self.loop.is_closed():
            self._sweep_handle = self.loop.call_later(SWEEP_BUSY if found else SWEEP_INTERVAL, self.sweep)
        return found

    def drain(self) -> bool:
        """The progress pass's gate: empty UCX's unexpected queue; False if it is not empty yet.

        Every message UCX takes off a socket and no receive expects waits in its
        unexpected queue, in a descriptor from pools that never shrink until the
        worker closes.  A flood (any host that reaches the rail's port can send
        one) would grow them as far as the intake outruns the sweeper, so the
        pass takes nothing more from the wire while this returns False: the rest
        of the flood waits in the kernel's socket buffers, and TCP slows the
        sender.  Honest peers on this rail slow down with it, but go on.
        """
        return self.take(SWEEP_BUDGET) < SWEEP_BUDGET

    def take(self, budget: int) -> int:
        """Take up to ``budget`` unexpected messages out of UCX's queue: their owner's, or dropped unread.

        A message is *unexpected* when no posted receive matched it.  Every
        message of our own protocol has its receive posted before it is sent,
        except a WRITE's bulk bytes overtaking their header (the owner keeps
        those); anything else is foreign or a protocol violation.  UCX keeps an
        unexpected eager message in memory until it is matched, so they are
        matched here (``tag_probe`` + a receive into one scratch byte: UCX
        reports truncation and frees the message).  Returns how many were found;
        fewer than ``budget`` means the queue is empty (or the discarding
        receives in flight reached ``MAX_DISCARDS``).
        """
        found = 0
        worker = self.worker
        if worker is None:
            return 0
        discards = self._discards
        while discards and discards[0].future.done():
            _ucxx.future_error(discards.popleft().future)  # truncation expected; mark it retrieved
        if len(discards) >= MAX_DISCARDS // 2:  # one that does not finish must not hold up the rest
            pending: collections.deque[Any] = collections.deque()
            for req in discards:
                if req.future.done():
                    _ucxx.future_error(req.future)
                else:
                    pending.append(req)
            while len(pending) >= MAX_DISCARDS:  # stuck ones (a fragment that never came): drop the oldest;
                pending.popleft()  # dropping its last reference cancels the receive (ucxx)
                if self.stats is not None:
                    self.stats["discards_pruned"] += 1
            self._discards = discards = pending
        tag, mask = self._any_tag
        while found < budget and len(discards) < MAX_DISCARDS:
            try:
                probe = worker.tag_probe(tag, mask, remove=True)
            except Exception:  # pragma: no cover - a worker being torn down
                logger.debug("rail %s: tag_probe failed", self.name, exc_info=True)
                break
            if not probe.matched:
                break
            found += 1
            ns, kind, index = split_tag(int(probe.sender_tag.value))
            length = int(probe.length)
            owner = self.owners.get(ns)
            try:
                if owner is not None and owner.on_unexpected(probe, kind, index, length):
                    continue
            except Exception:
                self.discard(probe, foreign=False)  # taken off the queue by the probe: not left in UCX
                raise
            self.discard(probe, foreign=owner is None)
        self._dropped_since_trim += found
        if not found and self._dropped_since_trim:
            # The queue is empty after a burst (a flood that ended, or one the gate keeps in the
            # kernel: then this comes between two intakes): what UCX freed goes back to the OS,
            # at most once per TRIM_DELAY, so a long flood is trimmed as it goes, not only after.
            if self._dropped_since_trim >= TRIM_AFTER_DROPPED:
                self.trimmer.soon()
            self._dropped_since_trim = 0
        return found

    def discard(self, probe: Any, *, foreign: bool = True) -> None:
        """Match a probed message into one scratch byte: UCX drops it (truncation) and frees its memory."""
        length = int(probe.length)
        try:
            req = self.worker.tag_recv_with_handle(self._scratch_array, probe)
        except Exception:  # pragma: no cover - a worker being torn down
            logger.debug("rail %s: discarding a message failed", self.name, exc_info=True)
            return
        self._discards.append(req)
        self.progress.kick()
        if not foreign:
            return
        if self.stats is not None:
            self.stats["unexpected_dropped"] += 1
        self._dropped += 1
        self._dropped_bytes += length
        now = time.monotonic()
        if now - self._warned_at >= LOG_EVERY:
            logger.warning(
                "rail %s: dropped %d unexpected UCX message(s) (%d bytes) that no link of this engine "
                "expected: a stale peer, or a host that reached the UCX port without the control handshake",
                self.name,
                self._dropped,
                self._dropped_bytes,
            )
            self._warned_at = now
            self._dropped = self._dropped_bytes = 0

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        """Close every endpoint, stop the threads, and let UCX release the worker and context."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for channel in list(self.channels):
            channel.abort("rail closing")
        self.channels.clear()
        self.owners.clear()
        if self.worker is None:
            return
        self.progress.close()
        # The discarding receives die with the worker (it cancels what is still in flight).
        # Those the last progress pass finished carry a truncation error: mark it retrieved,
        # or asyncio logs "Future exception was never retrieved" for each.
        for req in self._discards:
            if req.future.done():
                _ucxx.future_error(req.future)
        self._discards.clear()
        self.worker = None
        self.context = None


def resolve_plans(specs: Sequence[RailSpec] | None) -> list[RailPlan]:
    """Rail plans from explicit specs, or discovered when ``specs`` is None."""
    plans = discover() if specs is None else plans_from_specs(specs)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError(f"rail names must be unique, got {names}")
    return plans


__all__ = ["LocalRail", "RailPlan", "Tier", "discover", "host_id", "resolve_plans"]
