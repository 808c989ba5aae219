"""The end of a transfer: slow rails' last slices are cut so that every rail finishes together.

The veth testbed's rails (800, 200 and 50 Mbit/s) under the ucx backend's scheduling (4 ms
slices, three in flight, ``min_slice`` 256 KiB): one ``min_slice`` is 10.5 ms on the
200 Mbit/s rail and 42 ms on the 50 Mbit/s one, 2-8 % of a 64 MiB transfer.  Handed a
whole ``min_slice`` too many, such a rail ends the transfer late; handed one too few, it
idles while the others finish.  FIFO rails in virtual time, exact rates: the fluid optimum
is ``size / sum(rates)``, and what is measured here is how far after it the transfer ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from fabric import FifoFabric
from tent_async.core import SchedulerConfig

KiB = 1024
MiB = 1024 * KiB
UCX = SchedulerConfig(target_slice_time=4e-3, window=3, max_window=8, min_slice=256 * KiB)  # ucx default_config
TWO = [100e6, 25e6]  # 800 and 200 Mbit/s, in bytes/s
THREE = [100e6, 25e6, 6.25e6]  # and 50 Mbit/s
SIZES = [64 * MiB + k * 176 * KiB for k in range(12)]  # where one rail's share ends in a slice matters


def _transfers(
    bws: Sequence[float], size: int, n: int = 4, wire_scale: Sequence[float] | None = None
) -> tuple[list[float], list[int]]:
    """``n`` transfers of ``size`` one after another: each one's fluid optimum over its time,
    and how many slices under ``min_slice`` the slow rails carried for it."""
    fab = FifoFabric(bws, config=UCX, wire_scale=wire_scale)
    ratios, small = [], []
    for _ in range(n):
        t0, p0 = fab.now, len(fab.posts)
        tid = fab.submit(size)
        fab.run()
        done = fab.finished[tid]
        assert done.outcome.value == "done" and sum(done.bytes_per_rail.values()) == size
        ratios.append(size / sum(bws) / (done.finished_at - t0))
        small.append(sum(1 for a in fab.posts[p0:] if a.rail > 0 and a.length < UCX.min_slice))
    return ratios, small


@pytest.mark.parametrize("bws", [TWO, THREE], ids=["800+200", "800+200+50"])
def test_slow_rails_finish_with_the_others(bws: list[float]) -> None:
    """Within 0.3 % of the fluid optimum from the third transfer on, at every size.

    Before the end balance: 0.9946 (two rails) and 0.9936 (three) at the worst of these
    sizes; the slow rails took whole ``min_slice`` slices to the end and idled up to one.
    """
    worst = min(min(_transfers(bws, size)[0][2:]) for size in SIZES)
    assert worst >= 0.997, worst


@pytest.mark.parametrize("bws", [TWO, THREE], ids=["800+200", "800+200+50"])
def test_a_slow_rail_whose_wire_time_is_measured_short_still_ends_with_the_others(bws: list[float]) -> None:
    """The ucx backend leaves out of a slice's wire time what its event loop spent on other
    rails, while the kernel keeps sending a TCP rail's bytes: on veth the slow rails were
    learned 12-38 % too fast (docs/benchmarks.md).  Here they report 85 % of their wire time.

    The planner's own clock (completion to completion) says what they delivered; before,
    0.9894 and 0.9883 at the worst size (a whole ``min_slice`` landing up to one late).
    """
    scale = [1.0] + [0.85] * (len(bws) - 1)
    worst = min(min(_transfers(bws, size, wire_scale=scale)[0][2:]) for size in SIZES)
    assert worst >= 0.997, worst
    fab = FifoFabric(bws, config=UCX, wire_scale=scale)
    fab.submit(64 * MiB)
    fab.run()
    slow = fab.planner.rails[1]
    assert slow.estimator.bandwidth > 1.1 * bws[1]  # what the wire times say
    assert slow.delivered == pytest.approx(bws[1], rel=0.02)  # what the rail delivered


@pytest.mark.parametrize("bws", [TWO, THREE], ids=["800+200", "800+200+50"])
def test_the_end_balance_costs_a_slice_or_two_per_slow_rail(bws: list[float]) -> None:
    """Slices under ``min_slice`` only at the end: at most two per slow rail and transfer."""
    for size in SIZES[:4]:
        _, small = _transfers(bws, size)
        assert max(small) <= 2 * (len(bws) - 1), (size, small)
        assert sum(small) >= 1  # the balance does cut below min_slice


def test_small_transfers_are_not_split_over_fast_rails() -> None:
    """Rails that move ``min_slice`` within ``target_slice_time`` keep it as their floor: a
    transfer of 64 KiB on two fast rails is one slice, as before."""
    fab = FifoFabric([1e9, 1e9])
    for _ in range(20):
        fab.submit(64 * KiB)
    fab.run()
    assert len(fab.finished) == 20
    assert all(a.length == 64 * KiB for a in fab.posts)


def test_the_tail_floor_respects_a_rails_per_slice_cost() -> None:
    from tent_async.core.slicing import tail_floor

    cfg = UCX
    # no cost: an eighth of min_slice (shares under it are the estimates' drift)
    assert tail_floor(25e6, 0.0, cfg) == cfg.min_slice // 8
    # 2 ms per slice: the slice whose cost is a quarter of its time (3 x 2 ms x 25 MB/s)
    assert tail_floor(25e6, 2e-3, cfg) == 150_000 - 150_000 % cfg.slice_align
    # never above min_slice
    assert tail_floor(25e6, 1.0, cfg) == cfg.min_slice


def test_slow_rails_alone_are_sliced_as_before() -> None:
    """The balance hands what a slow rail leaves to a fast one: with no fast rail (one slow
    rail; or the fast rail down) no slice is cut under min_slice (a small remainder merges
    into the slice before it, as before)."""
    for bws in ([25e6], [25e6, 6.25e6]):
        fab = FifoFabric(bws, config=UCX)
        fab.submit(8 * MiB + 4 * KiB)
        fab.run()
        assert min(a.length for a in fab.posts) >= UCX.min_slice, bws
