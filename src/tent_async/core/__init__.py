"""The sans-IO core: slicing, dispatch policies, telemetry and rail health.

Nothing in this package performs I/O or reads a clock; every entry point takes
``now``.  The asyncio engine and the virtual-time simulator both drive the same
:class:`Planner`.
"""

from .config import SchedulerConfig
from .decisions import Attempt, AttemptState, Decision, Finished, Outcome, Piece, Post, Withdraw
from .events import EventKind, RailEvent
from .health import Health, RailHealth
from .planner import Planner
from .policies import NO_RAIL, POLICIES, EarliestFinish, Policy, RoundRobin, SingleRail, StaticSlices, make_policy
from .rail_state import RailInfo, RailState, standby_error, stands_by
from .slicing import cut, nominal_slice
from .telemetry import RailEstimator

__all__ = [
    "NO_RAIL",
    "POLICIES",
    "Attempt",
    "AttemptState",
    "Decision",
    "EarliestFinish",
    "EventKind",
    "Finished",
    "Health",
    "Outcome",
    "Piece",
    "Planner",
    "Policy",
    "Post",
    "RailEstimator",
    "RailEvent",
    "RailHealth",
    "RailInfo",
    "RailState",
    "RoundRobin",
    "SchedulerConfig",
    "SingleRail",
    "standby_error",
    "stands_by",
    "StaticSlices",
    "Withdraw",
    "cut",
    "make_policy",
    "nominal_slice",
]
