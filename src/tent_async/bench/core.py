"""Micro-benchmark of the sans-IO core alone: what one scheduling decision costs.

No I/O, no event loop: a planner with N equal rails is fed completions as fast
as Python can, and the time spent inside :meth:`Planner.poll` and
:meth:`Planner.next_wakeup` (choosing a rail, cutting and posting the slice,
checking deadlines, finding when to wake next: what the engine does on every
pump) and in :meth:`Planner.complete` (telemetry, accounting) is divided by
the number of slices.  Target: dispatch <= 5 us per slice with 8 rails.

It also times what the planner costs a small transfer, one slice long, from
:meth:`Planner.submit` to the poll that reports it finished (submit, poll,
complete, poll, each poll followed by ``next_wakeup``) on one rail, one
transfer at a time: the planner's share of a small transfer's round trip
(the ucx backend's 4 KiB latency, docs/ucx.md "Performance").

    tent-async bench core [--rails 8] [--slices 200000] [--transfers 50000]
"""

from __future__ import annotations

import argparse
import json
import time

from rich.table import Table

from ..core import Finished, Piece, Planner, Post, RailInfo, SchedulerConfig
from ..display import console as make_console

TARGET_US = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", type=int, default=8, help="number of equal rails (default 8)")
    parser.add_argument("--slices", type=int, default=200_000, help="slices per policy (default 200000)")
    parser.add_argument("--policies", default="eft,round_robin,single", help="comma-separated policies")
    parser.add_argument(
        "--transfers", type=int, default=50_000, help="one-slice transfers timed per policy (default 50000)"
    )


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


def measure_transfers(policy: str, transfers: int) -> dict[str, float]:
    """Microseconds of planner time per one-slice (4 KiB) transfer, one rail, one transfer at a time."""
    planner = Planner([RailInfo("r0", 10e9, 20e-6)], SchedulerConfig(), policy)
    now = 0.0
    finished = 0
    clock = time.perf_counter
    t0 = clock()
    for _ in range(transfers):
        planner.submit([Piece("src", 0, "dst", 0, 4096)], now)
        decisions = planner.poll(now)
        planner.next_wakeup()
        now += 50e-6
        for d in decisions:
            if type(d) is Post:
                planner.complete(d.attempt.id, now)
        finished += sum(type(d) is Finished for d in planner.poll(now))
        planner.next_wakeup()
        now += 50e-6
    spent = clock() - t0
    if finished != transfers:  # the loop above must be what it says: one whole transfer per round
        raise RuntimeError(f"{finished} of {transfers} one-slice transfers finished")
    return {"transfer_us": spent / transfers * 1e6, "transfers": transfers}


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
    if args.transfers > 0:
        parts = []
        for policy in (p.strip() for p in args.policies.split(",")):
            t = measure_transfers(policy, args.transfers)
            parts.append(f"{policy} {t['transfer_us']:.2f} us")
            print(json.dumps({"bench": "core_transfer", "policy": policy, **t}))
        console.print(
            f"one-slice 4 KiB transfers, one rail, one at a time (submit, poll, complete, poll): "
            f"{', '.join(parts)} of planner time per transfer"
        )
    return 0
