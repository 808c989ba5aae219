"""The fluid fabric: slices as flows sharing link capacity, in virtual time.

Model
    A *link* has a capacity over time (see :mod:`.profiles`), a base latency
    and a jitter.  A slice sent over a path of links is a *flow*: it first
    spends the path's latency (base plus an exponentially distributed jitter
    with mean ``jitter``) without using capacity, then moves its bytes as a
    fluid.  Flows that share links share their capacity **max-min fairly**
    (progressive filling); on a single link this is processor sharing: ``n``
    flows each get ``capacity / n``.

Why processor sharing
    A NIC with several outstanding RDMA writes interleaves them at packet
    granularity and its congestion control splits the wire between queue
    pairs; over the millisecond a slice takes, that is a fair share, not FIFO
    service.  Fair sharing also punishes what the scheduler should avoid:
    piling slices onto a slow rail slows every one of them.  Max-min across
    several links (sender NIC, spine, receiver NIC) is the standard fluid
    model of a network with per-flow fairness.

Events
    Rates are recomputed only when the set of flows of a *component* (links
    that can share flows: one rail of a node pair, one rail plane of a
    cluster) or a link's capacity changes; between events every flow moves at
    a constant rate, so the next completion is known exactly and is the only
    timer the component needs.  Link profile changes are scheduled only while
    the link carries flows, so an idle fabric schedules nothing.

Faults
    ``down``: flows on the link (waiting out latency, moving, or lost in a
    stall) fail after the link's ``error_delay`` with ``rail_down``;
    ``erroring``: they fail without ``rail_down``; ``stalled``: they stop,
    never complete and report nothing until withdrawn.  Withdrawing a flow
    removes it at once and confirms after ``withdraw_delay``; a flow's bytes
    count as delivered only when it completes, so a withdrawn or failed slice
    never lands (which is how the simulator meets the fencing contract).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs

from ...errors import ConfigError, TentError
from ...units import parse_bandwidth, parse_duration
from .clock import Timer, VirtualClock
from .profiles import PROFILE_TYPES, LinkTimeline, Mode, Profile

INF = math.inf
_EPS_BYTES = 1e-3  # flows this close to done complete together (float rounding of event times)


class SimRailError(TentError):
    """A slice failed on a simulated link (an outage or an erroring link)."""


def _name(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"a link needs a non-empty name, got {value!r}")


def _non_negative(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name} must not be negative, got {value!r}")


def _profile(value: Any) -> tuple[Profile, ...]:
    if isinstance(value, PROFILE_TYPES):
        value = (value,)
    items = tuple(value)
    for item in items:
        if not isinstance(item, PROFILE_TYPES):
            raise ConfigError(
                f"a link profile holds Bursts, Trace, Degrade, Outage, Stall or Errors values; got {item!r}"
            )
    return items


@attrs.frozen(kw_only=True)
class SimRail:
    """One simulated link: a rail of a node pair, a NIC or a spine of a cluster.

    ``capacity``
        Nominal bytes/s, or a string such as ``"400Gb/s"`` or ``"50GB/s"``.
    ``latency``
        Seconds before a slice's first byte moves (default 5 us).
    ``jitter``
        Mean of an exponentially distributed extra latency per slice (default 0).
    ``error_delay``
        Seconds from a failure until the slices it killed report their error
        (default 0: at once).
    ``profile``
        Background load, degradation, outages, stalls: see :mod:`.profiles`.
    """

    name: str = attrs.field(validator=_name)
    capacity: float = attrs.field(converter=parse_bandwidth)
    latency: float = attrs.field(default=5e-6, converter=parse_duration)
    jitter: float = attrs.field(default=0.0, converter=parse_duration)
    error_delay: float = attrs.field(default=0.0, converter=parse_duration)
    profile: tuple[Profile, ...] = attrs.field(default=(), converter=_profile)


class FlowState(enum.Enum):
    PENDING = "pending"  # waiting out the path latency
    ACTIVE = "active"  # moving bytes
    STALLED = "stalled"  # lost in a stalled link; never completes
    FAILING = "failing"  # failed; the error is on its way to the driver
    DONE = "done"  # completed and reported
    WITHDRAWN = "withdrawn"  # withdrawn (confirmation scheduled or delivered)


_PENDING = FlowState.PENDING
_ACTIVE = FlowState.ACTIVE
_STALLED = FlowState.STALLED


class Flow:
    """One slice on its way through the fabric."""

    __slots__ = (
        "comp",
        "finished_at",
        "history",
        "id",
        "path",
        "posted_at",
        "rate",
        "remaining",
        "size",
        "started_at",
        "state",
        "timer",
        "token",
    )

    def __init__(self, fid: int, token: Any, path: tuple[Link, ...], size: int, now: float) -> None:
        self.id = fid
        self.token = token
        self.path = path
        self.size = size
        self.remaining = float(size)
        self.rate = 0.0
        self.posted_at = now
        self.started_at = INF
        self.finished_at = INF
        self.state = _PENDING
        self.timer: Timer | None = None
        self.comp: Component = path[0].comp
        self.history: list[tuple[float, float]] | None = None  # (time, rate) changes, when recorded

    @property
    def moved(self) -> float:
        """Bytes that crossed the wire so far (as of the component's last update)."""
        return self.size - max(self.remaining, 0.0)

    def __repr__(self) -> str:
        names = "->".join(link.name for link in self.path)
        return f"<Flow {self.id} {self.state.value} {self.size} B on {names}>"


class Link:
    """Live state of one link."""

    __slots__ = (
        "capacity",
        "carried",
        "comp",
        "delivered",
        "flows",
        "index",
        "jitter_rng",
        "mode",
        "name",
        "override_factor",
        "override_mode",
        "rate_flows",
        "spec",
        "timeline",
        "timer",
        "used",
    )

    def __init__(self, index: int, spec: SimRail, timeline: LinkTimeline, jitter_rng: random.Random) -> None:
        self.index = index
        self.spec = spec
        self.name = spec.name
        self.timeline = timeline
        self.jitter_rng = jitter_rng
        self.capacity = spec.capacity
        self.mode = Mode.UP
        self.override_mode: Mode | None = None
        self.override_factor = 1.0
        self.flows: dict[int, Flow] = {}  # every pending, active or stalled flow through the link
        self.rate_flows: dict[int, Flow] = {}  # the active ones
        self.timer: Timer | None = None
        self.used = 0.0  # bytes/s handed out to flows at the last recompute
        self.carried = 0.0  # bytes that crossed the link (wasted ones included)
        self.delivered = 0  # bytes of completed flows
        self.comp: Component = None  # type: ignore[assignment]  # set by the fabric

    def __repr__(self) -> str:
        return f"<Link {self.name} {self.mode.value} {self.capacity:.4g} B/s, {len(self.rate_flows)} flows>"


class Component:
    """Links whose flows can share capacity; rates are recomputed per component."""

    __slots__ = ("active", "index", "links", "next_flow", "timer", "updated")

    def __init__(self, index: int, links: list[Link]) -> None:
        self.index = index
        self.links = links
        self.active: dict[int, Flow] = {}
        self.updated = 0.0
        self.timer: Timer | None = None
        self.next_flow: Flow | None = None


class FabricListener(Protocol):
    """Who hears what became of each flow (the engine backend, or the scenario runner)."""

    def on_complete(self, flow: Flow) -> None: ...

    def on_error(self, flow: Flow, error: SimRailError, rail_down: bool) -> None: ...

    def on_withdrawn(self, flow: Flow) -> None: ...


Monitor = Callable[[float, Link], None]
"""Called with ``(now, link)`` after every recompute that touched the link (tests, tracing)."""


class FluidFabric:
    """Links, flows and fair sharing, driven by a :class:`VirtualClock`.

    ``components`` groups link indices whose flows may share a link; by
    default each link is its own component (a node pair's rails).  A flow's
    path must lie inside one component.  ``origin`` is the virtual time the
    profiles count from (default: the clock's time at construction).
    """

    def __init__(
        self,
        rails: Sequence[SimRail],
        clock: VirtualClock,
        listener: FabricListener,
        *,
        seed: int = 0,
        components: Sequence[Sequence[int]] | None = None,
        origin: float | None = None,
        withdraw_delay: float = 0.0,
    ) -> None:
        if not rails:
            raise ConfigError("a fabric needs at least one link")
        names = [r.name for r in rails]
        if len(set(names)) != len(names):
            raise ConfigError(f"link names must be unique, got {names}")
        self.clock = clock
        self.listener = listener
        self.seed = seed
        self.origin = clock.now if origin is None else origin
        self.withdraw_delay = withdraw_delay
        self.links: list[Link] = []
        for i, spec in enumerate(rails):
            timeline = LinkTimeline(spec.capacity, spec.profile, random.Random(f"{seed}/profile/{spec.name}"))
            self.links.append(Link(i, spec, timeline, random.Random(f"{seed}/jitter/{spec.name}")))
        self._by_name = {link.name: link for link in self.links}
        groups = [[i] for i in range(len(self.links))] if components is None else [list(g) for g in components]
        seen: set[int] = set()
        self.components: list[Component] = []
        for ci, group in enumerate(groups):
            members = []
            for i in group:
                if not 0 <= i < len(self.links) or i in seen:
                    raise ConfigError(f"component {ci}: link index {i} is unknown or in two components")
                seen.add(i)
                members.append(self.links[i])
            comp = Component(ci, members)
            comp.updated = clock.now
            for link in members:
                link.comp = comp
            self.components.append(comp)
        if len(seen) != len(self.links):
            missing = sorted(set(range(len(self.links))) - seen)
            raise ConfigError(f"links {missing} belong to no component")
        self._next_id = 1
        self.monitor: Monitor | None = None
        self.record_rates = False  # keep every flow's (time, rate) history, for exact timelines
        self.flows_started = 0
        self.flows_completed = 0
        self.bytes_completed = 0
        self.bytes_wasted = 0.0  # moved by flows that failed or were withdrawn

    # ================================================================ queries

    def link(self, key: int | str) -> Link:
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise ConfigError(f"unknown link {key!r}; links: {sorted(self._by_name)}") from None
        if not 0 <= key < len(self.links):
            raise ConfigError(f"link index {key} out of range (0..{len(self.links) - 1})")
        return self.links[key]

    def capacity_integral(self, link: int | str, t0: float, t1: float) -> float:
        """Bytes ``link`` could carry for us between virtual times ``t0`` and ``t1`` (profile only)."""
        lk = self.link(link)
        return lk.timeline.integral(t0 - self.origin, t1 - self.origin)

    def settle(self) -> None:
        """Bring every link's ``carried`` counter up to the current time."""
        for comp in self.components:
            self._advance(comp)

    # ================================================================ actions

    def start(self, token: Any, path: Sequence[int | str | Link], size: int) -> Flow:
        """Send ``size`` bytes along ``path``; the listener hears how it ends."""
        if size < 0:
            raise ValueError(f"a flow cannot carry a negative number of bytes ({size})")
        links = tuple(p if isinstance(p, Link) else self.link(p) for p in path)
        if not links:
            raise ValueError("a flow needs a path of at least one link")
        comp = links[0].comp
        if any(link.comp is not comp for link in links):
            raise ValueError(f"path {[lk.name for lk in links]} crosses components; links of a path must share one")
        now = self.clock.now
        flow = Flow(self._next_id, token, links, size, now)
        self._next_id += 1
        self.flows_started += 1
        delay = 0.0
        for link in links:
            self._attach(link, flow)
            spec = link.spec
            delay += spec.latency
            if spec.jitter > 0.0:
                delay += link.jitter_rng.expovariate(1.0 / spec.jitter)
        flow.timer = self.clock.call_at(now + delay, self._join, flow)
        return flow

    def withdraw(self, flow: Flow) -> None:
        """Stop ``flow`` at once; the listener hears ``on_withdrawn`` after ``withdraw_delay``.

        A flow whose completion or error is already on its way is left alone:
        that report resolves it.
        """
        state = flow.state
        if state is not _PENDING and state is not _ACTIVE and state is not _STALLED:
            return
        if state is _ACTIVE:
            comp = flow.comp
            self._advance(comp)
            self._remove_active(flow)
            self._detach(flow)
            self._reshare(comp)
        else:
            if flow.timer is not None:
                flow.timer.cancel()
            self._detach(flow)
        self.bytes_wasted += flow.moved
        flow.state = FlowState.WITHDRAWN
        flow.timer = self.clock.call_at(self.clock.now + self.withdraw_delay, self._report_withdrawn, flow)

    def set_override(self, link: int | str, mode: Mode | None = None, factor: float = 1.0) -> None:
        """Force ``link`` into ``mode`` (``None``: follow its profile) at ``factor`` of its capacity, now."""
        if not 0.0 < factor <= 1.0:
            raise ConfigError(f"capacity factor must be in (0, 1], got {factor}")
        lk = self.link(link)
        lk.override_mode = mode
        lk.override_factor = factor
        self._on_link_change(lk)

    # ============================================================== internals

    def _state_at(self, link: Link, now: float) -> tuple[Mode, float]:
        tl = link.timeline
        t = now - self.origin
        mode = tl.mode_at(t) if link.override_mode is None else link.override_mode
        return mode, tl.capacity_at(t) * link.override_factor

    def _attach(self, link: Link, flow: Flow) -> None:
        if not link.flows:
            link.mode, link.capacity = self._state_at(link, self.clock.now)
            self._arm_link(link)
        link.flows[flow.id] = flow

    def _detach(self, flow: Flow) -> None:
        for link in flow.path:
            link.flows.pop(flow.id, None)
            if not link.flows and link.timer is not None:
                link.timer.cancel()
                link.timer = None

    def _arm_link(self, link: Link) -> None:
        if link.timer is not None:
            link.timer.cancel()
            link.timer = None
        if link.timeline.static:
            return
        nxt = link.timeline.next_change(self.clock.now - self.origin)
        if nxt < INF:
            link.timer = self.clock.call_at(nxt + self.origin, self._on_link_change, link)

    def _path_mode(self, flow: Flow) -> Mode:
        worst = Mode.UP
        for link in flow.path:
            m = link.mode
            if m is Mode.DOWN:
                return m
            if m is Mode.STALLED or (m is Mode.ERRORING and worst is Mode.UP):
                worst = m
        return worst

    def _join(self, flow: Flow) -> None:
        if flow.state is not _PENDING:
            return
        flow.timer = None
        mode = self._path_mode(flow)
        if mode is not Mode.UP:
            self._trip(flow, mode)
            return
        comp = flow.comp
        self._advance(comp)
        flow.state = _ACTIVE
        flow.started_at = self.clock.now
        comp.active[flow.id] = flow
        for link in flow.path:
            link.rate_flows[flow.id] = flow
        self._reshare(comp)

    def _trip(self, flow: Flow, mode: Mode) -> None:
        """``flow`` met a link in ``mode`` (not up): fail it or lose it."""
        if mode is Mode.STALLED:
            if flow.state is _ACTIVE:
                self._remove_active(flow)
            if flow.timer is not None:
                flow.timer.cancel()
                flow.timer = None
            flow.state = _STALLED
            return
        was_active = flow.state is _ACTIVE
        if was_active:
            self._remove_active(flow)
        elif flow.timer is not None:
            flow.timer.cancel()
        self._detach(flow)
        self.bytes_wasted += flow.moved
        flow.state = FlowState.FAILING
        bad = [lk for lk in flow.path if lk.mode is mode]
        delay = max(lk.spec.error_delay for lk in bad)
        names = ", ".join(lk.name for lk in bad)
        if mode is Mode.DOWN:
            error = SimRailError(f"simulated link {names} is down")
        else:
            error = SimRailError(f"simulated link {names} failed the slice")
        flow.timer = self.clock.call_at(self.clock.now + delay, self._report_error, flow, error, mode is Mode.DOWN)

    def _remove_active(self, flow: Flow) -> None:
        flow.comp.active.pop(flow.id, None)
        for link in flow.path:
            link.rate_flows.pop(flow.id, None)
        flow.rate = 0.0
        if flow.history is not None:
            self._note_rate(flow, self.clock.now)

    @staticmethod
    def _note_rate(flow: Flow, now: float) -> None:
        h = flow.history
        if h is None:
            flow.history = [(now, flow.rate)]
        elif h[-1][1] != flow.rate:
            if h[-1][0] == now:
                h[-1] = (now, flow.rate)
            else:
                h.append((now, flow.rate))

    def _on_link_change(self, link: Link) -> None:
        link.timer = None
        now = self.clock.now
        old_mode, old_cap = link.mode, link.capacity
        link.mode, link.capacity = self._state_at(link, now)
        if link.flows:
            self._arm_link(link)
        comp = link.comp
        self._advance(comp)
        mode = link.mode
        if mode is not old_mode and mode is not Mode.UP:
            for flow in list(link.flows.values()):
                if mode is Mode.STALLED:
                    if flow.state is _ACTIVE:
                        self._trip(flow, mode)
                    # pending flows are lost when they reach the link (see _join)
                else:
                    self._trip(flow, mode)
            self._reshare(comp)
        elif link.capacity != old_cap and link.rate_flows:
            self._reshare(comp)

    def _advance(self, comp: Component) -> None:
        """Move every active flow of ``comp`` forward to now at its current rate."""
        now = self.clock.now
        dt = now - comp.updated
        if dt > 0.0:
            for flow in comp.active.values():
                flow.remaining -= flow.rate * dt
            for link in comp.links:
                if link.used:
                    link.carried += link.used * dt
        comp.updated = now

    def _reshare(self, comp: Component) -> None:
        """Max-min fair rates for ``comp``'s active flows, and its next completion."""
        active = comp.active
        if comp.timer is not None:
            comp.timer.cancel()
            comp.timer = None
        comp.next_flow = None
        if len(comp.links) == 1:
            link = comp.links[0]
            n = len(active)
            rate = link.capacity / n if n else 0.0
            for flow in active.values():
                flow.rate = rate
            link.used = rate * n
        else:
            self._water_fill(comp)
        if self.record_rates:
            now = self.clock.now
            for flow in active.values():
                self._note_rate(flow, now)
        monitor = self.monitor
        if monitor is not None:
            now = self.clock.now
            for link in comp.links:
                monitor(now, link)
        if not active:
            return
        best = INF
        nxt: Flow | None = None
        for flow in active.values():
            rate = flow.rate
            if rate > 0.0:
                t = flow.remaining / rate
                if t < best:
                    best, nxt = t, flow
        if nxt is not None:
            comp.next_flow = nxt
            comp.timer = self.clock.call_at(self.clock.now + max(best, 0.0), self._due, comp)

    @staticmethod
    def _water_fill(comp: Component) -> None:
        """Progressive filling: raise all rates together; freeze flows at each saturated link."""
        rem: dict[Link, float] = {}
        cnt: dict[Link, int] = {}
        for link in comp.links:
            link.used = 0.0
            n = len(link.rate_flows)
            if n:
                rem[link] = link.capacity
                cnt[link] = n
        frozen: set[int] = set()
        while cnt:
            share = INF
            bottleneck: Link | None = None
            for link, n in cnt.items():
                s = rem[link] / n
                if s < share:
                    share, bottleneck = s, link
            assert bottleneck is not None
            share = max(share, 0.0)
            for flow in bottleneck.rate_flows.values():
                if flow.id in frozen:
                    continue
                frozen.add(flow.id)
                flow.rate = share
                for link in flow.path:
                    link.used += share
                    rem[link] -= share
                    left = cnt[link] - 1
                    if left:
                        cnt[link] = left
                    else:
                        del cnt[link]

    def _due(self, comp: Component) -> None:
        comp.timer = None
        self._advance(comp)
        first = comp.next_flow
        done = [f for f in comp.active.values() if f.remaining <= _EPS_BYTES or f is first]
        for flow in done:
            self._remove_active(flow)
            self._detach(flow)
            flow.remaining = 0.0
            flow.state = FlowState.DONE
            flow.finished_at = self.clock.now
        self._reshare(comp)
        for flow in done:
            for link in flow.path:
                link.delivered += flow.size
            self.flows_completed += 1
            self.bytes_completed += flow.size
            self.listener.on_complete(flow)

    def _report_error(self, flow: Flow, error: SimRailError, rail_down: bool) -> None:
        flow.timer = None
        flow.finished_at = self.clock.now
        self.listener.on_error(flow, error, rail_down)

    def _report_withdrawn(self, flow: Flow) -> None:
        flow.timer = None
        flow.finished_at = self.clock.now
        self.listener.on_withdrawn(flow)
