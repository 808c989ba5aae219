"""UCX over real heterogeneous rails: the veth testbed, raw ucxx vs UCX's own multi-rail (vs the engine).

Builds a :class:`~tent_async.testbed.VethTestbed` (default rails of 800 and 200 Mbit/s),
runs a server process in one namespace and a client process in the other (``ip netns
exec``, fresh interpreters: never a fork of a process holding a UCX context), and
measures a WRITE of ``--size`` bytes, each figure beside the aggregate shaped capacity:

* **raw rail X alone**: raw ucxx, one context pinned to that veth (``NET_DEVICES``),
  ``--slice`` slices with ``--window`` in flight, tag sends into pre-posted receives;
* **raw, all rails, static split**: the same on every rail at once, bytes split in
  proportion to the shaped rates (a hand-tuned split that knows the rates: the ceiling);
* **UCX multi-rail**: one context over all the veths (``NET_DEVICES=a,b``,
  ``MAX_RNDV_RAILS=n``), one tag send per iteration: UCX splits it by its own estimate;
* **engine** (once ``tent_async.backends.ucx`` exists): ``eft``, ``round_robin``,
  ``single``, and a timeline with the fastest rail taken down mid-transfer.

The receiver checks every byte.  Share of bytes per rail comes from the kernel's
interface counters, so it shows what really crossed each link.

    tent-async bench veth [--rates 800mbit,200mbit] [--size 64MiB] [--iterations 3]

``run_veth(console, args)`` is the reusable entry point (``tent-async bench ucx`` can
call it); it returns the rows it printed as JSON lines.  Needs root (see docs/testbed.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..display import console as make_console
from ..testbed import Side, TestbedError, VethTestbed, available
from ..units import parse_size

ENGINE_POLICIES = ("eft", "round_robin", "single")
_TCP_CEILING = 0.956  # TCP/IP/Ethernet payload share of a 1500-MTU link: the best any TCP rail can do
_READY_TIMEOUT = 60.0


class BenchStepError(RuntimeError):
    """One measurement step failed or timed out; the message carries the worker's last words."""


# =========================================================================== arguments


def add_veth_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the veth measurement (shared with ``tent-async bench ucx``)."""
    parser.add_argument("--rates", default="800mbit,200mbit", help="rail rates (default 800mbit,200mbit)")
    parser.add_argument("--size", default="64MiB", help="bytes per transfer (default 64MiB)")
    parser.add_argument("--iterations", type=int, default=3, help="timed transfers per case (default 3)")
    parser.add_argument("--slice", default="4MiB", help="raw per-rail runs: bytes per tag send (default 4MiB)")
    parser.add_argument("--window", type=int, default=4, help="raw per-rail runs: slices in flight (default 4)")
    parser.add_argument("--policies", default=",".join(ENGINE_POLICIES), help="engine policies to run")
    parser.add_argument("--no-engine", action="store_true", help="raw ucxx only")
    parser.add_argument("--no-raw", action="store_true", help="engine rows and the link-down timeline only")
    parser.add_argument(
        "--no-hints",
        action="store_true",
        help="engine rails without bandwidth= hints: the engine learns each rail's rate from telemetry",
    )
    parser.add_argument("--timeline-size", default="160MiB", help="bytes of the link-down timeline transfer")
    parser.add_argument("--down-at", type=float, default=1.0, help="seconds into the timeline to take a rail down")
    parser.add_argument("--step-timeout", type=float, default=0.0, help="seconds per step (default: from the rates)")


add_arguments = add_veth_arguments


def run(args: argparse.Namespace) -> int:
    """``tent-async bench veth``."""
    rows = run_veth(make_console(), args)
    return 0 if rows else 1


# ============================================================================ helpers


def rail_names(tb: VethTestbed) -> list[str]:
    """``r800``, ``r200``, ... (suffixed where two rails share a rate)."""
    names: list[str] = []
    for r in tb.rails:
        name = f"r{r.mbit:g}"
        names.append(name if name not in names else f"{name}_{r.index}")
    return names


def _split(total: int, weights: Sequence[float], align: int = 4096) -> list[int]:
    """Bytes per rail in proportion to ``weights``, page-aligned, summing to ``total``."""
    raw = [total * w / sum(weights) for w in weights]
    sizes = [int(x) // align * align for x in raw]
    sizes[0] += total - sum(sizes)
    return sizes


def _pattern(n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Position-dependent bytes: a slice landing at the wrong offset is caught."""
    return (np.arange(n, dtype=np.uint32) % 251).astype(np.uint8)


