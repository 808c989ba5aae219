"""No byte of a peer's UCX worker address reaches UCX unchecked (issue 11, finding 4).

UCX unpacks a worker address without knowing its length; a malformed one
crashed the process (SIGABRT/SIGSEGV) within a few LINKs.  Addresses are now
parsed and compared with the local rail's own address first
(``backends/ucx/address.py``).  The fuzz test sends thousands of malformed and
mutated addresses to an engine in another process, which must survive them
all and keep serving.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tent_async as tent
from conftest import requires_ucxx
from tent_async.backends.ucx import address as addr
from tent_async.backends.ucx import backend as ucx_backend
from tent_async.backends.ucx import protocol as p

pytestmark = [pytest.mark.ucx, requires_ucxx]

MiB = 1 << 20
RAILS = [{"name": "lo", "device": "lo"}, {"name": "shm", "device": "shm"}]

# Real addresses of UCX 1.21 (tcp over lo, posix shared memory), as a peer would send them.
LO = bytes.fromhex(
    "201b0a2ef1604fbc9900120102a5822365f6c1ecb0f9ffffef00000000cf1917b75138539e3e4bd7e037370113230082975d8580"
)
SHM = bytes.fromhex(
    "20108d9cb28e0e84c10000637577cc2b320040975000000000004f03008876d396cbad77328a0108a5822365f6c1ec30a7d377cc2b32"
    "0000705077ccab33004f230088891300c0020000c08580"
)


def mutations(real: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = [b"", b"\x20", bytes(40), rng.randbytes(40), real[:-1], real + b"\x00", real[:9]]
    while len(out) < count:
        how = rng.randrange(4)
        data = bytearray(real)
        if how == 0:
            out.append(rng.randbytes(rng.randrange(1, 120)))
            continue
        if how == 1:  # flip a few bits anywhere
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == 2:  # overwrite a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # cut or extend
            cut = rng.randrange(len(data))
            data = data[:cut] + bytearray(rng.randbytes(rng.randrange(0, 8)))
        out.append(bytes(data))
    return out


def test_own_addresses_parse_and_match_themselves() -> None:
    for real, kind in ((LO, "tcp"), (SHM, "shm")):
        parsed = addr.parse(real)
        assert parsed.devices
        addr.check_peer_address(real, real, kind=kind)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_parsing_any_bytes_raises_only_address_error(data: bytes) -> None:
    for own, kind in ((LO, "tcp"), (SHM, "shm")):
        with contextlib.suppress(addr.AddressError):
            addr.check_peer_address(data, own, kind=kind)


def test_mutated_addresses_are_refused_unless_only_their_contents_changed() -> None:
    rng = random.Random(1)
    refused = 0
    for data in mutations(LO, rng, 2000):
        try:
            addr.check_peer_address(data, LO, kind="tcp")
        except addr.AddressError:
            refused += 1
            continue
        assert len(data) == len(LO)  # what passes has our layout
    assert refused > 1000
    assert isinstance(addr.AddressError("x"), p.ProtocolError)


@pytest.mark.anyio
async def test_malformed_worker_addresses_in_link_never_crash_the_serving_engine(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=RAILS, segments=[{"name": "kv", "size": MiB, "seed": 1}])
    rails = [tent.RailSpec(**r) for r in RAILS]
    async with tent.Engine(backend="ucx", name="rogue", rails=rails) as rogue:
        rng = random.Random(7)
        sent = 0
        for rail in ("lo", "shm"):
            real = rogue.backend.local_rails[rail].address  # type: ignore[attr-defined]
            addresses = mutations(real, rng, 400)
            for start in range(0, len(addresses), 50):  # a connection may send 64 LINKs at once
                with anyio.fail_after(30):
                    peer = await rogue.connect(server.address)
                for i, data in enumerate(addresses[start : start + 50]):
                    peer.send_control(p.Link(link_id=10**9 + sent, rail=rail, address=data, namespace=1 + i))
                    sent += 1
                await peer.segment("kv", refresh=True)  # answered after every LINK before it
                await peer.close()
        with anyio.fail_after(60):
            while True:  # another process: poll until it has looked at every LINK
                stats = server.cmd(cmd="stats")["stats"]
                if stats.get("protocol_errors", 0) >= sent // 2:
                    break
                await anyio.sleep(0.2)
        assert server.proc.poll() is None, "the serving engine died"
        refused = server.cmd(cmd="stats")["stats"]["protocol_errors"]
        print(f"{sent} LINKs: {refused} addresses refused by the check, {sent - refused} handed to UCX")
        assert refused < sent  # some mutated contents passed the check and reached UCX, harmlessly
        # Nothing that a refused or failed link set-up registered stays behind (finding 7).
        held = server.cmd(cmd="internals")["internals"]
        assert held == {"channels": 0, "namespaces": 0, "connections": 0, "links": 0}, held
    # It still serves an honest peer.
    async with tent.Engine(backend="ucx", name="honest", rails=rails) as honest:
        with anyio.fail_after(30):
            other = await honest.connect(server.address)
            kv = await other.segment("kv")
            src = honest.register(np.full(MiB, 5, dtype=np.uint8), name="src")
            await honest.transfer(src[:], kv[:])
        assert server.cmd(cmd="read", segment="kv", start=0, stop=4)["hex"] == "05050505"


@pytest.mark.anyio
async def test_a_server_sending_malformed_worker_addresses_cannot_crash_the_client(spawn_peer: Any) -> None:
    server = spawn_peer(name="bad", bad_addresses=True, rails=RAILS, segments=[{"name": "kv", "size": MiB}])
    async with tent.Engine(backend="ucx", name="client", rails=[tent.RailSpec(**r) for r in RAILS]) as engine:
        for _ in range(5):
            with anyio.fail_after(30), pytest.raises(tent.PeerConnectError, match="worker address"):
                await engine.connect(server.address)
        assert engine.backend.stats["protocol_errors"] >= 5  # type: ignore[attr-defined]


# A real UCX 1.21 address of a tcp rail on a NIC (192.0.2.2, port 51365): device address
# "0002c0000202" is (flags 0, AF_INET, the IPv4 address).
ETH = bytes.fromhex("20ef0b38cde5ad086600060002c0000202cf1917b751389763344bd7e037370013230082c8a58580")
ETH_NET = ipaddress.IPv4Network("192.0.2.0/24")


def _pointing_at(real: bytes, ip: str) -> bytes:
    at = real.index(bytes.fromhex("0002c0000202"))
    return real[: at + 2] + ipaddress.IPv4Address(ip).packed + real[at + 6 :]


def test_a_tcp_address_must_point_into_the_rail_subnet_or_at_the_control_address() -> None:
    """What the peer advertised does not matter, and nothing allowed means nothing passes (review)."""
    addr.check_peer_address(ETH, ETH, kind="tcp", allowed=[ETH_NET])
    elsewhere = _pointing_at(ETH, "198.51.100.7")
    with pytest.raises(addr.AddressError, match="outside this rail's subnet"):
        addr.check_peer_address(elsewhere, ETH, kind="tcp", allowed=[ETH_NET])
    with pytest.raises(addr.AddressError, match="outside this rail's subnet"):
        addr.check_peer_address(ETH, ETH, kind="tcp")  # an empty list no longer skips the check
    control = ipaddress.IPv4Network("198.51.100.7/32")
    addr.check_peer_address(elsewhere, ETH, kind="tcp", allowed=[ETH_NET, control])


def _nic() -> tuple[str, str] | None:
    """An interface with a non-loopback IPv4 address, and that address."""
    import psutil

    for name, entries in sorted(psutil.net_if_addrs().items()):
        for entry in entries:
            if entry.family == socket.AF_INET and entry.address and not entry.address.startswith("127."):
                return name, entry.address
    return None


@pytest.mark.anyio
async def test_a_peer_advertising_an_address_cannot_make_the_engine_dial_it(
    spawn_peer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes: a client claims a rail at 198.51.100.7 and sends a LINK pointing there.

    Before the review fix the server checked TCP worker addresses against the rails the
    client advertised in HELLO, so the claim was enough to make the server's UCX dial it.
    """
    nic = _nic()
    if nic is None:
        pytest.skip("no interface with a non-loopback IPv4 address")
    device, ip = nic
    rails = [{"name": "eth", "device": device}]
    server = spawn_peer(name="decode-0", rails=rails, listen=f"{ip}:0", segments=[{"name": "kv", "size": MiB}])
    fake = "198.51.100.7"
    real_hello = ucx_backend.Hello

    def hello(**fields: Any) -> Any:
        claim = p.RailAd(name="fake", kind="tcp", device="eth9", ip=fake, bandwidth=1e9, prefix=24, address=b"")
        fields["rails"] = (*fields["rails"], claim)
        return real_hello(**fields)

    monkeypatch.setattr(ucx_backend, "Hello", hello)
    async with tent.Engine(backend="ucx", name="rogue", rails=[tent.RailSpec(**rails[0])]) as rogue:
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)  # its honest link (pointing at its own NIC) is up
        assert peer.rails
        before = server.cmd(cmd="stats")["stats"].get("protocol_errors", 0)
        own = rogue.backend.local_rails["eth"].address  # type: ignore[attr-defined]
        at = own.index(bytes([0, socket.AF_INET]) + socket.inet_aton(ip))
        forged = own[: at + 2] + socket.inet_aton(fake) + own[at + 6 :]
        peer.send_control(p.Link(link_id=10**9, rail="eth", address=forged, namespace=12345))
        with anyio.fail_after(30):
            await peer.segment("kv", refresh=True)  # answered after the LINK before it
            for _ in range(600):  # another process: no event to wait on
                if server.cmd(cmd="stats")["stats"].get("protocol_errors", 0) > before:
                    break
                await anyio.sleep(0.05)
        assert server.cmd(cmd="stats")["stats"].get("protocol_errors", 0) > before
        assert server.proc.poll() is None
