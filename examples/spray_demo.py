"""Slice spraying over heterogeneous rails, eft against round_robin.

Runs entirely in-process on the ``local`` backend: three copy rails throttled
to different speeds stand in for two NICs and a slow link.  The same 256 MiB
transfer runs once per policy; the table shows how each policy split the
bytes across rails, and what that did to throughput, next to the aggregate
capacity of the rails (the physical limit).

    python examples/spray_demo.py [--size 256MiB] [--policies eft,round_robin,single]
"""

from __future__ import annotations

import argparse

import anyio
import numpy as np
from rich.console import Console
from rich.table import Table

import tent_async as tent
from tent_async.units import format_rate, format_size, parse_size

RAILS = [
    tent.RailSpec(name="nic0", bandwidth="2GB/s"),
    tent.RailSpec(name="nic1", bandwidth="1GB/s"),
    tent.RailSpec(name="slow0", bandwidth="200MB/s"),
]


async def run_policy(policy: str, size: int) -> tuple[tent.TransferResult, tent.Telemetry]:
    src = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with tent.Engine(backend="local", rails=RAILS, policy=policy, name=f"demo-{policy}") as engine:
        a = engine.register(src, name="kv-src", permission="r")
        b = engine.register(dst, name="kv-dst")
        await engine.transfer(a[0 : 8 << 20], b[0 : 8 << 20])  # warm-up: telemetry learns the rails
        result = await engine.transfer(a[:], b[:])
        if not np.array_equal(src, dst):
            raise SystemExit(f"{policy}: destination differs from source")
        return result, engine.telemetry()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="bytes per transfer (default 256MiB)")
    parser.add_argument("--policies", default="eft,round_robin,single", help="comma-separated policies")
    args = parser.parse_args()
    size = parse_size(args.size)
    capacity = sum(r.bandwidth or 0.0 for r in RAILS)
    console = Console()
    console.print(
        f"Moving {format_size(size)} over {len(RAILS)} local rails: "
        + ", ".join(f"{r.name} {format_rate(r.bandwidth or 0)}" for r in RAILS)
        + f" (aggregate capacity {format_rate(capacity)})"
    )
    table = Table(title="bytes per rail, by policy (share of the transfer)")
    table.add_column("policy")
    for rail in RAILS:
        table.add_column(f"{rail.name}\n(fair share {100 * (rail.bandwidth or 0) / capacity:.0f}%)", justify="right")
    table.add_column("slices", justify="right")
    table.add_column("throughput", justify="right")
    table.add_column("of capacity", justify="right")
    for policy in args.policies.split(","):
        result, _telemetry = await run_policy(policy.strip(), size)
        shares = [result.bytes_per_rail.get(r.name, 0) / size for r in RAILS]
        table.add_row(
            policy,
            *(
                f"{format_size(result.bytes_per_rail.get(r.name, 0))} ({100 * s:.0f}%)"
                for r, s in zip(RAILS, shares, strict=True)
            ),
            str(result.slices),
            format_rate(result.throughput),
            f"{result.throughput / capacity:.2f}",
        )
    console.print(table)
    console.print(
        "eft sends each slice to the rail expected to finish it first, so every rail carries the share its speed "
        "earns; round_robin stripes equally and waits for the slowest rail; single uses one rail."
    )


if __name__ == "__main__":
    anyio.run(main)
