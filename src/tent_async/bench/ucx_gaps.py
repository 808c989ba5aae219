"""What a small transfer costs when it comes alone: ``tent-async bench ucx --gaps``.

The loopback benchmark times 4 KiB transfers back to back, where a polling
progress mode shines: neither process ever sleeps.  Serving traffic is often
sporadic (a small transfer now and then between larger work), and a process
that polls burns its core while it waits.  This part puts the progress modes
side by side on both counts: for each rail of ``--rails`` and each mode of
``--progress`` (alternating, ``--repeat`` rounds), 4 KiB WRITEs to a peer
engine back to back (``--lat-iters`` of them) and then with the client idle
for :data:`GAPS` before each (``asyncio.sleep``; the idle time measured is
printed, as the loop's timer rounds it up), reporting the p50 and p99, each
process's CPU time per transfer, and the share of the wall time each process
was on a CPU.  The peer answers its CPU time on stdin (``cpu``: the
``engine`` peer of :mod:`._ucx_peer`); the client's is ``time.process_time``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from typing import Any

import numpy as np
from rich.table import Table

GAPS = (0.0, 0.001, 0.005)  # seconds the client idles before each transfer (0: back to back)
SPAN = 1.5  # seconds of idling per gap at most: fewer transfers for the longer gaps
MIN_COUNT = 20  # ... but at least this many
SMALL = 4096
WARM = 100


def _peer_cpu(proc: subprocess.Popen[str]) -> float:
    """The peer process's CPU seconds so far (it answers a ``cpu`` line on stdin)."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write("cpu\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the peer exited (code {proc.wait(10)})")
    return float(json.loads(line)["cpu"])


def count_for(gap: float, count: int) -> int:
    """How many transfers to time after idling ``gap`` seconds each (``count`` back to back)."""
    if gap <= 0:
        return count
    return max(MIN_COUNT, min(count, int(SPAN / gap)))


async def _client(proc: subprocess.Popen[str], address: str, rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    from ..engine import Engine
    from ._ucx_peer import rail_spec

    rails = [rail_spec(rail)] if rail != "default" else None
    async with Engine(backend="ucx", name="gaps-client", rails=rails, progress=mode) as engine:
        src = engine.register(np.ones(1 << 20, dtype=np.uint8), name="src")
        peer = await engine.connect(address)
        dst = await peer.segment("dst")
        for _ in range(WARM):
            await engine.transfer(src[:SMALL], dst[:SMALL])
        out = []
        for gap in GAPS:
            n = count_for(gap, count)
            theirs0 = _peer_cpu(proc)
            mine0 = time.process_time()
            start = time.perf_counter()
            times = []
            for _ in range(n):
                if gap:
                    await asyncio.sleep(gap)
                t0 = time.perf_counter()
                await engine.transfer(src[:SMALL], dst[:SMALL])
                times.append(time.perf_counter() - t0)
            wall = time.perf_counter() - start
            mine = time.process_time() - mine0
            theirs = _peer_cpu(proc) - theirs0
            times.sort()
            out.append(
                {
                    "gap": gap,
                    "idle": (wall - sum(times)) / n,  # what the client really idled before each
                    "count": n,
                    "p50": times[len(times) // 2],
                    "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
                    "cpu_client": mine / n,
                    "cpu_peer": theirs / n,
                    "busy_client": mine / wall,
                    "busy_peer": theirs / wall,
                }
            )
        return out


def _one(rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    from .ucx import SIZE, _peer

    with _peer("engine", {"rail": rail, "size": SIZE, "progress": mode}) as (hello, proc):
        return asyncio.run(_client(proc, hello["address"], rail, mode, count))


def run_gaps(console: Any, args: argparse.Namespace) -> None:
    """``--gaps``: latency and CPU of sporadic 4 KiB WRITEs per rail and progress mode."""
    rails = [r.strip() for r in args.rails.split(",") if r.strip()]
    modes = [m.strip() for m in args.progress.split(",") if m.strip()]
    table = Table(title="4 KiB WRITEs back to back and after idling, 2 processes on loopback (medians over rounds)")
    for col in ("rail", "progress", "idle before each", "p50 (p99)", "CPU per transfer: client / peer", "on a CPU"):
        table.add_column(col, justify="left" if col in ("rail", "progress") else "right")
    for rail in rails:
        got: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in modes}
        for _ in range(args.repeat):
            for mode in modes:
                got[mode].append(_one(rail, mode, args.lat_iters))
        for mode in modes:
            for i, gap in enumerate(GAPS):
                rows = [run[i] for run in got[mode]]
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                table.add_row(
                    rail,
                    mode,
                    "none" if not gap else f"{med['idle'] * 1e3:.1f} ms",
                    f"{med['p50'] * 1e6:.0f} ({med['p99'] * 1e6:.0f}) us",
                    f"{med['cpu_client'] * 1e6:.0f} / {med['cpu_peer'] * 1e6:.0f} us",
                    f"{med['busy_client']:.0%} / {med['busy_peer']:.0%}",
                )
                print(
                    json.dumps(
                        {
                            "bench": "ucx_gaps",
                            "rail": rail,
                            "progress": mode,
                            "gap_ms": gap * 1e3,
                            "idle_ms": med["idle"] * 1e3,
                            "count": med["count"],
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
        f"{MIN_COUNT}) after each idle time; modes alternate, {args.repeat} rounds. 'on a CPU': CPU time over wall "
        "time over the timed transfers and idling, client / peer (100% = a core kept busy)"
    )
