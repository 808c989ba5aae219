"""Virtual time: a clock that jumps from one scheduled event to the next.

The simulator never reads the wall clock.  Every future happening (a slice
finishing, a burst of background traffic starting, a planner deadline) is a
timer on a :class:`VirtualClock`; running the clock means popping the earliest
timer, setting ``now`` to its time and calling it.  Ties are broken by the order
in which timers were scheduled, so a run is a pure function of its inputs and
repeats bit for bit.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any


class Timer:
    """A scheduled callback; :meth:`cancel` it to drop it."""

    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __repr__(self) -> str:
        state = " cancelled" if self.cancelled else ""
        return f"<Timer at {self.when:.9f}{state} {getattr(self.callback, '__qualname__', self.callback)!r}>"


class VirtualClock:
    """Simulated seconds, advanced only by running timers."""

    __slots__ = ("_heap", "_seq", "now")

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Run ``callback(*args)`` at virtual time ``when`` (never earlier than now)."""
        if math.isnan(when):
            raise ValueError("cannot schedule a timer at NaN")
        timer = Timer(max(when, self.now), callback, args)
        self._seq += 1
        heapq.heappush(self._heap, (timer.when, self._seq, timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        return self.call_at(self.now + delay, callback, *args)

    def next_time(self) -> float | None:
        """Time of the earliest live timer, or ``None`` when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def step(self) -> bool:
        """Advance to the earliest timer and run every timer due at that instant.

        Timers scheduled for the same instant while running are run too, in
        scheduling order.  Returns ``False`` when nothing was scheduled.
        """
        when = self.next_time()
        if when is None:
            return False
        self.now = when
        heap = self._heap
        while heap and heap[0][0] <= when:
            _, _, timer = heapq.heappop(heap)
            if not timer.cancelled:
                timer.cancelled = True  # a timer runs once
                timer.callback(*timer.args)
        return True

    def run_until(self, when: float) -> None:
        """Run every timer up to and including ``when``, then set ``now`` to ``when``."""
        while True:
            nxt = self.next_time()
            if nxt is None or nxt > when:
                break
            self.step()
        self.now = max(self.now, when)

    def __len__(self) -> int:
        """Scheduled timers, cancelled ones not yet dropped included."""
        return len(self._heap)


class PollSet:
    """Which planners a virtual-time driver polls next: those that heard news, and those
    whose own wake-up (``Planner.next_wakeup``) came due, in the order they were marked.

    One per driver (the scenario runner, the serving benchmark's per-GPU engines);
    keys are whatever names a planner there.
    """

    __slots__ = ("_due", "_timers", "clock")

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._due: dict[Any, None] = {}
        self._timers: dict[Any, tuple[float, Timer]] = {}

    def mark(self, key: Any) -> None:
        """``key``'s planner heard news: poll it soon."""
        self._due[key] = None

    def pop(self) -> Any | None:
        """The next planner to poll, or ``None`` when none is due."""
        if not self._due:
            return None
        key = next(iter(self._due))
        del self._due[key]
        return key

    def arm(self, key: Any, when: float | None) -> None:
        """Poll ``key``'s planner at ``when`` (its next wake-up); ``None``: never on its own."""
        current = self._timers.get(key)
        if current is not None:
            if current[0] == when:
                return
            current[1].cancel()
            del self._timers[key]
        if when is not None:
            self._timers[key] = (when, self.clock.call_at(when, self._woken, key))

    def _woken(self, key: Any) -> None:
        del self._timers[key]
        self._due[key] = None
