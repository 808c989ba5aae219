"""``tent-async bench sim``: the simulated-fabric scenarios under every policy, in one run.

Each scenario of :mod:`tent_async.backends.sim.scenarios` (homogeneous,
heterogeneous, congested, degraded, mixed, cluster) runs under ``eft``,
``round_robin`` and ``single`` with the same seed, through the same sans-IO
planner the engine uses, on the fluid fabric in virtual time.  Printed: a
table, one JSON line per (scenario, policy), and the issue's targets for
``eft`` with whether this run met them.

Definitions (see docs/sim.md):

* ``throughput_GBps``: bytes delivered / (last completion - first submission);
* ``capacity_GBps``: the *available* capacity over the same window, i.e. the
  links' capacity net of background load, degradation and outages,
  integrated over the window and divided by its length (for the cluster, per
  rail plane the narrowest of transmit, spine and receive sides);
* ``efficiency``: throughput / capacity;
* ``p50_ms`` ... ``p99_ms``: nearest-rank percentiles of flow completion
  times (submission to completion), of the KV blocks in "mixed" and
  "cluster", of every flow elsewhere.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import attrs
from rich.console import Console
from rich.table import Table

from ..backends.sim import Elephants, PairTopology, RunResult, Scenario, SimRail, run_scenario
from ..backends.sim.scenarios import SCENARIO_NAMES, scenario
from ..core import SchedulerConfig
from ..display import console as make_console
from ..display import step_progress
from ..units import parse_size

POLICIES = ("eft", "round_robin", "single")


@attrs.frozen
class Target:
    """One of the issue's goals for ``eft``, checked against a run."""

    scenario: str
    text: str
    check: Callable[[dict[str, RunResult]], tuple[bool, str]]


def _efficiency(runs: dict[str, RunResult]) -> tuple[bool, str]:
    eff = runs["eft"].efficiency
    return eff >= 0.95, f"{eff:.4f}"


def _speedup(runs: dict[str, RunResult]) -> tuple[bool, str]:
    ratio = runs["eft"].throughput / runs["round_robin"].throughput
    return ratio >= 1.33, f"{ratio:.2f}x"


def _tail(runs: dict[str, RunResult]) -> tuple[bool, str]:
    ratio = runs["eft"].percentile(99) / runs["round_robin"].percentile(99)
    return ratio <= 0.30, f"{ratio:.4f}x"


TARGETS = (
    Target("homogeneous", "efficiency >= 0.95", _efficiency),
    Target("heterogeneous", "efficiency >= 0.95", _efficiency),
    Target("heterogeneous", "throughput >= 1.33x round_robin", _speedup),
    Target("congested", "efficiency >= 0.95", _efficiency),
    Target("congested", "throughput >= 1.33x round_robin", _speedup),
    Target("degraded", "efficiency >= 0.95", _efficiency),
    Target("degraded", "throughput >= 1.33x round_robin", _speedup),
    Target("mixed", "KV P99 <= 0.30x round_robin's", _tail),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIO_NAMES), help="comma-separated scenarios (default: all six)"
    )
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="scale sizes and durations (default 1.0)")
    parser.add_argument("--seed", type=int, default=1, help="seed of jitter, bursts and arrivals (default 1)")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    parser.add_argument("--kv-load", type=float, default=None, help="offered KV load of mixed and cluster")
    parser.add_argument(
        "--no-background", action="store_true", help="drop the cross-tenant bursts (congested, mixed, cluster)"
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="also time 10 s of elephant traffic over 8 x 400 Gb/s (simulator speed, wall clock)",
    )


def _row(name: str, policy: str, r: RunResult, rr: RunResult | None, scale: float, wall: float) -> dict[str, object]:
    p = {q: r.percentile(q) for q in (50, 90, 99)}
    line: dict[str, object] = {
        "bench": "sim",
        "scenario": name,
        "policy": policy,
        "seed": r.seed,
        "scale": scale,
        "throughput_GBps": round(r.throughput / 1e9, 3),
        "capacity_GBps": round(r.capacity / 1e9, 3),
        "nominal_GBps": round(r.nominal_capacity / 1e9, 3),
        "efficiency": round(r.efficiency, 4),
        "p50_ms": round(p[50] * 1e3, 3),
        "p90_ms": round(p[90] * 1e3, 3),
        "p99_ms": round(p[99] * 1e3, 3),
        "latency_of": r.latency_kind or "all",
        "flows": len(r.flows),
        "unfinished": r.unfinished,
        "reroutes": r.reroutes,
        "bytes_per_rail": r.bytes_per_rail,
        "virtual_s": round(r.duration, 6),
        "wall_s": round(wall, 3),
    }
    if rr is not None:
        line["throughput_vs_round_robin"] = round(r.throughput / rr.throughput, 4) if rr.throughput else None
        rr99 = rr.percentile(99)
        line["p99_vs_round_robin"] = round(p[99] / rr99, 4) if rr99 else None
    return line


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for n in names:
        if n not in SCENARIO_NAMES:
            raise SystemExit(f"unknown scenario {n!r}; choose from {', '.join(SCENARIO_NAMES)}")
    console = make_console()
    results: dict[str, dict[str, RunResult]] = {}
    lines: list[dict[str, object]] = []
    scenarios: dict[str, Scenario] = {}
    with step_progress(disable=args.json_only) as progress:
        task = progress.add_task("simulating", total=len(names) * len(policies))
        for name in names:
            sc = scenario(name, args.scale, args.seed, kv_load=args.kv_load, background=not args.no_background)
            scenarios[name] = sc
            runs: dict[str, RunResult] = {}
            walls: dict[str, float] = {}
            for policy in policies:
                progress.update(task, description=f"{name} / {policy}")
                t0 = time.perf_counter()
                runs[policy] = run_scenario(sc, policy)
                walls[policy] = time.perf_counter() - t0
                progress.advance(task)
            results[name] = runs
            rr = runs.get("round_robin")
            for policy in policies:
                lines.append(_row(name, policy, runs[policy], rr, args.scale, walls[policy]))
    if not args.json_only:
        _table(console, scenarios, results, lines)
        _targets(console, results)
    for line in lines:
        print(json.dumps(line))
    if args.speed:
        _speed(console, args.json_only)
    return 0


