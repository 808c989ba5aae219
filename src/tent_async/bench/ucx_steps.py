"""Where a small ucx transfer's time goes: ``tent-async bench ucx --steps`` (issue 9).

Both processes (this one and a fresh peer engine, ``_ucx_peer steps``) stamp every
step of sequential 4 KiB transfers with ``time.perf_counter()``, which is
CLOCK_MONOTONIC on Linux, so the two processes' stamps share one time line.  The
steps are the entry (and some exits) of the engine's, the planner's, the link's,
the server's and the progress pass's methods and the endpoint's ``tag_send`` /
``tag_recv``, stamped by wrapping them (about 1 us per stamped call on a slow VM:
the figures are a little above an unstamped run's).  For each transfer the peer's
stamps inside its ``transfer()`` call are merged in; the table gives the median of
every step over the transfers whose steps came in the most common order, and a
few spans over all of them.  Each process's CPU time per transfer
(``time.process_time``) is reported beside: on a host where the two processes
cannot overlap, their sum is the round trip.  So is the work each process does
per transfer, counted (not stamped): event-loop turns, progress passes, the
worker's progress calls and arms inside passes, and the UCX sends and receives
posted on endpoints (raw ucxx's round trip is one send and one receive per side).

This instruments the library by replacing methods: run it alone (``--steps`` runs
nothing else), never inside an application.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.table import Table

from .ucx import ask

SMALL = 4096
Stamp = tuple[str, float]
LOG: list[Stamp] = []  # (label, perf_counter) of this process
WORK: collections.Counter[str] = collections.Counter()  # this process's counted work (see count_turns)
WORK_KEYS = ("turns", "passes", "progress calls", "arms", "UCX sends", "UCX receives")


def _wrap(cls: type, name: str, label: str, after: str | None = None) -> None:
    fn: Callable[..., Any] = getattr(cls, name)
    log = LOG.append
    clock = time.perf_counter

    @functools.wraps(fn)
    def stamped(*args: Any, **kwargs: Any) -> Any:
        log((label, clock()))
        result = fn(*args, **kwargs)
        if after is not None:
            log((after, clock()))
        return result

    setattr(cls, name, stamped)


class _StampedEndpoint:
    """An endpoint whose tag_send and tag_recv calls are stamped on entry and exit."""

    __slots__ = ("ep",)

    def __init__(self, ep: Any) -> None:
        self.ep = ep

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)

    def tag_send(self, array: Any, tag: Any) -> Any:
        WORK["UCX sends"] += 1
        LOG.append(("send<", time.perf_counter()))
        req = self.ep.tag_send(array, tag)
        LOG.append(("send>", time.perf_counter()))
        return req

    def tag_recv(self, array: Any, tag: Any) -> Any:
        WORK["UCX receives"] += 1
        LOG.append(("recv<", time.perf_counter()))
        req = self.ep.tag_recv(array, tag)
        LOG.append(("recv>", time.perf_counter()))
        return req

    def tag_recv_with_handle(self, array: Any, probe: Any) -> Any:
        WORK["UCX receives"] += 1
        return self.ep.tag_recv_with_handle(array, probe)


class _CountedWorker:
    """A worker whose progress calls and arms are counted (handed to the pass only)."""

    __slots__ = ("worker",)

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)

    def progress_once(self) -> Any:
        WORK["progress calls"] += 1
        return self.worker.progress_once()

    def arm(self) -> Any:
        WORK["arms"] += 1
        return self.worker.arm()


def count_turns(loop: asyncio.AbstractEventLoop) -> None:
    """Count the loop's turns (``_run_once``) into :data:`WORK`."""
    run_once = loop._run_once  # type: ignore[attr-defined]

    def counted() -> None:
        WORK["turns"] += 1
        run_once()

    loop._run_once = counted  # type: ignore[attr-defined]


