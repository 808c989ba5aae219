"""A kit for property tests of code that uses tent_async.

People who build on the engine want to property-test *their* use of it: that
their transfers complete byte-exact whatever the rails do, that a deadline they
set holds.  This package gives them plain values to describe rails and faults,
and hypothesis strategies that draw them:

* :class:`FaultSchedule` / :class:`FaultStep`: which rail fails how, and when;
  ``await schedule.run(engine.backend)`` applies it on the ``local`` backend (wall
  clock) or the ``sim`` backend (virtual time: a failing example replays exactly).
* :func:`rail_specs`, :func:`fault_schedules` and :func:`workloads` (in :mod:`.strategies`, which needs
  hypothesis: ``pip install 'tent_async[testing]'``).
* :class:`SliceTrace` records every slice of an engine; :func:`check_trace` checks
  exactly-once coverage, no post to a quarantined rail, nothing after a transfer's
  end, and that every transfer ends (:mod:`.trace`).

See "Property-testing your use of the engine" in docs/guide.md for a worked example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .faults import ACTIONS, Action, FaultKnobs, FaultSchedule, FaultStep
from .trace import SliceEvent, SliceTrace, TraceViolation, check_trace

if TYPE_CHECKING:
    from .strategies import FAULT_KINDS, BlockTransfer, Workload, fault_schedules, rail_specs, workloads

_STRATEGIES = ("FAULT_KINDS", "BlockTransfer", "Workload", "fault_schedules", "rail_specs", "workloads")


def __getattr__(name: str) -> Any:
    # The strategies need hypothesis, a test-time dependency: import it only when asked.
    if name in _STRATEGIES:
        try:
            from . import strategies
        except ImportError as exc:  # pragma: no cover - hypothesis is installed with the test extra
            raise ImportError(
                f"tent_async.testing.{name} needs hypothesis: pip install 'tent_async[testing]' ({exc})"
            ) from exc
        return getattr(strategies, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACTIONS",
    "FAULT_KINDS",
    "Action",
    "FaultKnobs",
    "FaultSchedule",
    "FaultStep",
    "SliceEvent",
    "SliceTrace",
    "TraceViolation",
    "check_trace",
    "fault_schedules",
    "rail_specs",
    "workloads",
    "BlockTransfer",
    "Workload",
]
