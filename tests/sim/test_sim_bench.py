"""The two simulator benchmarks run end to end (tiny scale) and print what they promise."""

from __future__ import annotations

import json

import pytest

from tent_async.cli import main

REQUIRED = {
    "scenario",
    "policy",
    "throughput_GBps",
    "capacity_GBps",
    "efficiency",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "bytes_per_rail",
    "throughput_vs_round_robin",
    "p99_vs_round_robin",
}


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_bench_sim_every_scenario_and_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "sim", "--scale", "0.02"]) == 0
    out = capsys.readouterr().out
    lines = _json_lines(out)
    seen = {(line["scenario"], line["policy"]) for line in lines}
    scenarios = ("homogeneous", "heterogeneous", "congested", "degraded", "mixed", "cluster")
    assert seen == {(s, p) for s in scenarios for p in ("eft", "round_robin", "single")}
    for line in lines:
        assert set(line) >= REQUIRED
        assert 0.0 < float(line["efficiency"]) <= 1.0 + 1e-9  # type: ignore[arg-type]
    assert "targets for eft" in out


def test_bench_failover_reports_every_fault(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "failover", "--size", "2GiB", "--fail-at", "2ms", "--stall-at", "6ms", "--degrade-at", "12ms"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = _json_lines(out)
    assert {(line["policy"], line["fault"]) for line in lines} == {
        (p, f) for p in ("eft", "round_robin", "single") for f in ("hard", "stall", "degrade")
    }
    assert all(line["outcome"] == "done" for line in lines)
    assert "goodput per 5 ms bucket" in out