def install() -> None:
    """Stamp the steps of a transfer in this process (both sides use the same set)."""
    from .. import engine as engine_module
    from ..backends.ucx import backend, channel, peer, progress, server

    endpoint = channel.Channel._endpoint

    def stamped_endpoint(self: channel.Channel) -> Any:
        return _StampedEndpoint(endpoint(self))

    channel.Channel._endpoint = stamped_endpoint  # type: ignore[method-assign]
    _wrap(progress.LoopProgress, "_on_event", "event")
    _wrap(progress.LoopProgress, "_pass", "pass<", "pass>")
    run_pass = progress.LoopProgress._run_pass
    pass_ = progress.LoopProgress._pass

    def counted_pass(self: progress.LoopProgress, queued: bool = False) -> None:
        WORK["passes"] += 1
        pass_(self, queued)

    def counted_run_pass(self: progress.LoopProgress, worker: Any, nested: bool = False) -> bool:
        return run_pass(self, _CountedWorker(worker), nested)

    progress.LoopProgress._pass = counted_pass  # type: ignore[method-assign]
    progress.LoopProgress._run_pass = counted_run_pass  # type: ignore[method-assign]
    _wrap(progress.LoopProgress, "_deliver", "deliver<", "deliver>")
    _wrap(engine_module.Engine, "submit", "submit<", "submit>")
    _wrap(engine_module.Engine, "_finish", "finish")
    _wrap(backend.UcxBackend, "post", "post<", "post>")
    _wrap(peer.Link, "_on_reply", "reply")
    _wrap(server.ServerLink, "_on_header", "header")
    _wrap(server.Server, "serve", "serve<", "serve>")
    _wrap(server.ServerLink, "reply", "answer")


def _steps(client: list[Stamp], peer: list[Stamp]) -> tuple[list[tuple[str, float]], dict[str, float], int, int]:
    """Median per step of the most common order, spans over all transfers, and the counts."""
    transfers: list[list[Stamp]] = []
    current: list[Stamp] | None = None
    for label, t in client:
        if label == "call":
            current = [(label, t)]
        elif current is not None:
            current.append((label, t))
            if label == "ret":
                transfers.append(current)
                current = None
    times = [t for _label, t in peer]
    orders: collections.Counter[tuple[str, ...]] = collections.Counter()
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    spans: dict[str, list[float]] = collections.defaultdict(list)
    for tr in transfers:
        t0, t1 = tr[0][1], tr[-1][1]
        lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
        theirs = peer[lo:hi]
        events = sorted(
            [("client " + lab, t) for lab, t in tr] + [("peer " + lab, t) for lab, t in theirs], key=lambda e: e[1]
        )
        orders[tuple(lab for lab, _t in events)] += 1
        seen: collections.Counter[str] = collections.Counter()
        prev: tuple[str, float] | None = None
        for lab, t in events:
            seen[lab] += 1
            key = f"{lab} #{seen[lab]}"
            if prev is not None:
                gaps[(prev[0], key)].append(t - prev[1])
            prev = (key, t)
        first: dict[str, float] = {}
        for lab, t in tr:
            first.setdefault(lab, t)
        woke = next((t for lab, t in theirs if lab == "event"), None)
        answer = next((t for lab, t in theirs if lab == "send<" and woke is not None and t > woke), None)
        spans["round trip"].append(t1 - t0)
        if "send<" in first:
            spans["client: transfer() to the header's tag_send"].append(first["send<"] - t0)
        if woke is not None and answer is not None:
            spans["peer: wake-up to the answer's tag_send"].append(answer - woke)
        if "reply" in first:
            spans["client: reply decoded to transfer() return"].append(t1 - first["reply"])
    if not orders:
        return [], {}, 0, 0
    order, count = orders.most_common(1)[0]
    rows = []
    seen = collections.Counter()
    prev_key = ""
    for lab in order:
        seen[lab] += 1
        key = f"{lab} #{seen[lab]}"
        if prev_key:
            rows.append((f"{prev_key} -> {key}", statistics.median(gaps[(prev_key, key)])))
        prev_key = key
    return rows, {k: statistics.median(v) for k, v in spans.items()}, count, len(transfers)


