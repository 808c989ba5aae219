"""Queues, not scans: fairness between flows, priority classes with bounded aging, and a
planner whose cost does not grow with the number of open transfers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric import FifoFabric
from tent_async.core import EarliestFinish, Piece, Planner, Post, RailInfo, SchedulerConfig

MiB = 1 << 20
KiB = 1 << 10


class CountingEft(EarliestFinish):
    calls = 0

    def choose(self, transfer: Any, now: float) -> Any:
        CountingEft.calls += 1
        return super().choose(transfer, now)


def test_a_poll_with_every_rail_full_asks_the_policy_nothing() -> None:
    planner = Planner([RailInfo("a", 1e9), RailInfo("b", 1e9)], SchedulerConfig(window=2, max_window=2))
    policy = CountingEft()
    policy.bind(planner.rails, planner.config)
    planner.policy = policy
    for i in range(10_000):
        planner.submit([Piece("s", i * 64 * KiB, "d", i * 64 * KiB, 64 * KiB)], 0.0)
    posts = [d for d in planner.poll(0.0) if isinstance(d, Post)]
    assert len(posts) == 4  # two rails, two slices each
    before = CountingEft.calls
    for k in range(100):
        assert not planner.poll(1e-6 * (k + 1))  # nothing completed: nothing to decide
    assert CountingEft.calls == before
    # one completion frees one window: one decision, one post
    planner.complete(posts[0].attempt.id, 1e-3)
    again = [d for d in planner.poll(1e-3) if isinstance(d, Post)]
    assert len(again) == 1
    assert CountingEft.calls - before <= 2


@pytest.mark.parametrize("name", ["eft", "round_robin", "single", "static"])
def test_with_default_settings_no_policy_is_asked_about_a_full_rail_set(name: str) -> None:
    """The byte budget is eft's alone: under the others a rail full by count is full, and
    a poll with nothing completed asks nothing, however many transfers wait."""
    from tent_async.core import make_policy

    planner = Planner([RailInfo("a", 1e9), RailInfo("b", 1e9)], policy=name)
    calls = 0
    choose = planner.policy.choose

    def counting(transfer: Any, now: float) -> Any:
        nonlocal calls
        calls += 1
        return choose(transfer, now)

    planner.policy.choose = counting  # type: ignore[method-assign]
    for i in range(2_000):
        planner.submit([Piece("s", i * 4 * KiB, "d", i * 4 * KiB, 4 * KiB)], 0.0)
    assert [d for d in planner.poll(0.0) if isinstance(d, Post)]
    before = calls
    for k in range(50):
        planner.poll(1e-6 * (k + 1))
    assert calls - before <= 50, (name, calls - before)  # at most one hold per poll, never a scan
    assert make_policy(name).byte_window == (name == "eft")


def test_the_window_is_a_budget_of_bytes_as_well_as_slices() -> None:
    """Small slices (min_slice or less) fill a healthy rail up to ``window`` nominal slices'
    worth of bytes, at most ``max_window`` of them; bigger slices stop at ``window``; a
    suspect rail gets one."""

    def flows(cfg: SchedulerConfig, size: int, n: int = 100) -> Planner:
        planner = Planner([RailInfo("a", 1e9)], cfg)  # nominal slice 1 MB at 1 ms
        for i in range(n):
            planner.submit([Piece("s", i * size, "d", i * size, size)], 0.0)
        planner.poll(0.0)
        return planner

    by_bytes = flows(SchedulerConfig(window=2, max_window=64), 64 * KiB).rails[0]
    assert by_bytes.inflight_bytes >= 2 * by_bytes.nominal > by_bytes.inflight_bytes - 64 * KiB
    assert len(by_bytes.inflight) == 31
    by_count = flows(SchedulerConfig(window=2, max_window=16), 4 * KiB).rails[0]
    assert len(by_count.inflight) == 16
    assert len(flows(SchedulerConfig(window=2, max_window=16), 256 * KiB).rails[0].inflight) == 2
    assert len(flows(SchedulerConfig(window=3, max_window=1), 4 * KiB).rails[0].inflight) == 3

    sus = Planner([RailInfo("a", 1e9)], SchedulerConfig(window=2, max_window=16))
    for i in range(10):
        sus.submit([Piece("s", i * 4 * KiB, "d", i * 4 * KiB, 4 * KiB)], 0.0)
    first = [d for d in sus.poll(0.0) if isinstance(d, Post)]
    sus.fail(first[0].attempt.id, 1e-4, RuntimeError("boom"))  # one error: suspect
    assert sus.rails[0].health.state.value == "suspect"
    for d in first[1:]:
        sus.complete(d.attempt.id, 2e-4)
    sus.poll(2e-4)
    assert len(sus.rails[0].inflight) == 1


def test_small_transfers_are_not_starved_by_a_big_one() -> None:
    """Round-robin per slice within a class: a 4 MiB transfer submitted after a 1 GiB one
    finishes long before it."""
    fab = FifoFabric([1e9], "eft")
    big = fab.submit(1024 * MiB)
    fab.step()
    small = fab.submit(4 * MiB)
    fab.run()
    assert fab.finished[small].finished_at < 0.1 * fab.finished[big].finished_at


def test_high_priority_goes_first_and_background_still_moves() -> None:
    planner = Planner(
        [RailInfo("a", 1e9)], SchedulerConfig(window=1, max_window=1, priority_aging=4, min_slice=64 * KiB)
    )
    bg = planner.submit([Piece("s", 0, "d", 0, 64 * MiB)], 0.0, priority="background")
    hi = [planner.submit([Piece("s", 0, f"h{i}", 0, 64 * MiB)], 0.0, priority="high") for i in range(2)]
    served: list[int] = []
    now = 0.0
    for _ in range(100):
        for d in planner.poll(now):
            if isinstance(d, Post):
                served.append(d.attempt.transfer_id)
                now += d.attempt.length / 1e9  # the rail's bandwidth (no fixed cost per slice)
                planner.complete(d.attempt.id, now)
    # high first; background gets exactly one turn after being passed over `aging` times
    assert served[:4] == [hi[0], hi[1], hi[0], hi[1]]
    assert served[4] == bg
    share = served.count(bg) / len(served)
    assert 1 / 6 <= share <= 1 / 4  # one slice in five: bounded aging, not starvation


@settings(max_examples=60, deadline=None)
@given(
    prios=st.lists(st.sampled_from(["high", "normal", "background"]), min_size=2, max_size=8),
    aging=st.integers(1, 6),
)
def test_no_class_waits_longer_than_its_aging_bound(prios: list[str], aging: int) -> None:
    """Whatever the mix, a class with waiting work is served within (aging + 2) slices."""
    planner = Planner(
        [RailInfo("a", 1e9)], SchedulerConfig(window=1, max_window=1, priority_aging=aging, min_slice=64 * KiB)
    )
    cls = {}
    for i, p in enumerate(prios):
        tid = planner.submit([Piece("s", 0, f"d{i}", 0, 4 * MiB)], 0.0, priority=p)
        cls[tid] = p
    waited = {p: 0 for p in set(prios)}
    now = 0.0
    for _ in range(400):
        posts = [d for d in planner.poll(now) if isinstance(d, Post)]
        if not posts:
            break
        (post,) = posts
        served = cls[post.attempt.transfer_id]
        open_classes = {cls[t.id] for t in planner.transfers() if t.pending}
        for p in waited:
            waited[p] = 0 if p == served or p not in open_classes else waited[p] + 1
            assert waited[p] <= aging + 2, (p, waited)
        now += 1e-3
        planner.complete(post.attempt.id, now)


def test_priority_parsing_is_checked() -> None:
    planner = Planner([RailInfo("a", 1e9)])
    for bad in ("urgent", 7, None):
        with pytest.raises(ValueError, match="'high', 'normal' or 'background'"):
            planner.submit([Piece("s", 0, "d", 0, 10)], 0.0, priority=bad)  # type: ignore[arg-type]


def test_bulk_leaves_a_slot_free_and_yields_rails_that_carry_urgent_slices() -> None:
    cfg = SchedulerConfig(window=2, min_slice=64 * KiB, background_slice=0.25)
    planner = Planner([RailInfo("a", 1e9), RailInfo("b", 1e9)], cfg)
    planner.submit([Piece("s", 0, "bulk", 0, 1 << 30)], 0.0, priority="background")
    bulk = [d.attempt for d in planner.poll(0.0) if isinstance(d, Post)]
    assert len(bulk) == 2 and {a.rail for a in bulk} == {0, 1}  # one slot per rail, the other kept free
    nominal = planner.rails[0].nominal
    assert all(a.length <= nominal // 4 for a in bulk)  # short bulk slices drain fast
    hi = planner.submit([Piece("s", 0, "urgent", 0, 64 * KiB)], 0.0, priority="high")
    (urgent,) = [d.attempt for d in planner.poll(0.0) if isinstance(d, Post)]
    assert urgent.transfer_id == hi  # it found the free slot at once
    # The bulk slice on the urgent slice's rail completes: bulk does not take that rail back yet.
    (same_rail,) = [a for a in bulk if a.rail == urgent.rail]
    planner.complete(same_rail.id, 1e-4)
    assert not [d for d in planner.poll(1e-4) if isinstance(d, Post)]
    planner.complete(urgent.id, 2e-4)
    again = [d.attempt for d in planner.poll(2e-4) if isinstance(d, Post)]
    assert [a.rail for a in again] == [urgent.rail]


def _drive(planner: Planner, speeds: dict[str, float], until: Any, limit: float = 5.0) -> dict[int, float]:
    """Parallel rails, each slice taking length / speed: returns finish times by transfer id."""
    import heapq

    from tent_async.core import Finished

    now = 0.0
    events: list[tuple[float, int, Any]] = []
    done: dict[int, float] = {}

    def apply(decisions: list[Any]) -> None:
        for d in decisions:
            if isinstance(d, Post):
                a = d.attempt
                heapq.heappush(events, (now + a.length / speeds[a.rail_name], a.id, a))
            elif isinstance(d, Finished):
                done[d.transfer_id] = now

    apply(planner.poll(now))
    while events and not until(done) and now < limit:
        now, _, a = heapq.heappop(events)
        planner.complete(a.id, now, a.length / speeds[a.rail_name])
        apply(planner.poll(now))
    return done


def test_priority_holds_across_rail_sets() -> None:
    """A high transfer allowed only rail A is not left behind a normal elephant on A and B."""
    speeds = {"A": 10e9, "B": 1e9}
    planner = Planner([RailInfo("A", 10e9), RailInfo("B", 1e9)])
    elephant = planner.submit([Piece("s", 0, "d", 0, 4 << 30)], 0.0, priority="normal")
    urgent = planner.submit([Piece("s2", 0, "d2", 0, 1 * MiB)], 0.0, rails=["A"], priority="high")
    done = _drive(planner, speeds, lambda d: urgent in d)
    assert done[urgent] < 0.01  # ~2 slice times, not the elephant's 0.4 s
    assert elephant not in done


def test_an_aged_class_that_cannot_go_does_not_block_higher_ones() -> None:
    """Background's aging turn comes while it cannot be placed: high goes on meanwhile."""
    speeds = {"A": 10e9, "B": 10e6}
    planner = Planner([RailInfo("A", 10e9), RailInfo("B", 10e6)])
    high = planner.submit([Piece("s", 0, "d", 0, 1 << 30)], 0.0, priority="high")
    planner.submit([Piece("s1", 0, "d1", 0, 1 << 30)], 0.0, priority="background")
    normal = planner.submit([Piece("s2", 0, "d2", 0, 4 << 30)], 0.0, rails=["A"], priority="normal")
    done = _drive(planner, speeds, lambda d: high in d)
    assert high in done and normal not in done  # high finished while the normal elephant still ran
