"""The veth testbed itself: links appear, are shaped, fail on request, and always go away.

Speeds are checked only within generous bands (tests assert behaviour, not speed): a
shaped link must carry roughly its rate, and a fast link must be clearly faster than a
slow one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tent_async.cli import main as cli_main
from tent_async.testbed import (
    TestbedError,
    VethTestbed,
    _b36,
    _probe,
    available,
    cleanup_stale,
    list_testbeds,
    remove_testbed,
)

pytestmark = pytest.mark.netns


@pytest.fixture
def netns() -> Iterator[None]:
    """Skip where namespaces cannot be made; afterwards, check this process left nothing behind."""
    ok, reason = available()
    if not ok:
        pytest.skip(reason)
    yield
    mine = [info.token for info in list_testbeds() if info.owner_pid == os.getpid()]
    assert mine == [], f"testbeds left behind: {mine}"


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def links(ns: str | None = None) -> dict[str, dict[str, object]]:
    argv = ["ip", "-j", "addr", "show"] if ns is None else ["ip", "-n", ns, "-j", "addr", "show"]
    return {link["ifname"]: link for link in json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)}


def tbf_rates(ns: str) -> dict[str, float]:
    out = subprocess.run(["tc", "-n", ns, "-j", "qdisc", "show"], capture_output=True, check=True).stdout
    return {q["dev"]: float(q["options"]["rate"]) for q in json.loads(out) if q.get("kind") == "tbf"}


# ------------------------------------------------------------- no root needed


def test_available_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, reason = available()
    assert isinstance(ok, bool) and reason
    _probe.cache_clear()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    try:
        ok, reason = available()
        assert not ok and "root" in reason
    finally:
        _probe.cache_clear()


def test_names_are_short_unique_and_addresses_private() -> None:
    a = VethTestbed(["800mbit", "200mbit", "50mbit"])
    b = VethTestbed(["800mbit"] * 12)
    names = [*a.namespaces, *b.namespaces] + [r.dev(s) for tb in (a, b) for r in tb.rails for s in ("client", "server")]
    assert len(set(names)) == len(names)
    assert all(len(n) <= 15 for n in names)  # IFNAMSIZ - 1
    assert [r.server_ip for r in a.rails] == ["10.231.0.1", "10.231.1.1", "10.231.2.1"]
    assert [r.peer_ip("client") for r in a.rails] == [r.server_ip for r in a.rails]
    assert a.rails[0].bandwidth == 100e6 and a.rails[0].mbit == 800
    assert a.capacity == pytest.approx((800 + 200 + 50) * 1e6 / 8)
    with pytest.raises(ValueError, match="name"):
        VethTestbed(name="Not_OK")
    with pytest.raises(ValueError, match="subnet"):
        VethTestbed(subnet="192.168")
    with pytest.raises(ValueError, match="bandwidth"):
        VethTestbed(["fast"])
    with pytest.raises(TestbedError, match="not up"):
        a.link_down(0)


# ------------------------------------------------------------ built for real


def test_links_appear_shaped_and_are_removed(netns: None) -> None:
    with VethTestbed(["800mbit", "200mbit", "50mbit"]) as tb:
        assert set(tb.namespaces) <= namespaces()
        for side in ("client", "server"):
            ns = tb.ns(side)
            present = links(ns)
            rates = tbf_rates(ns)
            for r in tb.rails:
                link = present[r.dev(side)]
                assert link["operstate"] == "UP"
                assert any(a["local"] == r.ip(side) for a in link["addr_info"] if a["family"] == "inet")  # type: ignore[attr-defined]
                assert rates[r.dev(side)] == pytest.approx(r.bandwidth)
        assert tb.link_state(1) == {"client": "UP", "server": "UP"}
        # Reachable over its own rail: a closed port answers with a reset at once.
        probe = f"import socket; socket.create_connection(('{tb.rails[2].server_ip}', 9), timeout=5)"
        refused = tb.run("client", [sys.executable, "-c", probe], capture_output=True, text=True)
        assert "ConnectionRefusedError" in refused.stderr
    assert not set(tb.namespaces) & namespaces()
    assert not [n for n in links() if n.startswith(f"tnt{tb.token}")]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_removed_when_the_body_raises(netns: None, error: type[BaseException]) -> None:
    tb = VethTestbed(["100mbit"])
    with pytest.raises(error), tb:
        proc = tb.popen("server", ["sleep", "60"])
        stray = subprocess.Popen(tb.exec_argv("client", ["sleep", "60"]))  # not tracked: found via `ip netns pids`
        raise error("boom")
    assert not set(tb.namespaces) & namespaces()
    assert proc.poll() is not None
    assert stray.wait(5) is not None


def test_failed_build_removes_what_was_made(netns: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = VethTestbed._tbf

    def flaky(self: VethTestbed, verb: str, side: str, rail: object) -> None:
        calls.append(side)
        if len(calls) == 3:
            raise TestbedError("injected tc failure")
        real(self, verb, side, rail)  # type: ignore[arg-type]

    monkeypatch.setattr(VethTestbed, "_tbf", flaky)
    tb = VethTestbed(["100mbit", "100mbit"])
    with pytest.raises(TestbedError, match="injected"):
        tb.start()
    assert not set(tb.namespaces) & namespaces()


_CHILD = """
import os, signal, sys
from tent_async.testbed import VethTestbed
tb = VethTestbed(["100mbit"]).start()
print(tb.token, flush=True)
if sys.argv[1] == "crash":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
tb.close()
"""


def test_stale_testbed_of_a_killed_run_is_removed_live_ones_are_not(netns: None) -> None:
    live = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert live.stdout is not None
        alive = live.stdout.readline().strip()
        crashed = subprocess.run([sys.executable, "-c", _CHILD, "crash"], capture_output=True, text=True, timeout=60)
        assert crashed.returncode == -signal.SIGKILL
        dead = crashed.stdout.strip()
        by_token = {info.token: info for info in list_testbeds()}
        assert by_token[dead].stale and not by_token[alive].stale
        assert len(by_token[dead].present) == 2
        removed = cleanup_stale()  # what every VethTestbed.start() does first
        assert dead in removed and alive not in removed
        tokens = {info.token for info in list_testbeds()}
        assert dead not in tokens and alive in tokens
    finally:
        live.communicate("", timeout=30)
    assert alive not in {info.token for info in list_testbeds()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_removed_when_the_owner_is_terminated_or_interrupted(netns: None, sig: signal.Signals) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        token = child.stdout.readline().strip()
        assert token in {info.token for info in list_testbeds()}
        child.send_signal(sig)
        # Teardown runs several `ip` commands (each bounded at 10 s); on a loaded 2-core CI
        # machine it once took longer than 30 s, so allow it the sum of those bounds.
        child.wait(90)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert token not in {info.token for info in list_testbeds()}


def test_two_testbeds_side_by_side(netns: None) -> None:
    with VethTestbed(["100mbit"]) as a, VethTestbed(["100mbit"]) as b:
        assert not set(a.namespaces) & set(b.namespaces)
        assert a.rails[0].server_ip == b.rails[0].server_ip  # same addresses, separate namespaces
        before = b.byte_counters("client")[0][0]
        with a.tcp_stream(0) as stream:
            stream.wait_flowing()
            assert stream.wait_bytes(1 << 20, timeout=10)
        assert a.byte_counters("client")[0][0] > 1 << 20
        assert a.byte_counters("server")[0][1] > 1 << 20
        assert b.byte_counters("client")[0][0] - before < 64 * 1024  # b saw none of a's traffic
        with b.tcp_stream(0) as stream:
            stream.wait_flowing()


def test_shaping_holds_in_both_directions(netns: None) -> None:
    with VethTestbed(["800mbit", "200mbit", "50mbit"]) as tb:
        got = [tb.tcp_throughput(r.index, 1.5) for r in tb.rails]
        back = tb.tcp_throughput(2, 1.5, sender="server")
        for r, rate in zip(tb.rails, got, strict=True):
            # Shaping caps each rail at its rate; the lower bound is loose because a loaded
            # CI machine may not keep a link busy (behaviour, not speed).
            assert 0.3 <= rate / r.bandwidth <= 1.1, f"rail {r.index} shaped {r.mbit} Mbit/s carried {rate * 8e-6:.1f}"
        assert 0.3 <= back / tb.rails[2].bandwidth <= 1.1
        assert got[0] > 4 * got[2]
        assert got[0] > got[1] > got[2]


def test_link_down_stops_traffic_and_link_up_restores_it(netns: None) -> None:
    with VethTestbed(["200mbit"]) as tb, tb.tcp_stream(0) as stream:
        stream.wait_flowing()
        tb.link_down(0)
        assert tb.link_state(0)["client"] == "DOWN" and tb.link_state(0)["server"] != "UP"
        time.sleep(0.3)
        before = stream.received()
        time.sleep(1.0)
        assert stream.received() - before < 64 * 1024
        tb.link_up(0)
        assert tb.link_state(0) == {"client": "UP", "server": "UP"}
        assert stream.wait_bytes(stream.received() + (1 << 20), timeout=30)


def test_set_rate_changes_what_the_link_carries(netns: None) -> None:
    with VethTestbed(["800mbit"]) as tb, tb.tcp_stream(0) as stream:
        stream.wait_flowing()
        time.sleep(0.3)
        t0 = time.monotonic()
        time.sleep(1.0)
        fast = stream.rate(t0, time.monotonic())
        rail = tb.set_rate(0, "50mbit")
        assert rail.bandwidth == tb.rails[0].bandwidth == 50e6 / 8
        assert tbf_rates(tb.namespaces.server)[rail.server_dev] == pytest.approx(50e6 / 8)
        time.sleep(0.5)
        t0 = time.monotonic()
        time.sleep(1.5)
        slow = stream.rate(t0, time.monotonic())
        assert 0.3 <= slow / rail.bandwidth <= 1.1
        assert fast > 4 * slow


def test_attach_to_a_named_testbed(netns: None) -> None:
    name = "t" + _b36(os.getpid(), 5)
    tb = VethTestbed(["300mbit", "20mbit"], name=name).start()
    try:
        again = VethTestbed.attach(name)
        assert [(r.client_dev, r.server_ip) for r in again.rails] == [(r.client_dev, r.server_ip) for r in tb.rails]
        assert [r.bandwidth for r in again.rails] == pytest.approx([r.bandwidth for r in tb.rails])
        with pytest.raises(TestbedError, match="already up"):
            VethTestbed(name=name).start()
        VethTestbed(name=name).close()  # never started: must not touch the one that is up
        assert set(tb.namespaces) <= namespaces()
        again.close()
        assert not set(tb.namespaces) & namespaces()
    finally:
        tb.close()
    with pytest.raises(TestbedError, match="not up"):
        VethTestbed.attach(name)


def test_cli_up_status_down(netns: None, capsys: pytest.CaptureFixture[str]) -> None:
    name = "c" + _b36(os.getpid(), 5)
    try:
        assert cli_main(["testbed", "up", "--name", name, "--rates", "100mbit,10mbit"]) == 0
        out = capsys.readouterr().out
        assert f"tntn{name}c0" in out and "10.231.1.1" in out
        assert {f"tntn{name}c", f"tntn{name}s"} <= namespaces()
        assert cli_main(["testbed", "status"]) == 0
        assert f"named '{name}'" in capsys.readouterr().out
        assert cli_main(["testbed", "down", "--name", name]) == 0
        assert not {f"tntn{name}c", f"tntn{name}s"} & namespaces()
    finally:
        remove_testbed(f"n{name}")


def test_ucx_sees_the_rail_devices_right_away(netns: None) -> None:
    """A UCX context made just after start() opens the veth (a down device raises UCXXNoDeviceError)."""
    pytest.importorskip("ucxx")
    code = (
        "import sys, ucxx, ucxx._lib.libucxx as L\n"
        "ctx = L.UCXContext({'TLS': 'tcp', 'NET_DEVICES': sys.argv[1]})\n"
        "print([l.split('flags')[-1].strip() for l in ctx.info.splitlines() if 'resource' in l])\n"
    )
    with VethTestbed(["100mbit", "100mbit"]) as tb:
        dev = tb.rails[1].client_dev
        env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n"}
        out = tb.run("client", [sys.executable, "-c", code, dev], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"tcp/{dev}" in out.stdout