async def _client(
    rail: str, address: str, op: str, iters: int, warm: int, mark: Callable[[], float], mode: str
) -> dict[str, Any]:
    from ..engine import Engine
    from ._ucx_peer import rail_spec

    rails = [rail_spec(rail)] if rail != "default" else None
    async with Engine(backend="ucx", name="steps-client", rails=rails, progress=mode) as engine:
        src = engine.register(np.random.default_rng(1).integers(0, 256, SMALL, dtype=np.uint8), name="src")
        dst = engine.register(np.ones(SMALL, dtype=np.uint8), name="dst")
        peer = await engine.connect(address)
        if op == "write":
            a, b = src[:], (await peer.segment("dst"))[:SMALL]
        else:
            a, b = (await peer.segment("src"))[:SMALL], dst[:]
        for _ in range(warm):
            await engine.transfer(a, b)
        peer_cpu0 = mark()  # the peer clears its stamps and says its CPU time so far
        del LOG[:]
        count_turns(asyncio.get_running_loop())
        WORK.clear()
        log = LOG.append
        clock = time.perf_counter
        cpu0 = time.process_time()
        for _ in range(iters):
            log(("call", clock()))
            await engine.transfer(a, b)
            log(("ret", clock()))
        cpu = time.process_time() - cpu0
        return {"cpu": cpu, "peer_cpu0": peer_cpu0, "work": {k: WORK[k] for k in WORK_KEYS}}


def _one(rail: str, op: str, iters: int, mode: str = "loop") -> tuple[dict[str, Any], list[Stamp]]:
    """One stamped run against a fresh peer, both in progress ``mode``: the client's figures, the peer's stamps."""
    config = {"rail": rail, "size": 1 << 20, "progress": mode}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tent_async.bench._ucx_peer", "steps", json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdin, stdout = proc.stdin, proc.stdout
    assert stdin is not None
    assert stdout is not None

    def mark() -> float:
        return float(ask(proc, "mark")["cpu"])  # a blocking exchange of one line, before the timed part

    try:
        hello = json.loads(stdout.readline())
        result = asyncio.run(_client(rail, hello["address"], op, iters, 200, mark, mode))
    finally:
        stdin.close()
    theirs = json.loads(stdout.read() or "{}")
    proc.wait(15)
    result["peer_cpu"] = float(theirs.get("cpu", 0.0)) - result["peer_cpu0"]
    result["peer_work"] = theirs.get("work", {})
    return result, [(str(lab), float(t)) for lab, t in theirs.get("log", [])]


def run_steps(console: Any, args: argparse.Namespace) -> None:
    """``--steps``: the per-step table of 4 KiB WRITEs and READs per rail of ``--rails`` and mode of ``--progress``."""
    rails = [r.strip() for r in args.rails.split(",") if r.strip()]
    modes = [m.strip() for m in args.progress.split(",") if m.strip()]
    install()
    for rail, mode, op in ((r, m, o) for r in rails for m in modes for o in ("write", "read")):
        result, theirs = _one(rail, op, args.lat_iters, mode)
        rows, spans, count, total = _steps(LOG, theirs)
        title = f"4 KiB {op.upper()} over {rail}, {mode}: medians per step ({count} of {total} in this order)"
        table = Table(title=title)
        table.add_column("step")
        table.add_column("median", justify="right")
        for step, seconds in rows:
            table.add_row(step, f"{seconds * 1e6:.1f} us")
        table.add_row("sum of the medians", f"{sum(s for _step, s in rows) * 1e6:.1f} us")
        for name, seconds in spans.items():
            table.add_row(f"[b]{name}[/b] (all transfers)", f"{seconds * 1e6:.1f} us")
        cpu = [round(result["cpu"] / max(total, 1) * 1e6), round(result["peer_cpu"] / max(total, 1) * 1e6)]
        table.add_row("CPU per transfer: client / peer", f"{cpu[0]} / {cpu[1]} us")
        work = {
            side: {k: round(float(counts.get(k, 0)) / max(total, 1), 2) for k in WORK_KEYS}
            for side, counts in (("client", result["work"]), ("peer", result["peer_work"]))
        }
        for key in WORK_KEYS:
            table.add_row(f"{key} per transfer: client / peer", f"{work['client'][key]} / {work['peer'][key]}")
        console.print(table)
        print(
            json.dumps(
                {
                    "bench": "ucx_steps",
                    "rail": rail,
                    "progress": mode,
                    "op": op,
                    "steps_us": {s: round(v * 1e6, 1) for s, v in rows},
                    "spans_us": {s: round(v * 1e6, 1) for s, v in spans.items()},
                    "cpu_us": cpu,
                    "work": work,
                }
            )
        )
