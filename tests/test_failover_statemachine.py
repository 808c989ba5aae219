"""Hypothesis state machine over the planner: random submits (scattered or adjacent pieces,
every priority, with and without scatter-gather slices), completions, errors, stalls, clock
advances, cancellations and rail recoveries, with the failover invariants checked after
every step.

The machine plays the driver: it carries out the planner's decisions the way a
backend would (an attempt can complete, fail, or sit silently until its
deadline), and it keeps its own record of which bytes were acknowledged, so the
invariants are checked against an independent account, not the planner's.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tent_async.core import (
    Attempt,
    AttemptState,
    Finished,
    Health,
    Outcome,
    Piece,
    Planner,
    Post,
    RailInfo,
    SchedulerConfig,
    Withdraw,
)
from tent_async.errors import NoRailError, TransferFailedError

KiB = 1024
CONFIG = SchedulerConfig(
    min_slice=64 * KiB,
    max_slice=256 * KiB,
    deadline_floor=0.05,
    deadline_factor=4.0,
    quarantine_after=2,
    failure_window=1.0,
    backoff_base=0.1,
    backoff_cap=0.8,
    max_attempts_per_rail=2,
    max_attempts=6,
    probe_interval=0.2,
    busy_wait=0.3,
)


class Busy(Exception):
    """The peer's load (a busy refusal), as the ucx backend reports a staging refusal."""


class Fatal(Exception):
    """The kind of error a peer reports for a transfer's own fault."""


class PlannerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.planner: Planner
        self.now = 0.0
        self.outstanding: dict[int, Attempt] = {}  # posted, not yet reported back
        self.pieces: dict[int, list[Piece]] = {}
        self.acked: dict[int, list[tuple[int, int]]] = defaultdict(list)  # tid -> (stream offset, length)
        self.charged: dict[int, set[int]] = defaultdict(set)  # tid -> rails charged with a failure of it
        self.busied: dict[int, set[int]] = defaultdict(set)  # tid -> rails where a slice of it met a busy peer
        self.fatal: set[int] = set()
        self.finished: dict[int, Finished] = {}
        self.no_rail_checked: set[int] = set()

    @initialize(
        policy=st.sampled_from(["eft", "round_robin", "single", "static"]),
        bandwidths=st.lists(st.sampled_from([1e8, 3e8, 1e9]), min_size=1, max_size=4),
        scatter_gather=st.booleans(),
    )
    def setup(self, policy: str, bandwidths: list[float], scatter_gather: bool) -> None:
        rails = [RailInfo(f"r{i}", bw) for i, bw in enumerate(bandwidths)]
        self.planner = Planner(rails, CONFIG, policy, scatter_gather=scatter_gather)

    # ------------------------------------------------------------------ driver

    def _poll(self) -> None:
        for d in self.planner.poll(self.now):
            if isinstance(d, Post):
                a = d.attempt
                assert self.planner.rails[a.rail].health.state is not Health.QUARANTINED, "posted to a quarantined rail"
                assert not self.planner.rails[a.rail].held, "posted to a rail held off for a busy peer"
                self._check_extents(a)
                self.outstanding[a.id] = a
            elif isinstance(d, Withdraw):
                assert d.attempt.state is AttemptState.WITHDRAWING
            else:
                self._on_finished(d)
        self._check_new_failures()
        wake = self.planner.next_wakeup()
        assert wake is None or wake > self.now, f"next_wakeup {wake} is not after now {self.now}: the driver would spin"

    def _on_finished(self, fin: Finished) -> None:
        tid = fin.transfer_id
        assert tid not in self.finished
        self.finished[tid] = fin
        # fencing: nothing of a finished transfer is still out there
        assert all(a.transfer_id != tid for a in self.planner.attempts())
        assert not any(a.transfer_id == tid for a in self.outstanding.values())
        if fin.outcome is Outcome.DONE:
            total = sum(p.length for p in self.pieces[tid])
            assert self._tiles(tid, total), f"transfer {tid} finished without all bytes acknowledged"
        elif fin.outcome is Outcome.FAILED:
            err = fin.error
            assert isinstance(err, NoRailError | TransferFailedError | Fatal | Busy), err
            if isinstance(err, TransferFailedError):
                assert self.charged[tid], "failed on retries without any charged failure"
            if isinstance(err, Busy):
                assert self.busied[tid], "failed as busy without a busy refusal"
            if isinstance(err, Fatal):
                assert tid in self.fatal

    def _check_new_failures(self) -> None:
        """A transfer fails for lack of rails only if none of its rails is clean and usable."""
        for t in self.planner.transfers():
            if t.id in self.no_rail_checked or not isinstance(t.error, NoRailError):
                continue
            self.no_rail_checked.add(t.id)
            for rail in t.rails:
                failed = self.charged[t.id]  # a busy refusal holds a rail off a while, it stays usable
                clean = rail.health.state in (Health.HEALTHY, Health.SUSPECT) and rail.index not in failed
                assert not clean, f"NoRailError while {rail.name} was usable and never failed this transfer"

    def _check_extents(self, a: Attempt) -> None:
        """The slice carries exactly the bytes its stream range maps to (after merging neighbours)."""
        got = list(a.extents) if a.extents is not None else [(a.src, a.src_offset, a.dst, a.dst_offset, a.length)]
        if not self.planner.scatter_gather:
            assert a.extents is None, "a multi-extent slice for a driver without scatter-gather"
        want = []
        pos = 0
        for p in self.pieces[a.transfer_id]:
            lo, hi = max(pos, a.offset), min(pos + p.length, a.offset + a.length)
            if lo < hi:
                want.append((p.src, p.src_offset + lo - pos, p.dst, p.dst_offset + lo - pos, hi - lo))
            pos += p.length
        assert _merged(got) == _merged(want), (got, want)

    def _tiles(self, tid: int, total: int) -> bool:
        spans = sorted((o, o + n) for (o, n) in self.acked[tid])
        pos = 0
        for start, end in spans:
            if start != pos:
                return False
            pos = end
        return pos == total

    # ------------------------------------------------------------------- rules

    @rule(
        sizes=st.lists(st.integers(0, 1024 * KiB), min_size=1, max_size=3),
        adjacent=st.booleans(),
        priority=st.sampled_from(["high", "normal", "background"]),
        data=st.data(),
    )
    def submit(self, sizes: list[int], adjacent: bool, priority: str, data: st.DataObject) -> None:
        n = len(self.planner.rails)
        eligible = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))
        if adjacent:  # one run in memory on both sides: the planner merges them
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces = [Piece("s", 7 + st_, "d", st_, size) for st_, size in zip(starts, sizes, strict=True)]
        else:
            pieces = [Piece(f"s{i}", 0, f"d{i}", 0, size) for i, size in enumerate(sizes)]
        tid = self.planner.submit(pieces, self.now, sorted(eligible), priority=priority)
        self.pieces[tid] = pieces
        self._poll()

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        aid = data.draw(st.sampled_from(sorted(self.outstanding)))
        a = self.outstanding.pop(aid)
        if a.state is AttemptState.LIVE:
            self.acked[a.transfer_id].append((a.offset, a.length))
        self.planner.complete(aid, self.now)
        self._poll()

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), rail_down=st.booleans(), fatal=st.integers(0, 9))
    def fail(self, data: st.DataObject, rail_down: bool, fatal: int) -> None:
        aid = data.draw(st.sampled_from(sorted(self.outstanding)))
        a = self.outstanding.pop(aid)
        if a.state is AttemptState.LIVE:
            if fatal == 0:
                self.fatal.add(a.transfer_id)
                self.planner.fail(aid, self.now, Fatal("peer refused"), transfer_fatal=True)
                self._poll()
                return
            if fatal == 1:  # the peer's load: the rail held off a while, the bytes retried, not charged
                self.busied[a.transfer_id].add(a.rail)
                rail = self.planner.rails[a.rail]
                before = rail.health.state
                others = {x.id for x in rail.inflight.values() if x.state is AttemptState.LIVE} - {aid}
                self.planner.fail(aid, self.now, Busy("peer busy"), busy=True)
                assert rail.health.state is before, "a busy refusal changed the rail's health"
                assert {x.id for x in rail.inflight.values() if x.state is AttemptState.LIVE} >= others, (
                    "a busy refusal withdrew the rail's other slices"
                )
                self._poll()
                return
            self.charged[a.transfer_id].add(a.rail)
        self.planner.fail(aid, self.now, "link error", rail_down=rail_down)
        self._poll()

    @precondition(lambda self: any(a.state is AttemptState.WITHDRAWING for a in self.outstanding.values()))
    @rule(data=st.data())
    def confirm_withdrawal(self, data: st.DataObject) -> None:
        stale = sorted(aid for aid, a in self.outstanding.items() if a.state is AttemptState.WITHDRAWING)
        aid = data.draw(st.sampled_from(stale))
        del self.outstanding[aid]
        self.planner.withdrawn(aid, self.now)
        self._poll()

    @rule(dt=st.sampled_from([0.001, 0.01, 0.06, 0.3, 1.0]))
    def advance_clock(self, dt: float) -> None:
        """Time passes; outstanding attempts that are not reported stall silently."""
        before = {a.id: a.state for a in self.planner.attempts()}
        self.now += dt
        self._poll()
        for aid, state in before.items():
            a = self.outstanding.get(aid)
            missed = a is not None and a.deadline <= self.now  # a deadline miss charges the rail
            if missed and state is AttemptState.LIVE and a.state is AttemptState.WITHDRAWING:
                self.charged[a.transfer_id].add(a.rail)

    @precondition(lambda self: self.planner.transfers())
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        tid = data.draw(st.sampled_from(sorted(t.id for t in self.planner.transfers())))
        self.planner.cancel(tid, self.now)
        self._poll()

    @rule(rail=st.integers(0, 3))
    def rail_reported_down(self, rail: int) -> None:
        if rail < len(self.planner.rails):
            for a in self.planner.rails[rail].inflight.values():
                if a.state is AttemptState.LIVE:
                    self.charged[a.transfer_id].add(rail)
            self.planner.rail_down(rail, self.now, "link down")
            self._poll()

    def teardown(self) -> None:
        """Liveness: once the backend answers everything and time moves on, every transfer ends."""
        if not hasattr(self, "planner"):
            return
        for _ in range(200):
            if not self.planner.transfers():
                return
            for aid, a in sorted(self.outstanding.items()):
                del self.outstanding[aid]
                if a.state is AttemptState.LIVE:
                    self.acked[a.transfer_id].append((a.offset, a.length))
                    self.planner.complete(aid, self.now)
                else:
                    self.planner.withdrawn(aid, self.now)
            self.now += 0.5
            self._poll()
        raise AssertionError(f"transfers never ended: {[t.id for t in self.planner.transfers()]}")

    # -------------------------------------------------------------- invariants

    @invariant()
    def accounting_matches_attempts(self) -> None:
        for rail in self.planner.rails:
            assert rail.inflight_bytes == sum(a.length for a in rail.inflight.values()) >= 0
            for a in rail.inflight.values():
                assert a.state in (AttemptState.LIVE, AttemptState.WITHDRAWING)
                if rail.health.state is Health.QUARANTINED:
                    assert a.state is AttemptState.WITHDRAWING, "a live slice sits on a quarantined rail"
        if self.planner.idle:
            assert all(r.inflight_bytes == 0 and not r.inflight for r in self.planner.rails)

    @invariant()
    def every_byte_is_acked_in_flight_or_queued_exactly_once(self) -> None:
        for t in self.planner.transfers():
            if t.phase.value != "running":
                continue
            live = [a for a in self.planner.attempts() if a.transfer_id == t.id and a.state is AttemptState.LIVE]
            spans = [(o, o + n) for (o, n) in self.acked[t.id]]
            spans += [(a.offset, a.offset + a.length) for a in live]
            spans += [(r.offset, r.offset + r.length) for r in t.pending]
            spans.sort()
            pos = 0
            for start, end in spans:
                assert start == pos, f"transfer {t.id}: gap or overlap at {pos} ({spans})"
                pos = end
            assert pos == sum(p.length for p in self.pieces[t.id])
            assert t.pending_bytes == sum(r.length for r in t.pending)
            # an open transfer is never complete-but-unreported
            assert not (t.acked == t.total and not t.live)

    @invariant()
    def planner_and_driver_agree_on_live_attempts(self) -> None:
        assert {a.id for a in self.planner.attempts()} == set(self.outstanding)


def _merged(extents: list[tuple[object, int, object, int, int]]) -> list[tuple[object, int, object, int, int]]:
    out: list[tuple[object, int, object, int, int]] = []
    for src, so, dst, do, n in extents:
        if n == 0:
            continue
        if out:
            ps, pso, pd, pdo, pn = out[-1]
            if ps == src and pd == dst and pso + pn == so and pdo + pn == do:
                out[-1] = (ps, pso, pd, pdo, pn + n)
                continue
        out.append((src, so, dst, do, n))
    return out


TestPlannerFailover = PlannerMachine.TestCase
# More runs than the profile's default: rare rules (a fatal error is one draw in ten) need them.
TestPlannerFailover.settings = settings(
    TestPlannerFailover.settings, max_examples=max(150, TestPlannerFailover.settings.max_examples)
)
