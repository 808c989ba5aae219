"""Medium transfers spray: ``tent-async bench spray``.

One transfer alone on the simulated fabric (8 x 400 Gb/s by default, the
engine in virtual time), of 1, 4, 16 and 64 MiB, under ``eft``,
``round_robin`` and ``single`` in the same run.  The limit is what no
schedule can beat: ``size / aggregate capacity + one rail latency + the
per-slice cost the backend states``.  Target: eft within 1.3x of it at every
size; the rails each policy used are reported.

    tent-async bench spray [--rails 8] [--capacity 400Gb/s] [--sizes 1MiB,4MiB,16MiB,64MiB]
"""

from __future__ import annotations

import argparse
import json

import anyio
import numpy as np
from rich.table import Table

from ..backends.sim import SimRail
from ..display import console
from ..engine import Engine
from ..units import format_rate, format_size, parse_bandwidth, parse_duration, parse_size

TARGET = 1.3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", type=int, default=8, help="simulated rails (default 8)")
    parser.add_argument("--capacity", default="400Gb/s", help="capacity of each rail (default 400Gb/s)")
    parser.add_argument("--latency", default="5us", help="latency of each rail (default 5us)")
    parser.add_argument("--sizes", default="1MiB,4MiB,16MiB,64MiB", help="transfer sizes (comma-separated)")
    parser.add_argument("--policies", default="eft,round_robin,single", help="policies to compare")


async def _one(size: int, policy: str, fabric: list[SimRail]) -> tuple[float, int, float]:
    """Virtual seconds one transfer of ``size`` takes alone, rails it used, and the stated slice cost."""
    async with Engine(backend="sim", fabric=fabric, policy=policy, copy=False) as engine:
        a = engine.register(np.zeros(size, dtype=np.uint8), name="a", permission="r")
        b = engine.register(np.zeros(size, dtype=np.uint8), name="b")
        result = await engine.transfer(a[:], b[:])
        cost = max(info.slice_cost for info in engine.backend.rail_infos())
        return result.elapsed, len(result.bytes_per_rail), cost


def run(args: argparse.Namespace) -> int:
    cap = parse_bandwidth(args.capacity)
    latency = parse_duration(args.latency)
    fabric = [SimRail(name=f"nic{i}", capacity=cap, latency=latency) for i in range(args.rails)]
    aggregate = cap * args.rails
    policies = [p.strip() for p in args.policies.split(",")]
    out = console()
    table = Table(
        title=f"one transfer alone on {args.rails} x {format_rate(cap)} simulated rails "
        f"(aggregate {format_rate(aggregate)}, latency {latency * 1e6:.0f} us)"
    )
    for col in ("size", "limit", *(f"{p}: time (x limit), rails" for p in policies)):
        table.add_column(col, justify="right")
    worst = 0.0
    for size in (parse_size(s) for s in args.sizes.split(",")):
        cells = []
        limit = 0.0
        for policy in policies:
            elapsed, used, cost = anyio.run(_one, size, policy, fabric)
            limit = size / aggregate + latency + cost
            ratio = elapsed / limit
            if policy == "eft":
                worst = max(worst, ratio)
            cells.append(f"{elapsed * 1e6:,.1f} us ({ratio:.2f}x), {used}")
            print(
                json.dumps(
                    {
                        "bench": "spray",
                        "size": size,
                        "policy": policy,
                        "seconds": elapsed,
                        "of_limit": ratio,
                        "rails_used": used,
                    }
                )
            )
        table.add_row(format_size(size), f"{limit * 1e6:,.1f} us", *cells)
    out.print(table)
    out.print(f"eft worst: {worst:.2f}x the limit (target <= {TARGET}x): {'met' if worst <= TARGET else 'MISSED'}")
    return 0
