"""What a small transfer costs when it comes alone: ``tent-async bench ucx --gaps``.

The loopback benchmark times 4 KiB transfers back to back, where a polling
progress mode shines: neither process ever sleeps.  Serving traffic is often
sporadic (a small transfer now and then between larger work), and a process
that polls burns its core while it waits.  This part puts the progress modes
side by side on both counts: for each rail of ``--rails`` and each mode of
``--progress`` (alternating, ``--repeat`` rounds), raw ucxx's 4 KiB send + ack
round trip and the engine's 4 KiB WRITE, back to back (``--lat-iters`` of
them) and with the client idle for each of :data:`GAPS` before each
(``asyncio.sleep``; the idle time measured is printed, as the loop's timer
rounds it up).  Reported: the p50 and p99, each process's CPU time per
transfer, and the share of the wall time each process was on a CPU.  Raw ucxx
in the same mode, after the same idle time, is the reference: what waking a
worker costs on this host before the engine does anything.  The peers answer
their CPU time on stdin (``cpu``, :mod:`._ucx_peer`); the client's is
``time.process_time``.  Every run (one kind, rail and mode) has a fresh client
interpreter and a fresh peer, as ``bench ucx``'s runs do, bounded by ``--limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from rich.table import Table

from .ucx import _pct, _peer, ask, raw_round_trips, run_isolated

GAPS = (0.0, 0.001, 0.005)  # seconds the client idles before each transfer (0: back to back)
SPAN = 1.5  # seconds of idling per gap at most: fewer transfers for the longer gaps
MIN_COUNT = 20  # ... but at least this many
SMALL = 4096
WARM = 100
KINDS = ("raw", "engine")


def _peer_cpu(proc: subprocess.Popen[str]) -> tuple[float, float]:
    """The peer process's CPU seconds so far, and when it said so (its ``perf_counter``)."""
    answer = ask(proc, "cpu")
    return float(answer["cpu"]), float(answer["at"])


def count_for(gap: float, count: int) -> int:
    """How many transfers to time after idling ``gap`` seconds each (``count`` back to back)."""
    if gap <= 0:
        return count
    return max(MIN_COUNT, min(count, round(SPAN / gap)))


async def _measure(
    proc: subprocess.Popen[str], once: Callable[[], Awaitable[float]], count: int
) -> list[dict[str, Any]]:
    """Time ``once()`` (one round trip, its seconds) after each idle time of :data:`GAPS`."""
    for _ in range(WARM):
        await once()
    out = []
    for gap in GAPS:
        n = count_for(gap, count)
        # The peer's figures come from a blocking exchange on its stdin: asked before this
        # window opens and after it closes, never inside it.
        cpu0, at0 = _peer_cpu(proc)
        mine0 = time.process_time()
        start = time.perf_counter()
        times = []
        for _ in range(n):
            if gap:
                await asyncio.sleep(gap)
            times.append(await once())
        wall = time.perf_counter() - start
        mine = time.process_time() - mine0
        cpu1, at1 = _peer_cpu(proc)
        out.append(
            {
                "idle": (wall - sum(times)) / n,  # what the client really idled before each
                "count": n,
                "p50": statistics.median(times),
                "p99": _pct(times, 0.99),
                "cpu_client": mine / n,
                "cpu_peer": (cpu1 - cpu0) / n,
                "busy_client": mine / wall,
                "busy_peer": (cpu1 - cpu0) / (at1 - at0),  # over the peer's own clock between its two answers
            }
        )
    return out


