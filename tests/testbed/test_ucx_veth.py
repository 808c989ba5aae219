"""The raw-ucxx measurement on the veth testbed: it runs, checks its data, and shows the split.

Behaviour only: each rail alone carries roughly its shaped rate, the static split by rate
uses both rails in proportion, UCX's own multi-rail really uses both devices.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os

import pytest
from rich.console import Console

from tent_async.bench.ucx_veth import (
    _is_rail,
    _plan,
    _split,
    add_veth_arguments,
    engine_available,
    rail_names,
    run_veth,
    timeline_metrics,
)
from tent_async.testbed import VethTestbed, available, list_testbeds


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_veth_arguments(parser)
    return parser.parse_args(list(argv))


def test_split_and_plan() -> None:
    sizes = _split(64 << 20, [100e6, 25e6])
    assert sum(sizes) == 64 << 20 and all(s % 4096 == 0 for s in sizes)
    assert sizes[0] == pytest.approx(0.8 * (64 << 20), rel=0.01)
    spec = {"mode": "rails", "sizes": [10 << 20, 3 << 20], "slice": 4 << 20}
    plan = _plan(spec, warmup=False)
    assert plan[0] == [(0, 4 << 20), (4 << 20, 8 << 20), (8 << 20, 10 << 20)]
    assert plan[1][0][0] == 10 << 20 and plan[1][-1][1] == 13 << 20
    assert _plan(spec, warmup=True) == [[(0, 4 << 20)], [(10 << 20, 13 << 20)]]
    assert _plan({"mode": "multirail", "sizes": [64 << 20], "slice": 4 << 20}, warmup=False) == [[(0, 64 << 20)]]
    assert rail_names(VethTestbed(["800mbit", "200mbit", "200mbit"])) == ["r800", "r200", "r200_2"]


def test_timeline_metrics_on_a_synthetic_failover() -> None:
    # 125 MB/s until the link goes down at t=1, nothing for 0.2 s, the engine notices at
    # 1.15 s, then the surviving 25 MB/s rail carries everything.
    dt = 0.005
    samples, n, t = [], 0.0, 0.0
    while t < 2.0:
        rate = 125e6 if t < 1.0 else 0.0 if t < 1.2 else 24e6
        n += rate * dt
        t += dt
        samples.append((round(t, 6), int(n)))
    m = timeline_metrics(samples, 1.0, [0.5, 1.15, 1.3], survivors=25e6)
    assert m["detected_s"] == pytest.approx(0.15)
    assert m["longest_stall_s"] == pytest.approx(0.2, abs=0.011)
    assert m["recovery_s"] == pytest.approx(0.2, abs=0.011)
    assert m["recovery_after_detection_s"] == pytest.approx(0.05, abs=0.011)
    assert m["goodput_before"] == pytest.approx(125e6, rel=0.02)
    assert m["goodput_per_window"][0][0] == -0.5
    assert (
        _is_rail("server/r800", "r800") and _is_rail("server/r800:r800", "r800") and not _is_rail("server/r200", "r800")
    )


@pytest.mark.netns
@pytest.mark.ucx
def test_raw_ucxx_rows_on_the_testbed() -> None:
    ok, reason = available()
    if not ok:
        pytest.skip(reason)
    if importlib.util.find_spec("ucxx") is None:
        pytest.skip("ucxx not installed (the `ucx` extra)")
    out = io.StringIO()
    rows = run_veth(Console(file=out, width=200), parse("--size", "8MiB", "--iterations", "1"))
    text = out.getvalue()
    by_kind = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    assert len(by_kind["raw_rail"]) == 2, text
    assert all(row["data_ok"] for row in rows), text
    for row in by_kind["raw_rail"]:
        assert 0.3 <= row["rail_fraction"] <= 1.1, row  # capped by shaping; loose below (loaded CI)
    r800, r200 = by_kind["raw_rail"]
    assert r800["throughput"] > 2 * r200["throughput"]
    (parallel,) = by_kind["raw_parallel"]
    assert parallel["share"]["r800"] > parallel["share"]["r200"] > 5
    assert parallel["throughput"] > r800["throughput"]
    (multi,) = by_kind["ucx_multirail"]
    assert len(multi["resources"][0]) == 2  # one context holding both veths
    assert min(multi["share"].values()) > 10  # and UCX really put bytes on both
    if not engine_available()[0]:
        assert "engine rows skipped" in text
    assert '"bench": "ucx_veth"' in text  # JSON lines
    assert [i.token for i in list_testbeds() if i.owner_pid == os.getpid()] == []
