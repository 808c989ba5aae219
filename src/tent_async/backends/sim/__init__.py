"""An emulated fabric in virtual time, running the same sans-IO core as the engine.

Two ways in:

* ``tent.Engine(backend="sim", fabric=[SimRail(...), ...])``: API-level code
  runs unchanged against simulated rails, with real byte copies, while time
  is virtual (:mod:`.backend`);
* :class:`ScenarioRunner` / :func:`run_scenario`: the planner driven directly
  (no asyncio) for benchmarks with thousands of flows (:mod:`.runner`).

Modules, one idea each: :mod:`.clock` (virtual time), :mod:`.profiles`
(capacity and faults over time), :mod:`.fabric` (fluid max-min sharing of
links by slices), :mod:`.topology` (node pair, rail-optimised cluster),
:mod:`.workloads` (elephants, KV blocks, periodic bulk), :mod:`.runner`
(scenarios and results), :mod:`.scenarios` (the benchmark's scenarios).
See docs/sim.md.
"""

from .backend import FAULT_MODES, SimBackend
from .clock import Timer, VirtualClock
from .fabric import Flow, FlowState, FluidFabric, Link, SimRail, SimRailError
from .profiles import Bursts, Degrade, Errors, LinkTimeline, Mode, Outage, Profile, Stall, Trace, flapping
from .runner import AccountingError, FlowRecord, RunResult, Scenario, ScenarioRunner, SliceRecord, run_scenario
from .topology import ClusterTopology, PairTopology, Topology
from .workloads import Arrival, Elephants, KVBlocks, Periodic, Workload

__all__ = [
    "FAULT_MODES",
    "AccountingError",
    "Arrival",
    "Bursts",
    "ClusterTopology",
    "Degrade",
    "Elephants",
    "Errors",
    "Flow",
    "FlowRecord",
    "FlowState",
    "FluidFabric",
    "KVBlocks",
    "Link",
    "LinkTimeline",
    "Mode",
    "Outage",
    "PairTopology",
    "Periodic",
    "Profile",
    "RunResult",
    "Scenario",
    "ScenarioRunner",
    "SimBackend",
    "SimRail",
    "SimRailError",
    "SliceRecord",
    "Stall",
    "Timer",
    "Topology",
    "Trace",
    "VirtualClock",
    "Workload",
    "flapping",
    "run_scenario",
]
