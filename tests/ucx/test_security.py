"""What hosts without the secret, and peers that break the protocol, can make an engine do.

Memory bounds are behavioural: the serving engine runs in its own process and
its resident set (``VmRSS`` in ``/proc/<pid>/status``) is sampled while the
attack runs.  See docs/ucx.md, "Threat model".
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from procnet import listening_ports

import tent_async as tent
from conftest import PeerProcess, requires_ucxx
from tent_async.backends.ucx import protocol as p
from tent_async.backends.ucx import server as srv

pytestmark = [pytest.mark.ucx, pytest.mark.anyio, requires_ucxx]

MiB = 1 << 20
ATTACK = 256 * MiB
BOUND = 64 * MiB  # what an attack may add to the serving process's resident memory
RAILS = [{"name": "lo", "device": "lo"}, {"name": "shm", "device": "shm"}]
ATTACKER = Path(__file__).with_name("ucx_attacker.py")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RssWatch:
    """The largest VmRSS of a process, sampled every 5 ms, above its level at the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = status_kib(pid, "VmRSS") * 1024
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS") * 1024)
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak - self.base


def attack(how: str, port: int, mode: str, size: int = ATTACK, count: int = 1) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(ATTACKER), how, str(port), mode, str(size), str(count)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, f"attacker failed: {out.stdout[-2000:]} {out.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


async def settle() -> None:
    """Let the serving process reach a steady resident size before a measurement starts."""
    await anyio.sleep(1.0)