async def _engine(proc: subprocess.Popen[str], address: str, rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    from ..engine import Engine
    from ._ucx_peer import rail_spec

    rails = [rail_spec(rail)] if rail != "default" else None
    async with Engine(backend="ucx", name="gaps-client", rails=rails, progress=mode) as engine:
        src = engine.register(np.ones(1 << 20, dtype=np.uint8), name="src")
        peer = await engine.connect(address)
        dst = await peer.segment("dst")

        async def once() -> float:
            t0 = time.perf_counter()
            await engine.transfer(src[:SMALL], dst[:SMALL])
            return time.perf_counter() - t0

        return await _measure(proc, once, count)


async def _raw(proc: subprocess.Popen[str], address: bytes, rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    """Raw ucxx's 4 KiB send + 8-byte ack round trip (``bench ucx``'s own), through ``_measure``."""
    async with raw_round_trips(rail, proc, address, mode, SMALL) as once:
        return await _measure(proc, lambda: once(SMALL), count)


def one_run(kind: str, rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    """One run's rows (one per gap): ``kind`` is ``"raw"`` or ``"engine"``, against a fresh peer."""
    if kind == "engine":
        with _peer("engine", {"rail": rail, "size": 1 << 20, "progress": mode}) as (hello, proc):
            return asyncio.run(_engine(proc, hello["address"], rail, mode, count))
    messages = WARM + sum(count_for(gap, count) for gap in GAPS)  # exactly what _measure sends
    config = {"rail": rail, "size": SMALL, "rounds": [[SMALL, messages]], "progress": mode}
    with _peer("raw", config) as (hello, proc):
        return asyncio.run(_raw(proc, bytes.fromhex(hello["address"]), rail, mode, count))


def run_gaps(console: Any, args: argparse.Namespace) -> None:
    """``--gaps``: latency and CPU of sporadic 4 KiB round trips per rail and progress mode, raw and engine."""
    rails = [r.strip() for r in args.rails.split(",") if r.strip()]
    modes = [m.strip() for m in args.progress.split(",") if m.strip()]
    table = Table(
        title="4 KiB round trips back to back and after idling, 2 processes on loopback (medians over rounds)"
    )
    columns = ("rail", "progress", "idle before each", "what", "p50 (p99)", "vs raw", "CPU per round trip", "on a CPU")
    for col in columns:
        table.add_column(col, justify="left" if col in ("rail", "progress", "what") else "right")
    for rail in rails:
        kinds = ("engine",) if rail == "default" else KINDS  # raw ucxx has no rails=None
        got: dict[tuple[str, str], list[list[dict[str, Any]]]] = {(k, m): [] for k in kinds for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                for kind in kinds:
                    call = f"one_run({kind!r}, {rail!r}, {mode!r}, {args.lat_iters})"
                    run = run_isolated("ucx_gaps", call, args.limit)
                    if run is None:
                        console.print(
                            f"[yellow]{rail}: a {kind} run ({mode}) failed or hung for {args.limit:g} s; "
                            "left out[/yellow]"
                        )
                    else:
                        got[kind, mode].append(run)
        for mode in modes:
            for i, gap in enumerate(GAPS):
                raw_p50 = None
                for kind in kinds:
                    what = "raw ucxx" if kind == "raw" else "engine WRITE"
                    rows = [run[i] for run in got[kind, mode]]
                    if not rows:
                        table.add_row(rail, mode, f"{gap * 1e3:g} ms", what, "-", "-", "-", "-")
                        continue
                    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                    if kind == "raw":
                        raw_p50 = med["p50"]
                    table.add_row(
                        rail,
                        mode,
                        "none" if not gap else f"{med['idle'] * 1e3:.1f} ms",
                        what,
                        f"{med['p50'] * 1e6:.0f} ({med['p99'] * 1e6:.0f}) us",
                        f"{(med['p50'] - raw_p50) * 1e6:+.0f} us" if kind == "engine" and raw_p50 else "-",
                        f"{med['cpu_client'] * 1e6:.0f} / {med['cpu_peer'] * 1e6:.0f} us",
                        f"{med['busy_client']:.0%} / {med['busy_peer']:.0%}",
                    )
                    print(
                        json.dumps(
                            {
                                "bench": "ucx_gaps",
                                "rail": rail,
                                "what": kind,
                                "progress": mode,
                                "gap_ms": gap * 1e3,
                                "idle_ms": med["idle"] * 1e3,
                                "count": rows[0]["count"],
                                "runs": len(rows),
                                "p50_us": med["p50"] * 1e6,
                                "p99_us": med["p99"] * 1e6,
                                "cpu_client_us": med["cpu_client"] * 1e6,
                                "cpu_peer_us": med["cpu_peer"] * 1e6,
                                "busy_client": med["busy_client"],
                                "busy_peer": med["busy_peer"],
                                "p50_us_each": [round(r["p50"] * 1e6, 1) for r in rows],
                            }
                        )
                    )
    console.print(table)
    console.print(
        f"{args.lat_iters} back to back, then up to {args.lat_iters} (at most {SPAN:g} s of idling, at least "
        f"{MIN_COUNT}) after each idle time; raw ucxx and the engine progress alike and alternate, {args.repeat} "
        "rounds, each run in fresh processes. CPU per round trip and 'on a CPU' (CPU time over the wall time of "
        "the timed round trips and idling, each process by its own clock; 100% = a core kept busy): client / peer"
    )
