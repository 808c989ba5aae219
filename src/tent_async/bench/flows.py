"""Many concurrent flows on the local backend: ``tent-async bench flows``.

N concurrent ``engine.transfer()`` calls of 64 KiB from one anyio task group,
on paced local rails, against the same pairs submitted as one
``transfer_batch`` (the fast way), alternating in the same run with two
references: the same transfers submitted from one task and awaited one after
another (the engine without a task per flow), and N anyio tasks that await a
future and do nothing else (what the pattern costs with no engine at all: when
that alone takes longer than the batch, 0.9x is out of reach).  The task
group's start-up (the ``start_soon`` loop, before any task has run and so
before the engine has been asked anything) is shown too: no engine can move a
byte during it, and then none faster than the rails' paced aggregate, so
``batch / (start-up + bytes / limit)`` bounds the ratio.  The event
loop thread's CPU time per flow is shown as well: the loop is what runs out
first (the rails' copies of 64 KiB run on it too), and CPU time is what a
loaded machine changes least.  Reports throughput beside the rails' paced
aggregate (the physical limit), the ratio to the batch, the planner's
dispatch cost per slice (``poll`` and ``next_wakeup``), deadline misses, the
event loop's lag, and the Python memory one open transfer costs.  Targets:
>= 0.9x the batch at every count, dispatch cost flat within 1.2x from the
smallest to the largest count, zero deadline misses, <= 2 KiB per open
transfer.

Dispatch cost is the planner's own CPU time: ``time.thread_time`` on the loop
thread inside ``poll``/``next_wakeup`` (less what reading that clock costs, a
system call), less the garbage collector's pauses that fell inside them
(``gc.callbacks``).  Wall time inside ``poll`` (printed
beside it) also counts the time the loop thread waited for the GIL while rail
threads copied on a shared 2-core machine, and a collection that an
allocation inside ``poll`` happened to trigger scans every object the process
holds (ten thousand tasks' frames at 10,000 flows): neither is the planner's
cost, and either made the wall-time spread read 1.08x in one run and 1.74x in
the next.  The collector's share is printed beside the wall time.  Slices per
poll are shown because a poll has a fixed cost (deadlines, the next wakeup, the
timer): where the loop has time to spare, or rails run dry while tasks start,
the engine polls for a slice or two at a time and each slice carries more of it.

    tent-async bench flows [--counts 100,1000,10000] [--rails 3] [--rate 400MB/s]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import time
import tracemalloc
from typing import Any

import anyio
import numpy as np
from rich.table import Table

from ..core import Planner
from ..display import console as make_console
from ..display import step_progress
from ..engine import Engine
from ..rails import RailSpec
from ..units import format_rate, format_size, parse_bandwidth, parse_size

FLOW_RATIO = 0.9
FLAT = 1.2
PER_TRANSFER = 2048
# one batch; N anyio tasks each calling transfer(); one task submitting N and awaiting
# each handle; N anyio tasks that await a future and nothing else (the pattern's floor)
MODES = ("batch", "tasks", "submit", "alone")


# ------------------------------------------------------------------ flows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counts", default="100,1000,10000", help="concurrent transfers per run (comma-separated)")
    parser.add_argument("--size", default="64KiB", help="bytes per transfer (default 64KiB)")
    parser.add_argument("--rails", type=int, default=3, help="paced local rails (default 3)")
    parser.add_argument("--rate", default="400MB/s", help="pace of each rail (default 400MB/s)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median is reported (default 3)")


class _PollTimer:
    """Wraps a planner's poll and next_wakeup to add up the time spent deciding.

    Wall time (``perf_counter``), the loop thread's CPU time (``thread_time``: not
    the time it waited for the GIL while rail threads copied), and the part of
    that CPU time the garbage collector took (collections started inside).
    """

    def __init__(self, planner: Planner) -> None:
        self.seconds = 0.0
        self.cpu = 0.0
        self.gc = 0.0
        self.posts = 0
        self.polls = 0
        self._inside = False
        self._gc_start = 0.0
        poll, wake = planner.poll, planner.next_wakeup
        wall, cpu = time.perf_counter, time.thread_time
        # thread_time is a system call (0.5-1 us here, more than an empty poll): what
        # reading it costs is taken off every interval, or a count whose pumps post
        # fewer slices each would pay more of it per slice.
        reads = [cpu() for _ in range(2001)]
        tare = statistics.median(b - a for a, b in itertools.pairwise(reads))

        def span() -> float:  # the wall-time interval around two CPU reads and no work
            t0 = wall()
            cpu()
            cpu()
            return wall() - t0

        tare_wall = statistics.median(span() for _ in range(1001))

        def timed_poll(now: float, *, late_by: float = 0.0, deadlines: bool = True) -> Any:
            self._inside = True
            t0, c0 = wall(), cpu()
            out = poll(now, late_by=late_by, deadlines=deadlines)
            self.cpu += cpu() - c0 - tare
            self.seconds += wall() - t0 - tare_wall
            self._inside = False
            self.polls += 1
            self.posts += sum(1 for d in out if type(d).__name__ == "Post")
            return out

        def timed_wake() -> Any:
            self._inside = True
            t0, c0 = wall(), cpu()
            out = wake()
            self.cpu += cpu() - c0 - tare
            self.seconds += wall() - t0 - tare_wall
            self._inside = False
            return out

        planner.poll = timed_poll  # type: ignore[method-assign]
        planner.next_wakeup = timed_wake  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, _info: dict[str, int]) -> None:
        if not self._inside:
            return
        if phase == "start":
            self._gc_start = time.thread_time()
        else:
            self.gc += time.thread_time() - self._gc_start

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


async def _tasks_alone(n: int) -> dict[str, float]:
    """The floor of the pattern: N anyio tasks that each await a future resolved at once, no engine."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return {"elapsed": time.perf_counter() - t0}


