"""Rail discovery and pairing rules (no UCX needed), and the GPU path where a GPU exists."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

import tent_async as tent
from conftest import requires_ucxx
from tent_async.backends.ucx.pairing import pair_rails, standby_links
from tent_async.backends.ucx.protocol import RailAd
from tent_async.backends.ucx.rails import RailPlan, discover, plan_from_spec, plans_from_specs, shm_config


def plan(
    name: str, kind: str, ip: str, prefix: int = 24, pair: str | None = None, standby_for: str | None = None
) -> RailPlan:
    return RailPlan(name, kind, name, ip, prefix, 1e9, 1e-5, 0, {}, pair=pair, standby_for=standby_for)


def ad(name: str, kind: str, ip: str) -> RailAd:
    return RailAd(name, kind, name, ip, 1e9, 24, b"worker-address")


def test_discovery_finds_shm_and_loopback_with_ucx_multirail_off() -> None:
    plans = {p.name: p for p in discover()}
    assert plans["shm"].kind == "shm" and plans["shm"].ucx_config == shm_config()
    assert plans["lo"].kind == "tcp" and plans["lo"].ip == "127.0.0.1"
    assert all(p.ucx_config["MAX_RNDV_RAILS"] == "1" for p in plans.values())


def test_explicit_specs_and_errors() -> None:
    spec = tent.RailSpec(name="nic", device="lo", bandwidth="1GB/s", options={"UCX_TCP_KEEPIDLE": "2s"})
    p = plan_from_spec(spec)
    assert p.ucx_config["TCP_KEEPIDLE"] == "2s" and p.ucx_config["NET_DEVICES"] == "lo" and p.bandwidth == 1e9
    with pytest.raises(tent.ConfigError, match="no IPv4"):
        plan_from_spec(tent.RailSpec(name="x", device="nonexistent0"))
    with pytest.raises(tent.ConfigError, match="cuda:N"):
        plan_from_spec(tent.RailSpec(name="g", device="cuda:x"))


def test_pairing_only_pairs_rails_that_can_meet() -> None:
    local = [plan("shm", "shm", "127.0.0.1", 8), plan("lo", "tcp", "127.0.0.1", 8), plan("eth0", "tcp", "10.0.0.1")]
    remote = [ad("shm", "shm", "127.0.0.1"), ad("lo", "tcp", "127.0.0.1"), ad("eth0", "tcp", "10.0.0.2")]
    same = pair_rails(local, remote, same_host=True)
    assert [(p.local.name, p.remote.name, p.dial) for p in same] == [
        ("shm", "shm", "127.0.0.1"),
        ("lo", "lo", "127.0.0.1"),
        ("eth0", "eth0", "10.0.0.2"),
    ]
    other = pair_rails(local, remote, same_host=False)
    assert [(p.local.name, p.remote.name) for p in other] == [("eth0", "eth0")]
    assert other[0].rail_name("decode-0") == "decode-0/eth0"
    # another subnet: nothing, unless paired explicitly
    far = [ad("nic", "tcp", "192.168.5.5")]
    assert pair_rails(local, far, same_host=False) == []
    explicit = pair_rails([plan("eth0", "tcp", "10.0.0.1", pair="nic")], far, same_host=False)
    assert explicit[0].rail_name("p") == "p/eth0:nic" and explicit[0].dial == "192.168.5.5"
    # one-to-one: two local NICs facing one remote NIC make one rail
    two = [plan("a", "tcp", "10.0.0.1"), plan("b", "tcp", "10.0.0.3")]
    assert len(pair_rails(two, [ad("eth0", "tcp", "10.0.0.2")], same_host=False)) == 1


def test_discovered_tcp_rails_stand_by_for_shm_on_the_same_host_only() -> None:
    local = [plan("shm", "shm", "127.0.0.1", 8), plan("lo", "tcp", "127.0.0.1", 8), plan("eth0", "tcp", "10.0.0.1")]
    remote = [ad("shm", "shm", "127.0.0.1"), ad("lo", "tcp", "127.0.0.1"), ad("eth0", "tcp", "10.0.0.2")]
    same = pair_rails(local, remote, same_host=True)
    assert standby_links(same, same_host=True, discovered=True) == {"lo": "shm", "eth0": "shm"}
    # Rails the user named are pooled as given ...
    assert standby_links(same, same_host=True, discovered=False) == {}
    # ... another host has no shared memory to stand by for ...
    assert standby_links(pair_rails(local, remote, same_host=False), same_host=False, discovered=True) == {}
    # ... and without a shared-memory pair (it failed to wire up) TCP carries as before.
    assert standby_links(same[1:], same_host=True, discovered=True) == {}


def test_a_rail_spec_may_name_the_rail_it_stands_by_for() -> None:
    local = [plan("nic0", "tcp", "10.0.0.1"), plan("mgmt", "tcp", "10.0.1.1", standby_for="nic0")]
    remote = [ad("nic0", "tcp", "10.0.0.2"), ad("mgmt", "tcp", "10.0.1.2")]
    pairs = pair_rails(local, remote, same_host=False)
    assert standby_links(pairs, same_host=False, discovered=False) == {"mgmt": "nic0"}
    assert standby_links(pairs[1:], same_host=False, discovered=False) == {}  # nic0 does not reach this peer
    spec = tent.RailSpec(name="b", device="lo", options={"standby_for": "a"})
    assert plan_from_spec(spec).standby_for == "a" and "standby_for" not in plan_from_spec(spec).ucx_config
    a = tent.RailSpec(name="a", device="shm")
    assert [p.standby_for for p in plans_from_specs([a, spec])] == [None, "a"]
    with pytest.raises(tent.ConfigError, match="which is not a rail here"):
        plans_from_specs([spec])
    with pytest.raises(tent.ConfigError, match="cannot stand by for itself"):
        plans_from_specs([tent.RailSpec(name="a", device="shm", options={"standby_for": "a"})])
    chain = tent.RailSpec(name="c", device="lo", options={"standby_for": "b"})
    with pytest.raises(tent.ConfigError, match="itself stands by"):
        plans_from_specs([a, spec, chain])


@requires_ucxx
@pytest.mark.ucx
@pytest.mark.gpu
@pytest.mark.anyio
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed (gpu extra)")
async def test_gpu_segments_over_cuda_rails(spawn_peer: Any) -> None:  # pragma: no cover - needs a GPU
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA runtime: {exc}")
    server = spawn_peer(
        name="gpu-peer", rails=[{"name": "cuda0", "device": "cuda:0"}], segments=[{"name": "kv", "size": 1 << 20}]
    )
    async with tent.Engine(backend="ucx", name="gpu-client", rails=[tent.RailSpec(name="cuda0", device="cuda:0")]) as e:
        peer = await e.connect(server.address)
        kv = await peer.segment("kv")
        src = e.register(cupy.arange(1 << 20, dtype=cupy.uint8), name="src")
        await e.transfer(src[:], kv[:])
        expect = (np.arange(1 << 20) % 256).astype(np.uint8)
        assert server.cmd(cmd="read", segment="kv", start=0, stop=16)["hex"] == expect[:16].tobytes().hex()