def _table(
    console: Console,
    scenarios: dict[str, Scenario],
    results: dict[str, dict[str, RunResult]],
    lines: list[dict[str, object]],
) -> None:
    table = Table(title="simulated fabric: every scenario under every policy (same seed)")
    for col in ("scenario", "policy", "GB/s", "capacity\nGB/s", "eff.", "p50\nms", "p90\nms", "p99\nms"):
        table.add_column(col, justify="left" if col in ("scenario", "policy") else "right")
    table.add_column("vs rr\nthroughput", justify="right")
    table.add_column("vs rr\np99", justify="right")
    table.add_column("share of bytes per rail (%)")
    table.add_column("wall s", justify="right")
    for line in lines:
        per_rail: dict[str, int] = line["bytes_per_rail"]  # type: ignore[assignment]
        total = sum(per_rail.values()) or 1
        shares = " ".join(f"{100 * v / total:.0f}" for v in per_rail.values())
        table.add_row(
            str(line["scenario"]),
            str(line["policy"]),
            f"{line['throughput_GBps']:.1f}",
            f"{line['capacity_GBps']:.1f}",
            f"{line['efficiency']:.4f}",
            f"{line['p50_ms']:.2f}",
            f"{line['p90_ms']:.2f}",
            f"{line['p99_ms']:.2f}",
            _fmt(line.get("throughput_vs_round_robin"), "x"),
            _fmt(line.get("p99_vs_round_robin"), "x"),
            shares,
            f"{line['wall_s']:.2f}",
        )
    console.print(table)
    for name, sc in scenarios.items():
        extra = f"; scheduler: {sc.config_note}" if sc.config_note and sc.config_note != "defaults" else ""
        console.print(f"[bold]{name}[/bold]: {sc.description}{extra}")


def _fmt(value: object, unit: str) -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _targets(console: Console, results: dict[str, dict[str, RunResult]]) -> None:
    table = Table(title="targets for eft (measured in this run)")
    table.add_column("scenario")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("met")
    for target in TARGETS:
        runs = results.get(target.scenario)
        if runs is None or "eft" not in runs or "round_robin" not in runs:
            continue
        ok, measured = target.check(runs)
        table.add_row(target.scenario, target.text, measured, "yes" if ok else "[bold red]NO[/bold red]")
    console.print(table)


def _speed(console: Console, json_only: bool) -> None:
    """Wall time of 10 virtual seconds of elephants over 8 x 400 Gb/s, default and 1 ms slices."""
    rails = tuple(SimRail(name=f"nic{i}", capacity="400Gb/s", jitter="2us") for i in range(8))
    configs = {
        "defaults (max_slice 16 MiB)": SchedulerConfig(),
        "max_slice 64 MiB (1 ms slices at 400 Gb/s)": SchedulerConfig(max_slice=parse_size("64MiB")),
    }
    for label, config in configs.items():
        sc = Scenario(
            name="speed",
            topology=PairTopology(rails=rails),
            workloads=(Elephants(size="4GiB", concurrency=2),),
            horizon=10.0,
            config=config,
        )
        t0 = time.perf_counter()
        r = run_scenario(sc, "eft", check=False)
        wall = time.perf_counter() - t0
        line = {
            "bench": "sim-speed",
            "config": label,
            "virtual_s": round(r.duration, 3),
            "wall_s": round(wall, 2),
            "slices": r.attempts,
            "bytes": r.bytes_acked,
            "efficiency": round(r.efficiency, 4),
        }
        if not json_only:
            console.print(
                f"speed, {label}: {r.duration:.2f} virtual s, {r.attempts} slices, "
                f"{r.bytes_acked / 1e12:.2f} TB in {wall:.2f} s of wall time"
            )
        print(json.dumps(line))