def push(s: socket.socket, nbytes: int) -> bool:
    """Try to send ``nbytes``; True if the other side closed the connection first."""
    chunk = bytes(MiB)
    try:
        for _ in range(nbytes // MiB):
            s.sendall(chunk)
    except OSError:
        return True
    return False


@pytest.fixture
def guarded(spawn_peer: Any) -> PeerProcess:
    server: PeerProcess = spawn_peer(
        name="decode-0", secret="s3cret", rails=RAILS, segments=[{"name": "kv", "size": 4 * MiB, "seed": 1}]
    )
    return server


async def serves_a_legitimate_peer(server: PeerProcess) -> None:
    async with tent.Engine(
        backend="ucx", name="prefill-0", secret="s3cret", rails=[tent.RailSpec(**r) for r in RAILS]
    ) as e:
        with anyio.fail_after(30):
            peer = await e.connect(server.address)
            kv = await peer.segment("kv")
            src = e.register(np.full(4 * MiB, 9, dtype=np.uint8), name="src")
            await e.transfer(src[:], kv[:])
            out = np.zeros(4 * MiB, dtype=np.uint8)
            back = e.register(out, name="back")
            await e.transfer(kv[:], back[:])
        assert (out == 9).all()


async def test_unauthenticated_hosts_cannot_make_the_engine_allocate(guarded: PeerProcess) -> None:
    """Everything that listens: the control port, and the UCX transport's own ports."""
    server = guarded
    pid = server.proc.pid
    control = int(server.address.rsplit(":", 1)[1])
    ports = listening_ports(pid)
    assert control in ports
    await settle()
    watch = RssWatch(pid)
    try:
        # 1. The control port: a 256 MiB frame before the handshake is refused at its header,
        #    and the connection closed before the bytes could follow.
        with socket.create_connection(("127.0.0.1", control)) as s:
            s.settimeout(5)
            s.recv(4096)  # CHALLENGE
            s.sendall(ATTACK.to_bytes(4, "big"))
            assert push(s, ATTACK)
        # 2. Many unauthenticated connections at once: beyond a few dozen they are closed at once.
        crowd = [socket.create_connection(("127.0.0.1", control)) for _ in range(200)]
        for s in crowd:
            s.close()
        # 3. Raw UCX clients dialling every port, the standard way (as one dials a UCX listener).
        for port in ports:
            for mode in ("am", "stream", "eager"):
                attack("sockaddr", port, mode)
    finally:
        growth = watch.stop()
    print(f"growth {growth / MiB:.1f} MiB")
    assert growth < BOUND, f"the serving engine grew by {growth / MiB:.0f} MiB"
    stats = server.cmd(cmd="stats")["stats"]
    assert stats.get("handshake_refused", 0) >= 1
    await serves_a_legitimate_peer(server)


async def test_a_forged_worker_address_reaches_only_tag_matching(guarded: PeerProcess) -> None:
    """The residual risk: UCX's tcp transport port answers anyone who forges a worker address.

    Active messages and streams are not enabled, and a large tagged message
    waits at its sender until a receive matches, so none of those cost the
    engine memory.  Forced-eager tagged messages are pushed whole and UCX
    keeps them until they are matched: the sweeper drops them, and the memory
    they took is reused rather than added up (docs/ucx.md, "Threat model").
    """
    server = guarded
    pid = server.proc.pid
    control = int(server.address.rsplit(":", 1)[1])
    ucx_ports = [port for port in listening_ports(pid) if port != control]
    assert ucx_ports, "the lo rail's UCX tcp transport listens on a port"
    await settle()
    watch = RssWatch(pid)
    try:
        for port in ucx_ports:
            for mode in ("am", "stream", "tag"):
                result = attack("forged", port, mode)
                if "skip" in result:
                    pytest.skip(result["skip"])
    finally:
        growth = watch.stop()
    print(f"growth {growth / MiB:.1f} MiB")
    assert growth < BOUND, f"the serving engine grew by {growth / MiB:.0f} MiB"
    # Forced eager: UCX holds each message until the sweeper matches it away.
    await settle()
    watch = RssWatch(pid)
    try:
        attack("forged", ucx_ports[0], "eager", size=64 * MiB, count=4)
        await anyio.sleep(0.5)
    finally:
        growth = watch.stop()
    stats = server.cmd(cmd="stats")["stats"]
    print(f"eager growth {growth / MiB:.1f} MiB, {stats}")
    assert stats.get("unexpected_dropped", 0) >= 4
    assert growth < 3 * 64 * MiB, f"4 x 64 MiB eager messages grew the engine by {growth / MiB:.0f} MiB"
    await serves_a_legitimate_peer(server)


@pytest.mark.parametrize("how", ["oversized", "no-slot"])
async def test_a_peer_breaking_the_data_protocol_loses_only_its_own_connection(spawn_peer: Any, how: str) -> None:
    """An authenticated peer sends a header larger than its slot, or one no slot was posted for."""
    server = spawn_peer(name="decode-0", rails=RAILS[:1], segments=[{"name": "kv", "size": MiB, "seed": 1}])
    lo = [tent.RailSpec(**RAILS[0])]
    async with (
        tent.Engine(backend="ucx", name="rogue", rails=lo) as rogue,
        tent.Engine(backend="ucx", name="honest", rails=lo) as honest,
    ):
        with anyio.fail_after(30):
            peer = await rogue.connect(server.address)
            other = await honest.connect(server.address)
        link = next(iter(peer.links.values()))
        ch = link.channel
        assert ch is not None
        if how == "oversized":  # 1 MiB into a slot sized for a header with 16 KiB inline
            message = np.zeros(MiB, dtype=np.uint8)
            tag = p.make_tag(link.peer_ns, p.KIND_CONTROL, link.free_slots[-1])
        else:  # a well-formed header for a slot the server never posted
            message = np.frombuffer(p.pack_data(p.Bind(request=1)), dtype=np.uint8)
            tag = p.make_tag(link.peer_ns, p.KIND_CONTROL, peer.slots + 5)
        ch.keep(ch.tag_send(message, tag), message, None, send=True)
        for _ in range(1000):  # another process: no event to wait on
            if peer.closed:
                break
            await anyio.sleep(0.01)
        assert peer.closed
        assert "protocol violation" in peer.closed_reason()
        stats = server.cmd(cmd="stats")["stats"]
        assert stats["protocol_errors"] >= 1
        if how == "oversized":
            assert stats["truncated"] >= 1
        # The other peer's connection is untouched.
        kv = await other.segment("kv")
        src = honest.register(np.full(MiB, 5, dtype=np.uint8), name="src")
        with anyio.fail_after(30):
            await honest.transfer(src[:], kv[:])
        assert server.cmd(cmd="read", segment="kv", start=0, stop=4)["hex"] == "05050505"


async def test_a_short_read_answer_is_never_reported_complete(spawn_peer: Any) -> None:
    """The peer sends half the bytes of every large READ: the receive completes, the READ must not."""
    server = spawn_peer(name="liar", short_reads=True, rails=RAILS, segments=[{"name": "kv", "size": MiB, "seed": 3}])
    rails = [tent.RailSpec(**r) for r in RAILS]
    # cma=False: the checks of UCX's path (a direct copy on shm reads the peer's memory itself, cma.py)
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, cma=False) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        out = np.zeros(MiB, dtype=np.uint8)
        dst = engine.register(out, name="dst")
        with anyio.fail_after(30), pytest.raises(tent.ProtocolError, match=r"sent \d+ bytes for a \d+-byte READ"):
            await engine.transfer(kv[:], dst[:])
        assert engine.backend.stats["protocol_errors"] >= 1  # type: ignore[attr-defined]
        # Small READs (answered inline) are not affected by the fault and still complete.
        with anyio.fail_after(30):
            await engine.transfer(kv[:4096], dst[:4096])
        assert out[:4096].tobytes().hex() == server.cmd(cmd="read", segment="kv", start=0, stop=4096)["hex"]


