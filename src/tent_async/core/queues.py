"""Queues, not scans: where open transfers wait for a rail with a free window.

Transfers that may use exactly the same rails form a :class:`RailGroup`, with
one queue per priority class.  The planner serves a group only while one of
its rails has room, and then takes transfers from the front of the queue
that :meth:`RailGroup.next_class` names, so a poll when every rail is full
costs the same for ten open transfers as for ten thousand.

Fairness rule, stated once here:

* the highest class with waiting work is served first;
* within a class, transfers take turns one slice at a time (round-robin), so
  a big transfer cannot starve the small ones submitted after it;
* a lower class that higher classes were served ``aging`` times in a row
  ahead of takes the next turn (bounded aging; the highest such class first),
  so background traffic always makes progress, and no class waits more than
  ``aging + 2`` slices while it has work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .rail_state import RailState, stands_by
from .transfer_state import TransferState

_CLASSES = (0, 1, 2)


class RailGroup:
    """The transfers of one eligible-rail set, queued by priority class."""

    __slots__ = ("aging", "key", "passed", "queues", "rail_set", "rails")

    def __init__(self, key: tuple[int, ...], rails: tuple[RailState, ...], aging: int) -> None:
        self.key = key
        self.rails = rails
        self.rail_set = frozenset(rails)
        self.aging = aging
        self.queues: tuple[deque[TransferState], deque[TransferState], deque[TransferState]] = (
            deque(),
            deque(),
            deque(),
        )
        self.passed = [0, 0, 0]  # turns each class was passed over while it had work

    def push(self, t: TransferState) -> None:
        """Queue ``t`` at the back of its class."""
        t.queued = True
        self.queues[t.priority].append(t)

    def worth_asking(self) -> bool:
        """Is a dispatch decision worth making for this group now?

        Yes when one of its rails can take a slice (``RailState.room``: by its
        count window, or under eft by its byte budget for small slices), and also when
        none of them may carry data at all (quarantined or probing): the
        policy then answers NO_RAIL, and the transfers are stalled or failed
        instead of waiting in the queue unseen.  No when every usable rail is
        merely full: that is the common, O(rails) answer.  A standby whose rail
        is healthy and one of the group's does not count: it stands by for
        these bytes (:func:`~.rail_state.stands_by`), and its room would make
        the policies that look at every queued transfer do so on every poll.
        Bytes its rail may no longer retry then wait for that rail's next
        report, which asks again.
        """
        usable = False
        for rail in self.rails:
            if rail.dispatchable:
                if rail.primary is not None and stands_by(rail, self.rails, None, 0):
                    continue
                if rail.room:
                    return True
                usable = True
        return not usable

    def next_class(self) -> int | None:
        """The class whose front transfer gets the next slice; ``None`` when nothing waits.

        Transfers with nothing left to send (finished, failed, cancelled, or
        all their bytes in flight) are dropped from the fronts on the way.
        """
        chosen: int | None = None
        starving: int | None = None
        for c in _CLASSES:
            if not self._has_work(c):
                self.passed[c] = 0
                continue
            if chosen is None:
                chosen = c
            elif starving is None and self.passed[c] >= self.aging:
                starving = c
        return chosen if starving is None else starving

    def best_class(self) -> int:
        """The highest class with waiting work (3 when none)."""
        for c in _CLASSES:
            if self._has_work(c):
                return c
        return 3

    def _has_work(self, c: int) -> bool:
        """Does class ``c`` have a transfer with bytes to send?  Drops finished fronts on the way."""
        q = self.queues[c]
        while q and not q[0].pending:
            q.popleft().queued = False
        return bool(q)

    def served(self, c: int) -> None:
        """The front transfer of class ``c`` got a slice: rotate it, count the turn."""
        passed = self.passed
        passed[c] = 0
        for lower in range(c + 1, 3):  # only service to a higher class counts as passing over
            if self.queues[lower]:
                passed[lower] += 1
        q = self.queues[c]
        t = q.popleft()
        if t.pending:
            q.append(t)
        else:
            t.queued = False

    def pop_front(self, c: int) -> TransferState:
        t = self.queues[c].popleft()
        t.queued = False
        return t

    def __iter__(self) -> Iterator[TransferState]:
        for q in self.queues:
            yield from q
