"""Slice spraying over heterogeneous rails, eft against round_robin and single.

``tent-async demo`` (or ``./dev demo`` in a checkout, which runs the same code
with the same options) runs entirely in-process on the ``local`` backend:
three copy rails throttled to different speeds stand in for two NICs and a slow
link.  The same transfer runs once per policy; the table shows how each policy
split the bytes across rails, and what that did to throughput, next to the
aggregate capacity of the rails (the physical limit).

    tent-async demo [--size 256MiB] [--policies eft,round_robin,single]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import anyio
import numpy as np
from rich.console import Console
from rich.table import Table

from .core.policies import POLICIES
from .display import console as make_console
from .engine import Engine, TransferResult
from .errors import ConfigError
from .rails import RailSpec
from .units import format_rate, format_size, parse_size

RAILS = (
    RailSpec(name="nic0", bandwidth="2GB/s"),
    RailSpec(name="nic1", bandwidth="1GB/s"),
    RailSpec(name="slow0", bandwidth="200MB/s"),
)
WARM_UP = 8 << 20  # bytes moved first, so telemetry has learned the rails


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="256MiB", help="bytes per transfer (default 256MiB)")
    parser.add_argument(
        "--policies", default="eft,round_robin,single", help="comma-separated policies (default all three)"
    )


async def run_policy(policy: str, size: int) -> TransferResult:
    """One warm-up transfer, then ``size`` bytes over :data:`RAILS` with ``policy``; checks the bytes."""
    src = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with Engine(backend="local", rails=RAILS, policy=policy, name=f"demo-{policy}") as engine:
        a = engine.register(src, name="kv-src", permission="r")
        b = engine.register(dst, name="kv-dst")
        warm = min(WARM_UP, size)
        await engine.transfer(a[0:warm], b[0:warm])
        result = await engine.transfer(a[:], b[:])
        if not np.array_equal(src, dst):
            raise RuntimeError(f"{policy}: destination differs from source")
        return result


async def demo(size: int, policies: Sequence[str], console: Console) -> None:
    capacity = sum(r.bandwidth or 0.0 for r in RAILS)
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
    for policy in policies:
        result = await run_policy(policy, size)
        table.add_row(
            policy,
            *(
                f"{format_size(result.bytes_per_rail.get(r.name, 0))} "
                f"({100 * result.bytes_per_rail.get(r.name, 0) / size:.0f}%)"
                for r in RAILS
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


def run(args: argparse.Namespace) -> int:
    """Entry point of ``tent-async demo``."""
    size = parse_size(args.size)
    if size < 1:
        raise ConfigError("--size must be at least one byte")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ConfigError(f"unknown policies {unknown or policies}; choose from {', '.join(sorted(POLICIES))}")
    anyio.run(demo, size, policies, make_console())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tent-async demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
