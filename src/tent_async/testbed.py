"""Real heterogeneous rails on one machine: two network namespaces joined by shaped veth pairs.

A test or benchmark of the UCX backend needs rails that really differ in speed and that
can really fail, without a cluster.  :class:`VethTestbed` builds them::

    with VethTestbed(rates=["800mbit", "200mbit", "50mbit"]) as tb:
        rail = tb.rails[0]          # rail.client_dev, rail.server_ip, rail.bandwidth (bytes/s), ...
        server = tb.popen("server", [sys.executable, "server.py", rail.server_ip])
        tb.run("client", [sys.executable, "client.py", rail.server_ip], timeout=60)
        tb.link_down(0)             # a real fault: carrier lost, traffic stops
        tb.set_rate(1, "10mbit")    # a real degradation (tc qdisc change)

Rail ``i`` is one veth pair: ``<client ns>/tnt<token>c<i>`` with ``<subnet>.<i>.2/24`` and
``<server ns>/tnt<token>s<i>`` with ``<subnet>.<i>.1/24``, both ends shaped with
``tc qdisc ... root tbf rate R burst B latency L`` (tbf works here; netem is not
available).  Everything lives inside the two namespaces, so several testbeds (parallel
test runs) never collide, and deleting the namespaces removes every link.

Names carry the owner's pid (``tnt`` + ``p`` + 5 base-36 digits of the pid + a 2-digit
sequence), so a testbed left behind by a crashed (SIGKILLed) run is recognised and removed
by the next :meth:`VethTestbed.start` or :func:`cleanup_stale`.  Named testbeds
(``VethTestbed(name="cli")``, made by ``tent-async testbed up``) outlive their process and
are removed only on request (``tent-async testbed down``).

Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), ``ip`` and ``tc`` from iproute2, and kernel
support for veth and sch_tbf; :func:`available` checks all of it by building a throwaway
namespace, so tests can skip with the reason.  See docs/testbed.md.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from types import FrameType, TracebackType
from typing import Any, Literal, NamedTuple, Self

from .errors import TentError
from .units import parse_bandwidth, parse_duration, parse_size

__all__ = [
    "PREFIX",
    "Namespaces",
    "Side",
    "TcpStream",
    "TestbedError",
    "TestbedInfo",
    "VethRail",
    "VethTestbed",
    "available",
    "cleanup_stale",
    "list_testbeds",
    "remove_testbed",
]

PREFIX = "tnt"
Side = Literal["client", "server"]
_SIDES: tuple[Side, Side] = ("client", "server")
_LETTER = {"client": "c", "server": "s"}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_NS_RE = re.compile(rf"^{PREFIX}(?P<token>p[0-9a-z]{{7}}|n[0-9a-z]{{1,7}})(?P<side>[cs])$")
_DEV_RE = re.compile(rf"^{PREFIX}(?P<token>p[0-9a-z]{{7}}|n[0-9a-z]{{1,7}})(?P<side>[cs])(?P<index>[0-9]{{1,2}})$")
_NAME_RE = re.compile(r"^[0-9a-z]{1,7}$")
_SUBNET_RE = re.compile(r"^10\.(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])$")
_MAX_RAILS = 64
_MIN_BURST = 256 * 1024  # calibrated: 32-256 KiB give ~96% of the rate as TCP goodput
_seq = itertools.count()


class TestbedError(TentError, RuntimeError):
    """The testbed could not be built, changed or removed; the message says what to do."""

    __test__ = False  # not a pytest test class


class Namespaces(NamedTuple):
    """The two network namespaces of a testbed."""

    client: str
    server: str


@dataclass(frozen=True)
class VethRail:
    """One shaped veth pair: a rail between the client and the server namespace."""

    index: int
    bandwidth: float  # shaped rate, bytes/s (both directions)
    burst: int  # tbf bucket, bytes
    latency: float  # tbf queue limit expressed as delay, seconds
    client_dev: str
    server_dev: str
    client_ip: str
    server_ip: str
    prefixlen: int = 24

    @property
    def mbit(self) -> float:
        """Shaped rate in Mbit/s (how tc and link speeds are quoted)."""
        return self.bandwidth * 8 / 1e6

    @property
    def tc_rate(self) -> str:
        """The rate as tc reads it (bits per second, exact)."""
        return f"{round(self.bandwidth * 8)}bit"

    def dev(self, side: Side) -> str:
        """This rail's interface in ``side``'s namespace (what UCX's NET_DEVICES names)."""
        return self.client_dev if _side(side) == "client" else self.server_dev

    def ip(self, side: Side) -> str:
        """This rail's address in ``side``'s namespace."""
        return self.client_ip if _side(side) == "client" else self.server_ip

    def peer_ip(self, side: Side) -> str:
        """The address that ``side`` dials to reach the other side over this rail."""
        return self.server_ip if _side(side) == "client" else self.client_ip


@dataclass(frozen=True)
class TestbedInfo:
    """A testbed found on the machine (:func:`list_testbeds`)."""

    __test__ = False  # not a pytest test class

    token: str
    namespaces: Namespaces
    owner_pid: int | None  # None for named testbeds
    stale: bool  # owner process is gone: safe to remove
    present: tuple[str, ...] = field(default=())  # which of the two namespaces exist


# ---------------------------------------------------------------------------- helpers


def _side(side: str) -> Side:
    if side == "client":
        return "client"
    if side == "server":
        return "server"
    raise ValueError(f"side must be 'client' or 'server', got {side!r}")


def _b36(n: int, width: int) -> str:
    digits = ""
    while n:
        n, d = divmod(n, 36)
        digits = _B36[d] + digits
    return digits.rjust(width, "0")[-width:]


def _ns_name(token: str, side: Side) -> str:
    return f"{PREFIX}{token}{_LETTER[side]}"


def _dev_name(token: str, side: Side, index: int) -> str:
    return f"{PREFIX}{token}{_LETTER[side]}{index}"


def _owner_pid(token: str) -> int | None:
    return int(token[1:6], 36) if token.startswith("p") else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmd(argv: Sequence[str], *, timeout: float = 10.0, check: bool = True, what: str = "") -> str:
    """Run an ip/tc command; a failure becomes a TestbedError that quotes the command and its stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise TestbedError(f"{argv[0]!r} not found: install iproute2 (apt-get install iproute2)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from exc
    if check and proc.returncode != 0:
        hint = f" ({what})" if what else ""
        raise TestbedError(f"`{' '.join(argv)}` failed{hint}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def _netns_list() -> list[str]:
    if shutil.which("ip") is None:
        return []
    out = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links(ns: str) -> list[dict[str, Any]]:
    """``ip -j link show`` inside ``ns`` (JSON keeps parsing honest)."""
    out = _cmd(["ip", "-n", ns, "-j", "link", "show"], what=f"list links of namespace {ns}")
    links: list[dict[str, Any]] = json.loads(out or "[]")
    return links


def _kill_namespace_pids(ns: str, grace: float = 1.0) -> None:
    """Stop every process still inside ``ns`` (all of them were started in it by a testbed).

    A namespace with a process left inside survives ``ip netns del`` (only its name goes),
    and so do its links: stop them first.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = _cmd(["ip", "netns", "pids", ns], check=False)
        pids = [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.02)


def _delete_namespace(ns: str) -> None:
    if ns not in _netns_list():
        return
    _kill_namespace_pids(ns)
    _cmd(["ip", "netns", "del", ns], check=False)
    if ns in _netns_list():
        raise TestbedError(f"namespace {ns} is still there after `ip netns del {ns}`; remove it by hand")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while tearing down, so a second Ctrl-C cannot leave half a testbed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ------------------------------------------------------------------- availability


@functools.cache
def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN); run as root or via sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found; install iproute2 (apt-get install iproute2)"
    token = "p" + _b36(os.getpid(), 5) + _b36(next(_seq), 2)
    ns = _ns_name(token, "client")
    a, b = _dev_name(token, "client", 0), _dev_name(token, "server", 0)
    try:
        _cmd(["ip", "netns", "add", ns], what="network namespaces")
        _cmd(["ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b], what="veth support")
        _cmd(
            ["tc", "-n", ns, *f"qdisc replace dev {a} root tbf rate 8mbit burst 32kb latency 50ms".split()],
            what="sch_tbf support",
        )
    except TestbedError as exc:
        return False, (
            f"cannot build a veth testbed here: {exc} "
            "(needs CAP_NET_ADMIN and CAP_SYS_ADMIN, e.g. root outside a restricted container)"
        )
    finally:
        with suppress(TestbedError):
            _delete_namespace(ns)
    return True, "root, iproute2, network namespaces, veth and tbf all work"


def available() -> tuple[bool, str]:
    """Whether a testbed can be built here, and why not (for ``pytest.skip``).

    Checked once per process by building and removing a throwaway namespace with a
    tbf-shaped veth pair: only a real try proves root, iproute2 and kernel support.
    """
    return _probe()


# -------------------------------------------------------------- finding testbeds


def list_testbeds() -> list[TestbedInfo]:
    """Every testbed (complete or half-removed) on this machine, by its namespaces."""
    found: dict[str, set[str]] = {}
    for ns in _netns_list():
        m = _NS_RE.match(ns)
        if m:
            found.setdefault(m["token"], set()).add(ns)
    infos = []
    for token, present in sorted(found.items()):
        pid = _owner_pid(token)
        names = Namespaces(_ns_name(token, "client"), _ns_name(token, "server"))
        infos.append(
            TestbedInfo(
                token, names, pid, stale=pid is not None and not _pid_alive(pid), present=tuple(sorted(present))
            )
        )
    return infos


def remove_testbed(token: str) -> None:
    """Remove both namespaces of the testbed ``token`` (its links and processes go with them)."""
    errors = []
    for side in _SIDES:
        try:
            _delete_namespace(_ns_name(token, side))
        except TestbedError as exc:
            errors.append(str(exc))
    _remove_root_links(token)
    if errors:
        raise TestbedError("; ".join(errors))


def _remove_root_links(token: str | None) -> None:
    """Links of ours in the root namespace (only if a creation was cut off mid-way)."""
    with suppress(TestbedError):
        for link in _links_root():
            m = _DEV_RE.match(str(link.get("ifname", "")))
            if not m:
                continue
            owner = _owner_pid(m["token"])
            if m["token"] == token or (token is None and owner is not None and not _pid_alive(owner)):
                _cmd(["ip", "link", "del", str(link["ifname"])], check=False)


def _links_root() -> list[dict[str, Any]]:
    out = _cmd(["ip", "-j", "link", "show"])
    links: list[dict[str, Any]] = json.loads(out or "[]")
    return links


def cleanup_stale() -> list[str]:
    """Remove testbeds whose owner process is gone (crashed or killed runs); return their tokens.

    Testbeds of live processes (parallel test runs) and named testbeds are left alone.
    """
    removed = []
    for info in list_testbeds():
        if info.stale:
            with suppress(TestbedError):
                remove_testbed(info.token)
                removed.append(info.token)
    _remove_root_links(None)
    return removed


# ------------------------------------------------------------------------ testbed


class VethTestbed:
    """Two network namespaces joined by N tbf-shaped veth pairs, removed again on exit.

    ``rates``
        One entry per rail: ``"800mbit"``, ``"1gbit"``, ``"25MB/s"`` or bytes/s.
    ``name``
        ``None`` (default): a private per-process name, removed on exit and, if the process
        dies without cleaning up, by the next testbed's start.  A short name (``[0-9a-z]``,
        up to 7 characters) makes a testbed that other processes can :meth:`attach` to and
        that only :meth:`close` or ``tent-async testbed down`` removes.
    ``subnet``
        First two octets of the rails' private /24s (rail ``i``: ``<subnet>.<i>.0/24``).
        The addresses exist only inside the testbed's namespaces.
    ``burst``, ``latency``
        tbf bucket and queue limit.  The default burst is ``max(256 KiB, 2.5 ms of rate)``;
        with ``latency="50ms"`` plain TCP then gets ~96% of the rate (docs/testbed.md).
    ``link_timeout``
        How long to wait for the links' carrier to come up (a fresh veth stays down up to
        ~1 s, and UCX refuses a device that is down when its context is created).
    """

    def __init__(
        self,
        rates: Sequence[str | float] = ("800mbit", "200mbit", "50mbit"),
        *,
        name: str | None = None,
        subnet: str = "10.231",
        burst: int | str | None = None,
        latency: str | float = "50ms",
        link_timeout: float = 5.0,
    ) -> None:
        rates = list(rates)
        if not 1 <= len(rates) <= _MAX_RAILS:
            raise ValueError(f"give between 1 and {_MAX_RAILS} rail rates, got {len(rates)}")
        if name is not None and not _NAME_RE.match(name):
            raise ValueError(f"testbed name must be 1-7 characters of [0-9a-z], got {name!r}")
        if not _SUBNET_RE.match(subnet):
            raise ValueError(
                f"subnet must be the first two octets of a private 10.x network, e.g. '10.231'; got {subnet!r}"
            )
        self.token = f"n{name}" if name is not None else "p" + _b36(os.getpid(), 5) + _b36(next(_seq), 2)
        self.name = name
        self.namespaces = Namespaces(_ns_name(self.token, "client"), _ns_name(self.token, "server"))
        lat = parse_duration(latency)
        self.link_timeout = link_timeout
        self.rails: list[VethRail] = []
        for i, rate in enumerate(rates):
            bw = parse_bandwidth(rate)
            self.rails.append(
                VethRail(
                    index=i,
                    bandwidth=bw,
                    burst=parse_size(burst) if burst is not None else max(_MIN_BURST, int(bw * 0.0025)),
                    latency=lat,
                    client_dev=_dev_name(self.token, "client", i),
                    server_dev=_dev_name(self.token, "server", i),
                    client_ip=f"{subnet}.{i}.2",
                    server_ip=f"{subnet}.{i}.1",
                )
            )
        self._procs: list[subprocess.Popen[Any]] = []
        self._state = "new"  # new -> up -> closed (or detached)
        self._atexit: Any = None
        self._old_sigterm: Any = None

    def __repr__(self) -> str:
        rates = ", ".join(f"{r.mbit:g}mbit" for r in self.rails)
        return f"VethTestbed({self.namespaces.client}<->{self.namespaces.server}, [{rates}], {self._state})"

    # -------------------------------------------------------------- lifecycle

    @staticmethod
    def available() -> tuple[bool, str]:
        """See :func:`available`."""
        return available()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Build the namespaces and shaped links, and wait until every link carries traffic.

        On any failure (also Ctrl-C) whatever was built is removed before the error propagates.
        """
        if self._state != "new":
            raise TestbedError(f"{self!r} was already started; create a new VethTestbed")
        ok, reason = available()
        if not ok:
            raise TestbedError(reason)
        cleanup_stale()
        if self.name is not None and any(ns in _netns_list() for ns in self.namespaces):
            raise TestbedError(
                f"a testbed named {self.name!r} is already up ({', '.join(self.namespaces)}); "
                f"use VethTestbed.attach({self.name!r}) or remove it: tent-async testbed down --name {self.name}"
            )
        self._state = "up"
        if self.name is None:
            # Close on interpreter exit (also SystemExit) if the owner forgot; a weak
            # reference keeps the testbed collectable.
            ref = weakref.ref(self)

            def close_at_exit() -> None:
                tb = ref()
                if tb is not None:
                    tb.close()

            self._atexit = close_at_exit
            atexit.register(close_at_exit)
            self._catch_sigterm()
        try:
            self._build()
            self.wait_links_up()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        c, s = self.namespaces
        for ns in (c, s):
            _cmd(["ip", "netns", "add", ns], what="create network namespace")
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        for r in self.rails:
            _cmd(
                ["ip", *f"link add {r.client_dev} netns {c} type veth peer name {r.server_dev} netns {s}".split()],
                what="create veth pair",
            )
            for side in _SIDES:
                ns = self.ns(side)
                _cmd(["ip", "-n", ns, "addr", "add", f"{r.ip(side)}/{r.prefixlen}", "dev", r.dev(side)])
                self._tbf("add", side, r)
                _cmd(["ip", "-n", ns, "link", "set", r.dev(side), "up"])

    def _tbf(self, verb: str, side: Side, rail: VethRail) -> None:
        tbf = f"rate {rail.tc_rate} burst {rail.burst} latency {rail.latency * 1e6:.0f}us"
        _cmd(["tc", "-n", self.ns(side), "qdisc", verb, "dev", rail.dev(side), "root", "tbf", *tbf.split()], what="tbf")

    def _catch_sigterm(self) -> None:
        """Turn SIGTERM into SystemExit while up, so ``with``/``finally`` blocks run and clean up."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
        self._old_sigterm = None

    def close(self) -> None:
        """Stop the processes started in the namespaces and remove both namespaces (idempotent)."""
        if self._state in ("closed", "detached"):
            return
        if self._state == "new":  # never started: nothing of ours to remove (a same-named testbed is not ours)
            self._state = "closed"
            return
        with _signals_deferred():
            self._state = "closed"
            for proc in self._procs:
                _stop(proc)
            self._procs.clear()
            errors = []
            for ns in self.namespaces:
                try:
                    _delete_namespace(ns)
                except TestbedError as exc:
                    errors.append(str(exc))
            _remove_root_links(self.token)
            if self._atexit is not None:
                atexit.unregister(self._atexit)
                self._atexit = None
            self._restore_sigterm()
        if errors:
            raise TestbedError("; ".join(errors))

    def detach(self) -> None:
        """Leave a named testbed up after this process exits (``tent-async testbed up``)."""
        if self.name is None:
            raise TestbedError("only a named testbed can outlive its process: VethTestbed(..., name='x')")
        self._state = "detached"
        self._procs.clear()

    @classmethod
    def attach(cls, name: str) -> VethTestbed:
        """A handle on the named testbed that is already up (e.g. made by ``tent-async testbed up``).

        Rails, addresses and rates are read back from the system.  Closing the handle
        removes the testbed; :meth:`detach` leaves it up.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"testbed name must be 1-7 characters of [0-9a-z], got {name!r}")
        return cls._attach_token(f"n{name}")

    @classmethod
    def _attach_token(cls, token: str) -> VethTestbed:
        tb = cls(["1mbit"])
        tb.token = token
        tb.name = token[1:] if token.startswith("n") else None
        tb.namespaces = Namespaces(_ns_name(token, "client"), _ns_name(token, "server"))
        present = _netns_list()
        missing = [ns for ns in tb.namespaces if ns not in present]
        if missing:
            hint = f"start one: tent-async testbed up --name {tb.name}" if tb.name else "it was removed"
            raise TestbedError(f"testbed {token} is not up ({', '.join(missing)} missing); {hint}")
        tb.rails = _read_rails(token, tb.namespaces)
        tb._state = "up"
        return tb

    # -------------------------------------------------------------- queries

    def ns(self, side: Side) -> str:
        """The namespace of ``side``."""
        return self.namespaces.client if _side(side) == "client" else self.namespaces.server

    @property
    def capacity(self) -> float:
        """Sum of the shaped rates, bytes/s: the physical limit of a transfer over all rails."""
        return sum(r.bandwidth for r in self.rails)

    def link_state(self, index: int) -> dict[Side, str]:
        """Operational state of rail ``index`` on each side (``"UP"``, ``"DOWN"``, ``"LOWERLAYERDOWN"``)."""
        rail = self.rails[index]
        states: dict[Side, str] = {}
        for side in _SIDES:
            for link in _links(self.ns(side)):
                if link.get("ifname") == rail.dev(side):
                    states[side] = str(link.get("operstate", "UNKNOWN"))
        return states

    def byte_counters(self, side: Side) -> list[tuple[int, int]]:
        """Kernel ``(tx_bytes, rx_bytes)`` of each rail's interface on ``side``, in rail order.

        What really crossed each link (headers included), whoever sent it: the way to see
        how a transfer was split over the rails.
        """
        self._require_up()
        out = _cmd(["ip", "-n", self.ns(side), "-s", "-j", "link", "show"])
        stats = {str(link.get("ifname")): link.get("stats64", {}) for link in json.loads(out or "[]")}
        counters = []
        for r in self.rails:
            st = stats.get(r.dev(side), {})
            counters.append((int(st.get("tx", {}).get("bytes", 0)), int(st.get("rx", {}).get("bytes", 0))))
        return counters

    def wait_links_up(self, indices: Sequence[int] | None = None, timeout: float | None = None) -> None:
        """Block until the given rails (default all) are operationally up on both sides."""
        self._require_up()
        wanted = {self.rails[i].dev(side) for i in (indices or range(len(self.rails))) for side in _SIDES}
        limit = self.link_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            states = {
                str(link.get("ifname")): str(link.get("operstate"))
                for ns in self.namespaces
                for link in _links(ns)
                if link.get("ifname") in wanted
            }
            down = {dev: states.get(dev, "MISSING") for dev in sorted(wanted) if states.get(dev) != "UP"}
            if not down:
                return
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"links not up after {limit:g} s: {down}; check `ip -n {self.namespaces.client} link` "
                    "(a freshly made veth takes up to ~1 s to get its carrier)"
                )
            time.sleep(0.02)

    def _require_up(self) -> None:
        if self._state not in ("up", "detached"):
            raise TestbedError(f"{self!r} is not up; use `with VethTestbed(...) as tb:` or tb.start()")

    # -------------------------------------------------------------- processes

    def exec_argv(self, side: Side, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``side``'s namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self.ns(side), *argv]

    def run(
        self, side: Side, argv: Sequence[str], *, timeout: float | None = 60.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` inside ``side``'s namespace, bounded by ``timeout`` seconds.

        The child is a fresh process (fork+exec, i.e. spawn semantics): safe even when this
        process holds a live UCX context.
        """
        self._require_up()
        return subprocess.run(self.exec_argv(side, argv), timeout=timeout, **kwargs)

    def popen(self, side: Side, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """``subprocess.Popen`` inside ``side``'s namespace; stopped by :meth:`close` if still running."""
        self._require_up()
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(side, argv), **kwargs)
        self._procs = [p for p in self._procs if p.poll() is None]
        self._procs.append(proc)
        return proc

    # -------------------------------------------------------------- faults

    def link_down(self, index: int, side: Side | Literal["both"] = "client", *, wait: bool = True) -> None:
        """Take rail ``index`` down (``ip link set DEV down``): the peer loses carrier, traffic stops.

        Connections are not told; the kernel keeps retransmitting, as on a pulled cable.  With
        ``wait`` it returns once both ends report the link not up (the peer's carrier change
        is asynchronous, a few ms).
        """
        self._require_up()
        rail = self.rails[index]
        for s in _SIDES if side == "both" else (_side(side),):
            _cmd(["ip", "-n", self.ns(s), "link", "set", rail.dev(s), "down"])
        deadline = time.monotonic() + self.link_timeout
        while wait and "UP" in self.link_state(index).values():
            if time.monotonic() > deadline:
                raise TestbedError(f"rail {index} still reports UP {self.link_timeout:g} s after link down")
            time.sleep(0.01)

    def link_up(self, index: int, *, wait: bool = True) -> None:
        """Bring rail ``index`` up on both sides and (by default) wait until it carries traffic."""
        self._require_up()
        rail = self.rails[index]
        for s in _SIDES:
            _cmd(["ip", "-n", self.ns(s), "link", "set", rail.dev(s), "up"])
        if wait:
            self.wait_links_up([index])

    def set_rate(
        self, index: int, rate: str | float, *, burst: int | str | None = None, latency: str | float | None = None
    ) -> VethRail:
        """Change rail ``index``'s shaped rate in both directions (``tc qdisc change``); returns the new rail.

        Traffic keeps flowing at the new rate: a real degradation (or recovery), not an error.
        """
        self._require_up()
        old = self.rails[index]
        bw = parse_bandwidth(rate)
        new = replace(
            old,
            bandwidth=bw,
            burst=parse_size(burst) if burst is not None else max(_MIN_BURST, int(bw * 0.0025)),
            latency=parse_duration(latency) if latency is not None else old.latency,
        )
        for side in _SIDES:
            self._tbf("change", side, new)
        self.rails[index] = new
        return new

    # -------------------------------------------------------------- measuring

    def tcp_stream(self, index: int, *, sender: Side = "client", timeout: float = 30.0) -> TcpStream:
        """Start a bulk TCP flow over rail ``index`` (runs until :meth:`TcpStream.close`)."""
        self._require_up()
        return TcpStream(self, index, sender=_side(sender), timeout=timeout)

    def tcp_throughput(
        self, index: int, seconds: float = 2.0, *, sender: Side = "client", warmup: float = 0.3
    ) -> float:
        """Plain-TCP goodput over rail ``index`` in bytes/s, measured at the receiver.

        The first ``warmup`` seconds (slow start, tbf's initial burst) are not counted.
        """
        with self.tcp_stream(index, sender=sender) as stream:
            stream.wait_flowing()
            t0 = time.monotonic() + warmup
            time.sleep(warmup + seconds)
            return stream.rate(t0, time.monotonic())


def _read_rails(token: str, namespaces: Namespaces) -> list[VethRail]:
    """Rebuild the rail list of an existing testbed from ``ip -j addr`` and ``tc -j qdisc``."""
    addrs: dict[tuple[str, int], str] = {}
    shape: dict[int, tuple[float, int, float]] = {}
    for side, ns in zip(_SIDES, namespaces, strict=True):
        for link in json.loads(_cmd(["ip", "-n", ns, "-j", "addr", "show"]) or "[]"):
            m = _DEV_RE.match(str(link.get("ifname", "")))
            if not m or m["token"] != token:
                continue
            for a in link.get("addr_info", []):
                if a.get("family") == "inet":
                    addrs[(side, int(m["index"]))] = str(a["local"])
        for q in json.loads(_cmd(["tc", "-n", ns, "-j", "qdisc", "show"]) or "[]"):
            m = _DEV_RE.match(str(q.get("dev", "")))
            if q.get("kind") == "tbf" and m and side == "client":
                opts = q.get("options", {})
                shape[int(m["index"])] = (float(opts["rate"]), int(opts["burst"]), float(opts.get("lat", 0)) / 1e6)
    rails = []
    for i in sorted({i for _, i in addrs}):
        bw, burst, lat = shape.get(i, (0.0, 0, 0.0))
        rails.append(
            VethRail(
                index=i,
                bandwidth=bw,
                burst=burst,
                latency=lat,
                client_dev=_dev_name(token, "client", i),
                server_dev=_dev_name(token, "server", i),
                client_ip=addrs.get(("client", i), ""),
                server_ip=addrs.get(("server", i), ""),
            )
        )
    return rails


def _stop(proc: subprocess.Popen[Any], grace: float = 2.0) -> None:
    """Terminate, then kill, one child we started."""
    if proc.poll() is not None:
        return
    with suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            proc.kill()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)


# ----------------------------------------------------------------- TCP flows

# Receiver: prints its port, then "<monotonic time> <bytes so far>" every 50 ms (also
# while nothing arrives, so a dead link shows up as a flat line).  CLOCK_MONOTONIC is
# system-wide, so the parent can compare these times with its own.
_SINK = r"""
import socket, sys, time
ip, timeout = sys.argv[1], float(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((ip, 0)); s.listen(1)
s.settimeout(timeout); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(0.05); buf = bytearray(1 << 20); n = 0; last = 0.0
while True:
    try:
        k = c.recv_into(buf)
        if not k:
            break
        n += k
    except socket.timeout:
        pass
    now = time.monotonic()
    if now - last >= 0.05:
        print(f"{now:.6f} {n}", flush=True); last = now
print(f"{time.monotonic():.6f} {n}", flush=True)
"""

# Sender: connects from its own rail address and sends until killed (or the link dies).
_SOURCE = r"""
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = socket.create_connection((dst, port), timeout=10, source_address=(src, 0)); c.settimeout(None)
buf = b"x" * (1 << 20)
while True:
    c.sendall(buf)
"""


class TcpStream:
    """A bulk TCP flow across one rail, with the receiver's byte count sampled every 50 ms.

    Plain sockets, no UCX: the ground truth for what a rail carries.
    """

    def __init__(self, tb: VethTestbed, index: int, *, sender: Side, timeout: float) -> None:
        rail = tb.rails[index]
        receiver: Side = "server" if sender == "client" else "client"
        self.rail = rail
        self.samples: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._sink = tb.popen(
            receiver,
            [sys.executable, "-c", _SINK, rail.ip(receiver), str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._source: subprocess.Popen[Any] | None = None
        try:
            assert self._sink.stdout is not None
            port = self._read_port(self._sink.stdout, timeout)
            self._source = tb.popen(
                sender,
                [sys.executable, "-c", _SOURCE, rail.ip(sender), rail.ip(receiver), port],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            _stop(self._sink)
            raise
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"tcp-stream-{index}")
        self._reader.start()

    @staticmethod
    def _read_port(stdout: Any, timeout: float) -> str:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box or not box[0].strip().isdigit():
            raise TestbedError(f"TCP receiver did not start within {timeout:g} s (got {box[:1]!r})")
        return box[0].strip()

    def _read(self) -> None:
        assert self._sink.stdout is not None
        for line in self._sink.stdout:
            t, _, n = line.partition(" ")
            with self._cond:
                self.samples.append((float(t), int(n)))
                self._cond.notify_all()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop both ends."""
        if self._source is not None:
            _stop(self._source)
        _stop(self._sink)
        self._reader.join(2)

    def received(self, at: float | None = None) -> int:
        """Bytes received by time ``at`` (monotonic; default: the latest sample)."""
        with self._cond:
            if at is None:
                return self.samples[-1][1] if self.samples else 0
            before = [n for t, n in self.samples if t <= at]
            return before[-1] if before else 0

    def rate(self, t0: float, t1: float) -> float:
        """Bytes/s received between the samples nearest ``t0`` and ``t1`` (monotonic times)."""
        with self._cond:
            inside = [(t, n) for t, n in self.samples if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return 0.0
        (ta, na), (tb, nb) = inside[0], inside[-1]
        return (nb - na) / (tb - ta)

    def wait_bytes(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` bytes have arrived; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.samples) and self.samples[-1][1] >= n, timeout)

    def wait_flowing(self, timeout: float = 10.0) -> None:
        """Wait for the first bytes (connection made, data moving)."""
        if not self.wait_bytes(1, timeout):
            raise TestbedError(f"no TCP data over rail {self.rail.index} within {timeout:g} s; is the link up?")


# ------------------------------------------------------------------ command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """``tent-async testbed up|down|status|measure``."""
    sub = parser.add_subparsers(dest="testbed_command", required=True)
    up = sub.add_parser("up", help="build a named testbed and leave it up (until `down`)")
    up.add_argument("--rates", default="800mbit,200mbit,50mbit", help="comma-separated rail rates")
    up.add_argument("--name", default="cli", help="testbed name, [0-9a-z]{1,7} (default cli)")
    up.add_argument("--subnet", default="10.231", help="first two octets of the rails' /24s (default 10.231)")
    up.add_argument("--burst", default=None, help="tbf burst (default max(256KiB, 2.5 ms of rate))")
    up.add_argument("--latency", default="50ms", help="tbf latency (default 50ms)")
    down = sub.add_parser("down", help="remove a named testbed and any stale ones")
    down.add_argument("--name", default="cli", help="testbed name (default cli)")
    down.add_argument(
        "--all", action="store_true", help="remove every tent_async testbed, also those of running processes"
    )
    sub.add_parser("status", help="list testbeds, their links, addresses and shaped rates")
    measure = sub.add_parser("measure", help="plain-TCP goodput over each rail of a named testbed")
    measure.add_argument("--name", default="cli", help="testbed name (default cli)")
    measure.add_argument("--seconds", type=float, default=2.0, help="seconds per rail (default 2)")


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of ``tent-async testbed``."""
    from .display import console as make_console

    console = make_console()
    try:
        if args.testbed_command == "up":
            return _cli_up(console, args)
        if args.testbed_command == "down":
            return _cli_down(console, args)
        if args.testbed_command == "measure":
            return _cli_measure(console, args)
        return _cli_status(console)
    except (TestbedError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 1


def _rail_table(tb: VethTestbed, title: str) -> str:
    """Plain fixed-width lines (never truncated, easy to copy addresses from)."""
    width = max(10, *(len(r.server_dev) for r in tb.rails)) + 2
    head = f"{'rail':<5}{'Mbit/s':>8}  {'client dev':<{width}}{'client ip':<16}{'server dev':<{width}}{'server ip':<16}"
    head += "state"
    lines = [title, head]
    for r in tb.rails:
        states = tb.link_state(r.index)
        state = "/".join(states.get(s, "?") for s in _SIDES)
        lines.append(
            f"{r.index:<5}{r.mbit:>8g}  {r.client_dev:<{width}}{r.client_ip:<16}{r.server_dev:<{width}}"
            f"{r.server_ip:<16}{state}"
        )
    return "\n".join(lines)


_PLAIN: dict[str, Any] = {"soft_wrap": True, "highlight": False}


def _cli_up(console: Any, args: argparse.Namespace) -> int:
    ok, reason = available()
    if not ok:
        console.print(f"[bold red]error:[/] {reason}")
        return 1
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    tb = VethTestbed(rates, name=args.name, subnet=args.subnet, burst=args.burst, latency=args.latency)
    tb.start()
    tb.detach()
    c, s = tb.namespaces
    console.print(_rail_table(tb, f"testbed {args.name!r}: client namespace {c}, server namespace {s}"), **_PLAIN)
    console.print(
        f"run inside:  ip netns exec {s} python server.py ...  /  ip netns exec {c} python client.py ...\n"
        f"a fault:     ip -n {c} link set {tb.rails[0].client_dev} down   (and ... up)\n"
        f"remove:      tent-async testbed down --name {args.name}",
        **_PLAIN,
    )
    return 0


def _cli_down(console: Any, args: argparse.Namespace) -> int:
    stale = cleanup_stale()
    if stale:
        console.print(f"removed stale testbeds: {', '.join(stale)}")
    if args.all:
        infos = list_testbeds()
        for info in infos:
            remove_testbed(info.token)
        console.print(f"removed {len(infos)} testbed(s)")
        return 0
    if not _NAME_RE.match(args.name):
        raise TestbedError(f"testbed name must be 1-7 characters of [0-9a-z], got {args.name!r}")
    token = f"n{args.name}"
    if not any(info.token == token for info in list_testbeds()):
        console.print(f"no testbed named {args.name!r} is up")
        return 0
    remove_testbed(token)
    console.print(f"removed testbed {args.name!r}")
    return 0


def _cli_status(console: Any) -> int:
    infos = list_testbeds()
    if not infos:
        console.print("no tent_async testbeds on this machine")
        return 0
    for info in infos:
        owner = f"named {info.token[1:]!r}" if info.owner_pid is None else f"pid {info.owner_pid}"
        flag = " [bold red](stale: owner gone)[/]" if info.stale else ""
        if len(info.present) < 2:
            console.print(f"{info.token} ({owner}){flag}: half removed, only {', '.join(info.present)}")
            continue
        tb = VethTestbed._attach_token(info.token)
        tb._state = "detached"  # a view only: never remove it from here
        c, s = info.namespaces
        console.print(_rail_table(tb, f"{info.token} ({owner}){flag}: client {c}, server {s}"), **_PLAIN)
    return 0


def _cli_measure(console: Any, args: argparse.Namespace) -> int:
    tb = VethTestbed.attach(args.name)
    tb.detach()
    for r in tb.rails:
        got = tb.tcp_throughput(r.index, args.seconds)
        console.print(
            f"rail {r.index} ({r.client_dev} -> {r.server_ip}) shaped {r.mbit:g} Mbit/s: "
            f"TCP goodput {got * 8 / 1e6:.1f} Mbit/s = {got / r.bandwidth:.1%} of the rate",
            **_PLAIN,
        )
    return 0
