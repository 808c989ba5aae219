"""The ucx backend over real, shaped rails (the veth testbed): spraying follows the rails'
capacities, a rail taken down mid-transfer is routed around byte-exact, and a peer killed
mid-transfer gives a clear error.

Behaviour, not speed: shares are checked within wide bands, and every transfer's bytes are
verified by the receiving process.
"""

from __future__ import annotations

import argparse
import io

import pytest
from rich.console import Console

from tent_async.bench import ucx_veth as V
from tent_async.testbed import VethTestbed, available

ok, why = available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.ucx,
    pytest.mark.skipif(not ok, reason=f"veth testbed unavailable: {why}"),
    pytest.mark.skipif(not V.engine_available()[0], reason=V.engine_available()[1] or "ucx backend unavailable"),
]

RATES = ["400mbit", "100mbit"]  # 50 + 12.5 MB/s: eft's fair share of the fast rail is 0.8


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    V.add_veth_arguments(parser)
    return parser.parse_args(list(argv))


def share(bytes_per_rail: dict[str, int], rail: str) -> float:
    total = sum(bytes_per_rail.values())
    return sum(n for name, n in bytes_per_rail.items() if V._is_rail(name, rail)) / total


def test_eft_bytes_per_rail_follow_the_rails_capacities() -> None:
    with VethTestbed(rates=RATES) as tb:
        names = V.rail_names(tb)
        eft, _ = V.engine_case(tb, args("--size", "24MiB", "--iterations", "1"), "eft")
        rr, _ = V.engine_case(tb, args("--size", "8MiB", "--iterations", "1"), "round_robin")
    assert eft["data_ok"]
    assert rr["data_ok"]
    fast = share(eft["bytes_per_rail"][-1], names[0])
    # ~0.8 by capacity; wide band because a loaded machine perturbs the learned rates
    assert 0.55 <= fast <= 0.95, eft["bytes_per_rail"]
    assert abs(share(rr["bytes_per_rail"][-1], names[0]) - 0.5) < 0.08  # striping ignores capacity


def test_a_rail_taken_down_mid_transfer_is_routed_around_byte_exact() -> None:
    console = Console(file=io.StringIO())
    with VethTestbed(rates=RATES) as tb:
        row = V.link_down_timeline(console, tb, args("--timeline-size", "24MiB", "--down-at", "0.3"), "eft")
    assert row["data_ok"], row
    assert row["detected_s"] is not None  # only the deadlines can notice a dead link
    kinds = {kind for _t, kind, rail in row["events"] if V._is_rail(rail, "r400")}
    assert "FAILURE" in kinds
    assert "REROUTE" in kinds


def test_a_peer_killed_mid_transfer_gives_a_clear_error() -> None:
    a = args("--timeline-size", "48MiB")
    with VethTestbed(rates=RATES) as tb:
        server_spec, client_spec = V._engine_specs(tb, a, "eft", 48 << 20)
        server_spec["timeout"] = client_spec["timeout"] = 60.0
        client_spec["mode"] = "timeline"
        with V._pair(tb, server_spec, client_spec) as (server, client):
            client.expect("connected", V._READY_TIMEOUT)
            client.tell("go")
            client.expect("started", 30)
            server.proc.kill()
            with pytest.raises(V.BenchStepError) as info:
                client.expect("timeline", 10)  # the transfer must fail, within seconds
            message = str(info.value) + "\n" + "\n".join(client.stderr[-20:])
    assert "failed before 'timeline'" in message, message
    assert "PeerClosedError: peer 'server'" in message  # names the peer that went away, and why
    assert "is gone" in message