def engine_available() -> tuple[bool, str]:
    """Whether the tent_async UCX backend can be imported (engine rows need it)."""
    try:
        importlib.import_module("tent_async.backends.ucx")
    except ImportError as exc:
        return False, f"tent_async.backends.ucx cannot be imported ({exc})"
    return True, ""


class _Worker:
    """A benchmark worker process inside one namespace, talking JSON lines on stdout."""

    def __init__(self, tb: VethTestbed, side: Side, spec: dict[str, Any]) -> None:
        env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", "PYTHONUNBUFFERED": "1"}
        self.role = f"{side}:{spec['role']}"
        self.proc = tb.popen(
            side,
            [sys.executable, "-m", "tent_async.bench.ucx_veth", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.put(json.loads(line))
        self.events.put(None)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())
            del self.stderr[:-20]

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next message, which must be ``event``; a timeout, exit or error raises BenchStepError."""
        try:
            msg = self.events.get(timeout=timeout)
        except queue.Empty:
            raise BenchStepError(f"{self.role}: no {event!r} within {timeout:g} s{self._tail()}") from None
        if msg is None:
            self.proc.wait(5)
            raise BenchStepError(f"{self.role} exited ({self.proc.returncode}) before {event!r}{self._tail()}")
        if msg.get("event") == "error":
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            time.sleep(0.1)  # let the stderr pump take the traceback's last lines
            raise BenchStepError(f"{self.role} failed before {event!r}: {msg.get('error')}{self._tail()}")
        if msg.get("event") != event:
            raise BenchStepError(f"{self.role}: expected {event!r}, got {msg}{self._tail()}")
        return msg

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def _tail(self) -> str:
        return ("\n  stderr: " + "\n  stderr: ".join(self.stderr[-4:])) if self.stderr else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)


@contextlib.contextmanager
def _pair(
    tb: VethTestbed, server_spec: dict[str, Any], client_spec: dict[str, Any]
) -> Iterator[tuple[_Worker, _Worker]]:
    """Start the server, hand its ports/address to the client, stop both whatever happens."""
    server = _Worker(tb, "server", server_spec)
    client: _Worker | None = None
    try:
        ready = server.expect("ready", _READY_TIMEOUT)
        client = _Worker(tb, "client", {**client_spec, **ready.get("connect", {})})
        yield server, client
    finally:
        for w in (client, server):
            if w is not None:
                w.stop()


# ======================================================================= measurement


def _step_timeout(args: argparse.Namespace, nbytes: float, rate: float) -> float:
    if args.step_timeout > 0:
        return float(args.step_timeout)
    return 30.0 + 3.0 * nbytes / (rate * 0.5)


def _row(
    tb: VethTestbed,
    case: str,
    kind: str,
    result: dict[str, Any],
    counters: tuple[list[tuple[int, int]], list[tuple[int, int]]],
    **extra: Any,
) -> dict[str, Any]:
    seconds = statistics.median(result["seconds"])
    thr = result["bytes"] / seconds
    before, after = counters
    sent = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    total = sum(sent) or 1
    return {
        "bench": "ucx_veth",
        "case": case,
        "kind": kind,
        "bytes": result["bytes"],
        "iterations": [round(s, 4) for s in result["seconds"]],
        "seconds": round(seconds, 4),
        "throughput": thr,
        "mbit": thr * 8 / 1e6,
        "capacity": tb.capacity,
        "fraction": thr / tb.capacity,
        "share": {name: round(100 * s / total, 1) for name, s in zip(rail_names(tb), sent, strict=True)},
        "data_ok": result.get("data_ok"),
        **extra,
    }


def _raw_case(
    tb: VethTestbed, args: argparse.Namespace, indices: Sequence[int], sizes: Sequence[int]
) -> tuple[dict[str, Any], tuple[list[tuple[int, int]], list[tuple[int, int]]], list[str]]:
    """One context per rail in ``indices``; rail i carries ``sizes[i]`` bytes per iteration."""
    rails = [tb.rails[i] for i in indices]
    common = {
        "mode": "rails",
        "sizes": list(sizes),
        "slice": parse_size(args.slice),
        "window": args.window,
        "iterations": args.iterations,
    }
    rate = sum(r.bandwidth for r in rails)
    timeout = _step_timeout(args, sum(sizes) * (args.iterations + 1), rate)
    server_spec = {**common, "role": "raw_server", "devices": [r.server_dev for r in rails], "timeout": timeout}
    client_spec = {
        **common,
        "role": "raw_client",
        "devices": [r.client_dev for r in rails],
        "peers": [r.server_ip for r in rails],
        "timeout": timeout,
    }
    return _run_raw(tb, server_spec, client_spec, timeout)


def _multirail_case(
    tb: VethTestbed, args: argparse.Namespace
) -> tuple[dict[str, Any], tuple[list[tuple[int, int]], list[tuple[int, int]]], list[str]]:
    """One context over every veth, UCX's own multi-rail (MAX_RNDV_RAILS = number of rails)."""
    size = parse_size(args.size)
    common = {"mode": "multirail", "sizes": [size], "slice": parse_size(args.slice), "iterations": args.iterations}
    timeout = _step_timeout(args, size * (args.iterations + 1), min(r.bandwidth for r in tb.rails) * 2)
    server_spec = {**common, "role": "raw_server", "devices": [r.server_dev for r in tb.rails], "timeout": timeout}
    client_spec = {
        **common,
        "role": "raw_client",
        "devices": [r.client_dev for r in tb.rails],
        "peers": [tb.rails[0].server_ip],
        "timeout": timeout,
    }
    return _run_raw(tb, server_spec, client_spec, timeout)


def _run_raw(
    tb: VethTestbed, server_spec: dict[str, Any], client_spec: dict[str, Any], timeout: float
) -> tuple[dict[str, Any], tuple[list[tuple[int, int]], list[tuple[int, int]]], list[str]]:
    with _pair(tb, server_spec, client_spec) as (server, client):
        client.expect("connected", _READY_TIMEOUT)
        before = tb.byte_counters("client")
        client.tell("go")
        result = client.expect("result", timeout)
        after = tb.byte_counters("client")
        verified = server.expect("verified", 30)
    result["data_ok"] = bool(verified["ok"])
    return result, (before, after), list(result.get("resources", []))


def run_veth(console: Console, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build the testbed, run every case, print a rich table and JSON lines; return the rows.

    Returns ``[]`` (after saying why) where the testbed cannot be built or ucxx is missing.
    """
    ok, reason = available()
    if not ok:
        console.print(f"[yellow]veth testbed skipped:[/] {reason}")
        return []
    if importlib.util.find_spec("ucxx") is None:  # not imported here: it rewrites os.environ
        console.print("[yellow]veth testbed skipped:[/] ucxx is not installed; pip install 'tent_async[ucx]'")
        return []
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    size = parse_size(args.size)
    rows: list[dict[str, Any]] = []
    with VethTestbed(rates) as tb:
        names = rail_names(tb)
        cap = tb.capacity
        where = ", ".join(f"{n} ({r.client_dev}->{r.server_ip})" for n, r in zip(names, tb.rails, strict=True))
        console.print(
            f"veth testbed: rails {where}; aggregate shaped capacity {cap * 8 / 1e6:.0f} Mbit/s = {cap / 1e6:.1f} MB/s "
            f"(TCP payload can reach ~{_TCP_CEILING:.1%} of it); {args.iterations} x {size / 2**20:g} MiB per case",
            highlight=False,
        )

        def emit(row: dict[str, Any]) -> None:
            rows.append(row)
            console.print(json.dumps(row), markup=False, highlight=False, soft_wrap=True)

        steps: list[tuple[str, Callable[[], None]]] = []
        for i, name in enumerate(names):

            def alone(i: int = i, name: str = name) -> None:
                res, cnt, resources = _raw_case(tb, args, [i], [size])
                emit(
                    _row(
                        tb,
                        f"raw {name} alone",
                        "raw_rail",
                        res,
                        cnt,
                        rails=[name],
                        rail_fraction=size / statistics.median(res["seconds"]) / tb.rails[i].bandwidth,
                        resources=resources,
                    )
                )

            steps.append((f"raw {name}", alone))

        def parallel() -> None:
            sizes = _split(size, [r.bandwidth for r in tb.rails])
            res, cnt, resources = _raw_case(tb, args, range(len(tb.rails)), sizes)
            emit(_row(tb, "raw all rails, split by rate", "raw_parallel", res, cnt, rails=names, resources=resources))

        def multirail() -> None:
            res, cnt, resources = _multirail_case(tb, args)
            emit(
                _row(
                    tb,
                    f"UCX multi-rail, {len(tb.rails)} rails",
                    "ucx_multirail",
                    res,
                    cnt,
                    rails=names,
                    resources=resources,
                )
            )

        steps += [("raw parallel", parallel), ("ucx multi-rail", multirail)]
        if getattr(args, "no_raw", False):
            steps = []
        for label, step in steps:
            try:
                step()
            except (BenchStepError, TestbedError) as exc:
                console.print(f"[bold red]{label} failed:[/] {exc}", highlight=False)
        if not args.no_engine:
            engine_rows(console, tb, args, [p.strip() for p in args.policies.split(",") if p.strip()], emit)
        console.print(_table(tb, rows))
    return rows


def _table(tb: VethTestbed, rows: Sequence[dict[str, Any]]) -> Table:
    cap = tb.capacity
    table = Table(
        title=f"WRITE over veth rails {' + '.join(f'{r.mbit:g}' for r in tb.rails)} Mbit/s "
        f"(aggregate {cap * 8 / 1e6:.0f} Mbit/s)"
    )
    for col in ("case", "MiB", "median s", "Mbit/s", "of aggr.", "bytes/rail %", "data"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in rows:
        if "fraction" not in row:
            continue
        share = " ".join(f"{v:g}" for v in row["share"].values())
        data = {True: "ok", False: "CORRUPT", None: "-"}[row.get("data_ok")]
        table.add_row(
            row["case"],
            f"{row['bytes'] / 2**20:g}",
            f"{row['seconds']:.3f}",
            f"{row['mbit']:.1f}",
            f"{row['fraction']:.3f}",
            share,
            data,
        )
    return table


# ================================================================ engine (plug-in point)
#
# LEAD: this is where the tent_async engine plugs in once ``tent_async.backends.ucx``
# lands.  Written against the intended API (issue 5):
#     Engine(backend="ucx", name=..., listen="ip:port", rails=[RailSpec(name, device, bandwidth)])
#     peer = await engine.connect(address); remote = await peer.segment("buf")
#     await engine.transfer(local[0:n], remote[0:n]); engine.submit(...).bytes_done
# Only :func:`make_engine` (both sides) and the message flow below need touching if the
# backend's constructor or Peer API differ.  Until then these rows are skipped with a
# message, and the raw rows above stand alone.


def engine_rows(
    console: Console,
    tb: VethTestbed,
    args: argparse.Namespace,
    policies: Sequence[str],
    emit: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Engine rows (one per policy) and the link-down timeline; [] with a message if no backend.

    Each row is passed to ``emit`` (which prints and records it) as soon as it exists.
    """
    ok, reason = engine_available()
    if not ok:
        console.print(f"[yellow]engine rows skipped:[/] {reason}", highlight=False)
        return []
    out: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        out.append(row)
        emit(row)

    hints = "" if not getattr(args, "no_hints", False) else ", no bandwidth hints"
    for policy in policies:
        try:
            res, cnt = engine_case(tb, args, policy)
            keep(
                _row(
                    tb,
                    f"engine {policy}{hints}",
                    "engine",
                    res,
                    cnt,
                    policy=policy,
                    rails=rail_names(tb),
                    bytes_per_rail=res.get("bytes_per_rail"),
                )
            )
            fractions = [res["bytes"] / s / tb.capacity for s in res["seconds"]]
            later = fractions[2:]
            console.print(
                f"engine {policy}{hints}, each transfer in order: "
                + " ".join(f"{f:.3f}" for f in fractions)
                + (f" of the aggregate; from the third on, worst {min(later):.3f}" if later else " of the aggregate"),
                highlight=False,
            )
        except (BenchStepError, TestbedError) as exc:
            console.print(f"[bold red]engine {policy} failed:[/] {exc}", highlight=False)
    try:
        keep(link_down_timeline(console, tb, args, "eft"))
    except (BenchStepError, TestbedError) as exc:
        console.print(f"[bold red]link-down timeline failed:[/] {exc}", highlight=False)
    return out


def _engine_specs(
    tb: VethTestbed, args: argparse.Namespace, policy: str, size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    names = rail_names(tb)
    hints = not getattr(args, "no_hints", False)
    rails = [{"name": n, "bandwidth": r.bandwidth if hints else None} for n, r in zip(names, tb.rails, strict=True)]
    control = min(tb.rails, key=lambda r: r.bandwidth)  # the link-down timeline takes the fastest down
    server = {
        "role": "engine_server",
        "size": size,
        "listen": f"{control.server_ip}:0",
        "rails": [{**x, "device": r.server_dev} for x, r in zip(rails, tb.rails, strict=True)],
    }
    client = {
        "role": "engine_client",
        "size": size,
        "policy": policy,
        "iterations": args.iterations,
        "slice": parse_size(args.slice),
        "rails": [{**x, "device": r.client_dev} for x, r in zip(rails, tb.rails, strict=True)],
    }
    return server, client


def engine_case(
    tb: VethTestbed, args: argparse.Namespace, policy: str
) -> tuple[dict[str, Any], tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """``--iterations`` WRITEs of ``--size`` bytes by an engine with ``policy`` over every rail."""
    size = parse_size(args.size)
    slowest = min(r.bandwidth for r in tb.rails)
    timeout = _step_timeout(args, size * (args.iterations + 1), slowest)
    server_spec, client_spec = _engine_specs(tb, args, policy, size)
    server_spec["timeout"] = client_spec["timeout"] = timeout
    client_spec["mode"] = "iterations"
    with _pair(tb, server_spec, client_spec) as (server, client):
        client.expect("connected", _READY_TIMEOUT)
        before = tb.byte_counters("client")
        client.tell("go")
        result = client.expect("result", timeout)
        after = tb.byte_counters("client")
        server.tell("stop")
        result["data_ok"] = bool(server.expect("verified", 30)["ok"])
    return result, (before, after)


def _is_rail(engine_rail: str, name: str) -> bool:
    """Does the engine's rail (``"server/r800"``, ``"server/r800:r800"``) use our local rail ``name``?"""
    return engine_rail.rsplit("/", 1)[-1].split(":")[0] == name


def timeline_metrics(
    samples: Sequence[tuple[float, int]],
    t_down: float,
    event_times: Sequence[float],
    survivors: float,
    window: float = 0.1,
) -> dict[str, Any]:
    """Goodput around a link going down at ``t_down``, from ``(time, bytes done)`` samples.

    ``event_times``: when the engine reported something about the downed rail (its deadline
    firing).  Recovery: the first ``window`` after both the fault and that detection in
    which goodput is >= 90% of the surviving rails' TCP ceiling.  A surviving rail that was
    already busy keeps delivering, so goodput need not dip at all; ``longest_stall_s`` shows
    whether the transfer ever stood still.
    """

    def done_at(t: float) -> float:
        before = [(ts, n) for ts, n in samples if ts <= t]
        after = [(ts, n) for ts, n in samples if ts >= t]
        if not before:
            return float(samples[0][1]) if samples else 0.0
        if not after:
            return float(before[-1][1])
        (t0, n0), (t1, n1) = before[-1], after[0]
        return float(n0) if t1 <= t0 else n0 + (n1 - n0) * (t - t0) / (t1 - t0)

    def goodput(a: float, b: float) -> float:
        return (done_at(b) - done_at(a)) / (b - a) if b > a else 0.0

    end = samples[-1][0] if samples else t_down
    detected = min((t for t in event_times if t >= t_down), default=None)
    target = 0.9 * _TCP_CEILING * survivors
    recovered = None
    t = max(t_down, detected or t_down)
    while t + window <= end:
        if goodput(t, t + window) >= target:
            recovered = t
            break
        t += window / 10
    stall, last_t, last_n = 0.0, t_down, done_at(t_down)
    for ts, n in samples:
        if ts > t_down and n > last_n:  # progress: the gap since the previous progress was a stall
            stall = max(stall, ts - last_t)
            last_t, last_n = ts, n
    steps = int((end - (t_down - 0.5)) / window)
    series = [
        [round(-0.5 + k * window, 3), round(goodput(t_down - 0.5 + k * window, t_down - 0.5 + (k + 1) * window))]
        for k in range(max(0, steps))
    ]
    return {
        "goodput_before": goodput(t_down - 0.5, t_down),
        "goodput_after": goodput(t_down, end),
        "detected_s": None if detected is None else round(detected - t_down, 4),
        "recovery_s": None if recovered is None else round(recovered - t_down, 4),
        "recovery_after_detection_s": (
            None if recovered is None or detected is None else round(recovered - detected, 4)
        ),
        "longest_stall_s": round(stall, 4),
        "goodput_per_window": series,
    }


def link_down_timeline(console: Console, tb: VethTestbed, args: argparse.Namespace, policy: str) -> dict[str, Any]:
    """One big WRITE; the fastest rail goes down ``--down-at`` s in; goodput over time and recovery.

    The engines' control connection uses the slowest rail's address, so the fault hits the
    data plane only.  See :func:`timeline_metrics` for what is reported.
    """
    size = parse_size(args.timeline_size)
    fastest = max(range(len(tb.rails)), key=lambda i: tb.rails[i].bandwidth)
    survivors = sum(r.bandwidth for r in tb.rails if r.index != fastest)
    timeout = _step_timeout(args, size, survivors)
    server_spec, client_spec = _engine_specs(tb, args, policy, size)
    server_spec["timeout"] = client_spec["timeout"] = timeout
    client_spec["mode"] = "timeline"
    name = rail_names(tb)[fastest]
    with _pair(tb, server_spec, client_spec) as (server, client):
        client.expect("connected", _READY_TIMEOUT)
        client.tell("go")
        started = client.expect("started", 30)
        time.sleep(max(0.0, started["t"] + args.down_at - time.monotonic()))
        t_down = time.monotonic()
        tb.link_down(fastest)
        try:
            result = client.expect("timeline", timeout)
        finally:
            tb.link_up(fastest)
        server.tell("stop")
        data_ok = bool(server.expect("verified", 30)["ok"])
    samples = [(float(t), int(n)) for t, n in result["samples"]]
    events = [(float(t), str(kind), str(rail)) for t, kind, rail in result.get("events", [])]
    metrics = timeline_metrics(samples, t_down, [t for t, _, rail in events if _is_rail(rail, name)], survivors)
    row = {
        "bench": "ucx_veth",
        "case": f"engine {policy}, {name} down at {args.down_at:g} s",
        "kind": "timeline",
        "policy": policy,
        "bytes": size,
        "down_rail": name,
        "surviving_capacity": survivors,
        **metrics,
        "events": [[round(t - t_down, 4), kind, rail] for t, kind, rail in events],
        "bytes_per_rail": result.get("bytes_per_rail"),
        "data_ok": data_ok,
    }
    around = " ".join(f"{g / 1e6:.0f}" for t, g in metrics["goodput_per_window"] if -0.3 <= t < 0.7)
    console.print(
        f"timeline ({policy}): {name} down at {args.down_at:g} s; goodput {metrics['goodput_before'] / 1e6:.1f} MB/s "
        f"before, {metrics['goodput_after'] / 1e6:.1f} MB/s after (surviving capacity {survivors / 1e6:.1f} MB/s); "
        f"engine noticed after {metrics['detected_s']} s; >= 90% of the surviving TCP ceiling "
        f"{metrics['recovery_after_detection_s']} s after that (target < 0.05); longest stall "
        f"{metrics['longest_stall_s']} s; MB/s per 100 ms from -0.3 s: {around}; data {'ok' if data_ok else 'CORRUPT'}",
        highlight=False,
    )
    return row


# ============================================================ worker side (in a namespace)


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _stdin_line() -> str:
    return await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


class _RawRail:
    """One UCX context + worker + progress thread, as the ucx backend has per rail.

    Cython layer directly (``ucxx._lib.libucxx``): ApplicationContext gives progress only
    to the first context of a loop (docs/ucx.md, "ucxx's sharp edges").
    """

    def __init__(self, config: dict[str, str]) -> None:
        import ucxx  # noqa: F401  (sets its UCX_* defaults before libucxx loads)
        import ucxx._lib.libucxx as ucx_lib
        from ucxx._lib_async.notifier_thread import _notifierThread

        self.lib = ucx_lib
        self.loop = asyncio.get_running_loop()
        features = (ucx_lib.Feature.TAG, ucx_lib.Feature.WAKEUP, ucx_lib.Feature.STREAM, ucx_lib.Feature.AM)
        self.ctx = ucx_lib.UCXContext(config, feature_flags=features)
        self.worker = ucx_lib.UCXWorker(self.ctx, enable_delayed_submission=True, enable_python_future=True)
        self.worker.start_progress_thread(polling_mode=False, epoll_timeout=1)
        self._nq: queue.Queue[str] = queue.Queue()
        self._nt = threading.Thread(target=_notifierThread, args=(self.loop, self.worker, self._nq), daemon=True)
        self._nt.start()
        self.accepted: asyncio.Queue[Any] = asyncio.Queue()
        self._listener: Any = None

    def resources(self) -> list[str]:
        return [line.split("flags")[-1].strip() for line in self.ctx.info.splitlines() if "resource" in line]

    def listen(self) -> int:
        def on_conn(conn_request: Any) -> None:  # runs on the progress thread
            ep = self._listener.create_endpoint_from_conn_request(conn_request, True)
            self.loop.call_soon_threadsafe(self.accepted.put_nowait, ep)

        self._listener = self.lib.UCXListener.create(self.worker, 0, on_conn, deliver_endpoint=False)
        return int(self._listener.port)

    def connect(self, ip: str, port: int) -> Any:
        return self.lib.UCXEndpoint.create(self.worker, ip, port, True)

    def post_send(self, ep: Any, buf: np.ndarray[Any, Any], tag: int) -> Any:
        from ucxx._lib.arr import Array

        return ep.tag_send(Array(buf), self.lib.UCXXTag(tag))

    def post_recv(self, ep: Any, buf: np.ndarray[Any, Any], tag: int) -> Any:
        from ucxx._lib.arr import Array

        return ep.tag_recv(Array(buf), self.lib.UCXXTag(tag))

    def close(self) -> None:
        self._listener = None
        with contextlib.suppress(Exception):
            self.worker.stop_progress_thread()
        self._nq.put("shutdown")
        self.worker.stop_request_notifier_thread()
        self._nt.join(3)


_ACK = 1 << 62
_HELLO = 1 << 61


def _slices(offset: int, size: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, offset + size)) for a in range(offset, offset + size, step)]


def _contexts(spec: dict[str, Any]) -> list[dict[str, str]]:
    if spec["mode"] == "multirail":
        devs = spec["devices"]
        return [{"TLS": "tcp", "NET_DEVICES": ",".join(devs), "MAX_RNDV_RAILS": str(len(devs))}]
    return [{"TLS": "tcp", "NET_DEVICES": dev, "MAX_RNDV_RAILS": "1"} for dev in spec["devices"]]


def _plan(spec: dict[str, Any], warmup: bool) -> list[list[tuple[int, int]]]:
    """Per rail, the [a, b) slices of one iteration (warm-up: one slice per rail)."""
    sizes = spec["sizes"]
    offsets = np.cumsum([0, *sizes[:-1]]).tolist()
    step = spec["slice"] if spec["mode"] == "rails" else max(sizes)
    plan = []
    for off, n in zip(offsets, sizes, strict=True):
        n = min(n, spec["slice"]) if warmup else n
        plan.append(_slices(int(off), n, step) if spec["mode"] == "rails" else [(int(off), int(off) + n)])
    return plan


async def _raw_server(spec: dict[str, Any]) -> None:
    total = sum(spec["sizes"])
    expected = _pattern(total)
    bufs = [np.zeros(total, np.uint8), np.zeros(total, np.uint8)]
    rails = [_RawRail(cfg) for cfg in _contexts(spec)]
    try:
        ports = [r.listen() for r in rails]
        _emit("ready", connect={"ports": ports}, resources=[r.resources() for r in rails])
        eps = [await r.accepted.get() for r in rails]
        hello = np.zeros(8, np.uint8)
        for r, ep in zip(rails, eps, strict=True):
            await r.post_recv(ep, hello, _HELLO).wait()
        rounds = [(0, True)] + [(k, False) for k in range(1, spec["iterations"] + 1)]

        def post(k: int, warm: bool) -> list[Any]:
            buf = bufs[k % 2]
            return [
                rails[i].post_recv(eps[i], buf[a:b], (k << 32) | j)
                for i, slices in enumerate(_plan(spec, warm))
                for j, (a, b) in enumerate(slices)
            ]

        ok = True
        pending = post(*rounds[0])
        for n, (k, warm) in enumerate(rounds):
            await asyncio.gather(*(req.wait() for req in pending))
            if n + 1 < len(rounds):
                pending = post(*rounds[n + 1])  # into the other buffer, before the ack releases the sender
            await rails[0].post_send(eps[0], np.zeros(8, np.uint8), _ACK | k).wait()
            buf = bufs[k % 2]
            for slices in _plan(spec, warm):
                a, b = slices[0][0], slices[-1][1]
                ok = ok and bool(np.array_equal(buf[a:b], expected[a:b]))
            buf[:] = 0
        _emit("verified", ok=ok)
        await asyncio.sleep(0.2)  # let the last ack leave before the endpoints go
    finally:
        for r in rails:
            r.close()


async def _raw_client(spec: dict[str, Any]) -> None:
    total = sum(spec["sizes"])
    src = _pattern(total)
    rails = [_RawRail(cfg) for cfg in _contexts(spec)]
    try:
        eps = [r.connect(ip, port) for r, ip, port in zip(rails, spec["peers"], spec["ports"], strict=False)]
        for r, ep in zip(rails, eps, strict=True):
            await r.post_send(ep, np.zeros(8, np.uint8), _HELLO).wait()
        _emit("connected", resources=[r.resources() for r in rails])
        await _stdin_line()

        async def one_round(k: int, warm: bool) -> float:
            ack = np.zeros(8, np.uint8)
            ack_req = rails[0].post_recv(eps[0], ack, _ACK | k)
            t0 = time.perf_counter()

            async def rail_sends(i: int, slices: list[tuple[int, int]]) -> None:
                sem = asyncio.Semaphore(spec.get("window", 1))

                async def one(j: int, a: int, b: int) -> None:
                    async with sem:
                        await rails[i].post_send(eps[i], src[a:b], (k << 32) | j).wait()

                await asyncio.gather(*(one(j, a, b) for j, (a, b) in enumerate(slices)))

            await asyncio.gather(*(rail_sends(i, s) for i, s in enumerate(_plan(spec, warm))))
            await ack_req.wait()
            return time.perf_counter() - t0

        await one_round(0, True)
        seconds = [await one_round(k, False) for k in range(1, spec["iterations"] + 1)]
        _emit("result", bytes=total, seconds=seconds, resources=[r.resources() for r in rails])
        await asyncio.sleep(0.2)
    finally:
        for r in rails:
            r.close()


# ---------------------------------------------------------------- engine workers


def make_engine(role: str, spec: dict[str, Any]) -> Any:
    """LEAD: the one place that constructs the engine on either side (adapt to the backend)."""
    import tent_async as tent

    rails = [tent.RailSpec(name=r["name"], device=r["device"], bandwidth=r["bandwidth"]) for r in spec["rails"]]
    if role == "engine_server":
        return tent.Engine(backend="ucx", name="server", listen=spec["listen"], rails=rails)
    return tent.Engine(backend="ucx", name="client", policy=spec["policy"], rails=rails)


async def _engine_server(spec: dict[str, Any]) -> None:
    buf = np.zeros(spec["size"], np.uint8)
    async with make_engine("engine_server", spec) as engine:
        engine.register(buf, name="buf", permission="rw")
        _emit("ready", connect={"address": engine.address})
        await _stdin_line()  # "stop" from the parent once the client is done
    _emit("verified", ok=bool(np.array_equal(buf, _pattern(spec["size"]))))


async def _engine_client(spec: dict[str, Any]) -> None:
    size = spec["size"]
    src = _pattern(size)
    async with make_engine("engine_client", spec) as engine:
        local = engine.register(src, name="src", permission="r")
        peer = await engine.connect(spec["address"])
        remote = await peer.segment("buf")
        await engine.transfer(local[0 : spec["slice"]], remote[0 : spec["slice"]])  # wire-up
        _emit("connected")
        await _stdin_line()
        if spec["mode"] == "iterations":
            seconds, per_rail = [], []
            for _ in range(spec["iterations"]):
                t0 = time.perf_counter()
                res = await engine.transfer(local[0:size], remote[0:size])
                seconds.append(time.perf_counter() - t0)
                per_rail.append(dict(res.bytes_per_rail))
            _emit("result", bytes=size, seconds=seconds, bytes_per_rail=per_rail)
            return
        events: list[tuple[float, str, str]] = []
        engine.add_event_listener(lambda ev: events.append((time.monotonic(), ev.kind.name, ev.rail)))
        handle = engine.submit(local[0:size], remote[0:size])
        samples = [(time.monotonic(), 0)]
        _emit("started", t=samples[0][0])
        while not handle.done():
            await asyncio.sleep(0.005)
            samples.append((time.monotonic(), handle.bytes_done))
        res = await handle
        _emit("timeline", samples=samples, events=events, bytes_per_rail=dict(res.bytes_per_rail))


def _worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    entry = {
        "raw_server": _raw_server,
        "raw_client": _raw_client,
        "engine_server": _engine_server,
        "engine_client": _engine_client,
    }[spec["role"]]
    try:
        asyncio.run(asyncio.wait_for(entry(spec), _READY_TIMEOUT + spec.get("timeout", 300.0)))
    except Exception as exc:
        _emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tent_async.bench.ucx_veth [options]``, or ``--worker SPEC`` inside a namespace."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker_main(argv[1])
    parser = argparse.ArgumentParser(prog="python -m tent_async.bench.ucx_veth", description=__doc__.splitlines()[0])
    add_veth_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
