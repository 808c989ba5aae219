"""Micro-benchmark of the sans-IO core alone: what one scheduling decision costs.

No I/O, no event loop: a planner with N equal rails is fed completions as fast
as Python can, and the time spent inside :meth:`Planner.poll` and
:meth:`Planner.next_wakeup` (choosing a rail, cutting and posting the slice,
checking deadlines, finding when to wake next: what the engine does on every
pump) and in :meth:`Planner.complete` (telemetry, accounting) is divided by
the number of slices.  Target: dispatch <= 5 us per slice with 8 rails.

    tent-async bench core [--rails 8] [--slices 200000]
"""

from __future__ import annotations

import argparse
import json
import time

from rich.table import Table

from ..core import Piece, Planner, Post, RailInfo, SchedulerConfig
from ..display import console as make_console

TARGET_US = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", type=int, default=8, help="number of equal rails (default 8)")
    parser.add_argument("--slices", type=int, default=200_000, help="slices per policy (default 200000)")
    parser.add_argument("--policies", default="eft,round_robin,single", help="comma-separated policies")


def measure(policy: str, rails: int, slices: int) -> dict[str, float]:
    """Seconds per slice spent in poll() and complete(), driving the planner flat out."""
    slice_size = 1 << 20
    config = SchedulerConfig(min_slice=slice_size, max_slice=slice_size)
    planner = Planner([RailInfo(f"r{i}", 50e9) for i in range(rails)], config, policy)
    planner.submit([Piece("src", 0, "dst", 0, slices * slice_size)], 0.0)
    now = 0.0
    done = 0
    poll_s = 0.0
    complete_s = 0.0
    live: list[int] = []
    clock = time.perf_counter
    while done < slices:
        t0 = clock()
        decisions = planner.poll(now)
        planner.next_wakeup()  # the engine asks after every poll, to arm its timer
        poll_s += clock() - t0
        live.extend(d.attempt.id for d in decisions if type(d) is Post)
        now += 20e-6
        half = len(live) // 2 or len(live)
        t0 = clock()
        for aid in live[:half]:
            planner.complete(aid, now, 20e-6)
        complete_s += clock() - t0
        done += half
        del live[:half]
    return {"dispatch_us": poll_s / done * 1e6, "complete_us": complete_s / done * 1e6, "slices": done}


def run(args: argparse.Namespace) -> int:
    console = make_console()
    table = Table(title=f"sans-IO core, {args.rails} rails: cost per slice (target: dispatch <= {TARGET_US} us)")
    columns = ("policy", "dispatch (poll + next_wakeup) us/slice", "complete us/slice", "total us/slice", "decisions/s")
    for col in columns:
        table.add_column(col, justify="right")
    worst = 0.0
    for policy in args.policies.split(","):
        m = measure(policy.strip(), args.rails, args.slices)
        total = m["dispatch_us"] + m["complete_us"]
        worst = max(worst, m["dispatch_us"])
        table.add_row(
            policy, f"{m['dispatch_us']:.2f}", f"{m['complete_us']:.2f}", f"{total:.2f}", f"{1e6 / total:,.0f}"
        )
        print(json.dumps({"bench": "core", "policy": policy, "rails": args.rails, **m}))
    console.print(table)
    verdict = "met" if worst <= TARGET_US else "MISSED"
    console.print(f"worst dispatch cost {worst:.2f} us/slice vs target {TARGET_US} us: {verdict}")
    return 0
