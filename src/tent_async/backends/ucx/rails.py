"""Local rails: what this host can send over, and one UCX context per rail.

A *local rail* is one device: a NIC (UCX's ``tcp`` transport pinned with
``NET_DEVICES``), shared memory for peers on the same host, or a GPU (CUDA
transports).  Each gets its own UCX context, worker, progress thread,
notifier thread and (on a listening engine) listener, with UCX's own
multi-rail off (``MAX_RNDV_RAILS=1``): the planner alone decides which rail
carries which slice.  An *engine rail* is a local rail paired with a peer's
rail in the handshake (:mod:`.pairing`).

Discovery (``rails=None``): every interface that is up and has an IPv4
address (link speed from the OS through psutil), a shared-memory rail, and
one rail per GPU that NVML reports when nvidia-ml-py is installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import queue
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from ...errors import ConfigError
from ...rails import RailSpec, Tier
from . import _ucxx
from .protocol import RailAd

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
_RAIL_NAME = re.compile(r"[^A-Za-z0-9_.:\-]")


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

    @property
    def loopback(self) -> bool:
        return self.ip.startswith("127.")

    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.prefix}", strict=False)

    def advert(self, port: int) -> RailAd:
        return RailAd(
            name=self.name,
            kind=self.kind,
            device=self.device,
            ip=self.ip,
            port=port,
            bandwidth=self.bandwidth,
            prefix=self.prefix,
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
        if key == _PAIR_OPTION:
            continue
        config[key[4:] if key.upper().startswith("UCX_") else key] = str(value)
    return config


def tcp_config(device: str) -> dict[str, str]:
    return {"TLS": "tcp", "NET_DEVICES": device, "MAX_RNDV_RAILS": "1"}


def shm_config() -> dict[str, str]:
    # The listener (sockaddr) path needs a tcp device for wire-up, and endpoints
    # accepted by a listener always use error handling, which drops shared memory
    # unless POSIX_ERROR_HANDLING=y (verified by experiment).
    return {"TLS": "posix,self,tcp", "NET_DEVICES": "lo", "POSIX_ERROR_HANDLING": "y", "MAX_RNDV_RAILS": "1"}


def cuda_config() -> dict[str, str]:
    config = shm_config()
    config["TLS"] = "cuda_copy,cuda_ipc,posix,self,tcp"
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
    return plans


# ==================================================================== runtime


def _set_cuda_device(gpu: int) -> None:  # pragma: no cover - needs a GPU
    """Progress-thread start hook: make the GPU's CUDA context current on that thread."""
    import cupy

    cupy.cuda.Device(gpu).use()
    cupy.cuda.runtime.free(0)  # forces the primary context into existence


class LocalRail:
    """One UCX context + worker + progress thread + notifier thread (+ listener).

    Create it on the event loop thread.  UCX callbacks (a peer connecting, an
    endpoint failing) run on the progress thread; they only hand work to the
    loop with ``call_soon_threadsafe``.
    """

    def __init__(self, plan: RailPlan, loop: asyncio.AbstractEventLoop, *, delayed_submission: bool = False) -> None:
        ucx = _ucxx.loaded()
        L = ucx.L
        self.plan = plan
        self.name = plan.name
        self.loop = loop
        self.port = 0
        self._listener: Any = None
        self.channels: set[Any] = set()  # every Channel ever opened here: retired ones keep their handle
        self._on_accept: Callable[[LocalRail, Any], None] | None = None
        features = (L.Feature.TAG, L.Feature.WAKEUP, L.Feature.AM)
        try:
            self.context = L.UCXContext(dict(plan.ucx_config), feature_flags=features)
        except ucx.UCXError as exc:
            raise ConfigError(
                f"rail {plan.name!r}: UCX cannot open {plan.device!r} with {dict(plan.ucx_config)}: "
                f"{_ucxx.describe_error(exc)} (is the device up? for RDMA see docs/ucx.md)"
            ) from exc
        self.worker = L.UCXWorker(self.context, enable_delayed_submission=delayed_submission, enable_python_future=True)
        if plan.gpu is not None:  # pragma: no cover - needs a GPU
            self.worker.set_progress_thread_start_callback(_set_cuda_device, cb_args=(plan.gpu,))
        self.worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self._notify_queue: queue.Queue[str] = queue.Queue()
        self._notifier: threading.Thread | None = threading.Thread(
            target=ucx.notifier,
            args=(loop, self.worker, self._notify_queue),
            name=f"tent-ucx-notifier-{plan.name}",
            daemon=True,
        )
        self._notifier.start()

    def resources(self) -> list[str]:
        """Transports and devices this context really opened, e.g. ``['tcp/eth0']``."""
        out = []
        for line in self.context.info.splitlines():
            if "resource" in line:
                out.append(line.split("flags")[-1].strip().lstrip("-").strip())
        return out

    def listen(self, on_accept: Callable[[LocalRail, Any], None]) -> int:
        """Accept peers on an ephemeral port of every address (UCX listeners bind 0.0.0.0)."""
        L = _ucxx.loaded().L
        self._on_accept = on_accept
        self._listener = L.UCXListener.create(self.worker, 0, self._conn_request, deliver_endpoint=False)
        self.port = int(self._listener.port)
        return self.port

    def _conn_request(self, conn_request: Any) -> None:
        # Progress thread: create the endpoint here (error handling on), work on the loop.
        listener = self._listener
        if listener is None:
            return
        try:
            ep = listener.create_endpoint_from_conn_request(conn_request, True)
        except Exception:
            logger.exception("rail %s: could not accept a connection", self.name)
            return
        if self._on_accept is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._on_accept, self, ep)

    def connect(self, ip: str, port: int) -> Any:
        """A new endpoint to ``ip:port`` (returns at once; wire-up happens on progress)."""
        L = _ucxx.loaded().L
        return L.UCXEndpoint.create(self.worker, ip, port, True)

    def close(self) -> None:
        """Stop accepting, stop the threads.  Endpoints must be closed before."""
        self._listener = None
        self._on_accept = None
        for channel in list(self.channels):
            channel.abort("rail closing")
        self.channels.clear()
        try:
            self.worker.stop_progress_thread()
        except Exception:  # pragma: no cover - best effort at shutdown
            logger.exception("rail %s: stopping the progress thread failed", self.name)
        if self._notifier is not None:
            self._notify_queue.put("shutdown")
            self.worker.stop_request_notifier_thread()  # wakes the notifier now, not in 1 s
            self._notifier.join(timeout=3)
            self._notifier = None


def resolve_plans(specs: Sequence[RailSpec] | None) -> list[RailPlan]:
    """Rail plans from explicit specs, or discovered when ``specs`` is None."""
    plans = discover() if specs is None else plans_from_specs(specs)
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ConfigError(f"rail names must be unique, got {names}")
    return plans


__all__ = ["LocalRail", "RailPlan", "Tier", "discover", "host_id", "resolve_plans"]
