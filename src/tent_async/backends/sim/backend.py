"""``Engine(backend="sim")``: the asyncio engine over the fluid fabric, in virtual time.

The backend replaces the engine's clock and timers with a
:class:`~.clock.VirtualClock` and advances it whenever the asyncio loop has
nothing ready to run: the engine reacts to everything that happened at one
virtual instant (completions, timers) before time moves on, so the planner
sees the same event order it would see on real hardware, only without the
waiting.  Data is really copied when a slice completes (``copy=False`` skips
it for scenarios too big for memory), so byte-exact checks hold.

One simulated world per event loop: every sim engine on a loop shares one
virtual clock (so two engines agree on what time it is), and one of them at a
time drives it.  A fabric's profile times count from its engine's start.

Idle detection looks at the loop's ready queue (CPython's asyncio keeps it in
``loop._ready``); on loops without one it yields ``idle_yields`` times.  Time
advances while the application awaits anything that is not ready, so a task
that waits for real I/O or a wall-clock ``asyncio.sleep`` sees virtual time
run ahead; use :meth:`SimBackend.sleep` to wait in virtual time.

Fencing: a slice's bytes land only when it completes; a withdrawn, failed or
stalled slice never writes the destination.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ...core import Attempt
from ...errors import ConfigError, SegmentError
from ...rails import RailSpec
from ...segments import Segment, SegmentBase
from ..base import Backend, BackendContext, Cancellable, copy_attempt
from .clock import VirtualClock
from .fabric import Flow, FluidFabric, SimRail, SimRailError
from .profiles import Mode
from .topology import PairTopology

FAULT_MODES: dict[str, Mode] = {"error": Mode.ERRORING, "down": Mode.DOWN, "stall": Mode.STALLED}


class _World:
    """The virtual clock of one event loop and the sim backends sharing it."""

    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.members: list[SimBackend] = []
        self.leader: SimBackend | None = None
        self.wake = asyncio.Event()
        self.changed = asyncio.Event()

    def hand_over(self) -> None:
        self.leader = None
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


_WORLDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _World] = weakref.WeakKeyDictionary()


def _as_topology(fabric: Any) -> PairTopology:
    if isinstance(fabric, PairTopology):
        return fabric
    if isinstance(fabric, SimRail):
        return PairTopology(rails=(fabric,))
    try:
        return PairTopology(rails=tuple(fabric))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fabric must be a PairTopology or a list of SimRail values: {exc}") from None


def _from_specs(rails: Sequence[RailSpec]) -> PairTopology:
    links = []
    for spec in rails:
        if spec.backend not in (None, "sim"):
            raise ConfigError(f"rail {spec.name!r} asks for backend {spec.backend!r}, but this is 'sim'")
        if spec.bandwidth is None:
            raise ConfigError(f"simulated rail {spec.name!r} needs a bandwidth (its capacity), e.g. '400Gb/s'")
        links.append(SimRail(name=spec.name, capacity=spec.bandwidth, latency=spec.latency))
    if not links:
        raise ConfigError("the sim backend needs at least one rail")
    return PairTopology(rails=tuple(links))


class SimBackend(Backend):
    """Rails of an emulated fabric, in virtual time.

    ``fabric``: a :class:`PairTopology` or a list of :class:`SimRail` (one
    per rail, with capacity, latency, jitter and profile).  Alternatively
    ``rails``: plain :class:`~tent_async.RailSpec` values whose bandwidth
    becomes the capacity.  ``seed`` makes jitter and bursts reproducible;
    ``copy=False`` moves no data (for huge scenarios; destinations stay as
    they were).
    """

    name: ClassVar[str] = "sim"
    scatter_gather: ClassVar[bool] = True

    def __init__(
        self,
        rails: Sequence[RailSpec] | None = None,
        *,
        fabric: PairTopology | Sequence[SimRail] | SimRail | None = None,
        seed: int = 0,
        copy: bool = True,
        idle_yields: int = 8,
    ) -> None:
        if fabric is not None and rails is not None:
            raise ConfigError("give the sim backend either fabric=... or rails=..., not both")
        if fabric is not None:
            self.topology = _as_topology(fabric)
        elif rails is not None:
            self.topology = _from_specs(rails)
        else:
            raise ConfigError(
                "the sim backend needs a fabric: Engine(backend='sim', fabric=[SimRail(name='nic0', "
                "capacity='400Gb/s'), ...]) or rails=[RailSpec(name=..., bandwidth=...)]"
            )
        if idle_yields < 1:
            raise ConfigError(f"idle_yields must be at least 1, got {idle_yields}")
        try:
            self._specs = [RailSpec(name=r.name, bandwidth=r.capacity, latency=r.latency) for r in self.topology.rails]
        except ValueError as exc:
            raise ConfigError(f"bad simulated rail: {exc}") from None
        self.seed = seed
        self.copy = copy
        self.idle_yields = idle_yields
        self._world: _World | None = None
        self._fabric: FluidFabric | None = None
        self._ctx: BackendContext | None = None
        self._link_of = {r.name: i for i, r in enumerate(self.topology.rails)}

    # ----------------------------------------------------------- lifecycle

    def rail_specs(self) -> Sequence[RailSpec]:
        return self._specs

    async def start(self, ctx: BackendContext) -> None:
        self._ctx = ctx
        loop = asyncio.get_running_loop()
        world = _WORLDS.get(loop)
        if world is None:
            world = _WORLDS[loop] = _World()
        self._world = world
        self._fabric = FluidFabric(
            self.topology.link_specs(), world.clock, self, seed=self.seed, origin=world.clock.now
        )
        world.members.append(self)
        ctx.spawn(self._drive, name=f"tent-sim-driver-{id(self):x}")

    async def aclose(self) -> None:
        world = self._world
        if world is None:
            return
        if self in world.members:
            world.members.remove(self)
        if world.leader is self:
            world.hand_over()
        if not world.members:
            loop = asyncio.get_running_loop()
            if _WORLDS.get(loop) is world:
                del _WORLDS[loop]

    @property
    def fabric(self) -> FluidFabric:
        """The running fabric (links, counters); available once the engine started."""
        if self._fabric is None:
            raise ConfigError("the sim fabric exists once the engine is started (async with Engine(...))")
        return self._fabric

    @property
    def now(self) -> float:
        """Virtual seconds since this loop's simulated world began."""
        return self._world.clock.now if self._world is not None else 0.0

    # ----------------------------------------------------- clock and timers

    def clock(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Cancellable:
        world = self._require_world()
        timer = world.clock.call_at(when, callback)
        world.wake.set()
        return timer

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of virtual time."""
        world = self._require_world()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        world.clock.call_at(world.clock.now + max(0.0, seconds), wake)
        world.wake.set()
        await fut

    def _require_world(self) -> _World:
        if self._world is None:
            raise ConfigError("the sim backend is not started; use it inside `async with Engine(...)`")
        return self._world

    async def _drive(self) -> None:
        """Advance virtual time whenever the loop is idle (while this backend leads its world)."""
        world = self._require_world()
        try:
            while self in world.members:
                if world.leader is None:
                    world.leader = self
                if world.leader is not self:
                    await world.changed.wait()
                    continue
                await self._settle()
                if world.leader is not self:
                    continue
                if world.clock.next_time() is None:
                    world.wake.clear()
                    await world.wake.wait()
                    continue
                world.clock.step()
        finally:
            if world.leader is self:  # cancelled or closed: another engine on the loop takes over
                world.hand_over()

    async def _settle(self) -> None:
        """Return once nothing else on the loop is ready to run."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        await asyncio.sleep(0)
        if ready is None:
            for _ in range(self.idle_yields - 1):
                await asyncio.sleep(0)
            return
        # No event says "the loop is idle": yield until its ready queue is empty.
        while ready:  # noqa: ASYNC110
            await asyncio.sleep(0)

    # --------------------------------------------------------- data movement

    def check_pair(self, src: SegmentBase, dst: SegmentBase) -> None:
        for seg in (src, dst):
            if not isinstance(seg, Segment):
                raise SegmentError(
                    f"the sim backend copies between local segments only; {seg!r} is not one "
                    "(the simulated peer's memory lives in this process)"
                )

    def post(self, attempt: Attempt) -> None:
        world = self._require_world()
        attempt.tag = self.fabric.start(attempt, (self._link_of[attempt.rail_name],), attempt.length)
        world.wake.set()

    def withdraw(self, attempt: Attempt) -> None:
        flow = attempt.tag
        if isinstance(flow, Flow):
            self.fabric.withdraw(flow)
            self._require_world().wake.set()

    # ------------------------------------------------- fabric listener

    def on_complete(self, flow: Flow) -> None:
        a: Attempt = flow.token
        ctx = self._ctx
        if ctx is None:
            return
        if self.copy:
            try:
                copy_attempt(a, "sim")
            except Exception as exc:
                ctx.fail(a.id, exc, transfer_fatal=True)
                return
        ctx.complete(a.id)

    def on_error(self, flow: Flow, error: SimRailError, rail_down: bool) -> None:
        if self._ctx is not None:
            self._ctx.fail(flow.token.id, error, rail_down=rail_down)

    def on_withdrawn(self, flow: Flow) -> None:
        if self._ctx is not None:
            self._ctx.withdrawn(flow.token.id)

    # ------------------------------------------------------------ fault knobs

    def _link(self, rail: str) -> int:
        try:
            return self._link_of[rail]
        except KeyError:
            raise ConfigError(f"unknown rail {rail!r}; rails: {sorted(self._link_of)}") from None

    def inject_fault(self, rail: str, mode: str) -> None:
        """Make ``rail`` fail now: ``"error"``, ``"down"`` or ``"stall"`` (silent)."""
        if mode not in FAULT_MODES:
            raise ConfigError(f"unknown fault mode {mode!r}; use one of {sorted(FAULT_MODES)}")
        link = self.fabric.links[self._link(rail)]
        self.fabric.set_override(link.index, FAULT_MODES[mode], link.override_factor)
        self._require_world().wake.set()

    def set_slowdown(self, rail: str, fraction: float) -> None:
        """Make ``rail`` deliver ``fraction`` (0 < f <= 1) of its capacity from now, without errors."""
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"slowdown fraction must be in (0, 1], got {fraction}")
        link = self.fabric.links[self._link(rail)]
        self.fabric.set_override(link.index, link.override_mode, fraction)
        self._require_world().wake.set()

    def clear_fault(self, rail: str) -> None:
        """Heal ``rail``: back to its profile at full speed.  Stalled slices stay lost until withdrawn."""
        self.fabric.set_override(self._link(rail), None, 1.0)
        self._require_world().wake.set()
