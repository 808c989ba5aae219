"""A tiny deterministic driver for planner tests: FIFO rails in virtual time.

Each rail serves its attempts one after another at a fixed bandwidth (which a
test may change, or break).  It is deliberately simpler than the ``sim``
backend so that core tests do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tent_async.core import Attempt, Finished, Planner, Post, RailInfo, SchedulerConfig, Withdraw


class FifoFabric:
    def __init__(
        self,
        bandwidths: Sequence[float],
        policy: str = "eft",
        config: SchedulerConfig | None = None,
        hints: Sequence[float] | None = None,
        withdraw_finishes: bool = False,
        slice_costs: Sequence[float] | None = None,
        wire_scale: Sequence[float] | None = None,
        standby: dict[int, int] | None = None,
    ) -> None:
        hints = hints or bandwidths
        standby = standby or {}  # rail index -> the rail index it stands by for
        infos = [
            RailInfo(f"r{i}", h, latency=0.0, standby_for=f"r{standby[i]}" if i in standby else "")
            for i, h in enumerate(hints)
        ]
        self.planner = Planner(infos, config or SchedulerConfig(), policy)
        self.bw = list(bandwidths)
        # Seconds every slice costs on top of its bytes (per-slice work the rail serialises).
        self.slice_costs = list(slice_costs or [0.0] * len(bandwidths))
        # None: the planner infers wire times; else each rail reports its slices' time on the
        # wire times this factor (a backend that measures a rail's wire time short or long).
        self.wire_scale = list(wire_scale) if wire_scale is not None else None
        self.started: dict[int, float] = {}  # aid -> when the rail started on it
        # False: a withdrawal stops the slice at once (a cancel); True: the slice still
        # finishes and reports (a slice that was late, not lost, as on real hardware).
        self.withdraw_finishes = withdraw_finishes
        self.now = 0.0
        self.free_at = [0.0] * len(bandwidths)
        self.pending: dict[int, tuple[float, Attempt]] = {}  # aid -> (finish time, attempt)
        self.stalled: set[int] = set()  # rail indices that swallow slices
        self.failing: set[int] = set()  # rail indices that error immediately
        self.finished: dict[int, Finished] = {}
        self.posts: list[Attempt] = []
        self.withdraws: list[Attempt] = []
        self.delivered: list[Attempt] = []  # LIVE attempts that completed

    def submit(self, size: int, rails: Sequence[int] | None = None) -> int:
        from tent_async.core import Piece

        return self.planner.submit([Piece("src", 0, "dst", 0, size)], self.now, rails)

    def _apply(self, decisions: list) -> None:
        for d in decisions:
            if isinstance(d, Post):
                a = d.attempt
                self.posts.append(a)
                if a.rail in self.failing:
                    self.planner.fail(a.id, self.now, "injected", rail_down=False)
                    continue
                if a.rail in self.stalled:
                    self.pending[a.id] = (float("inf"), a)
                    continue
                start = max(self.now, self.free_at[a.rail])
                self.started[a.id] = start
                finish = start + self.slice_costs[a.rail] + a.length / self.bw[a.rail]
                self.free_at[a.rail] = finish
                self.pending[a.id] = (finish, a)
            elif isinstance(d, Withdraw):
                self.withdraws.append(d.attempt)
                if self.withdraw_finishes and self.pending.get(d.attempt.id, (float("inf"),))[0] < float("inf"):
                    continue
                if d.attempt.id in self.pending:
                    del self.pending[d.attempt.id]
                    self.planner.withdrawn(d.attempt.id, self.now)
            else:
                self.finished[d.transfer_id] = d

    def drain(self) -> None:
        """Poll until the planner has nothing more to say at this instant."""
        while True:
            decisions = self.planner.poll(self.now)
            if not decisions:
                return
            self._apply(decisions)

    def step(self) -> bool:
        """Advance to the next event; returns False when nothing is left to do."""
        self.drain()
        while True:
            nxt = min(self.pending.items(), key=lambda kv: (kv[1][0], kv[0]), default=None)
            wake = self.planner.next_wakeup()
            t_done = nxt[1][0] if nxt else float("inf")
            t_wake = wake if wake is not None else float("inf")
            if t_done == float("inf") and t_wake == float("inf"):
                return False
            if t_wake < t_done:
                self.now = max(self.now, t_wake)
                self.drain()
                return True
            assert nxt is not None
            aid, (finish, a) = nxt
            del self.pending[aid]
            self.now = finish
            live = a.state.value == "live"
            if self.wire_scale is None:
                self.planner.complete(aid, self.now)
            else:
                self.planner.complete(aid, self.now, (finish - self.started[aid]) * self.wire_scale[a.rail])
            if live:
                self.delivered.append(a)
            self.drain()
            return True

    def run(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("fabric did not settle")
