"""Property: every byte lands exactly once at the right offset, nothing else changes.

Random segment sizes, view offsets, rail sets (1-8 rails, bandwidths spanning
100x), policies and concurrency, through the real engine and local backend.
"""

from __future__ import annotations

from typing import Any

import anyio
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import tent_async as tent
from tent_async.backends.local import LocalBackend
from tent_async.core import AttemptState

KiB = 1024


class RecordingBackend(LocalBackend):
    """A local backend that remembers which attempts delivered bytes for live slices."""

    def __init__(self, rails: list[tent.RailSpec]) -> None:
        super().__init__(rails)
        self.engine: tent.Engine | None = None
        self.delivered: list[tuple[Any, int, int]] = []  # (dst segment, dst offset, length)

    async def start(self, ctx: Any) -> None:
        backend = self

        class Proxy:
            def __getattr__(self, name: str) -> Any:
                return getattr(ctx, name)

            def complete(self, aid: int, wire_time: float | None = None) -> None:
                assert backend.engine is not None
                live = {a.id: a for a in backend.engine.planner.attempts()}
                a = live.get(aid)
                if a is not None and a.state is AttemptState.LIVE:
                    backend.delivered.append((a.dst, a.dst_offset, a.length))
                ctx.complete(aid, wire_time)

        await super().start(Proxy())  # type: ignore[arg-type]


rail_sets = st.lists(st.sampled_from([20e6, 50e6, 200e6, 500e6, 1e9, 2e9]), min_size=1, max_size=8).map(
    lambda bws: [tent.RailSpec(name=f"r{i}", bandwidth=bw) for i, bw in enumerate(bws)]
)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[int, list[tuple[int, int, int]]]:
    """A destination size and 1-4 non-overlapping (src offset, dst offset, length) copies."""
    size = draw(st.integers(1, 2048)) * KiB + draw(st.integers(0, 4095))
    n = draw(st.integers(1, 4))
    cuts = sorted(draw(st.lists(st.integers(0, size), min_size=2 * n, max_size=2 * n)))
    flows = []
    for i in range(n):
        start, end = cuts[2 * i], cuts[2 * i + 1]
        length = end - start
        src_off = draw(st.integers(0, size - length))
        flows.append((src_off, start, length))
    return size, flows


@given(
    rails=rail_sets,
    policy=st.sampled_from(["eft", "round_robin", "single"]),
    work=workloads(),
    slice_kib=st.sampled_from([64, 256, 1024]),
)
def test_every_byte_lands_exactly_once(
    rails: list[tent.RailSpec], policy: str, work: tuple[int, list[tuple[int, int, int]]], slice_kib: int
) -> None:
    size, flows = work
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size, dtype=np.uint8)
    sentinel = rng.integers(0, 256, size, dtype=np.uint8)
    dst = sentinel.copy()
    # Small slices so that even small transfers are cut and sprayed.
    config = tent.SchedulerConfig(min_slice=slice_kib * KiB, max_slice=max(slice_kib * KiB, 256 * KiB))

    async def main() -> None:
        backend = RecordingBackend(rails)
        async with tent.Engine(backend=backend, policy=policy, config=config) as engine:
            backend.engine = engine
            a = engine.register(src, permission="r")
            b = engine.register(dst)
            results: list[tent.TransferResult] = []

            async def one(src_off: int, dst_off: int, length: int) -> None:
                results.append(await engine.transfer(a[src_off : src_off + length], b[dst_off : dst_off + length]))

            async with anyio.create_task_group() as tg:
                for flow in flows:
                    tg.start_soon(one, *flow)
            assert engine.telemetry().inflight_bytes == 0
            assert all(sum(r.bytes_per_rail.values()) == r.bytes for r in results)
        # Exactly once: the live deliveries tile each destination range with no overlap.
        spans = sorted((off, off + length) for (_seg, off, length) in backend.delivered)
        expected = sorted((d, d + n) for (_s, d, n) in flows if n)
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            assert not merged or start >= merged[-1][1], "a byte was delivered twice"
            if merged and start == merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        assert sum(e - s for s, e in spans) == sum(n for *_x, n in flows)
        for d_start, d_end in expected:
            assert any(s <= d_start and d_end <= e for s, e in merged)

    anyio.run(main)
    touched = np.zeros(size, dtype=bool)
    for src_off, dst_off, length in flows:
        np.testing.assert_array_equal(dst[dst_off : dst_off + length], src[src_off : src_off + length])
        touched[dst_off : dst_off + length] = True
    np.testing.assert_array_equal(dst[~touched], sentinel[~touched])  # nothing outside changed