async def test_descriptors_and_threads_stay_flat_across_connect_close_cycles(spawn_peer: Any) -> None:
    server = spawn_peer(name="decode-0", rails=RAILS, segments=[{"name": "kv", "size": MiB, "seed": 1}])

    async def cycle(i: int) -> None:
        async with tent.Engine(backend="ucx", name=f"client-{i}", rails=[tent.RailSpec(**r) for r in RAILS]) as e:
            with anyio.fail_after(30):
                peer = await e.connect(server.address)
                kv = await peer.segment("kv")
                buf = e.register(np.full(MiB, i, dtype=np.uint8), name="buf")
                await e.transfer(buf[:], kv[:])
                await e.transfer(kv[:], buf[:])

    await cycle(0)
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    server_fds = server.cmd(cmd="fds")["fds"]
    for i in range(1, 9):
        await cycle(i)
    await anyio.sleep(0.5)  # the server notices the last client's goodbye
    assert len(os.listdir("/proc/self/fd")) - fds <= 2
    assert threading.active_count() == threads
    assert server.cmd(cmd="fds")["fds"] - server_fds <= 2


@pytest.mark.parametrize("first_attempt", [1, (1 << 23) - 4], ids=["fresh", "ids-past-the-tag-index"])
async def test_write_bytes_that_overtake_their_header_are_kept_for_it(spawn_peer: Any, first_attempt: int) -> None:
    """The sweeper finds a WRITE's bytes before their header was dispatched: kept, then received.

    Tags carry only an attempt id's low 23 bits; a long-running engine's ids outgrow them
    (the second case crosses that boundary), and early bytes must still find their header.
    """
    server = spawn_peer(
        name="slow",
        slow_headers=True,
        rails=RAILS[:1],
        segments=[{"name": "kv", "size": 4 * MiB, "seed": 1}, {"name": "ro", "size": MiB, "permission": "r"}],
    )
    # Every header waits 50 ms on the peer: deadlines that allow for it.
    config = tent.SchedulerConfig(target_slice_time=4e-3, window=3, deadline_floor=1.0)
    rails = [tent.RailSpec(**RAILS[0])]
    async with tent.Engine(backend="ucx", name="prefill-0", rails=rails, config=config) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
            ro = await peer.segment("ro")
        data = np.random.default_rng(7).integers(0, 256, 4 * MiB, dtype=np.uint8)
        src = engine.register(data, name="src")
        assert engine._planner is not None
        engine._planner._next_aid = first_attempt
        with anyio.fail_after(30):
            await engine.transfer(src[:], kv[:])
        digest = server.cmd(cmd="digest", segment="kv")["digest"]
        assert digest == hashlib.sha256(data.tobytes()).hexdigest()
        # A refused WRITE whose bytes came early: dropped, nothing written, the link lives on.
        forged = tent.RemoteSegment(peer, "ro", ro.size, "host", "rw", ro.sid)
        with anyio.fail_after(30), pytest.raises(tent.RemoteAccessError, match="read-only"):
            await engine.transfer(src[:MiB], forged[:])
        with anyio.fail_after(30):
            await engine.transfer(src[:MiB], kv[:MiB])
        stats = server.cmd(cmd="stats")["stats"]
        assert stats.get("early_writes", 0) >= 1, stats
        assert stats.get("protocol_errors", 0) == 0, stats


