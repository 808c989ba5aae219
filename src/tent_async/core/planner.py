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
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Sequence

from ..errors import NoRailError, TransferFailedError
from .config import SchedulerConfig
from .decisions import Attempt, AttemptState, Decision, Finished, Outcome, Piece, Post, Withdraw
from .events import EventKind, RailEvent
from .health import Health
from .policies import NO_RAIL, Policy, make_policy
from .rail_state import RailInfo, RailState
from .slicing import cut
from .transfer_state import PendingRange, Phase, TransferState

_LIVE = AttemptState.LIVE
_WITHDRAWING = AttemptState.WITHDRAWING
_DONE = AttemptState.DONE


class Planner:
    """Slicing, dispatch, telemetry and failover for one pool of rails."""

    def __init__(
        self,
        rails: Sequence[RailInfo],
        config: SchedulerConfig | None = None,
        policy: str | Policy = "eft",
    ) -> None:
        # No rails is allowed: a backend that pairs rails with peers (ucx) starts
        # empty and adds them with add_rail(); a transfer with no rail fails with
        # NoRailError, never hangs.
        names = [r.name for r in rails]
        if len(set(names)) != len(names):
            raise ValueError(f"rail names must be unique, got {names}")
        self.config = config or SchedulerConfig()
        self.rails: list[RailState] = [RailState(i, info, self.config) for i, info in enumerate(rails)]
        self._by_name = {r.name: r for r in self.rails}
        self.policy: Policy = make_policy(policy)
        self.policy.bind(self.rails, self.config)
        self._transfers: dict[int, TransferState] = {}
        self._active: deque[TransferState] = deque()
        self._attempts: dict[int, Attempt] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._decisions: list[Decision] = []
        self._events: list[RailEvent] = []
        self._next_tid = 1
        self._next_aid = 1
        self._quarantined: set[RailState] = set()  # rails whose quarantine timer runs
        self._probing: set[RailState] = set()  # rails waiting for (or carrying) a probe
        self._stalled: set[TransferState] = set()  # transfers waiting for a quarantined rail
        self._idle_check_at = -float("inf")
        self._suspect_slice = self.config.min_slice
        self._deadline_floor = self.config.deadline_floor
        self._deadline_factor = self.config.deadline_factor

    # ================================================================ intent

    def submit(self, pieces: Sequence[Piece], now: float, rails: Iterable[int | str] | None = None) -> int:
        """Accept a transfer made of ``pieces``; returns its id.

        ``rails`` restricts which rails may carry it (indices or names; default
        all).  A transfer of zero bytes finishes at the next :meth:`poll`.
        """
        if rails is None:
            eligible = list(self.rails)
        else:
            eligible = []
            for key in rails:
                rail = self._by_name.get(key) if isinstance(key, str) else self._rail_at(key)
                if rail is None:
                    raise ValueError(f"unknown rail {key!r}; known rails: {sorted(self._by_name)}")
                if rail not in eligible:
                    eligible.append(rail)
            eligible.sort(key=lambda r: r.index)
            if not eligible:
                raise ValueError("a transfer needs at least one eligible rail")
        for p in pieces:
            if p.length < 0 or p.src_offset < 0 or p.dst_offset < 0:
                raise ValueError(f"piece lengths and offsets must not be negative: {p!r}")
        tid = self._next_tid
        self._next_tid += 1
        t = TransferState(tid, pieces, eligible, now)
        self._transfers[tid] = t
        if t.pending:
            self._activate(t)
        else:
            self._maybe_finish(t, now)
        return tid

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
        self._release(rail, a)
        alone = a.started_idle
        if wire_time is None:
            wire_time = now - max(a.posted_at, rail.last_completion)
            # An inferred wire time of a slice that shared the rail with a later one
            # includes that sharing, so it cannot tell the rail's latency apart.
            alone = alone and not a.overlapped
        rail.estimator.observe(a.length, wire_time, started_idle=alone)
        rail.refresh()
        rail.last_completion = now
        rail.last_activity = now
        t = self._transfers[a.transfer_id]
        if a.missed:
            # The slice was not stuck, only late: give this rail's deadlines more slack.
            rail.deadline_scale = min(self.config.deadline_backoff_cap, rail.deadline_scale * 2.0)
        elif a.state is _LIVE and rail.deadline_scale > 1.0:
            rail.deadline_scale = max(1.0, rail.deadline_scale * 0.9)
        if a.state is _LIVE:
            rail.bytes_total += a.length
            rail.slices_total += 1
            t.acked += a.length
            t.slices += 1
            t.bytes_per_rail[rail.name] = t.bytes_per_rail.get(rail.name, 0) + a.length
            before = rail.health.state
            if before is not Health.HEALTHY and rail.health.on_success(now) is Health.HEALTHY:
                rail.sync_health()
                self._probing.discard(rail)
                self._event(now, EventKind.RECOVERY, rail, f"rail {rail.name} is healthy again")
        a.state = _DONE
        t.live.discard(aid)
        self._maybe_finish(t, now)

    def fail(
        self,
        aid: int,
        now: float,
        error: BaseException | str,
        *,
        rail_down: bool = False,
        transfer_fatal: bool = False,
    ) -> None:
        """An attempt failed.

        By default the failure is the rail's: the slice and everything else in
        flight on the rail is rerouted and the rail's health is charged.
        ``rail_down`` says the backend knows the rail is gone (quarantine at
        once).  ``transfer_fatal`` says the failure is the transfer's own fault
        (e.g. the peer refused the destination): the transfer fails with
        ``error`` and the rail is not blamed.
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
        t.live.discard(aid)
        if not stale:
            reason = str(error) or type(error).__name__
            if transfer_fatal:
                err = error if isinstance(error, BaseException) else TransferFailedError(reason)
                self._stop(t, Phase.FAILING, err, now)
            else:
                rail.errors += 1
                self._rail_failure(rail, now, f"error: {reason}", a, rail_down=rail_down)
        self._maybe_finish(t, now)

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
            t.live.discard(aid)
            rail.errors += 1
            self._rail_failure(rail, now, "attempt withdrawn by the backend", a)
        else:
            a.state = _DONE
            t.live.discard(aid)
        self._maybe_finish(t, now)

    def rail_down(self, rail: int | str, now: float, reason: str = "rail reported down") -> None:
        """A backend learned that a rail is gone (link down, endpoint closed)."""
        r = self._rail(rail)
        r.errors += 1
        self._rail_failure(r, now, reason, None, rail_down=True)

    def add_rail(self, info: RailInfo) -> int:
        """Add a rail (e.g. one paired with a newly connected peer); returns its index."""
        if info.name in self._by_name:
            raise ValueError(f"a rail named {info.name!r} exists already")
        rail = RailState(len(self.rails), info, self.config)
        self.rails.append(rail)
        self._by_name[rail.name] = rail
        return rail.index

    # ============================================================== decisions

    def poll(self, now: float) -> list[Decision]:
        """Run deadlines, health timers and dispatch; return the decisions to carry out."""
        heap = self._deadlines
        if heap and heap[0][0] <= now:
            self._expire_deadlines(now)
        if self._quarantined:
            for rail in list(self._quarantined):
                if now >= rail.health.quarantine_until:
                    rail.health.tick(now)
                    rail.sync_health()
                    self._quarantined.discard(rail)
                    self._probing.add(rail)
                    self._event(now, EventKind.PROBE, rail, f"quarantine of {rail.name} ended; probing")
        self._dispatch(now)
        out = self._decisions
        self._decisions = []
        return out

    def next_wakeup(self) -> float | None:
        """The time by which :meth:`poll` must run again even if nothing is reported."""
        times: list[float] = []
        heap = self._deadlines
        while heap and self._stale_deadline(heap[0]):
            heapq.heappop(heap)
        if heap:
            times.append(heap[0][0])
        for rail in self.rails:
            if rail.health.state is Health.QUARANTINED:
                times.append(rail.health.quarantine_until)
        for t in self._stalled:
            # Only while bytes wait: with all of them out on a probe, the probe's own
            # deadline is what wakes the planner.
            if t.stalled_since is not None and t.pending:
                times.append(t.stalled_since + self.config.no_rail_wait)
        if self._active and self.policy.probes_idle_rails:
            for rail in self.rails:
                if not rail.inflight and rail.health.state is not Health.QUARANTINED:
                    due = max(rail.last_activity, rail.probe_checked) + self.config.probe_interval
                    times.append(max(due, self._idle_check_at))
        return min(times) if times else None

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

    def transfer(self, tid: int) -> TransferState:
        """The live state of an open transfer (read-only use, for tests and tools)."""
        return self._transfers[tid]

    def transfers(self) -> list[TransferState]:
        return list(self._transfers.values())

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
        if not t.in_active:
            t.in_active = True
            self._active.append(t)

    @staticmethod
    def _release(rail: RailState, a: Attempt) -> None:
        rail.remove(a)

    def _stale_deadline(self, entry: tuple[float, int]) -> bool:
        a = self._attempts.get(entry[1])
        return a is None or a.state is not _LIVE

    def _expire_deadlines(self, now: float) -> None:
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, aid = heapq.heappop(heap)
            a = self._attempts.get(aid)
            if a is None or a.state is not _LIVE:
                continue
            rail = self.rails[a.rail]
            rail.deadline_misses += 1
            a.missed = True
            late_ms = (now - a.posted_at) * 1e3
            self._rail_failure(
                rail,
                now,
                f"deadline missed: {a.length} B slice not done after {late_ms:.1f} ms "
                f"(expected {a.expected * 1e3:.2f} ms)",
                a,
                charge=False,
            )

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
        after = rail.health.on_failure(now, rail_down=rail_down)
        rail.sync_health()
        if after is Health.QUARANTINED:
            self._quarantined.add(rail)
            self._probing.discard(rail)
        if after is Health.QUARANTINED and before is not Health.QUARANTINED:
            self._event(
                now,
                EventKind.QUARANTINE,
                rail,
                f"{rail.name} quarantined for {(rail.health.quarantine_until - now) * 1e3:.0f} ms",
                until=rail.health.quarantine_until,
            )
        elif after is Health.SUSPECT and before is Health.HEALTHY:
            self._event(now, EventKind.SUSPECT, rail, f"{rail.name} is suspect")

    def _requeue(self, a: Attempt, now: float, *, charge: bool, reason: str) -> None:
        """Put an attempt's bytes back at the front of its transfer's queue."""
        t = self._transfers[a.transfer_id]
        if t.phase is not Phase.RUNNING:
            return
        rail = self.rails[a.rail]
        t.reroutes += 1
        t.rail_errors[rail.name] = reason
        history = dict(a.history) if a.history else None
        if charge:
            history = history or {}
            history[a.rail] = history.get(a.rail, 0) + 1
        t.pending.appendleft(PendingRange(a.piece, a.offset, a.length, history))
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
                        f"transfer {t.id}: {a.length} bytes at piece {a.piece} offset {a.offset} failed on "
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
        t.stalled_since = None
        self._stalled.discard(t)
        for aid in list(t.live):
            a = self._attempts[aid]
            if a.state is _LIVE:
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
        self._stalled.discard(t)
        self._decisions.append(
            Finished(
                transfer_id=t.id,
                outcome=outcome,
                bytes_per_rail=dict(t.bytes_per_rail),
                slices=t.slices,
                attempts=t.attempts,
                reroutes=t.reroutes,
                submitted_at=t.submitted_at,
                finished_at=now,
                error=t.error,
            )
        )

    # --------------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> None:
        active = self._active
        while active and not active[0].pending:  # finished, failed or cancelled meanwhile
            active.popleft().in_active = False
        if not active:
            return
        if self._quarantined or self._probing:
            self._health_probes(now)
        choose = self.policy.choose
        misses = 0
        while active and misses < len(active):
            t = active[0]
            if not t.pending:
                active.popleft().in_active = False
                continue
            choice = choose(t, now)
            if choice is None:
                if t.stalled_since is not None:  # a rail is usable again, only busy
                    t.stalled_since = None
                    self._stalled.discard(t)
                active.rotate(-1)
                misses += 1
                continue
            if choice is NO_RAIL:
                if self._waiting_for_rail(t, now):
                    active.rotate(-1)
                    misses += 1
                else:
                    active.popleft().in_active = False
                    self._stalled.discard(t)
                    self._no_rail(t, now)
                continue
            rail, size = choice  # type: ignore[misc]
            if rail.health.state is Health.SUSPECT and size > self._suspect_slice:
                # A suspect rail proves itself with small slices, so that a rail that
                # is really stalled holds little data hostage until its quarantine.
                size = cut(self._suspect_slice, t.pending[0].length, 0.0)
            self._post(t, rail, size, now, probe=False)
            if t.pending:
                active.rotate(-1)
            else:
                active.popleft().in_active = False
            misses = 0
        if self.policy.probes_idle_rails and active and now >= self._idle_check_at:
            self._idle_check_at = now + 0.25 * self.config.probe_interval
            self._idle_probes(now)

    def _post(self, t: TransferState, rail: RailState, size: int, now: float, *, probe: bool) -> None:
        rng = t.pending[0]
        if size >= rng.length:
            size = rng.length
            t.pending.popleft()
        piece_index = rng.piece
        offset = rng.offset
        if size < rng.length:
            rng.offset += size
            rng.length -= size
        piece = t.pieces[piece_index]
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
            piece_index,
            offset,
            size,
            piece.src,
            piece.src_offset + offset,
            piece.dst,
            piece.dst_offset + offset,
            now,
            expected,
            deadline,
            probe,
            not rail.inflight,
            rng.history,
        )
        for other in rail.inflight.values():
            other.overlapped = True
        rail.add(a)
        rail.last_activity = now
        if t.stalled_since is not None and not probe:  # a rail took bytes: the wait is over
            t.stalled_since = None  # (a probe does not end it: it may stall like the rail did)
            self._stalled.discard(t)
        if probe:
            rail.probes_total += 1
        self._attempts[aid] = a
        t.live.add(aid)
        t.attempts += 1
        heapq.heappush(self._deadlines, (deadline, aid))
        self._decisions.append(Post(a))

    def _probe_target(self, t: TransferState, rail: RailState) -> bool:
        history = t.pending[0].history
        return rail in t.rails and (history is None or history.get(rail.index, 0) < self.config.max_attempts_per_rail)

    def _health_probes(self, now: float) -> None:
        """A probing rail with nothing in flight gets one small slice from any eligible transfer."""
        for rail in self.rails:
            if rail.health.state is not Health.PROBING or rail.inflight:
                continue
            for t in self._active:
                if t.pending and self._probe_target(t, rail):
                    self._post(t, rail, cut(self.config.min_slice, t.pending[0].length, 0.0), now, probe=True)
                    break

    def _idle_probes(self, now: float) -> None:
        """Under ``eft``, a usable rail idle for ``probe_interval`` gets one small slice."""
        interval = self.config.probe_interval
        for rail in self.rails:
            # The same expression as next_wakeup(), so a poll at exactly the wakeup time
            # probes (comparing with now - interval can round the other way and, on a
            # virtual clock that sits at that instant, wake the planner there forever).
            if rail.inflight or max(rail.last_activity, rail.probe_checked) + interval > now:
                continue
            state = rail.health.state
            if state is not Health.HEALTHY and state is not Health.SUSPECT:
                continue
            for t in self._active:
                if t.pending and self._probe_target(t, rail):
                    self._post(t, rail, cut(self.config.min_slice, t.pending[0].length, 0.0), now, probe=True)
                    if not t.pending:
                        self._active.remove(t)
                        t.in_active = False
                    break
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
            self._stalled.add(t)
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
