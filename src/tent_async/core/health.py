"""Rail health: healthy -> suspect -> quarantined -> probing -> healthy.

A plain state machine fed failures, successes and the time; it decides
whether a rail may carry data and how much.  It has no clock of its own: every
call passes ``now``.

* **healthy**: full window.
* **suspect**: after one error or missed deadline.  Keeps a window of one
  slice, of at most ``min_slice`` bytes, until ``recover_after`` successes in
  a row bring it back.
* **quarantined**: after ``quarantine_after`` failures within
  ``failure_window`` or in a row (no success between them), a failure while
  probing, or a backend saying the rail is down.  Carries nothing until the back-off expires; the back-off doubles on
  each quarantine up to a cap.
* **probing**: after the back-off; carries one small probe slice at a time.
  A probe that succeeds makes the rail healthy; one that fails sends it back
  to quarantine with a longer back-off.

The back-off level is forgiven one step per ``backoff_decay`` seconds of clean
service, so a flapping rail that succeeds once between failures keeps a long
back-off instead of being trusted again at once.
"""

from __future__ import annotations

import enum
from collections import deque

from .config import SchedulerConfig
from .events import EventKind


class Health(enum.Enum):
    """Where a rail stands in the failover state machine."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"
    QUARANTINED = "quarantined"
    PROBING = "probing"


_H = Health
# Every move the state machine may make; anything else is a bug and raises.
TRANSITIONS: frozenset[tuple[Health, Health]] = frozenset(
    {
        (_H.HEALTHY, _H.SUSPECT),  # one failure
        (_H.HEALTHY, _H.QUARANTINED),  # rail down, or K failures at once
        (_H.SUSPECT, _H.HEALTHY),  # recover_after successes
        (_H.SUSPECT, _H.QUARANTINED),  # K failures
        (_H.QUARANTINED, _H.QUARANTINED),  # reported down again: the back-off restarts, longer
        (_H.QUARANTINED, _H.PROBING),  # back-off over
        (_H.PROBING, _H.HEALTHY),  # probe succeeded
        (_H.PROBING, _H.QUARANTINED),  # probe failed
    }
)

# The rail event that announces arriving in a state (None: no event).
ARRIVAL_EVENT: dict[Health, EventKind] = {
    _H.SUSPECT: EventKind.SUSPECT,
    _H.QUARANTINED: EventKind.QUARANTINE,
    _H.PROBING: EventKind.PROBE,
    _H.HEALTHY: EventKind.RECOVERY,
}


class IllegalTransition(RuntimeError):
    """The health state machine was asked for a move it does not have (a bug)."""


class RailHealth:
    """Failure bookkeeping and state of one rail."""

    __slots__ = (
        "_clean_since",
        "_config",
        "_consecutive",
        "_failures",
        "_successes",
        "level",
        "quarantine_until",
        "quarantines",
        "state",
    )

    def __init__(self, config: SchedulerConfig) -> None:
        self._config = config
        self.state = Health.HEALTHY
        self.level = 0  # back-off exponent of the next quarantine
        self.quarantine_until = 0.0
        self.quarantines = 0
        self._failures: deque[float] = deque()
        self._consecutive = 0  # failures since the last success, however far apart
        self._successes = 0
        self._clean_since = 0.0

    # ------------------------------------------------------------- queries

    @property
    def usable(self) -> bool:
        """May the rail be given a slice at all (window permitting)?"""
        return self.state is not Health.QUARANTINED

    @property
    def dispatchable(self) -> bool:
        """May a policy choose the rail for ordinary slices (probing rails only get probes)?"""
        return self.state is Health.HEALTHY or self.state is Health.SUSPECT

    def window(self, full: int) -> int:
        """Slices the rail may hold in flight: ``full`` if healthy, one if suspect or probing, none in quarantine."""
        state = self.state
        if state is Health.HEALTHY:
            return full
        return 0 if state is Health.QUARANTINED else 1

    # -------------------------------------------------------------- events

    def on_failure(self, now: float, *, rail_down: bool = False) -> Health:
        """Record a failed slice (error or missed deadline); returns the new state."""
        cfg = self._config
        self._forgive(now)
        self._successes = 0
        self._consecutive += 1
        self._failures.append(now)
        while self._failures and self._failures[0] < now - cfg.failure_window:
            self._failures.popleft()
        # K failures close together, or K in a row with no success between them (a rail
        # whose failures are spread out, e.g. slow-to-confirm stalls, is just as broken).
        if (
            rail_down
            or self.state is Health.PROBING
            or len(self._failures) >= cfg.quarantine_after
            or self._consecutive >= cfg.quarantine_after
        ):
            self._quarantine(now)
        elif self.state is Health.HEALTHY:
            self._move(Health.SUSPECT)
        return self.state

    def on_success(self, now: float) -> Health:
        """Record a completed slice; returns the new state."""
        self._consecutive = 0
        if self.state is Health.PROBING:
            self._move(Health.HEALTHY)
            self._failures.clear()
            self._clean_since = now
        elif self.state is Health.SUSPECT:
            self._successes += 1
            if self._successes >= self._config.recover_after:
                self._move(Health.HEALTHY)
                self._successes = 0
                self._clean_since = now
        return self.state

    def tick(self, now: float) -> Health:
        """Advance timers: a quarantine that expired turns into probing."""
        if self.state is Health.QUARANTINED and now >= self.quarantine_until:
            self._move(Health.PROBING)
        return self.state

    # ------------------------------------------------------------ internals

    def _quarantine(self, now: float) -> None:
        cfg = self._config
        self._move(Health.QUARANTINED)
        self.quarantine_until = now + min(cfg.backoff_cap, cfg.backoff_base * (2.0**self.level))
        self.level += 1
        self.quarantines += 1
        self._failures.clear()
        self._consecutive = 0
        self._clean_since = float("inf")

    def _move(self, new: Health) -> None:
        if (self.state, new) not in TRANSITIONS:
            raise IllegalTransition(f"rail health cannot go from {self.state.value} to {new.value}")
        self.state = new

    def _forgive(self, now: float) -> None:
        if self.state is Health.HEALTHY and self.level and now > self._clean_since:
            steps = int((now - self._clean_since) / self._config.backoff_decay)
            if steps:
                self.level = max(0, self.level - steps)
                self._clean_since = now