async def test_idle_handshakes_cannot_lock_new_peers_out(guarded: PeerProcess) -> None:
    """Slowloris: sockets that connect and never say HELLO, from many source addresses (issue 11, finding 7).

    Each source may hold a few handshakes; when all are taken the oldest one
    makes room, so a legitimate peer still gets in.
    """
    server = guarded
    control = int(server.address.rsplit(":", 1)[1])
    idle = []
    try:
        for source in range(2, 12):  # 127.0.0.2-11: every 127/8 address is this host's
            for _ in range(srv.MAX_PENDING_PER_SOURCE + 2):
                s = socket.socket()
                s.bind((f"127.0.0.{source}", 0))
                s.connect(("127.0.0.1", control))
                idle.append(s)
        await anyio.sleep(0.5)
        await serves_a_legitimate_peer(server)
        stats = server.cmd(cmd="stats")["stats"]
        assert stats.get("handshakes_evicted", 0) >= 1  # 10 sources x 16 > 32 at once
        assert stats["handshake_refused"] >= 10 * 2  # each source's last two sockets
    finally:
        for s in idle:
            s.close()


async def test_a_flood_of_unexpected_messages_is_dropped_while_a_peer_keeps_transferring(
    guarded: PeerProcess,
) -> None:
    """Issue 11, finding 6: many small tagged messages at a rail's UCX port, from a forged address."""
    server = guarded
    pid = server.proc.pid
    control = int(server.address.rsplit(":", 1)[1])
    ucx_port = next(port for port in listening_ports(pid) if port != control)
    count = 30_000
    await settle()
    watch = RssWatch(pid)
    async with tent.Engine(
        backend="ucx", name="prefill-0", secret="s3cret", rails=[tent.RailSpec(**r) for r in RAILS]
    ) as engine:
        with anyio.fail_after(30):
            peer = await engine.connect(server.address)
            kv = await peer.segment("kv")
        src = engine.register(np.full(4096, 7, dtype=np.uint8), name="src")
        flood = subprocess.Popen(  # noqa: ASYNC220 - runs while the transfers below do
            [sys.executable, str(ATTACKER), "forged", str(ucx_port), "flood", "64", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        done = 0
        try:
            while flood.poll() is None:
                with anyio.fail_after(30):
                    await engine.transfer(src[:], kv[:4096])
                done += 1
                await anyio.sleep(0.005)
        finally:
            out, _ = flood.communicate(timeout=60)
        if '"skip"' in out:
            pytest.skip(out)
        with anyio.fail_after(30):
            await engine.transfer(src[:], kv[:4096])  # and right after it
        for _ in range(600):  # another process: poll its counters
            if server.cmd(cmd="stats")["stats"].get("unexpected_dropped", 0) >= count:
                break
            await anyio.sleep(0.05)
    growth = watch.stop()
    assert server.cmd(cmd="stats")["stats"]["unexpected_dropped"] >= count
    assert done >= 1
    assert growth < BOUND, f"the serving engine grew by {growth / MiB:.0f} MiB"
