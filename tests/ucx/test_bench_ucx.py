"""`tent-async bench ucx` runs end to end: raw ucxx and the engine each complete on both rails.

A smoke test of the benchmark's machinery (it once hung whenever a raw receive was cancelled
while the client's next message was already on its way); the figures themselves belong in
docs/benchmarks.md, never in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import requires_ucxx

pytestmark = [pytest.mark.ucx, requires_ucxx]


def test_the_loopback_benchmark_completes_raw_and_engine_runs_on_both_rails() -> None:
    cmd = [sys.executable, "-m", "tent_async.cli", "bench", "ucx", "--rails", "tcp,shm,default"]
    cmd += ["--iters", "1", "--lat-iters", "5", "--repeat", "1", "--limit", "90"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "left out" not in out.stdout, out.stdout
    rows = {r["rail"]: r for r in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"tcp", "shm", "default"}, out.stdout
    for rail, row in rows.items():
        for key in ("engine_write_GBps", "engine_read_GBps", "engine_write_us"):
            assert row[key] > 0, row
        if rail != "default":  # raw ucxx has no rails=None
            assert row["raw_GBps"] > 0 and row["raw_rtt_us"] > 0, row
    # the default rails are held to the best single rail (issue 9: more rails never slower)
    assert "rails=None 4 KiB p50 against the best single rail measured: WRITE" in out.stdout, out.stdout


def test_the_learning_run_reports_what_the_engine_learned_per_default_rail() -> None:
    cmd = [sys.executable, "-m", "tent_async.cli", "bench", "ucx", "--learn", "--limit", "150"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["bench"] == "ucx_learn", out.stdout
    got = rows[0]
    assert len(got["rates"]) == 6 and all(r > 0 for r in got["rates"])
    assert "shm" in got["learned"] and len(got["learned"]) >= 2  # shm and loopback at least
    for shares in got["shares"]:
        assert sum(shares.values()) == pytest.approx(1.0)
    assert got["small_p50"] > 0 and got["small_rails"]


def test_the_steps_run_merges_both_processes_stamps_into_one_time_line() -> None:
    cmd = [sys.executable, "-m", "tent_async.cli", "bench", "ucx", "--steps", "--rails", "shm", "--lat-iters", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["rail"], r["progress"], r["op"]) for r in rows] == [("shm", "loop", "write"), ("shm", "loop", "read")]
    for row in rows:
        steps = list(row["steps_us"])
        # The peer's steps sit between the client's header send and its reply: one time line.
        header = next(i for i, s in enumerate(steps) if s.startswith("client send<"))
        answer = next(i for i, s in enumerate(steps) if s.endswith("peer answer #1"))
        reply = next(i for i, s in enumerate(steps) if s.endswith("client reply #1"))
        assert header < answer < reply, steps
        assert all(v >= 0 for v in row["steps_us"].values())
        spans = row["spans_us"]
        assert spans["round trip"] >= spans["client: transfer() to the header's tag_send"] > 0
        assert spans["peer: wake-up to the answer's tag_send"] > 0
        assert min(row["cpu_us"]) > 0
        # A small slice travels inline: per transfer, each side posts exactly one UCX send (the
        # header; the answer) and one receive (the reply's; the slot's again), as raw ucxx's round
        # trip does, and each side's loop takes at least one pass for it (the counts are per
        # transfer over the timed ones).
        work = row["work"]
        for side in ("client", "peer"):
            assert work[side]["UCX sends"] == 1.0, work
            assert work[side]["UCX receives"] == 1.0, work
            assert work[side]["passes"] >= 0.9 and work[side]["turns"] >= 0.9, work
            assert work[side]["progress calls"] >= 1.0, work


def test_the_kv_bound_adds_each_sides_copy_to_the_contiguous_time() -> None:
    from tent_async.bench.ucx import copy_bound, copy_times

    assert copy_bound(4e-3, 4e-3) == 0.5
    assert copy_bound(4e-3, 0.0) == 1.0
    assert copy_bound(1e-3, 3e-3) == 0.25
    gather_s, scatter_s = copy_times(16384, size=1 << 20, rounds=1)
    assert gather_s > 0.0 and scatter_s > 0.0


def test_the_direct_copy_bound_swaps_the_contiguous_copy_for_the_blocks() -> None:
    from tent_async.backends.ucx import cma
    from tent_async.bench.ucx import cma_bound, cma_times

    assert cma_bound(4e-3, 2e-3, 2e-3) == 1.0
    assert cma_bound(4e-3, 2e-3, 6e-3) == 0.5
    assert cma_bound(1e-3, 3e-3, 1e-3) == 1.0  # a copy "longer" than the transfer: the transfer was all copy
    if cma.available():
        assert all(t > 0.0 for t in cma_times(16384, size=1 << 20, rounds=1))


def test_the_gaps_run_reports_raw_and_engine_latency_and_both_processes_cpu_after_each_idle_time() -> None:
    from tent_async.bench.ucx_gaps import GAPS, MIN_COUNT, count_for

    assert count_for(0.0, 500) == 500  # back to back: all of them
    assert count_for(0.005, 500) == 300  # 1.5 s of idling at most
    assert count_for(0.5, 500) == MIN_COUNT  # but never fewer than this
    cmd = [sys.executable, "-m", "tent_async.cli", "bench", "ucx", "--gaps", "--rails", "shm"]
    cmd += ["--progress", "loop", "--lat-iters", "30", "--repeat", "1", "--limit", "40"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "left out" not in out.stdout, out.stdout
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    got = [(r["rail"], r["what"], r["progress"], r["gap_ms"]) for r in rows]
    assert got == [("shm", what, "loop", g * 1e3) for g in GAPS for what in ("raw", "engine")], got
    for row, gap in zip(rows, [g for g in GAPS for _what in ("raw", "engine")], strict=True):
        assert row["count"] == count_for(gap, 30), row  # every round trip asked for was timed
        assert row["runs"] == 1, row
        assert row["p99_us"] >= row["p50_us"] > 0, row
        # The peer's CPU comes from the peer process (its answer on stdin), the client's from this one.
        assert row["cpu_client_us"] > 0, row
        assert row["cpu_peer_us"] > 0, row
        assert row["busy_client"] > 0, row
        assert row["busy_peer"] > 0, row
        # The client really idled before each round trip (the loop's timer never fires early).
        assert row["idle_ms"] >= 0.9 * row["gap_ms"], row


def _raw_peers() -> set[int]:
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "tent_async.bench._ucx_peer" in cmdline and "raw" in cmdline:
            found.add(proc.pid)
    return found


def test_a_raw_peer_exits_when_its_client_is_killed_mid_run() -> None:
    import time

    from tent_async.bench.ucx import run_isolated

    before = _raw_peers()
    # Far more round trips than 4 s allow: the client is killed at its limit, mid-run, and the
    # peer (waiting for a message that never comes) must notice its stdin closing and exit.
    assert run_isolated("ucx_gaps", "one_run('raw', 'shm', 'poll', 10**7)", 4.0) is None
    deadline = time.monotonic() + 15
    while _raw_peers() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _raw_peers() - before, "a raw peer outlived its killed client"
