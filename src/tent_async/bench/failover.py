"""``tent-async bench failover``: recovery time after rail faults on the simulated fabric.

One steady transfer (default 8 GiB) over 8 simulated rails; during it, one
rail fails hard, a second stalls silently and a third degrades to 5% of its
capacity, at staggered times so that each recovery can be measured on its
own.  The same run is repeated under ``eft``, ``round_robin`` and ``single``
(the hard failure hits ``nic0``, the rail ``single`` binds its transfer to,
so ``single`` has to fail over too).

Printed: the goodput timeline per bucket (default 5 ms) beside the capacity
that survived, and for each fault the time until every affected slice was
rerouted and until goodput was back to 90% of the surviving capacity (see
:mod:`tent_async.backends.sim.timeline` for the exact definitions), then one
JSON line per (policy, fault).  Targets: under 50 ms for the hard failure and
the degradation, under 50 ms plus one deadline for the silent stall.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

from ..backends.sim import (
    Degrade,
    Elephants,
    Outage,
    PairTopology,
    RunResult,
    Scenario,
    ScenarioRunner,
    SimRail,
    Stall,
)
from ..backends.sim.scenarios import JITTER
from ..backends.sim.timeline import Recovery, capacity, goodput, recovery
from ..core import SchedulerConfig
from ..display import console as make_console
from ..units import format_size, parse_bandwidth, parse_duration, parse_size

POLICIES = ("eft", "round_robin", "single")
FAULTS = (("hard", "nic0"), ("stall", "nic1"), ("degrade", "nic2"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rails", type=int, default=8, help="number of rails (default 8)")
    parser.add_argument("--rail-speed", default="100Gb/s", help="capacity of each rail (default 100Gb/s)")
    parser.add_argument("--size", default="8GiB", help="bytes of the transfer (default 8GiB)")
    parser.add_argument("--fail-at", default="10ms", help="nic0 fails hard at this time (default 10ms)")
    parser.add_argument("--stall-at", default="30ms", help="nic1 stalls silently at this time (default 30ms)")
    parser.add_argument("--degrade-at", default="60ms", help="nic2 drops to 5%% at this time (default 60ms)")
    parser.add_argument("--degrade-to", type=float, default=0.05, help="fraction nic2 keeps (default 0.05)")
    parser.add_argument(
        "--error-delay", default="1ms", help="time for the hard failure's errors to surface (default 1ms)"
    )
    parser.add_argument("--bucket", default="5ms", help="timeline bucket (default 5ms)")
    parser.add_argument("--resolution", default="1ms", help="time grid of the recovery search (default 1ms)")
    parser.add_argument(
        "--window", default="5ms", help="goodput must hold over this window to count as recovered (default 5ms)"
    )
    parser.add_argument("--timeline-until", default="150ms", help="print the timeline up to here (default 150ms)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies")
    parser.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")


def _scenario(args: argparse.Namespace) -> tuple[Scenario, list[tuple[str, str, float]]]:
    if args.rails < 3:
        raise SystemExit("the failover benchmark needs at least 3 rails (one per fault)")
    speed = parse_bandwidth(args.rail_speed)
    fail_at, stall_at, degrade_at = (parse_duration(v) for v in (args.fail_at, args.stall_at, args.degrade_at))
    error_delay = parse_duration(args.error_delay)
    profiles: dict[int, tuple[Outage | Stall | Degrade, ...]] = {
        0: (Outage(at=fail_at),),
        1: (Stall(at=stall_at),),
        2: (Degrade(at=degrade_at, factor=args.degrade_to),),
    }
    rails = tuple(
        SimRail(name=f"nic{i}", capacity=speed, jitter=JITTER, error_delay=error_delay, profile=profiles.get(i, ()))
        for i in range(args.rails)
    )
    scenario = Scenario(
        name="failover",
        description=f"{args.size} over {args.rails} x {args.rail_speed}; nic0 fails hard at {args.fail_at}, "
        f"nic1 stalls at {args.stall_at}, nic2 drops to {args.degrade_to:.0%} at {args.degrade_at}",
        topology=PairTopology(rails=rails),
        workloads=(Elephants(size=parse_size(args.size), count=1),),
        horizon=0.0,
        drain=600.0,
        config=SchedulerConfig(),
        seed=args.seed,
    )
    faults = [("hard", "nic0", fail_at), ("stall", "nic1", stall_at), ("degrade", "nic2", degrade_at)]
    return scenario, faults


def run(args: argparse.Namespace) -> int:
    scenario, faults = _scenario(args)
    config = scenario.config
    deadline = max(config.deadline_floor, config.deadline_factor * config.target_slice_time)
    targets = {"hard": 50.0, "stall": 50.0 + deadline * 1e3, "degrade": 50.0}
    bucket = parse_duration(args.bucket)
    resolution = parse_duration(args.resolution)
    window = parse_duration(args.window)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    console = make_console()
    runs: dict[str, tuple[RunResult, ScenarioRunner, float]] = {}
    for policy in policies:
        runner = ScenarioRunner(scenario, policy, record=True)
        t0 = time.perf_counter()
        result = runner.run()
        runs[policy] = (result, runner, time.perf_counter() - t0)

    recoveries: dict[str, list[Recovery]] = {
        policy: [
            recovery(result, runner.fabric, rail, fault, at, resolution=resolution, window=window)
            for fault, rail, at in faults
        ]
        for policy, (result, runner, _) in runs.items()
    }

    if not args.json_only:
        console.print(f"[bold]failover[/bold]: {scenario.description}")
        console.print(
            f"deadline = max(floor {config.deadline_floor * 1e3:.0f} ms, {config.deadline_factor:g} x expected) "
            f"= {deadline * 1e3:.0f} ms for 1 ms slices; errors of the hard failure surface after "
            f"{parse_duration(args.error_delay) * 1e3:g} ms; recovered = goodput >= 90% of the surviving capacity "
            f"over {window * 1e3:g} ms"
        )
        _timeline(console, runs, faults, bucket, parse_duration(args.timeline_until))
        _recovery_table(console, runs, recoveries, targets)

    for policy, (result, _runner, wall) in runs.items():
        flow = result.flows[0]
        for rec in recoveries[policy]:
            target = targets[rec.fault]
            line = {
                "bench": "failover",
                "policy": policy,
                "fault": rec.fault,
                "rail": rec.rail,
                "at_ms": round(rec.at * 1e3, 3),
                "affected_slices": rec.affected,
                "retries_lost": rec.retries_lost,
                "rerouted_ms": round(rec.rerouted_ms, 3),
                "recovery_ms": None if rec.recovery_ms is None else round(rec.recovery_ms, 3),
                "target_ms": round(target, 3),
                "met": rec.recovery_ms is not None and rec.recovery_ms < target,
                "transfer_ms": round(flow.elapsed * 1e3, 3) if flow.outcome == "done" else None,
                "outcome": flow.outcome,
                "reroutes": flow.reroutes,
                "wall_s": round(wall, 3),
            }
            print(json.dumps(line))
    return 0


def _timeline(
    console: Console,
    runs: dict[str, tuple[RunResult, ScenarioRunner, float]],
    faults: list[tuple[str, str, float]],
    bucket: float,
    until: float,
) -> None:
    end = max(result.end for result, _, _ in runs.values())
    shown = min(end, until)
    n = max(1, int(shown / bucket + 0.999999))
    any_runner = next(iter(runs.values()))[1]
    cap = capacity(any_runner.fabric, 0.0, n * bucket, bucket)
    series = {p: goodput(r.slices, 0.0, n * bucket, bucket) for p, (r, _, _) in runs.items()}
    table = Table(title=f"goodput per {bucket * 1e3:g} ms bucket (GB/s)")
    table.add_column("t (ms)", justify="right")
    table.add_column("surviving\ncapacity", justify="right")
    for policy in runs:
        table.add_column(policy, justify="right")
    table.add_column("fault")
    for i in range(n):
        lo, hi = i * bucket, (i + 1) * bucket
        marks = ", ".join(f"{rail} {fault}" for fault, rail, at in faults if lo <= at < hi)
        table.add_row(
            f"{lo * 1e3:.0f}-{hi * 1e3:.0f}",
            f"{cap[i] / 1e9:.1f}",
            *(f"{series[p][i] / 1e9:.1f}" for p in runs),
            marks,
        )
    console.print(table)
    if end > shown:
        console.print(f"(timeline cut at {shown * 1e3:.0f} ms; the slowest run ended at {end * 1e3:.0f} ms)")


def _recovery_table(
    console: Console,
    runs: dict[str, tuple[RunResult, ScenarioRunner, float]],
    recoveries: dict[str, list[Recovery]],
    targets: dict[str, float],
) -> None:
    table = Table(title="recovery after each fault")
    cols = ["policy", "fault", "affected\nslices", "later\nlost", "rerouted\n(ms)", "recovery\n(ms)"]
    cols += ["target\n(ms)", "met"]
    for col in cols:
        table.add_column(col, justify="right" if col not in ("policy", "fault") else "left")
    for policy, recs in recoveries.items():
        for rec in recs:
            rms = rec.recovery_ms
            target = targets[rec.fault]
            table.add_row(
                policy,
                f"{rec.fault} ({rec.rail})",
                str(rec.affected),
                str(rec.retries_lost),
                f"{rec.rerouted_ms:.1f}",
                "never" if rms is None else f"{rms:.1f}",
                f"< {target:.0f}",
                "yes" if rms is not None and rms < target else "no",
            )
    console.print(table)
    for policy, (result, _, wall) in runs.items():
        flow = result.flows[0]
        console.print(
            f"{policy}: transfer of {format_size(flow.size)} {flow.outcome} in {flow.elapsed * 1e3:.1f} ms "
            f"(virtual), {flow.reroutes} slice reroutes, bytes per rail "
            + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in result.bytes_per_rail.items())
            + f"; simulated in {wall:.2f} s"
        )
