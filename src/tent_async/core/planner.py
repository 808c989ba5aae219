"""The sans-IO scheduler: events in, decisions out, no I/O and no clock.

A driver (the asyncio :class:`~tent_async.Engine`, or the virtual-time
simulator) feeds the planner what happened, each call carrying ``now``:

* :meth:`Planner.submit` / :meth:`Planner.cancel` — the application's intent;
* :meth:`Planner.complete`, :meth:`Planner.fail`, :meth:`Planner.withdrawn` —
  what a backend reports about an attempt;

and calls :meth:`Planner.poll` to get the decisions to carry out (post or
withdraw attempts, finish transfers), plus :meth:`Planner.next_wakeup` to know
when to poll again if nothing else happens (deadlines, quarantine expiry,
probes).

Invariants the planner keeps (checked by the state-machine tests):

* a slice is never posted to a quarantined rail;
* every byte of a running transfer is exactly one of: acknowledged, covered by
  one LIVE attempt, or pending;
* a transfer is reported finished only when no attempt of it is LIVE or
  WITHDRAWING, so after :class:`Finished` nothing of it can still land;
* a rail's in-flight bytes are the sum of its LIVE and WITHDRAWING attempts.

Cost: open transfers wait in per-rail-set, per-priority queues
(:mod:`.queues`); a poll does work only while some rail has room in its
window (``RailState.room``), so it costs the same with ten thousand open transfers as with ten.  A
transfer is a byte stream over its extents (:mod:`.extents`); with a
``scatter_gather`` driver one slice may carry many extents, otherwise slices
are cut at extent boundaries.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

from ..errors import NoRailError, TransferFailedError
from .config import SchedulerConfig
from .decisions import Attempt, AttemptState, Decision, Finished, Outcome, Piece, Post, Withdraw
from .events import EventKind, RailEvent
from .extents import Extents
from .health import ARRIVAL_EVENT, Health
from .policies import NO_RAIL, Policy, make_policy
from .queues import RailGroup
from .rail_state import RailInfo, RailState, standby_error
from .slicing import cut
from .transfer_state import PendingRange, Phase, Priority, TransferProgress, TransferState

_LIVE = AttemptState.LIVE
_WITHDRAWING = AttemptState.WITHDRAWING
_DONE = AttemptState.DONE


def fit_extents(ext: Extents, offset: int, size: int, free: int, per: int, most: int = 0) -> int:
    """The longest prefix of ``size`` stream bytes from ``offset`` whose extents fit the rail's
    budget (at most ``free`` plus one per ``per`` bytes, and at most ``most`` when that is
    not 0); ``size`` itself when it fits.

    Honest block tables nearly always fit (blocks of ``per`` bytes or more always do), so the
    common case is one count; a table of many tiny blocks is cut into slices that fit instead
    of a slice the peer would refuse.
    """
    starts = ext.starts
    i0 = ext.index_at(offset)
    i1 = int(np.searchsorted(starts, offset + size, side="left"))
    n = i1 - i0
    allowed = free + size // per
    if most:
        allowed = min(allowed, most)
    if n <= max(1, allowed):
        return size
    # A shorter slice ends where one of its first n - 1 extents ends: m extents, ``ends[m - 1]`` bytes.
    ends = starts[i0 + 1 : i1] - offset
    budget = free + ends // per
    if most:
        budget = np.minimum(budget, most)
    ok = np.arange(1, n, dtype=np.int64) <= budget
    fits = np.flatnonzero(ok)
    m = int(fits[-1]) + 1 if len(fits) else 1
    return int(ends[m - 1])


class Planner:
    """Slicing, dispatch, telemetry and failover for one pool of rails."""

    def __init__(
        self,
        rails: Sequence[RailInfo],
        config: SchedulerConfig | None = None,
        policy: str | Policy = "eft",
        *,
        scatter_gather: bool = False,
    ) -> None:
        # No rails is allowed: a backend that pairs rails with peers (ucx) starts
        # empty and adds them with add_rail(); a transfer with no rail fails with
        # NoRailError, never hangs.
        names = [r.name for r in rails]
        if len(set(names)) != len(names):
            raise ValueError(f"rail names must be unique, got {names}")
        problem = standby_error(rails, pending_ok=True)
        if problem:
            raise ValueError(problem)
        self.config = config or SchedulerConfig()
        self.rails: list[RailState] = [RailState(i, info, self.config) for i, info in enumerate(rails)]
        self._by_name = {r.name: r for r in self.rails}
        for rail in self.rails:
            self._link_standby(rail)
        self._all: tuple[tuple[RailState, ...], tuple[int, ...]] = (tuple(self.rails), tuple(range(len(self.rails))))
        self._policy: Policy = make_policy(policy)
        self._policy.bind(self.rails, self.config)
        self._apply_window_rule()
        self.scatter_gather = scatter_gather  # may one slice carry several extents?
        self._transfers: dict[int, TransferState] = {}
        self._groups: dict[tuple[int, ...], RailGroup] = {}
        self._rail_sets: dict[tuple[int | str, ...], tuple[tuple[RailState, ...], tuple[int, ...]]] = {}
        self._work: dict[RailGroup, None] = {}  # groups with queued transfers, in order
        self._attempts: dict[int, Attempt] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._decisions: list[Decision] = []
        self._events: list[RailEvent] = []
        self._next_tid = 1
        self._next_aid = 1
        self._quarantined: set[RailState] = set()  # rails whose quarantine timer runs
        self._held: set[RailState] = set()  # rails held off because their peer was busy
        self._probing: set[RailState] = set()  # rails waiting for (or carrying) a probe
        self._stalled: dict[TransferState, None] = {}  # out of their queue, waiting for a rail to come back
        self._rails_changed = False  # a rail became usable again: stalled transfers retry
        self._stall_check_at = float("inf")  # when the earliest stalled transfer's wait ends
        self.lag_excused = 0  # deadlines pushed back because the driver polled late
        self._idle_check_at = -float("inf")
        self._suspect_slice = self.config.min_slice
        self._deadline_floor = self.config.deadline_floor
        self._deadline_factor = self.config.deadline_factor

    # ================================================================ intent

    def submit(
        self,
        pieces: Sequence[Piece] | Extents,
        now: float,
        rails: Iterable[int | str] | None = None,
        *,
        priority: str | int | Priority = Priority.NORMAL,
    ) -> int:
        """Accept a transfer; returns its id.

        ``pieces`` are its (source, destination) pairs, as :class:`Piece`
        objects or as :class:`~.extents.Extents` arrays; pairs adjacent on both
        sides are merged (:meth:`~.extents.Extents.coalesced`).  ``rails`` restricts which rails may carry it
        (indices or names; default all).  ``priority``: ``"high"``,
        ``"normal"`` or ``"background"`` (see :mod:`.queues`).  A transfer of
        zero bytes finishes at the next :meth:`poll`.
        """
        prio = Priority.parse(priority)
        group_key: tuple[int, ...]
        eligible: Sequence[RailState]
        if rails is None:
            eligible, group_key = self._all  # shared: no tuple per transfer
        else:
            # A backend names the same few rail sets again and again (a peer's rails): each set
            # is resolved once, and its transfers share one tuple and one group key.
            names = rails if type(rails) is tuple else tuple(rails)
            resolved = self._rail_sets.get(names)
            if resolved is None:
                resolved = self._resolve_rails(names)
                if len(self._rail_sets) < 1024:
                    self._rail_sets[names] = resolved
            eligible, group_key = resolved
        extents: Extents | None
        single: tuple[Hashable, int, Hashable, int] | None = None
        if isinstance(pieces, Extents):
            extents = pieces.coalesced()
        elif len(pieces) == 1:
            p = pieces[0]
            if p.length < 0 or p.src_offset < 0 or p.dst_offset < 0:
                raise ValueError(f"piece lengths and offsets must not be negative: {p!r}")
            extents = None
            single = (p.src, p.src_offset, p.dst, p.dst_offset)
            total = p.length
        else:
            extents = Extents.from_pieces(pieces).coalesced()
        if extents is not None:
            total = extents.total
            if len(extents) == 1:
                single = extents.first(0)
                extents = None
            elif len(extents) == 0:
                extents = None
        tid = self._next_tid
        self._next_tid += 1
        t = TransferState(tid, extents, single, total, eligible, now, prio)
        group = self._groups.get(group_key)
        if group is None:
            group = self._groups[group_key] = RailGroup(group_key, t.rails, self.config.priority_aging)
        t.group = group
        self._transfers[tid] = t
        if t.pending:
            self._activate(t)
        else:
            self._maybe_finish(t, now)
        return tid

    def _resolve_rails(self, names: tuple[int | str, ...]) -> tuple[tuple[RailState, ...], tuple[int, ...]]:
        """The rails ``names`` (indices or names) stand for, in index order, and their group key."""
        chosen: list[RailState] = []
        for key in names:
            rail = self._by_name.get(key) if isinstance(key, str) else self._rail_at(key)
            if rail is None:
                raise ValueError(f"unknown rail {key!r}; known rails: {sorted(self._by_name)}")
            if rail not in chosen:
                chosen.append(rail)
        chosen.sort(key=lambda r: r.index)
        if not chosen:
            raise ValueError("a transfer needs at least one eligible rail")
        return tuple(chosen), tuple([r.index for r in chosen])

    def cancel(self, tid: int, now: float) -> bool:
        """Cancel a transfer: pending bytes dropped, live attempts withdrawn.

        Returns False if the transfer is unknown or already finished.  The
        :class:`Finished` (outcome ``CANCELLED``) comes once every attempt is
        resolved.
        """
        t = self._transfers.get(tid)
        if t is None or t.phase is not Phase.RUNNING:
            return False
        self._stop(t, Phase.CANCELLING, None, now)
        return True

    # ============================================================ backend news

    def complete(self, aid: int, now: float, wire_time: float | None = None) -> None:
        """An attempt delivered all its bytes.

        ``wire_time`` is the seconds the slice spent on the wire, if the
        backend measured it; otherwise the planner takes the time since the
        later of its posting and the rail's previous completion.
        """
        a = self._attempts.pop(aid, None)
        if a is None:
            return  # unknown or already resolved: a duplicate report is harmless
        rail = self.rails[a.rail]
        alone = a.started_idle
        if wire_time is None:
            wire_time = now - max(a.posted_at, rail.last_completion)
            # An inferred wire time of a slice that shared the rail with a later one
            # includes that sharing, so it cannot tell the rail's latency apart.
            alone = alone and rail.posts == a.rail_posts  # nothing posted on the rail since
        rail.estimator.observe(a.length, wire_time, started_idle=alone)
        rail.refresh_estimates()
        rail.remove(a)  # updates the room, with the new estimates
        if rail.slow and a.posted_at < rail.last_completion:  # in flight since the previous completion
            rail.note_delivery(a.length, now - rail.last_completion)
        rail.last_completion = now
        rail.last_activity = now
        t = self._transfers[a.transfer_id]
        if a.missed:
            # The slice was not stuck, only late: give this rail's deadlines more slack.
            rail.deadline_scale = min(self.config.deadline_backoff_cap, rail.deadline_scale * 2.0)
        elif a.state is _LIVE and rail.deadline_scale > 1.0:
            rail.deadline_scale = max(1.0, rail.deadline_scale * 0.9)
        if a.state is _LIVE:
            rail.busy_streak = 0
            t.busy_since = None
            rail.bytes_total += a.length
            rail.slices_total += 1
            t.acked += a.length
            t.slices += 1
            t.bytes_per_rail[rail.name] = t.bytes_per_rail.get(rail.name, 0) + a.length
            before = rail.health.state
            if before is not Health.HEALTHY:
                rail.health.on_success(now)
                self._health_changed(rail, before, now)
        a.state = _DONE
        t.live -= 1
        self._maybe_finish(t, now)

    def fail(
        self,
        aid: int,
        now: float,
        error: BaseException | str,
        *,
        rail_down: bool = False,
        transfer_fatal: bool = False,
        busy: bool = False,
    ) -> None:
        """An attempt failed.

        By default the failure is the rail's: the slice and everything else in
        flight on the rail is rerouted and the rail's health is charged.
        ``rail_down`` says the backend knows the rail is gone (quarantine at
        once).  ``transfer_fatal`` says the failure is the transfer's own fault
        (e.g. the peer refused the destination): the transfer fails with
        ``error`` and the rail is not blamed.  ``busy`` says the peer refused
        for its load and nothing of the slice landed: not a rail fault, so
        the rail keeps its health and its other slices and is only held off
        for a short, growing while (``busy_hold``); the slice goes back without
        counting against its retry bound, and a transfer refused as busy for
        ``busy_wait`` without any progress fails with ``error``.
        """
        a = self._attempts.pop(aid, None)
        if a is None:
            return
        rail = self.rails[a.rail]
        self._release(rail, a)
        rail.last_activity = now
        t = self._transfers[a.transfer_id]
        stale = a.state is _WITHDRAWING
        a.state = _DONE
        t.live -= 1
        if not stale:
            reason = str(error) or type(error).__name__
            if transfer_fatal:
                err = error if isinstance(error, BaseException) else TransferFailedError(reason)
                self._stop(t, Phase.FAILING, err, now)
            elif busy:
                self._busy(rail, t, a, now, error, reason)
            else:
                rail.errors += 1
                self._rail_failure(rail, now, f"error: {reason}", a, rail_down=rail_down)
        self._maybe_finish(t, now)

    def _busy(
        self, rail: RailState, t: TransferState, a: Attempt, now: float, error: BaseException | str, reason: str
    ) -> None:
        """The peer refused ``a`` for its load: hold the rail off a while, put the bytes back."""
        cfg = self.config
        rail.busy_refusals += 1
        if not rail.held:  # a new busy episode (slices refused together count once)
            rail.busy_streak += 1
        rail.last_error = f"busy: {reason}"
        hold = min(cfg.busy_hold_cap, cfg.busy_hold * 2.0 ** min(rail.busy_streak - 1, 30))
        rail.held = True
        rail.held_until = max(rail.held_until, now + hold)
        self._held.add(rail)
        rail.sync_health()
        if t.busy_since is None:
            t.busy_since = now
        if now - t.busy_since >= cfg.busy_wait:
            err = error if isinstance(error, BaseException) else TransferFailedError(reason)
            self._stop(t, Phase.FAILING, err, now)
            return
        self._requeue(a, now, charge=False, reason=f"busy: {reason}")

    def _release_held(self, now: float) -> None:
        for rail in list(self._held):
            if now >= rail.held_until:
                rail.held = False
                self._held.discard(rail)
                rail.sync_health()

    def withdrawn(self, aid: int, now: float) -> None:
        """A withdrawn attempt is confirmed stopped: none of its bytes will land any more."""
        a = self._attempts.pop(aid, None)
        if a is None:
            return
        rail = self.rails[a.rail]
        self._release(rail, a)
        t = self._transfers[a.transfer_id]
        if a.state is _LIVE:
            # A withdrawal the planner did not ask for (the backend gave up on
            # its own): treat as a failure so the bytes are sent again.
            a.state = _DONE
            t.live -= 1
            rail.errors += 1
            self._rail_failure(rail, now, "attempt withdrawn by the backend", a)
        else:
            a.state = _DONE
            t.live -= 1
        self._maybe_finish(t, now)

    def rail_down(self, rail: int | str, now: float, reason: str = "rail reported down") -> None:
        """A backend learned that a rail is gone (link down, endpoint closed)."""
        r = self._rail(rail)
        r.errors += 1
        self._rail_failure(r, now, reason, None, rail_down=True)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        """Swap the policy (tests and tools; bind it first)."""
        self._policy = policy
        self._apply_window_rule()

    def _apply_window_rule(self) -> None:
        """Small slices may fill a rail's byte budget only under policies that say so.

        The others stop at the count window, and a rail with byte room would make
        the queues ask them about every transfer on every poll (each answering
        "hold"): ``RailState.window_max`` 0 turns the budget off.
        """
        window_max = self.config.max_window if getattr(self._policy, "byte_window", False) else 0
        for rail in self.rails:
            rail.set_window_max(window_max)

    def add_rail(self, info: RailInfo) -> int:
        """Add a rail (e.g. one paired with a newly connected peer); returns its index."""
        if info.name in self._by_name:
            raise ValueError(f"a rail named {info.name!r} exists already")
        problem = standby_error([*(r.info for r in self.rails), info], pending_ok=True)
        if problem:
            raise ValueError(problem)
        rail = RailState(len(self.rails), info, self.config)
        self.rails.append(rail)
        self._all = (tuple(self.rails), tuple(range(len(self.rails))))
        self._apply_window_rule()
        self._by_name[rail.name] = rail
        self._link_standby(rail)
        return rail.index

    def _link_standby(self, rail: RailState) -> None:
        """Tie ``rail`` to the rail it stands by for, and the rails standing by for it, whichever came first."""
        primary = self._by_name.get(rail.info.standby_for) if rail.info.standby_for else None
        if primary is not None and rail.primary is None:
            rail.primary = primary
            primary.standbys.append(rail)
        for other in self.rails:
            if other.info.standby_for == rail.name and other.primary is None and other is not rail:
                other.primary = rail
                rail.standbys.append(other)

    # ============================================================== decisions

    def poll(self, now: float, *, late_by: float = 0.0, deadlines: bool = True) -> list[Decision]:
        """Run deadlines, health timers and dispatch; return the decisions to carry out.

        ``late_by``: how much later than asked the driver got round to this
        poll (its event loop's lag).  A deadline that passed during that lag
        is not held against its rail: the completion may be waiting in the
        driver's own queue.  It is pushed back once, by the lag, and counted
        in :attr:`lag_excused`.  ``deadlines=False`` skips deadline checks in
        this poll: a driver whose reports queue behind other work (an event
        loop) judges deadlines only from its timer, which runs after every
        report queued before it, so a busy loop never blames a rail for a
        completion it has not read yet.
        """
        heap = self._deadlines
        if deadlines and heap and heap[0][0] <= now:
            self._expire_deadlines(now, late_by)
        if self._quarantined:
            for rail in list(self._quarantined):
                if now >= rail.health.quarantine_until:
                    rail.health.tick(now)
                    self._health_changed(rail, Health.QUARANTINED, now)
        if self._held:
            self._release_held(now)
        if self._stalled:
            self._retry_stalled(now)
        self._dispatch(now)
        out = self._decisions
        self._decisions = []
        return out

    def next_wakeup(self) -> float | None:
        """The time by which :meth:`poll` must run again even if nothing is reported."""
        # The earliest of the times below, kept as it goes (no list: this runs after every pump).
        inf = float("inf")
        soonest = inf
        heap = self._deadlines
        while heap and self._stale_deadline(heap[0]):
            heapq.heappop(heap)
        if heap:
            soonest = heap[0][0]
        quarantined = Health.QUARANTINED
        for rail in self.rails:
            if rail.health.state is quarantined and rail.health.quarantine_until < soonest:
                soonest = rail.health.quarantine_until
        for rail in self._held:
            if rail.held_until < soonest:
                soonest = rail.held_until
        if self._stalled and self._stall_check_at < soonest:
            soonest = self._stall_check_at
        if self._work and self.policy.probes_idle_rails:
            for rail in self.rails:
                if not rail.inflight and rail.health.state is not quarantined:
                    due = max(rail.last_activity, rail.probe_checked) + self.config.probe_interval
                    due = max(due, self._idle_check_at)
                    if due < soonest:
                        soonest = due
        return soonest if soonest < inf else None

    def drain_events(self) -> list[RailEvent]:
        """Rail events since the last call, oldest first."""
        out = self._events
        self._events = []
        return out

    # ========================================================== introspection

    @property
    def idle(self) -> bool:
        """No transfer is open and no attempt is outstanding."""
        return not self._transfers and not self._attempts

    def has_transfer(self, tid: int) -> bool:
        return tid in self._transfers

    def progress(self, tid: int) -> tuple[int, int]:
        """``(bytes acknowledged, total bytes)`` of an open transfer."""
        t = self._transfers[tid]
        return t.acked, t.total

    def status(self, tid: int) -> TransferProgress:
        """What an open transfer has done so far, as a value."""
        return self._transfers[tid].progress()

    def open_transfers(self) -> int:
        return len(self._transfers)

    def transfer(self, tid: int) -> TransferState:
        """The live state of an open transfer (read-only use, for the planner's own tests)."""
        return self._transfers[tid]

    def transfers(self) -> list[TransferState]:
        """Live states of every open transfer (read-only use, for the planner's own tests)."""
        return list(self._transfers.values())

    def attempt(self, aid: int) -> Attempt | None:
        """The attempt ``aid`` while it is LIVE or WITHDRAWING (``None`` once resolved)."""
        return self._attempts.get(aid)

    def attempts(self) -> list[Attempt]:
        """Attempts that are LIVE or WITHDRAWING."""
        return list(self._attempts.values())

    def rail(self, key: int | str) -> RailState:
        return self._rail(key)

    # ============================================================== internals

    def _rail_at(self, index: int) -> RailState | None:
        return self.rails[index] if 0 <= index < len(self.rails) else None

    def _rail(self, key: int | str) -> RailState:
        r = self._by_name.get(key) if isinstance(key, str) else self._rail_at(key)
        if r is None:
            raise ValueError(f"unknown rail {key!r}; known rails: {sorted(self._by_name)}")
        return r

    def _event(self, now: float, kind: EventKind, rail: RailState, detail: str, **extra: object) -> None:
        self._events.append(RailEvent(time=now, kind=kind, rail=rail.name, detail=detail, **extra))  # type: ignore[arg-type]

    def _activate(self, t: TransferState) -> None:
        """Queue ``t`` for dispatch (it has bytes to send)."""
        if self._stalled and t in self._stalled:
            del self._stalled[t]
        if not t.queued:
            group = t.group
            assert group is not None
            group.push(t)
            self._work[group] = None

    def _stall(self, t: TransferState) -> None:
        """Take ``t`` out of its queue until a rail comes back or its wait ends."""
        t.queued = False
        if not self._stalled:
            self._stall_check_at = float("inf")  # forget the times of transfers no longer stalled
        self._stalled[t] = None
        assert t.stalled_since is not None
        self._stall_check_at = min(self._stall_check_at, t.stalled_since + self.config.no_rail_wait)

    def _retry_stalled(self, now: float) -> None:
        """Requeue stalled transfers whose rail may be back, or whose wait is over (to fail them).

        Looks at them only when a rail changed or the earliest wait ended, so
        an outage with many open transfers does not make every poll scan them.
        """
        changed = self._rails_changed
        if not changed and now < self._stall_check_at:
            return
        self._rails_changed = False
        wait = self.config.no_rail_wait
        self._stall_check_at = float("inf")
        for t in list(self._stalled):
            since = t.stalled_since
            if changed or since is None or now >= since + wait:
                del self._stalled[t]
                if t.pending and t.phase is Phase.RUNNING:
                    self._activate(t)
            else:
                self._stall_check_at = min(self._stall_check_at, since + wait)

    def _health_changed(self, rail: RailState, before: Health, now: float) -> None:
        """React to a move of ``rail``'s health (the state machine itself is in :mod:`.health`).

        The one place that mirrors a new state into the dispatcher's view,
        keeps the timer sets, wakes stalled transfers and emits the event.
        """
        after = rail.health.state
        rail.sync_health()
        if after is Health.QUARANTINED:
            self._quarantined.add(rail)
            self._probing.discard(rail)
        elif after is Health.PROBING:
            self._quarantined.discard(rail)
            self._probing.add(rail)
            self._rails_changed = True
        else:
            self._probing.discard(rail)
            if before is Health.QUARANTINED or before is Health.PROBING:
                self._rails_changed = True
        if after is before:
            return
        kind = ARRIVAL_EVENT[after]
        if after is Health.QUARANTINED:
            self._event(
                now,
                kind,
                rail,
                f"{rail.name} quarantined for {(rail.health.quarantine_until - now) * 1e3:.0f} ms",
                until=rail.health.quarantine_until,
            )
        elif after is Health.PROBING:
            self._event(now, kind, rail, f"quarantine of {rail.name} ended; probing")
        elif after is Health.SUSPECT:
            self._event(now, kind, rail, f"{rail.name} is suspect")
        else:
            self._event(now, kind, rail, f"rail {rail.name} is healthy again")
        if rail.standbys and (before is Health.HEALTHY) is not (after is Health.HEALTHY):
            self._standbys_changed(rail, after, now)

    def _standbys_changed(self, rail: RailState, after: Health, now: float) -> None:
        """``rail`` left or regained health: its standbys start or stop carrying its transfers' bytes
        (:func:`~.rail_state.stands_by`); say so for those that may carry (not quarantined themselves)."""
        if after is not Health.HEALTHY:
            self._rails_changed = True  # they may carry now: stalled transfers retry
        what = "stands by again:" if after is Health.HEALTHY else "carries while"
        for standby in rail.standbys:
            if standby.dispatchable:
                self._event(now, EventKind.STANDBY, standby, f"{standby.name} {what} {rail.name} is {after.value}")

    @staticmethod
    def _release(rail: RailState, a: Attempt) -> None:
        rail.remove(a)

    def _stale_deadline(self, entry: tuple[float, int]) -> bool:
        a = self._attempts.get(entry[1])
        return a is None or a.state is not _LIVE

    def _expire_deadlines(self, now: float, late_by: float) -> None:
        heap = self._deadlines
        lag_tolerance = self.config.lag_tolerance
        excused: list[tuple[float, int]] = []
        while heap and heap[0][0] <= now:
            deadline, aid = heapq.heappop(heap)
            a = self._attempts.get(aid)
            if a is None or a.state is not _LIVE:
                continue
            rail = self.rails[a.rail]
            if late_by > lag_tolerance and deadline >= now - late_by and not a.excused:
                # It expired while the driver was not looking: its completion may be
                # queued behind us.  Look again one lag later, once.
                a.excused = True
                a.deadline = now + late_by
                rail.lag_excused += 1
                self.lag_excused += 1
                excused.append((a.deadline, aid))
                continue
            rail.deadline_misses += 1
            a.missed = True
            # What the rail has not finished in this time bounds its rate (only while it has
            # finished nothing yet: its starting rate was a guess).  Slices posted before this
            # one were ahead of it on the wire.
            ahead = sum(x.length for x in rail.inflight.values() if x.posted_at <= a.posted_at)
            if rail.estimator.at_most(max(ahead, a.length), now - a.posted_at):
                rail.refresh()
            late_ms = (now - a.posted_at) * 1e3
            self._rail_failure(
                rail,
                now,
                f"deadline missed: {a.length} B slice not done after {late_ms:.1f} ms "
                f"(expected {a.expected * 1e3:.2f} ms)",
                a,
                charge=False,
            )
        for entry in excused:
            heapq.heappush(heap, entry)

    def _rail_failure(
        self,
        rail: RailState,
        now: float,
        reason: str,
        failed: Attempt | None,
        *,
        rail_down: bool = False,
        charge: bool = True,
    ) -> None:
        """Charge ``rail`` with a failure and take every live slice off it.

        ``charge``: count the failure against the failed slice's bytes (their
        retry bound).  A missed deadline is not charged: it says the rail is
        slow or stuck, which is the rail's health's business (suspect, then
        quarantine), not that the bytes cannot be moved; charging it failed
        transfers on a single rail that was merely slower than believed.
        """
        rail.last_error = reason
        self._event(now, EventKind.FAILURE, rail, f"{rail.name}: {reason}")
        if failed is not None:
            if failed.state is _LIVE:  # still out there (missed deadline): withdraw it
                failed.state = _WITHDRAWING
                self._decisions.append(Withdraw(failed))
            self._requeue(failed, now, charge=charge, reason=reason)
        moved = 0
        for a in list(rail.inflight.values()):
            if a.state is _LIVE:
                a.state = _WITHDRAWING
                self._decisions.append(Withdraw(a))
                self._requeue(a, now, charge=False, reason=reason)
                moved += 1
        if failed is not None:
            moved += 1
        if moved:
            rail.rerouted_from += moved
            self._event(now, EventKind.REROUTE, rail, f"{moved} slice(s) taken off {rail.name}", slices=moved)
        before = rail.health.state
        rail.health.on_failure(now, rail_down=rail_down)
        self._health_changed(rail, before, now)

    def _requeue(self, a: Attempt, now: float, *, charge: bool, reason: str) -> None:
        """Put an attempt's bytes back at the front of its transfer's queue."""
        t = self._transfers[a.transfer_id]
        if t.phase is not Phase.RUNNING:
            return
        rail = self.rails[a.rail]
        t.reroutes += 1
        if t.rail_errors is None:
            t.rail_errors = {}
        t.rail_errors[rail.name] = reason
        history = dict(a.history) if a.history else None
        if charge:
            history = history or {}
            history[a.rail] = history.get(a.rail, 0) + 1
        t.pending.insert(0, PendingRange(a.offset, a.length, history))
        t.pending_bytes += a.length
        self._activate(t)
        if charge and history is not None:
            cfg = self.config
            if sum(history.values()) >= cfg.max_attempts or all(
                history.get(r.index, 0) >= cfg.max_attempts_per_rail for r in t.rails
            ):
                tried = ", ".join(f"{self.rails[i].name} x{n}" for i, n in sorted(history.items()))
                self._stop(
                    t,
                    Phase.FAILING,
                    TransferFailedError(
                        f"transfer {t.id}: {a.length} bytes at offset {a.offset} failed on "
                        f"every rail it may use ({tried}); last errors: {t.rail_errors}. Check the rails' "
                        f"health in engine.telemetry() and the peer's logs.",
                        t.rail_errors,
                    ),
                    now,
                )

    def _stop(self, t: TransferState, phase: Phase, error: BaseException | None, now: float) -> None:
        """Fail or cancel a transfer: drop pending bytes and withdraw live attempts."""
        if t.phase is not Phase.RUNNING:
            return
        t.phase = phase
        t.error = error
        t.pending.clear()
        t.pending_bytes = 0
        t.stalled_since = None
        self._stalled.pop(t, None)
        if t.live:  # rare (a cancel or failure): the attempts out are few, scan them
            for a in list(self._attempts.values()):
                if a.transfer_id == t.id and a.state is _LIVE:
                    a.state = _WITHDRAWING
                    self._decisions.append(Withdraw(a))
        self._maybe_finish(t, now)

    def _maybe_finish(self, t: TransferState, now: float) -> None:
        if t.live or self._transfers.get(t.id) is not t:
            return  # attempts still out, or reported finished already
        if t.phase is Phase.RUNNING:
            if t.acked < t.total:
                return
            outcome = Outcome.DONE
        elif t.phase is Phase.FAILING:
            outcome = Outcome.FAILED
        else:
            outcome = Outcome.CANCELLED
        del self._transfers[t.id]
        self._stalled.pop(t, None)
        self._decisions.append(
            Finished(
                transfer_id=t.id,
                outcome=outcome,
                bytes_per_rail=t.bytes_per_rail,  # t is forgotten now: no copy needed
                slices=t.slices,
                attempts=t.attempts,
                reroutes=t.reroutes,
                submitted_at=t.submitted_at,
                finished_at=now,
                error=t.error,
                acked=t.acked,
            )
        )

    # --------------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> None:
        """Post slices while rails have room, one slice per group per round.

        Groups (transfers of one rail set) share rails, so they take turns a
        slice at a time, the group whose best waiting class is highest first
        in every round: a high-priority transfer restricted to some rails is
        not left behind a normal-priority group that could fill them.
        """
        work = self._work
        if not work:
            return
        if self._quarantined or self._probing:
            self._health_probes(now)
        active = list(work)
        while active:
            if len(active) > 1:
                active.sort(key=RailGroup.best_class)  # stable: equals keep their turn order
            active = [group for group in active if self._serve_one(group, now)]
        if self.policy.probes_idle_rails and work and now >= self._idle_check_at:
            self._idle_check_at = now + 0.25 * self.config.probe_interval
            self._idle_probes(now)

    def _serve_one(self, group: RailGroup, now: float) -> bool:
        """Post at most one slice of ``group``; True if it did (it may have more to post)."""
        queues = group.queues
        choose = self.policy.choose
        misses = 0
        while group.worth_asking():
            c = group.next_class()
            if c is None:
                del self._work[group]
                return False
            t = queues[c][0]
            choice = choose(t, now)
            if choice is None:
                top = group.best_class()
                if c != top:
                    # The class whose aging turn it is cannot be placed now (bulk keeps off
                    # rails that carry urgent slices): the highest class takes this turn
                    # rather than the whole group waiting behind it.
                    c = top
                    t = queues[c][0]
                    choice = choose(t, now)
            if choice is None:
                if t.stalled_since is not None:  # a rail is usable again, only busy
                    t.stalled_since = None
                if getattr(self.policy, "holds_for_all", True):
                    return False  # every rail this group may use is busy (or a better one soon free)
                # This transfer waits for its own rail (round_robin's next in the cycle,
                # single's bound rail); the others of its class may go meanwhile.
                misses += 1
                if misses >= len(queues[c]):
                    return False
                queues[c].rotate(-1)
                continue
            if choice is NO_RAIL:
                group.pop_front(c)
                if self._waiting_for_rail(t, now):
                    self._stall(t)
                else:
                    self._no_rail(t, now)
                continue
            rail, size = choice  # type: ignore[misc]
            if rail.health.state is Health.SUSPECT and size > self._suspect_slice:
                # A suspect rail proves itself with small slices, so that a rail that
                # is really stalled holds little data hostage until its quarantine.
                size = self._suspect_slice
            self._post(t, rail, size, now, probe=False)
            group.served(c)
            if len(self._work) > 1:  # rotate groups: the next poll starts with another one
                del self._work[group]
                self._work[group] = None
            return True
        return False

    def _post(self, t: TransferState, rail: RailState, size: int, now: float, *, probe: bool) -> None:
        """Cut the next slice of ``t`` (at most ``size`` bytes) and post it on ``rail``."""
        rng = t.pending[0]
        offset = rng.offset
        limit = rng.length
        ext = t.extents
        if ext is not None and not self.scatter_gather:
            limit = min(limit, ext.extent_end(offset) - offset)  # one extent per slice
        size = cut(size, limit, self.config.tail_merge)
        if ext is not None and rail.info.extent_bytes and self.scatter_gather:
            info = rail.info
            size = fit_extents(ext, offset, size, info.extents_free, info.extent_bytes, info.extents_max)
        if size >= rng.length:
            del t.pending[0]
        else:
            rng.offset += size
            rng.length -= size
        t.pending_bytes -= size
        extents = None
        if ext is None:
            src, src_off, dst, dst_off = t.single  # type: ignore[misc]
            src_off += offset
            dst_off += offset
        else:
            win = ext.window(offset, size)
            src, src_off, dst, dst_off = win.first()
            if len(win) > 1:
                extents = win
        expected = rail.expected_time(size, now)
        deadline = now + max(self._deadline_floor, self._deadline_factor * expected) * rail.deadline_scale
        aid = self._next_aid
        self._next_aid = aid + 1
        # Positional: this runs once per slice and keyword passing costs measurably.
        a = Attempt(
            aid,
            t.id,
            rail.index,
            rail.name,
            offset,
            size,
            src,
            src_off,
            dst,
            dst_off,
            now,
            expected,
            deadline,
            probe,
            not rail.inflight,
            rng.history,
            extents,
            t.priority == 2,
        )
        rail.add(a)  # counts the post: what is in flight on the rail is overlapped now
        rail.last_activity = now
        if t.stalled_since is not None and not probe:  # a rail took bytes: the wait is over
            t.stalled_since = None  # (a probe does not end it: it may stall like the rail did)
        if probe:
            rail.probes_total += 1
        self._attempts[aid] = a
        t.live += 1
        t.attempts += 1
        heapq.heappush(self._deadlines, (deadline, aid))
        self._decisions.append(Post(a))

    def _probe_target(self, t: TransferState, rail: RailState) -> bool:
        if not t.pending or t.phase is not Phase.RUNNING:
            return False
        history = t.pending[0].history
        return history is None or history.get(rail.index, 0) < self.config.max_attempts_per_rail

    def _probe_candidate(self, rail: RailState) -> TransferState | None:
        """A waiting transfer that may send a probe slice over ``rail``."""
        for group in self._work:
            if rail in group.rail_set:
                for t in group:
                    if self._probe_target(t, rail):
                        return t
        for t in self._stalled:
            if t.group is not None and rail in t.group.rail_set and self._probe_target(t, rail):
                return t
        return None

    def _health_probes(self, now: float) -> None:
        """A probing rail with nothing in flight gets one small slice from any eligible transfer."""
        for rail in self.rails:  # in rail order, so a seeded simulation replays exactly
            if rail.health.state is not Health.PROBING or rail.inflight or rail.held:
                continue
            t = self._probe_candidate(rail)
            if t is not None:
                self._post(t, rail, self.config.min_slice, now, probe=True)

    def _idle_probes(self, now: float) -> None:
        """Under ``eft``, a usable rail idle for ``probe_interval`` gets one small slice."""
        interval = self.config.probe_interval
        for rail in self.rails:
            # The same expression as next_wakeup(), so a poll at exactly the wakeup time
            # probes (comparing with now - interval can round the other way and, on a
            # virtual clock that sits at that instant, wake the planner there forever).
            if rail.inflight or rail.held or max(rail.last_activity, rail.probe_checked) + interval > now:
                continue
            state = rail.health.state
            if state is not Health.HEALTHY and state is not Health.SUSPECT:
                continue
            t = self._probe_candidate(rail)
            if t is not None:
                self._post(t, rail, self.config.min_slice, now, probe=True)
            else:
                rail.probe_checked = now  # nothing to probe with: look again one interval later

    def _waiting_for_rail(self, t: TransferState, now: float) -> bool:
        """No rail of ``t`` can take its next bytes now: wait for one, at most ``no_rail_wait``.

        Worth waiting for: a rail that is quarantined (it will be probed) or
        probing, and that the bytes have not exhausted their retries on.  The
        wait is bounded from the first moment the transfer had no rail, so a
        rail whose probes keep failing (or are never confirmed withdrawn)
        cannot keep a transfer open forever.
        """
        history = t.pending[0].history if t.pending else None
        limit = self.config.max_attempts_per_rail
        coming_back = any(
            (r.health.state is Health.QUARANTINED or r.health.state is Health.PROBING)
            and (history is None or history.get(r.index, 0) < limit)
            for r in t.rails
        )
        if not coming_back:
            return False
        if t.stalled_since is None:
            t.stalled_since = now
        # The same expression as next_wakeup(), so the wakeup at that instant ends the wait.
        return now < t.stalled_since + self.config.no_rail_wait

    def _no_rail(self, t: TransferState, now: float) -> None:
        errors = {r.name: (r.last_error or r.health.state.value) for r in t.rails}
        states = ", ".join(f"{r.name}={r.health.state.value}" for r in t.rails)
        self._stop(
            t,
            Phase.FAILING,
            NoRailError(
                f"transfer {t.id}: no usable rail left ({states}); last errors: {errors}. "
                "Rails come back after their quarantine; retry later or add rails.",
                errors,
            ),
            now,
        )
