"""``tent-async watch``: run a workload on local rails and watch the rails live.

Shows a progress bar and the per-rail telemetry table, refreshed a few times
a second, optionally serves the same numbers as Prometheus metrics, and can
inject faults at given times to show failover as it happens::

    tent-async watch --rails nic0=2GB/s,nic1=1GB/s,slow0=200MB/s --count 40 \\
        --fault nic1:down@0.5 --fault nic1:clear@1.5 --metrics-port 9464
"""

from __future__ import annotations

import argparse
import re
import time

import anyio
import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from .core import SchedulerConfig
from .display import console as make_console
from .display import telemetry_table
from .engine import Engine
from .errors import ConfigError
from .rails import RailSpec
from .units import format_rate, format_size, parse_duration, parse_size

_FAULT_RE = re.compile(r"^(?P<rail>[^:@]+):(?P<mode>error|down|stall|clear|slow=[0-9.]+)@(?P<at>[0-9.]+\w*)$")


def parse_rails(text: str) -> list[RailSpec]:
    """``"nic0=2GB/s,slow0=200MB/s"`` -> rail specs (``name`` alone means unthrottled)."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, bw = item.partition("=")
        specs.append(RailSpec(name=name, bandwidth=bw or None))
    if not specs:
        raise ConfigError("give at least one rail, e.g. --rails nic0=2GB/s,nic1=1GB/s")
    return specs


def parse_fault(text: str) -> tuple[str, str, float]:
    """``"nic1:down@0.5"`` -> ``("nic1", "down", 0.5)``; modes error, down, stall, clear, slow=F."""
    m = _FAULT_RE.match(text)
    if not m:
        raise ConfigError(
            f"cannot read fault {text!r}; write RAIL:MODE@SECONDS, MODE one of error|down|stall|clear|slow=F"
        )
    return m["rail"], m["mode"], parse_duration(m["at"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", default="nic0=2GB/s,nic1=1GB/s,slow0=200MB/s", help="NAME=BANDWIDTH,...")
    parser.add_argument("--policy", default="eft", choices=["eft", "round_robin", "single"])
    parser.add_argument("--size", default="64MiB", help="bytes per transfer (default 64MiB)")
    parser.add_argument("--count", type=int, default=40, help="transfers to run (default 40)")
    parser.add_argument("--concurrency", type=int, default=4, help="transfers in flight at once (default 4)")
    parser.add_argument("--fault", action="append", default=[], help="RAIL:MODE@SECONDS (repeatable)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--refresh", type=float, default=4.0, help="display refreshes per second")


async def _inject(engine: Engine, faults: list[tuple[str, str, float]], start: float) -> None:
    from .backends.local import LocalBackend

    backend = engine.backend
    assert isinstance(backend, LocalBackend)
    for rail, mode, at in sorted(faults, key=lambda f: f[2]):
        await anyio.sleep(max(0.0, start + at - time.monotonic()))
        if mode == "clear":
            backend.clear_fault(rail)
        elif mode.startswith("slow="):
            backend.set_slowdown(rail, float(mode[5:]))
        else:
            backend.inject_fault(rail, mode)


async def watch(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or make_console()
    rails = parse_rails(args.rails)
    faults = [parse_fault(f) for f in args.fault]
    size = parse_size(args.size)
    slots = max(1, args.concurrency)
    src = np.random.default_rng(0).integers(0, 256, size * slots, dtype=np.uint8)
    dst = np.zeros_like(src)
    config = SchedulerConfig(deadline_floor="50ms", backoff_base="50ms")
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    server = None
    async with Engine(backend="local", rails=rails, policy=args.policy, config=config, name="watch") as engine:
        if args.metrics_port is not None:
            from .metrics import serve_metrics

            server = serve_metrics(engine, port=args.metrics_port)
            console.print(f"Prometheus metrics on http://127.0.0.1:{server.port}/metrics")
        a = engine.register(src, name="src", permission="r")
        b = engine.register(dst, name="dst")
        bytes_task = progress.add_task(f"{args.count} transfers", total=args.count * size)
        failures: list[BaseException] = []
        start = time.monotonic()
        try:
            with Live(console=console, refresh_per_second=args.refresh, transient=False) as live:

                def render() -> Group:
                    return Group(progress, telemetry_table(engine.telemetry()))

                async def worker(slot: int, todo: list[int]) -> None:
                    view = slice(slot * size, (slot + 1) * size)
                    while todo:
                        todo.pop()
                        try:
                            await engine.transfer(a[view], b[view])
                        except Exception as exc:  # shown at the end; the run goes on
                            failures.append(exc)
                        progress.advance(bytes_task, size)

                async def refresher() -> None:
                    while True:
                        live.update(render())
                        await anyio.sleep(1.0 / args.refresh)

                todo = list(range(args.count))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(refresher)
                    if faults:
                        tg.start_soon(_inject, engine, faults, start)
                    async with anyio.create_task_group() as workers:
                        for slot in range(slots):
                            workers.start_soon(worker, slot, todo)
                    tg.cancel_scope.cancel()
                live.update(render())
        finally:
            if server is not None:
                server.close()
        elapsed = time.monotonic() - start
        snap = engine.telemetry()
    capacity = sum(r.bandwidth or 0.0 for r in rails)
    console.print()
    console.print(
        f"{args.count} x {format_size(size)} in {elapsed:.2f} s: {format_rate(args.count * size / elapsed)}"
        + (f" (rails' aggregate capacity {format_rate(capacity)})" if all(r.bandwidth for r in rails) else "")
        + f"; {snap.transfers_failed} failed"
    )
    for exc in failures[:5]:
        console.print(f"[red]{type(exc).__name__}: {exc}[/red]")
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    return anyio.run(watch, args)
