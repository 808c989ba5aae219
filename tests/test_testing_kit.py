"""tent_async.testing: rail-set and fault-schedule strategies, and the guide's worked example."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tent_async as tent
from tent_async.testing import ACTIONS, FaultSchedule, FaultStep, fault_schedules, rail_specs

MiB = 1 << 20


@given(rail_specs(min_rails=2, max_rails=5, bandwidth=(1e8, 1e10), latency=(1e-6, 1e-4), tiers=["same_switch"]))
def test_rail_specs_are_valid_engine_rails(rails: list[tent.RailSpec]) -> None:
    assert 2 <= len(rails) <= 5
    assert len({r.name for r in rails}) == len(rails)
    for r in rails:
        assert r.bandwidth is not None and 1e8 <= r.bandwidth <= 1e10
        assert 1e-6 <= r.latency <= 1e-4
        assert r.tier is tent.Tier.SAME_SWITCH
    tent.Engine(backend="sim", rails=rails)  # accepted as they are


@given(st.data())
def test_fault_schedules_respect_spares_horizon_and_healing(data: st.DataObject) -> None:
    rails = data.draw(rail_specs(min_rails=1, max_rails=5))
    names = [r.name for r in rails]
    spare = data.draw(st.integers(0, len(names)))
    heal = data.draw(st.booleans())
    schedule = data.draw(fault_schedules(rails, horizon=0.5, spare=spare, heal=heal))
    assert isinstance(schedule, FaultSchedule)
    schedule.check_rails(names)
    times = [s.at for s in schedule]
    assert times == sorted(times) and all(0.0 <= t <= 0.5 for t in times)
    assert all(s.action in ACTIONS for s in schedule)
    assert set(names[:spare]) <= set(schedule.untouched(names))  # spares are never touched
    if heal:
        assert schedule.healed() and not schedule.faulty_at(math.inf)
    assert str(schedule)  # printable, in `tent-async watch --fault` syntax


def test_all_but_one_leaves_exactly_one_rail_up() -> None:
    @given(fault_schedules(["a", "b", "c", "d"], kinds=["all_but_one"], spare=0, max_faults=1))
    @settings(max_examples=30)
    def check(schedule: FaultSchedule) -> None:
        if schedule.steps:
            assert len(schedule.faulty_at(schedule.end)) == 3

    check()


def test_fault_values_are_checked() -> None:
    with pytest.raises(tent.ConfigError, match="unknown fault action"):
        FaultStep(0.0, "nic0", "melt")  # type: ignore[arg-type]
    with pytest.raises(tent.ConfigError, match=r"fraction must be in \(0, 1\]"):
        FaultStep(0.0, "nic0", "slow", 0.0)
    with pytest.raises(tent.ConfigError, match="not negative"):
        FaultStep(-1.0, "nic0", "down")
    with pytest.raises(tent.ConfigError, match="unknown rails"):
        FaultSchedule([FaultStep(0.1, "nic9", "down")]).check_rails(["nic0"])

    @given(st.data())
    @settings(max_examples=1)
    def draw_unknown_kind(data: st.DataObject) -> None:
        data.draw(fault_schedules(["a"], kinds=["meteor"]))

    with pytest.raises(tent.ConfigError, match="unknown fault kinds"):
        draw_unknown_kind()
    schedule = FaultSchedule([FaultStep(0.2, "b", "clear"), FaultStep(0.1, "b", "slow", 0.5)])
    assert [s.action for s in schedule] == ["slow", "clear"]  # sorted by time
    assert str(schedule) == "b:slow=0.5@0.1 b:clear@0.2"
    assert schedule.faulty_at(0.15) == set() and schedule.healed()


# ---------------------------------------------------------------- worked example (docs/guide.md)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rails=rail_specs(min_rails=2, max_rails=4, bandwidth=(1e9, 1e10), latency=(1e-6, 1e-4)),
    data=st.data(),
)
def test_a_transfer_completes_byte_exact_whatever_the_other_rails_do(
    rails: list[tent.RailSpec], data: st.DataObject
) -> None:
    schedule = data.draw(fault_schedules(rails, horizon=0.02, spare=1))
    src = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)

    async def main() -> tent.TransferResult:
        async with tent.Engine(backend="sim", rails=rails, seed=1) as engine:
            a, b = engine.register(src), engine.register(dst)
            async with anyio.create_task_group() as tg:
                tg.start_soon(schedule.run, engine.backend)
                result = await engine.transfer(a[:], b[:])
                tg.cancel_scope.cancel()  # the schedule may be longer than the transfer
            return result

    result = anyio.run(main)
    np.testing.assert_array_equal(src, dst)
    assert result.bytes == src.size


def test_a_schedule_on_the_sim_backend_replays_exactly() -> None:
    rails = [tent.RailSpec(name=f"r{i}", bandwidth=f"{i + 1}GB/s") for i in range(3)]
    schedule = FaultSchedule(
        [FaultStep(0.001, "r2", "stall"), FaultStep(0.002, "r1", "slow", 0.25), FaultStep(0.004, "r1", "down")]
    )

    async def once() -> tuple[dict[str, int], float, int]:
        src = np.arange(16 * MiB, dtype=np.uint64).view(np.uint8)[: 16 * MiB]
        dst = np.zeros_like(src)
        async with tent.Engine(backend="sim", rails=rails, seed=3) as engine:
            a, b = engine.register(src), engine.register(dst)
            async with anyio.create_task_group() as tg:
                tg.start_soon(schedule.run, engine.backend)
                result = await engine.transfer(a[:], b[:])
            snap = engine.telemetry()
        np.testing.assert_array_equal(src, dst)
        return dict(result.bytes_per_rail), result.elapsed, snap["r2"].deadline_misses + snap["r1"].errors

    first, second = anyio.run(once), anyio.run(once)
    assert first == second  # virtual time: the same schedule gives the same run
    assert first[2] > 0  # and the faults did hit the transfer


def _traced_run(
    rails: list[tent.RailSpec],
    schedule: FaultSchedule,
    src: np.ndarray,
    dst: np.ndarray,
    work: Callable[[tent.Engine, tent.Segment, tent.Segment, Any], None],
) -> Any:
    """Run ``work`` (it starts transfers in the task group it is given) on the sim backend while
    ``schedule`` plays; returns the slice trace of the run."""
    from tent_async.testing import SliceTrace

    async def main() -> SliceTrace:
        async with tent.Engine(backend="sim", rails=rails, seed=1) as engine:
            a, b = engine.register(src, permission="r"), engine.register(dst)
            with SliceTrace(engine) as trace:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(schedule.run, engine.backend)
                    async with anyio.create_task_group() as transfers:
                        work(engine, a, b, transfers)
                    tg.cancel_scope.cancel()
            return trace

    return anyio.run(main)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rails=rail_specs(min_rails=2, max_rails=4, bandwidth=(1e9, 1e10)), data=st.data())
def test_the_slice_trace_of_faulty_runs_keeps_every_invariant(rails: list[tent.RailSpec], data: st.DataObject) -> None:
    """The kit on the engine itself: concurrent transfers (one of them scattered blocks) under a
    drawn fault schedule, on the sim backend; the trace must pass the invariant checker."""

    schedule = data.draw(fault_schedules(rails, horizon=0.02, spare=1))
    src = np.random.default_rng(2).integers(0, 256, 8 * MiB, dtype=np.uint8)
    dst = np.zeros_like(src)
    perm = np.random.default_rng(3).permutation(512)

    def work(engine: tent.Engine, a: tent.Segment, b: tent.Segment, tg: Any) -> None:
        tg.start_soon(engine.transfer, a[: 4 * MiB], b[: 4 * MiB])
        region = slice(4 * MiB, 6 * MiB)
        tg.start_soon(engine.transfer_blocks, a[region], np.arange(512) * 4096, b[region], perm * 4096, 4096)

    trace = _traced_run(rails, schedule, src, dst, work)
    trace.check()
    assert trace.of("post") and len(trace.of("finished")) == 2
    assert np.array_equal(dst[: 4 * MiB], src[: 4 * MiB])
    assert np.array_equal(dst[4 * MiB : 6 * MiB].reshape(512, 4096)[perm], src[4 * MiB : 6 * MiB].reshape(512, 4096))


def test_the_checker_catches_each_violation() -> None:
    from tent_async.testing import SliceEvent, TraceViolation, check_trace

    post = SliceEvent(0.0, "post", 1, 1, "r0", 0, 100)
    done = SliceEvent(1.0, "complete", 1, 1, "r0", 0, 100, counted=True)
    fin = SliceEvent(2.0, "finished", 1, length=100, outcome="done")
    check_trace([post, done, fin])  # the honest story passes
    twice = SliceEvent(1.5, "complete", 1, 2, "r1", 50, 50, counted=True)
    with pytest.raises(TraceViolation, match="overlap"):
        check_trace([post, done, twice, fin])
    short = SliceEvent(1.0, "complete", 1, 1, "r0", 0, 60, counted=True)
    with pytest.raises(TraceViolation, match="60 of 100"):
        check_trace([post, short, fin])
    quarantine = SliceEvent(0.0, "rail", rail="r0", outcome="quarantine")
    with pytest.raises(TraceViolation, match="quarantined"):
        check_trace([quarantine, post, done, fin])
    probe = SliceEvent(0.0, "rail", rail="r0", outcome="probe")
    check_trace([quarantine, probe, post, done, fin])
    late = SliceEvent(3.0, "withdrawn", 1, 3, "r1", 0, 100)
    with pytest.raises(TraceViolation, match="not fenced"):
        check_trace([post, done, fin, late])
    with pytest.raises(TraceViolation, match="never ended"):
        check_trace([post, done])
    check_trace([post, done], ended=False)
    with pytest.raises(TraceViolation, match="without an error"):
        check_trace([post, SliceEvent(2.0, "finished", 1, outcome="failed")])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=st.data())
def test_drawn_workloads_land_byte_exact_through_faults(workload: st.DataObject) -> None:
    """Concurrent block-table transfers of every class, drawn by the kit, on the sim backend."""
    from tent_async.testing import Workload, workloads

    rails = [tent.RailSpec(name=f"r{i}", bandwidth="10GB/s") for i in range(3)]
    w = workload.draw(workloads(max_transfers=4, max_blocks=24))
    assert isinstance(w, Workload)
    schedule = workload.draw(fault_schedules(rails, horizon=0.001, spare=1))
    src = np.random.default_rng(w.pool_blocks).integers(0, 256, w.pool_bytes, dtype=np.uint8)
    dst = np.zeros_like(src)

    def work(engine: tent.Engine, a: tent.Segment, b: tent.Segment, tg: Any) -> None:
        for t in w.transfers:
            tg.start_soon(
                lambda t=t: engine.transfer_blocks(a, t.src_offsets(), b, t.dst_offsets(), w.block, priority=t.priority)
            )

    _traced_run(rails, schedule, src, dst, work).check()
    want = np.zeros_like(src)
    for t in w.transfers:
        for s, d in zip(t.src_offsets(), t.dst_offsets(), strict=True):
            want[d : d + w.block] = src[s : s + w.block]
    assert np.array_equal(dst, want)
