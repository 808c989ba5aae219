"""Scenario runner: the sans-IO planner driven directly over the fluid fabric, no asyncio.

For benchmarks with thousands of flows the engine's event loop is overhead we
do not need: the runner feeds each sending node's :class:`~tent_async.core.Planner`
(the very code the engine runs) with arrivals and fabric reports, and carries
out its decisions on the :class:`~.fabric.FluidFabric`, all on one
:class:`~.clock.VirtualClock`.  After every instant at which something
happened, every planner that heard news is polled, exactly as the engine's
pump does.

Byte accounting (``check=True``): every completed live attempt's byte range
is recorded per transfer, and a transfer reported done must be covered exactly
once, without gaps or overlaps, independently of the planner's own counters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from types import EllipsisType
from typing import Any

import attrs

from ...core import (
    AttemptState,
    Decision,
    Finished,
    Outcome,
    Piece,
    Planner,
    Post,
    RailEvent,
    SchedulerConfig,
    Withdraw,
)
from ...core.decisions import Attempt
from ...core.transfer_state import TransferProgress
from ...errors import TentError
from .clock import PollSet, VirtualClock
from .fabric import Flow, FluidFabric, SimRailError
from .topology import ClusterTopology, PairTopology
from .workloads import Arrival, Source, Workload, WorkloadContext, check_workloads

INF = math.inf


def carry_out(
    decisions: Sequence[Decision],
    fabric: FluidFabric,
    topology: ClusterTopology | PairTopology,
    node: int,
    owner: Any,
    finished: Callable[[Any, Finished], None],
) -> int:
    """Carry out one planner's decisions on the fabric: a flow per Post (tagged on its
    attempt, its token ``(owner, attempt)``), the flow of each Withdraw stopped, each
    Finished handed to ``finished(owner, finished)``; returns how many slices it started."""
    posts = 0
    for d in decisions:
        if type(d) is Post:
            a = d.attempt
            dst = a.dst
            assert isinstance(dst, int)
            a.tag = fabric.start((owner, a), topology.path(node, a.rail, dst), a.length)
            posts += 1
        elif type(d) is Withdraw:
            flow = d.attempt.tag
            assert isinstance(flow, Flow)
            fabric.withdraw(flow)
        else:
            assert isinstance(d, Finished)
            finished(owner, d)
    return posts


class AccountingError(TentError, AssertionError):
    """The simulator caught the scheduler delivering a byte twice, or not at all."""


def _topology(value: Any) -> PairTopology | ClusterTopology:
    if not isinstance(value, PairTopology | ClusterTopology):
        raise ValueError(f"topology must be a PairTopology or ClusterTopology, got {value!r}")
    return value


def _config(value: Any) -> SchedulerConfig:
    if not isinstance(value, SchedulerConfig):
        raise ValueError(f"config must be a SchedulerConfig, got {value!r}")
    return value


@attrs.frozen(kw_only=True)
class Scenario:
    """A reproducible experiment: fabric, traffic, scheduler knobs, seed.

    ``horizon``: no flow arrives after it (virtual seconds).  ``drain``:
    how long after the horizon the run waits for flows to finish before it
    stops and counts the rest as unfinished.  ``latency_kind``: the flow kind
    whose completion times the percentiles describe (``None``: all flows).
    ``config_note`` says why a knob of ``config`` differs from its default.
    """

    name: str
    topology: PairTopology | ClusterTopology = attrs.field(converter=_topology)
    workloads: tuple[Workload, ...] = attrs.field(converter=check_workloads)
    horizon: float
    drain: float = 30.0
    config: SchedulerConfig = attrs.field(factory=SchedulerConfig, converter=_config)
    latency_kind: str | None = None
    seed: int = 1
    description: str = ""
    config_note: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.horizon >= 0:
            raise ValueError(f"horizon must not be negative, got {self.horizon}")
        if not self.drain > 0:
            raise ValueError(f"drain must be positive, got {self.drain}")


@attrs.frozen
class FlowRecord:
    """What became of one flow.  ``finished`` is ``inf`` for a flow that did not end."""

    id: int
    kind: str
    tenant: str
    src: int
    dst: int
    size: int
    submitted: float
    finished: float
    outcome: str  # "done", "failed", "cancelled" or "unfinished"
    acked: int
    slices: int
    attempts: int
    reroutes: int

    @property
    def elapsed(self) -> float:
        return self.finished - self.submitted


@attrs.frozen
class SliceRecord:
    """One attempt's life (recorded with ``record=True``).

    ``outcome``: ``"done"`` (delivered for its transfer), ``"stale"`` (completed
    after it had been withdrawn), ``"failed"`` or ``"withdrawn"``.
    """

    node: int
    transfer: int
    rail: str
    length: int
    posted: float
    started: float  # first byte moved (inf if it never did)
    ended: float
    outcome: str
    probe: bool
    rates: tuple[tuple[float, float], ...] = ()  # (time, bytes/s) from each rate change until it ended


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported P99 is a latency some flow saw)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


@attrs.frozen
class RunResult:
    """Outcome of one (scenario, policy) run; equal results mean bit-identical runs."""

    scenario: str
    policy: str
    seed: int
    flows: tuple[FlowRecord, ...]
    start: float
    end: float
    bytes_acked: int
    capacity_bytes: float
    nominal_capacity: float
    bytes_per_rail: dict[str, int]
    carried_per_link: dict[str, float]
    attempts: int
    reroutes: int
    stale_completions: int
    events: tuple[RailEvent, ...]
    slices: tuple[SliceRecord, ...]
    latency_kind: str | None

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def throughput(self) -> float:
        """Bytes/s acknowledged between the first submission and the last completion."""
        return self.bytes_acked / self.duration if self.duration > 0 else 0.0

    @property
    def capacity(self) -> float:
        """Available capacity (bytes/s) averaged over the same window: the physical limit."""
        return self.capacity_bytes / self.duration if self.duration > 0 else 0.0

    @property
    def efficiency(self) -> float:
        return self.throughput / self.capacity if self.capacity > 0 else 0.0

    def latencies(self, kind: str | EllipsisType | None = ...) -> list[float]:
        """Completion times (s) of finished flows of ``kind`` (default: the scenario's latency kind)."""
        want = self.latency_kind if kind is ... else kind
        return [f.elapsed for f in self.flows if f.outcome == "done" and (want is None or f.kind == want)]

    def percentile(self, q: float, kind: str | EllipsisType | None = ...) -> float:
        """Nearest-rank percentile ``q`` (0-100) of :meth:`latencies`, in seconds."""
        return _percentile(self.latencies(kind), q)

    @property
    def unfinished(self) -> int:
        return sum(1 for f in self.flows if f.outcome != "done")


class _Open:
    """Book-keeping of one submitted flow."""

    __slots__ = ("arrival", "id", "node", "ranges", "source", "tid")

    def __init__(self, fid: int, arrival: Arrival, source: Source, node: int, tid: int) -> None:
        self.id = fid
        self.arrival = arrival
        self.source = source
        self.node = node
        self.tid = tid
        self.ranges: list[tuple[int, int]] = []  # (stream offset, length) of delivered slices

    def record(self, counts: Finished | TransferProgress, *, finished: float, outcome: str, acked: int) -> FlowRecord:
        """This flow's :class:`FlowRecord`; ``counts`` gives its submit time and slice counts."""
        a = self.arrival
        return FlowRecord(
            id=self.id,
            kind=a.kind,
            tenant=a.tenant,
            src=a.src,
            dst=a.dst,
            size=a.size,
            submitted=counts.submitted_at,
            finished=finished,
            outcome=outcome,
            acked=acked,
            slices=counts.slices,
            attempts=counts.attempts,
            reroutes=counts.reroutes,
        )


class ScenarioRunner:
    """Runs one scenario under one policy; see the module docstring.

    ``seed`` overrides the scenario's; ``config`` its scheduler config.
    ``record`` keeps every attempt's life (for timelines); ``check`` verifies
    byte accounting; ``monitor`` is handed to the fabric (see
    :data:`~.fabric.Monitor`); ``setup`` is called with the runner before the
    run starts (to schedule faults on ``runner.clock``, for instance).
    """

    def __init__(
        self,
        scenario: Scenario,
        policy: str = "eft",
        *,
        seed: int | None = None,
        config: SchedulerConfig | None = None,
        record: bool = False,
        check: bool = True,
        monitor: Callable[..., None] | None = None,
        setup: Callable[[ScenarioRunner], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.policy = policy
        self.seed = scenario.seed if seed is None else seed
        self.config = config or scenario.config
        self.record = record
        self.check = check
        self.topology = scenario.topology
        self.clock = VirtualClock()
        self.fabric = FluidFabric(
            self.topology.link_specs(),
            self.clock,
            self,
            seed=self.seed,
            components=self.topology.components(),
            origin=0.0,
        )
        self.fabric.monitor = monitor
        self.fabric.record_rates = record
        self.planners: dict[int, Planner] = {
            node: Planner(self.topology.rail_infos(node), self.config, policy) for node in self.topology.senders()
        }
        self._poll = PollSet(self.clock)  # planners to poll next
        self._open: dict[tuple[int, int], _Open] = {}
        self._records: list[FlowRecord] = []
        self._slices: list[SliceRecord] = []
        self._events: list[RailEvent] = []
        self._next_flow = 0
        self._stale = 0
        self._acked = 0
        self._sources: list[Source] = []
        self._setup = setup
        self._started = False

    # ============================================================== running

    def run(self) -> RunResult:
        if self._started:
            raise RuntimeError("a ScenarioRunner runs once; make a new one")
        self._started = True
        sc = self.scenario
        reference = self.topology.capacity(self.fabric, 0.0, sc.horizon) / sc.horizon if sc.horizon > 0 else 0.0
        if reference <= 0:
            reference = self.topology.nominal_capacity()
        for i, w in enumerate(sc.workloads):
            ctx = WorkloadContext(
                rng=random.Random(f"{self.seed}/workload/{i}"),
                topology=self.topology,
                capacity=reference,
                horizon=sc.horizon,
            )
            src = w.source(ctx)
            self._sources.append(src)
            for a in src.start():
                self.clock.call_at(a.time, self._arrive, a, src)
        if self._setup is not None:
            self._setup(self)
        limit = sc.horizon + sc.drain
        clock = self.clock
        while True:
            t = clock.next_time()
            if t is None or t > limit:
                break
            clock.step()
            self._service()
        return self._result()

    def _arrive(self, arrival: Arrival, source: Source) -> None:
        node = arrival.src
        planner = self.planners[node]
        now = self.clock.now
        tid = planner.submit([Piece(arrival.src, 0, arrival.dst, 0, arrival.size)], now)
        fid = self._next_flow
        self._next_flow += 1
        self._open[(node, tid)] = _Open(fid, arrival, source, node, tid)
        self._poll.mark(node)
        for a in source.arrived(arrival):
            self.clock.call_at(a.time, self._arrive, a, source)

    def _service(self) -> None:
        """Poll every planner that heard news; carry out its decisions."""
        fabric = self.fabric
        topo = self.topology
        while (node := self._poll.pop()) is not None:
            planner = self.planners[node]
            carry_out(planner.poll(self.clock.now), fabric, topo, node, node, self._finished)
            events = planner.drain_events()
            if events:
                self._events.extend(events)
            self._poll.arm(node, planner.next_wakeup())

    def _finished(self, node: int, fin: Finished) -> None:
        entry = self._open.pop((node, fin.transfer_id))
        a = entry.arrival
        outcome = fin.outcome.value
        if fin.outcome is Outcome.DONE and self.check:
            self._verify(entry, a.size)
        acked = a.size if fin.outcome is Outcome.DONE else sum(r[1] for r in entry.ranges)
        self._records.append(entry.record(fin, finished=fin.finished_at, outcome=outcome, acked=acked))
        for nxt in entry.source.finished(a, self.clock.now):
            self.clock.call_at(nxt.time, self._arrive, nxt, entry.source)

    def _verify(self, entry: _Open, size: int) -> None:
        pos = 0
        for offset, length in sorted(entry.ranges):
            if offset != pos:
                what = "overlap" if offset < pos else "gap"
                raise AccountingError(
                    f"flow {entry.id} (transfer {entry.tid} of node {entry.node}): {what} at byte {min(offset, pos)}; "
                    f"delivered ranges {sorted(entry.ranges)}"
                )
            pos += length
        if pos != size:
            raise AccountingError(f"flow {entry.id}: {pos} of {size} bytes delivered but reported done")

    # ======================================================= fabric listener

    def _slice(self, node: int, a: Attempt, flow: Flow, outcome: str) -> None:
        self._slices.append(
            SliceRecord(
                node=node,
                transfer=a.transfer_id,
                rail=a.rail_name,
                length=a.length,
                posted=flow.posted_at,
                started=flow.started_at,
                ended=self.clock.now,
                outcome=outcome,
                probe=a.probe,
                rates=tuple(flow.history or ()),
            )
        )

    def on_complete(self, flow: Flow) -> None:
        node, a = flow.token
        live = a.state is AttemptState.LIVE
        if live:
            entry = self._open.get((node, a.transfer_id))
            if entry is not None and self.check:
                entry.ranges.append((a.offset, a.length))
            self._acked += a.length
        else:
            self._stale += 1
        if self.record:
            self._slice(node, a, flow, "done" if live else "stale")
        self.planners[node].complete(a.id, self.clock.now)
        self._poll.mark(node)

    def on_error(self, flow: Flow, error: SimRailError, rail_down: bool) -> None:
        node, a = flow.token
        if self.record:
            self._slice(node, a, flow, "failed")
        self.planners[node].fail(a.id, self.clock.now, error, rail_down=rail_down)
        self._poll.mark(node)

    def on_withdrawn(self, flow: Flow) -> None:
        node, a = flow.token
        if self.record:
            self._slice(node, a, flow, "withdrawn")
        self.planners[node].withdrawn(a.id, self.clock.now)
        self._poll.mark(node)

    # ================================================================ result

    def _result(self) -> RunResult:
        now = self.clock.now
        records = list(self._records)
        for (node, tid), entry in sorted(self._open.items()):
            progress = self.planners[node].status(tid)
            records.append(entry.record(progress, finished=INF, outcome="unfinished", acked=progress.acked))
        records.sort(key=lambda r: r.id)
        start = min((r.submitted for r in records), default=0.0)
        ends = [r.finished for r in records if r.finished < INF]
        end = now if any(r.finished == INF for r in records) else max(ends, default=start)
        self.fabric.settle()
        per_rail: dict[str, int] = {}
        for planner in self.planners.values():
            for rail in planner.rails:
                per_rail[rail.name] = per_rail.get(rail.name, 0) + rail.bytes_total
        carried = {link.name: link.carried for link in self.fabric.links}
        return RunResult(
            scenario=self.scenario.name,
            policy=self.policy,
            seed=self.seed,
            flows=tuple(records),
            start=start,
            end=end,
            bytes_acked=self._acked,
            capacity_bytes=self.topology.capacity(self.fabric, start, end),
            nominal_capacity=self.topology.nominal_capacity(),
            bytes_per_rail=per_rail,
            carried_per_link=carried,
            attempts=sum(r.attempts for r in records),
            reroutes=sum(r.reroutes for r in records),
            stale_completions=self._stale,
            events=tuple(self._events),
            slices=tuple(self._slices),
            latency_kind=self.scenario.latency_kind,
        )


def run_scenario(scenario: Scenario, policy: str = "eft", **kwargs: Any) -> RunResult:
    """Run ``scenario`` under ``policy`` (keyword arguments as for :class:`ScenarioRunner`)."""
    return ScenarioRunner(scenario, policy, **kwargs).run()
