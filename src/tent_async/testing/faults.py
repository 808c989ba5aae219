"""Fault schedules: what happens to which rail, and when, as a plain value.

A :class:`FaultSchedule` is a sorted tuple of :class:`FaultStep` (at ``t``
seconds from the start, do ``action`` to ``rail``).  It is printable and
comparable, so a failing property test shows exactly what the rails did, and
it drives any backend with the fault knobs of the ``local`` and ``sim``
backends (``inject_fault``, ``set_slowdown``, ``clear_fault``): in wall-clock
time on ``local``, in virtual time on ``sim`` (where a run replays exactly).

Hypothesis strategies that draw schedules are in :mod:`tent_async.testing.strategies`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import attrs

from ..errors import ConfigError

Action = Literal["error", "down", "stall", "slow", "clear"]
ACTIONS: tuple[Action, ...] = ("error", "down", "stall", "slow", "clear")
"""``error``: every slice on the rail fails with an error; ``down``: slices fail and the
rail is declared down; ``stall``: slices vanish silently (a hung peer); ``slow``: the rail
delivers ``fraction`` of its speed; ``clear``: the rail heals (full speed, no fault)."""


@runtime_checkable
class FaultKnobs(Protocol):
    """What a backend offers to inject faults (the ``local`` and ``sim`` backends do)."""

    def inject_fault(self, rail: str, mode: str) -> None: ...

    def set_slowdown(self, rail: str, fraction: float) -> None: ...

    def clear_fault(self, rail: str) -> None: ...


def _at(_inst: Any, _attr: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"a fault's time must be finite and not negative, got {value!r}")


def _action(_inst: Any, _attr: attrs.Attribute[Any], value: str) -> None:
    if value not in ACTIONS:
        raise ConfigError(f"unknown fault action {value!r}; use one of {ACTIONS}")


def _fraction(_inst: Any, _attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"a slowdown fraction must be in (0, 1], got {value!r}")


@attrs.frozen
class FaultStep:
    """At ``at`` seconds from the start of the schedule, do ``action`` to ``rail``."""

    at: float = attrs.field(converter=float, validator=_at)
    rail: str
    action: Action = attrs.field(validator=_action)
    fraction: float = attrs.field(default=1.0, converter=float, validator=_fraction)  # for "slow"

    def apply(self, knobs: FaultKnobs) -> None:
        """Do it now, through the backend's fault knobs."""
        if self.action == "clear":
            knobs.clear_fault(self.rail)
        elif self.action == "slow":
            knobs.set_slowdown(self.rail, self.fraction)
        else:
            knobs.inject_fault(self.rail, self.action)

    def __str__(self) -> str:
        what = f"slow={self.fraction:g}" if self.action == "slow" else self.action
        return f"{self.rail}:{what}@{self.at:g}"  # the syntax of `tent-async watch --fault`


def _sorted_steps(steps: Iterable[FaultStep]) -> tuple[FaultStep, ...]:
    out = tuple(sorted(steps, key=lambda s: s.at))
    bad = [s for s in out if not isinstance(s, FaultStep)]
    if bad:
        raise ConfigError(f"a fault schedule holds FaultStep values, got {bad[0]!r}")
    return out


@attrs.frozen
class FaultSchedule:
    """Fault steps in time order (ties keep the order they were given in)."""

    steps: tuple[FaultStep, ...] = attrs.field(default=(), converter=_sorted_steps)

    def __iter__(self) -> Any:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __str__(self) -> str:
        return " ".join(str(s) for s in self.steps) or "(no faults)"

    @property
    def end(self) -> float:
        """Time of the last step (0 for an empty schedule)."""
        return self.steps[-1].at if self.steps else 0.0

    @property
    def rails(self) -> frozenset[str]:
        """Rails the schedule touches."""
        return frozenset(s.rail for s in self.steps)

    def untouched(self, rails: Iterable[str]) -> list[str]:
        """Those of ``rails`` that no step touches (they stay healthy throughout)."""
        touched = self.rails
        return [r for r in rails if r not in touched]

    def state_at(self, t: float) -> dict[str, FaultStep]:
        """The step in force on each touched rail at time ``t`` (``clear`` for a healed one)."""
        state: dict[str, FaultStep] = {}
        for step in self.steps:
            if step.at > t:
                break
            state[step.rail] = step
        return state

    def faulty_at(self, t: float) -> set[str]:
        """Rails failing (error, down or stall) at time ``t``; slowed rails are not failing."""
        return {rail for rail, step in self.state_at(t).items() if step.action in ("error", "down", "stall")}

    def healed(self) -> bool:
        """True if every rail the schedule touches ends cleared."""
        return all(step.action == "clear" for step in self.state_at(math.inf).values())

    def check_rails(self, rails: Sequence[str]) -> None:
        """Raise :class:`ConfigError` if a step names a rail not in ``rails``."""
        unknown = sorted(self.rails - set(rails))
        if unknown:
            raise ConfigError(f"the fault schedule names unknown rails {unknown}; the engine has {sorted(rails)}")

    async def run(
        self,
        knobs: FaultKnobs,
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Apply each step at its time, measured from the call.

        ``knobs`` is a backend with fault knobs (``engine.backend``).  The
        backend's own ``sleep`` and ``clock`` are used when it has them (the
        ``sim`` backend: virtual time, so a run replays exactly), else anyio's
        and the event loop's.  Run it beside the workload, in a task group, and
        cancel it when the workload is done if the schedule is longer.
        """
        if not isinstance(knobs, FaultKnobs):
            raise ConfigError(
                f"{type(knobs).__name__} has no fault knobs (inject_fault, set_slowdown, clear_fault); "
                "use the local or sim backend"
            )
        sleep = sleep or getattr(knobs, "sleep", None) or anyio.sleep
        clock = clock or getattr(knobs, "clock", None) or anyio.current_time
        start = clock()
        for step in self.steps:
            delay = start + step.at - clock()
            if delay > 0:
                await sleep(delay)
            step.apply(knobs)


__all__ = ["ACTIONS", "Action", "FaultKnobs", "FaultSchedule", "FaultStep"]
