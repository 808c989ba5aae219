"""Telemetry is inspectable from Python, exported to Prometheus and shown by the CLI."""

from __future__ import annotations

import json
import urllib.request

import anyio
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tent_async as tent
from tent_async.cli import main
from tent_async.metrics import serve_metrics
from tent_async.watch import parse_fault, parse_rails

MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def _scrape_engine(engine: tent.Engine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Serve ``engine``'s metrics on a free port, scrape them once (from a thread), stop serving."""
    server = serve_metrics(engine, port=0)
    try:
        return await anyio.to_thread.run_sync(_scrape, server.port)
    finally:
        server.close()


@pytest.mark.anyio
async def test_prometheus_metrics_match_the_telemetry_snapshot() -> None:
    rails = [tent.RailSpec(name="nic0", bandwidth="1GB/s"), tent.RailSpec(name="nic1", bandwidth="500MB/s")]
    # A quarantine long enough that the scrape (a thread, on a loaded machine) sees it.
    cfg = tent.SchedulerConfig(max_slice="256KiB", deadline_floor="50ms", backoff_base="30s", backoff_cap="30s")
    async with tent.Engine(rails=rails, name="e1", config=cfg) as engine:
        a = engine.register(np.ones(8 * MiB, dtype=np.uint8))
        b = engine.register(np.zeros(8 * MiB, dtype=np.uint8))
        engine.backend.inject_fault("nic1", "down")  # type: ignore[attr-defined]
        await engine.transfer(a[:], b[:])
        samples = await _scrape_engine(engine)
        snap = engine.telemetry()
    for rail in snap.rails:
        labels = (("engine", "e1"), ("rail", rail.name))
        assert samples[("tent_rail_bytes_total", labels)] == rail.bytes_total
        assert samples[("tent_rail_errors_total", labels)] == rail.errors
        assert samples[("tent_rail_bandwidth_bytes_per_second", labels)] == pytest.approx(rail.bandwidth)
        assert samples[("tent_rail_lag_excused_total", labels)] == rail.lag_excused
        assert samples[("tent_rail_busy_refusals_total", labels)] == rail.busy_refusals
        assert samples[("tent_rail_held", labels)] == (1.0 if rail.held else 0.0)
        assert samples[("tent_rail_standing_by", labels)] == (1.0 if rail.standing_by else 0.0)
    # the maximum only grows, and the snapshot was taken after the scrape
    assert 0.0 <= samples[("tent_engine_loop_lag_seconds", (("engine", "e1"), ("stat", "max")))] <= snap.loop_lag_max
    assert samples[("tent_rail_health", (("engine", "e1"), ("rail", "nic1"), ("state", "quarantined")))] == 1.0
    assert samples[("tent_rail_health", (("engine", "e1"), ("rail", "nic0"), ("state", "healthy")))] == 1.0
    assert samples[("tent_engine_transfers_total", (("engine", "e1"), ("outcome", "done")))] == 1.0
    assert samples[("tent_engine_bytes_total", (("engine", "e1"),))] == 8 * MiB


@pytest.mark.anyio
async def test_a_standby_rail_shows_in_telemetry_metrics_and_the_table() -> None:
    rails = [
        tent.RailSpec(name="shm", bandwidth="4GB/s"),
        tent.RailSpec(name="tcp", bandwidth="1GB/s", options={"standby_for": "shm"}),
    ]
    cfg = tent.SchedulerConfig(probe_interval="10s")
    async with tent.Engine(rails=rails, name="e3", config=cfg) as engine:
        a = engine.register(np.ones(4 * MiB, dtype=np.uint8))
        b = engine.register(np.zeros(4 * MiB, dtype=np.uint8))
        result = await engine.transfer(a[:], b[:])
        samples = await _scrape_engine(engine)
        snap = engine.telemetry()
    assert result.bytes_per_rail.get("shm", 0) >= 4 * MiB - cfg.min_slice  # at most eft's first idle probe on tcp
    assert snap["tcp"].standing_by and snap["tcp"].standby_for == "shm" and not snap["shm"].standing_by
    assert samples[("tent_rail_standing_by", (("engine", "e3"), ("rail", "tcp")))] == 1.0
    assert samples[("tent_rail_standing_by", (("engine", "e3"), ("rail", "shm")))] == 0.0
    assert "healthy (standby)" in str(snap)
    assert snap.as_dict()["rails"][1]["standing_by"] is True


@pytest.mark.anyio
async def test_a_standby_that_names_no_rail_or_a_standby_is_refused_at_start() -> None:
    bad = [
        [tent.RailSpec(name="a"), tent.RailSpec(name="b", options={"standby_for": "nope"})],
        [tent.RailSpec(name="a", options={"standby_for": "b"}), tent.RailSpec(name="b", options={"standby_for": "a"})],
        [tent.RailSpec(name="a", options={"standby_for": "a"})],
    ]
    for rails in bad:
        with pytest.raises(tent.ConfigError, match="standby_for"):
            async with tent.Engine(rails=rails, name="bad"):
                pass


@pytest.mark.anyio
async def test_telemetry_snapshot_as_dict_and_lookup() -> None:
    async with tent.Engine(rails=[tent.RailSpec(name="x")], name="e2") as engine:
        a = engine.register(bytearray(1 << 16))
        b = engine.register(bytearray(1 << 16))
        await engine.transfer(a, b)
        snap = engine.telemetry()
    d = snap.as_dict()
    assert d["engine"] == "e2"
    assert d["transfers_done"] == 1
    assert d["rails"][0]["name"] == "x"
    assert snap["x"].bytes_total == 1 << 16
    assert snap.bytes_per_rail == {"x": 1 << 16}
    with pytest.raises(KeyError, match="no rail named"):
        snap["y"]


def test_cli_watch_shows_rails_and_survives_a_fault(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["watch", "--count", "6", "--size", "2MiB", "--concurrency", "2", "--fault", "nic1:down@0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "nic1" in out and "quarantin" in out
    assert "6 x 2.0 MiB" in out and "0 failed" in out


def test_cli_bench_core_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "core", "--slices", "3000", "--policies", "eft", "--transfers", "200"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0]["policy"] == "eft"
    assert lines[0]["dispatch_us"] > 0
    # The one-slice transfers: every one finished (measure_transfers raises otherwise), timed.
    assert lines[1] == {
        "bench": "core_transfer",
        "policy": "eft",
        "transfers": 200,
        "transfer_us": lines[1]["transfer_us"],
    }
    assert lines[1]["transfer_us"] > 0


def test_cli_argument_errors() -> None:
    assert [r.name for r in parse_rails("a=1GB/s, b")] == ["a", "b"]
    assert parse_fault("nic1:slow=0.1@2.5") == ("nic1", "slow=0.1", 2.5)
    with pytest.raises(tent.ConfigError, match="RAIL:MODE@SECONDS"):
        parse_fault("nic1@now")
    with pytest.raises(tent.ConfigError, match="at least one rail"):
        parse_rails(" , ")


def test_telemetry_of_an_engine_with_no_rails_prints() -> None:
    # A listening ucx engine has no rails until a peer connects; printing its snapshot must work.
    snap = tent.Telemetry(time=0.0, policy="eft", rails=(), open_transfers=0, engine="decode-0")
    text = str(snap)
    assert "engine=decode-0" in text and "no rails yet" in text
    assert snap.inflight_bytes == 0 and dict(snap.bytes_per_rail) == {} and snap.as_dict()["rails"] == []


@pytest.mark.anyio
async def test_a_final_snapshot_is_readable_after_close_and_served_as_metrics() -> None:
    rails = [tent.RailSpec(name="nic0"), tent.RailSpec(name="nic1")]
    never_started = tent.Engine(rails=rails, name="later")
    with pytest.raises(tent.EngineClosedError, match="not running"):
        never_started.telemetry()
    async with tent.Engine(rails=rails, name="e2") as engine:
        a = engine.register(np.ones(2 * MiB, dtype=np.uint8))
        b = engine.register(np.zeros(2 * MiB, dtype=np.uint8))
        await engine.transfer(a[:], b[:])
        server = serve_metrics(engine, port=0)
        server.collector.add(never_started)
        live = await anyio.to_thread.run_sync(_scrape, server.port)
    try:
        final = engine.telemetry()  # after the block: the run's totals, not EngineClosedError
        assert final is engine.telemetry()  # frozen: the same snapshot every time
        assert final.transfers_done == 1 and final.bytes_done == 2 * MiB
        assert sum(final.bytes_per_rail.values()) == 2 * MiB and final.inflight_bytes == 0
        assert "done=1" in str(final)
        after = await anyio.to_thread.run_sync(_scrape, server.port)
    finally:
        server.close()
    engine_label = (("engine", "e2"),)
    assert live[("tent_engine_running", engine_label)] == 1.0
    assert after[("tent_engine_running", engine_label)] == 0.0  # closed, still served with its totals
    assert after[("tent_engine_bytes_total", engine_label)] == 2 * MiB
    assert after[("tent_engine_transfers_total", (("engine", "e2"), ("outcome", "done")))] == 1.0
    for rail in final.rails:
        assert after[("tent_rail_bytes_total", (("engine", "e2"), ("rail", rail.name)))] == rail.bytes_total
    assert not any(labels and dict(labels).get("engine") == "later" for _name, labels in after)  # never started


@pytest.mark.anyio
async def test_a_backends_own_counters_show_in_telemetry_and_metrics() -> None:
    """Backend.counters (the ucx backend's refusals, protocol errors, direct copies) reach both."""
    async with tent.Engine(rails=[tent.RailSpec(name="nic0")], name="e3") as engine:
        assert engine.telemetry().backend == ()  # the local backend counts nothing of its own
        engine.backend.counters = lambda: {"protocol_errors": 2, "cma_slices": 7}  # type: ignore[method-assign]
        snap = engine.telemetry()
        assert snap.backend == (("cma_slices", 7), ("protocol_errors", 2))
        samples = await _scrape_engine(engine)
    assert samples[("tent_backend_events_total", (("engine", "e3"), ("event", "cma_slices")))] == 7.0
    assert samples[("tent_backend_events_total", (("engine", "e3"), ("event", "protocol_errors")))] == 2.0
