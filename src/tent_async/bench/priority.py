"""Priority classes under load: ``tent-async bench priority``.

On the simulated fabric (the engine in virtual time), background bulk
transfers keep every rail busy while high-priority transfers of 256 KiB-4 MiB
arrive as a Poisson process.  The same arrival sequence is also run with no
background (the unloaded reference) and with the arrivals in the bulk's own
class under the same load (what no priority class gives), in one run.
Targets: high-priority P99 within 1.5x of its unloaded P99; background
throughput >= 0.9 of the capacity the high-priority traffic leaves.

    tent-async bench priority [--rails 4] [--capacity 100Gb/s] [--load 0.3] [--duration 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from typing import Any

import anyio
import numpy as np
from rich.table import Table

from ..backends.sim import SimBackend, SimRail
from ..display import console
from ..engine import Engine, TransferHandle
from ..units import format_rate, parse_bandwidth, parse_duration

P99_TARGET = 1.5
BG_TARGET = 0.9
KiB = 1 << 10
MiB = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", type=int, default=4, help="simulated rails (default 4)")
    parser.add_argument("--capacity", default="100Gb/s", help="capacity of each rail (default 100Gb/s)")
    parser.add_argument("--load", type=float, default=0.3, help="high-priority share of the capacity (default 0.3)")
    parser.add_argument("--duration", default="0.5s", help="virtual time of arrivals (default 0.5s)")
    parser.add_argument("--background", type=int, default=4, help="background flows kept open (default 4)")
    parser.add_argument("--seed", type=int, default=1)


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _scenario(args: argparse.Namespace, *, background: bool, urgent: str) -> dict[str, Any]:
    cap = parse_bandwidth(args.capacity)
    duration = parse_duration(args.duration)
    fabric = [SimRail(name=f"nic{i}", capacity=cap) for i in range(args.rails)]
    aggregate = cap * args.rails
    rng = random.Random(args.seed)
    mean_size = (256 * KiB + 4 * MiB) / 2
    rate = args.load * aggregate / mean_size  # arrivals per virtual second
    arrivals = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrivals.append((t, rng.randint(256 * KiB // 4096, 4 * MiB // 4096) * 4096))
    bg_size = 1 << 30
    async with Engine(backend="sim", fabric=fabric, copy=False) as engine:
        sim = engine.backend
        assert isinstance(sim, SimBackend)
        a = engine.register(np.zeros(bg_size, dtype=np.uint8), name="a", permission="r")
        b = engine.register(np.zeros(bg_size, dtype=np.uint8), name="b")
        latencies: list[float] = []
        hi_bytes = 0
        bg_done = 0
        open_bg: list[TransferHandle] = []
        stop = False
        start = sim.now

        async def bulk() -> None:
            nonlocal bg_done
            while not stop:
                handle = engine.submit(a[:], b[:], priority="background")
                open_bg.append(handle)
                try:
                    await handle
                    bg_done += handle.total_bytes
                except Exception:
                    return
                finally:
                    open_bg.remove(handle)

        async def one(size: int) -> None:
            nonlocal hi_bytes
            result = await engine.transfer(a[:size], b[:size], priority=urgent)  # type: ignore[arg-type]
            latencies.append(result.elapsed)
            hi_bytes += size

        async with anyio.create_task_group() as tg:
            if background:
                for _ in range(args.background):
                    tg.start_soon(bulk)
            async with anyio.create_task_group() as hi:
                for at, size in arrivals:
                    await sim.sleep(max(0.0, start + at - sim.now))
                    hi.start_soon(one, size)
            window = sim.now - start
            stop = True
            landed = bg_done + sum(h.bytes_done for h in open_bg)
            for h in list(open_bg):
                h.cancel()
        return {
            "latencies": latencies,
            "hi_bytes": hi_bytes,
            "bg_bytes": landed,
            "window": window,
            "aggregate": aggregate,
            "arrivals": len(arrivals),
        }


def run(args: argparse.Namespace) -> int:
    out = console()
    alone = anyio.run(lambda: _scenario(args, background=False, urgent="high"))
    loaded = anyio.run(lambda: _scenario(args, background=True, urgent="high"))
    flat = anyio.run(lambda: _scenario(args, background=True, urgent="background"))
    table = Table(
        title=f"{alone['arrivals']} Poisson transfers of 256 KiB-4 MiB at {args.load:.0%} of "
        f"{args.rails} x {args.capacity} (simulated), under {args.background} background bulk flows"
    )
    for col in ("run", "P50", "P99", "P99 / unloaded", "background throughput", "of what is left"):
        table.add_column(col, justify="right")
    base99 = _percentile(alone["latencies"], 99)
    verdict_p99 = verdict_bg = 0.0
    for name, r in (("unloaded, high", alone), ("loaded, high", loaded), ("loaded, same class as the bulk", flat)):
        p50 = _percentile(r["latencies"], 50)
        p99 = _percentile(r["latencies"], 99)
        left = r["aggregate"] * r["window"] - r["hi_bytes"]
        bg_share = r["bg_bytes"] / left if r["bg_bytes"] else 0.0
        if r is loaded:
            verdict_p99, verdict_bg = p99 / base99, bg_share
        table.add_row(
            name,
            f"{p50 * 1e6:,.0f} us",
            f"{p99 * 1e6:,.0f} us",
            f"{p99 / base99:.2f}",
            format_rate(r["bg_bytes"] / r["window"]) if r["bg_bytes"] else "",
            f"{bg_share:.2f}" if r["bg_bytes"] else "",
        )
        print(
            json.dumps(
                {
                    "bench": "priority",
                    "run": name,
                    "p50": p50,
                    "p99": p99,
                    "p99_of_unloaded": p99 / base99,
                    "background_of_left": bg_share,
                }
            )
        )
    out.print(table)
    out.print(
        f"high-priority P99 under load: {verdict_p99:.2f}x unloaded (target <= {P99_TARGET}x): "
        f"{'met' if verdict_p99 <= P99_TARGET else 'MISSED'}\n"
        f"background throughput: {verdict_bg:.2f} of what is left (target >= {BG_TARGET}): "
        f"{'met' if verdict_bg >= BG_TARGET else 'MISSED'}"
    )
    return 0