async def _flows_once(n: int, size: int, specs: list[RailSpec], mode: str) -> dict[str, float]:
    src = np.random.default_rng(n).integers(0, 256, n * size, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with Engine(backend="local", rails=specs) as engine:
        a = engine.register(src, name="src", permission="r")
        b = engine.register(dst, name="dst")
        await engine.transfer(a[: min(len(src), 4 << 20)], b[: min(len(src), 4 << 20)])  # learn the rails
        dst[:] = 0
        timer = _PollTimer(engine.planner)
        t0 = time.perf_counter()
        c0 = time.thread_time()
        started = t0
        if mode == "batch":
            await engine.transfer_batch(
                [(a[i * size : (i + 1) * size], b[i * size : (i + 1) * size]) for i in range(n)]
            )
        elif mode == "submit":
            handles = [engine.submit(a[i * size : (i + 1) * size], b[i * size : (i + 1) * size]) for i in range(n)]
            for handle in handles:
                await handle
        else:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(engine.transfer, a[i * size : (i + 1) * size], b[i * size : (i + 1) * size])
                started = time.perf_counter()  # no task has run yet: the engine has not been asked anything
        elapsed = time.perf_counter() - t0
        loop_cpu = time.thread_time() - c0
        timer.close()
        tele = engine.telemetry()
        if not np.array_equal(src, dst):
            raise AssertionError("destination differs from source")
        return {
            "elapsed": elapsed,
            "loop_cpu_us": loop_cpu / n * 1e6,  # the event loop thread's CPU per flow (rails idle meanwhile)
            "startup": started - t0,
            "dispatch_us": (timer.cpu - timer.gc) / max(1, timer.posts) * 1e6,
            "dispatch_cpu_us": timer.cpu / max(1, timer.posts) * 1e6,
            "dispatch_wall_us": timer.seconds / max(1, timer.posts) * 1e6,
            "dispatch_gc_us": timer.gc / max(1, timer.posts) * 1e6,
            "polls": timer.polls,
            "slices": timer.posts,
            "misses": sum(r.deadline_misses for r in tele.rails),
            "excused": sum(r.lag_excused for r in tele.rails),
            "lag_max_ms": tele.loop_lag_max * 1e3,
        }


async def _open_transfer_bytes(n: int, size: int, specs: list[RailSpec]) -> float:
    """Python memory (tracemalloc) one open, queued transfer costs, handle included."""
    src = np.zeros(n * size, dtype=np.uint8)
    dst = np.zeros_like(src)
    async with Engine(backend="local", rails=specs) as engine:
        a = engine.register(src, name="src", permission="r")
        b = engine.register(dst, name="dst")
        views = [(a[i * size : (i + 1) * size], b[i * size : (i + 1) * size]) for i in range(n)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        handles = [engine.submit(s, d) for s, d in views]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        for h in handles:
            await h
        return (after - before) / n


def run(args: argparse.Namespace) -> int:
    counts = [int(c) for c in args.counts.split(",")]
    size = parse_size(args.size)
    rate = parse_bandwidth(args.rate)
    specs = [RailSpec(name=f"paced{i}", bandwidth=rate) for i in range(args.rails)]
    limit = rate * args.rails
    console = make_console()
    rows = []
    with step_progress() as progress:
        task = progress.add_task("flows", total=len(counts) * len(MODES) * args.repeat)
        for n in counts:
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for _ in range(args.repeat):
                for mode in MODES:  # alternate, so drift hits every mode alike
                    if mode == "alone":
                        runs[mode].append(anyio.run(_tasks_alone, n))
                    else:
                        runs[mode].append(anyio.run(_flows_once, n, size, specs, mode))
                    progress.update(task, advance=1, description=f"{n} flows")
            med: dict[str, dict[str, float]] = {}
            for mode, rs in runs.items():
                med[mode] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                if "misses" in rs[0]:
                    med[mode]["misses"] = max(r["misses"] for r in rs)
            rows.append((n, med))
    per_open = anyio.run(_open_transfer_bytes, counts[-1], size, specs)
    table = Table(
        title=f"{format_size(size)} flows on {args.rails} local rails paced at {format_rate(rate)} "
        f"(limit {format_rate(limit)}), median of {args.repeat}"
    )
    for col in (
        "open transfers",
        "one batch",
        "transfer() in N tasks",
        "ratio",
        "of limit",
        "loop CPU/flow",
        "task start-up",
        "N tasks, no engine",
        "submit() x N, await",
        "ratio",
        "dispatch us/slice (CPU)",
        "wall, GC",
        "slices/poll",
        "deadline misses",
        "loop lag max",
    ):
        table.add_column(col, justify="right")
    worst = float("inf")
    bound = float("inf")
    dispatch = []
    walls = []
    misses = 0
    for n, med in rows:
        b, f, sub, alone = med["batch"], med["tasks"], med["submit"], med["alone"]
        total = n * size
        ratio = b["elapsed"] / f["elapsed"]
        worst = min(worst, ratio)
        # No byte can move before the start-up loop ends, and then no faster than the limit.
        bound = min(bound, b["elapsed"] / (f["startup"] + total / limit))
        dispatch.append(f["dispatch_us"])
        walls.append(f["dispatch_wall_us"])
        misses += int(f["misses"]) + int(sub["misses"])
        table.add_row(
            f"{n:,}",
            format_rate(total / b["elapsed"]),
            format_rate(total / f["elapsed"]),
            f"{ratio:.2f}",
            f"{total / f['elapsed'] / limit:.2f}",
            f"{f['loop_cpu_us']:.0f} us",
            f"{f['startup'] / b['elapsed']:.2f}x batch",
            f"{alone['elapsed'] / b['elapsed']:.2f}x batch",
            format_rate(total / sub["elapsed"]),
            f"{b['elapsed'] / sub['elapsed']:.2f}",
            f"{f['dispatch_us']:.1f}",
            f"{f['dispatch_wall_us']:.1f}, {f['dispatch_gc_us']:.1f}",
            f"{f['slices'] / max(1, f['polls']):.1f}",
            str(int(f["misses"])),
            f"{f['lag_max_ms']:.1f} ms",
        )
        print(
            json.dumps(
                {"bench": "flows", "n": n, "batch": b, "flows": f, "submit": sub, "tasks_alone": alone, "ratio": ratio}
            )
        )
    console.print(table)
    flat = max(dispatch) / min(dispatch)
    print(json.dumps({"bench": "flows", "bytes_per_open_transfer": per_open}))
    console.print(
        f"concurrent transfer() vs one batch: worst {worst:.2f} (target >= {FLOW_RATIO}): "
        f"{'met' if worst >= FLOW_RATIO else 'MISSED'} (the tasks' start-up, then every byte at the paced limit, "
        f"bounds it at {bound:.2f})\n"
        f"dispatch cost (planner CPU) {min(dispatch):.1f}-{max(dispatch):.1f} us/slice, spread {flat:.2f}x "
        f"(target <= {FLAT}x): {'met' if flat <= FLAT else 'MISSED'}; "
        f"wall time {min(walls):.1f}-{max(walls):.1f} us/slice, spread {max(walls) / min(walls):.2f}x\n"
        f"deadline misses on healthy rails: {misses} (target 0): {'met' if misses == 0 else 'MISSED'}\n"
        f"memory per open transfer: {per_open:,.0f} B (target <= {PER_TRANSFER} B): "
        f"{'met' if per_open <= PER_TRANSFER else 'MISSED'}"
    )
    return 0
