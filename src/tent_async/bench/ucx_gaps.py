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
``time.process_time``.
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

GAPS = (0.0, 0.001, 0.005)  # seconds the client idles before each transfer (0: back to back)
SPAN = 1.5  # seconds of idling per gap at most: fewer transfers for the longer gaps
MIN_COUNT = 20  # ... but at least this many
SMALL = 4096
WARM = 100
KINDS = ("raw", "engine")


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


async def _measure(
    proc: subprocess.Popen[str], once: Callable[[], Awaitable[float]], count: int
) -> list[dict[str, Any]]:
    """Time ``once()`` (one round trip, its seconds) after each idle time of :data:`GAPS`."""
    for _ in range(WARM):
        await once()
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
            times.append(await once())
        wall = time.perf_counter() - start
        mine = time.process_time() - mine0
        theirs = _peer_cpu(proc) - theirs0
        times.sort()
        out.append(
            {
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
    """Raw ucxx's 4 KiB send + 8-byte ack round trip (as ``bench ucx``'s), through ``_measure``."""
    from ..backends.ucx import _ucxx
    from ..backends.ucx.rails import LocalRail, plan_from_spec
    from ._ucx_peer import ACK_TAG, rail_progress, rail_spec, wait

    ucx = _ucxx.load()
    local = LocalRail(
        plan_from_spec(rail_spec(rail)), asyncio.get_running_loop(), sweep=False, progress=rail_progress(mode)
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"address": local.address.hex()}) + "\n")
        proc.stdin.flush()
        ep = local.connect(address)
        buf = np.ones(SMALL, dtype=np.uint8)
        ack = np.empty(8, dtype=np.uint8)
        tag = 0

        async def once() -> float:
            nonlocal tag
            recv = ep.tag_recv(ucx.Array(ack), ucx.L.UCXXTag(ACK_TAG | tag))
            t0 = time.perf_counter()
            send = ep.tag_send(ucx.Array(buf), ucx.L.UCXXTag(tag))
            local.progress.kick(send)
            await wait(local, send, mode)
            await wait(local, recv, mode)
            tag += 1
            return time.perf_counter() - t0

        out = await _measure(proc, once, count)
        ep.close_blocking(10**9, 1)
        return out
    finally:
        local.close()


def _one(kind: str, rail: str, mode: str, count: int) -> list[dict[str, Any]]:
    from .ucx import _peer

    if kind == "engine":
        with _peer("engine", {"rail": rail, "size": 1 << 20, "progress": mode}) as (hello, proc):
            return asyncio.run(_engine(proc, hello["address"], rail, mode, count))
    messages = WARM + sum(count_for(gap, count) for gap in GAPS)
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
                    got[kind, mode].append(_one(kind, rail, mode, args.lat_iters))
        for mode in modes:
            for i, gap in enumerate(GAPS):
                raw_p50 = None
                for kind in kinds:
                    rows = [run[i] for run in got[kind, mode]]
                    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                    if kind == "raw":
                        raw_p50 = med["p50"]
                    table.add_row(
                        rail,
                        mode,
                        "none" if not gap else f"{med['idle'] * 1e3:.1f} ms",
                        "raw ucxx" if kind == "raw" else "engine WRITE",
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
        f"{MIN_COUNT}) after each idle time; raw ucxx and the engine progress alike and alternate, {args.repeat} "
        "rounds. CPU per round trip and 'on a CPU' (CPU time over the wall time of the timed round trips and "
        "idling; 100% = a core kept busy): client / peer"
    )
