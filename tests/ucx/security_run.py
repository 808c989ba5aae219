"""A security campaign against one ucx engine in its own process; prints what it saw (docs/ucx.md).

    .venv/bin/python tests/ucx/security_run.py [--messages N] [--flood N] [--senders K] [--phases a,b]

Phases, each followed by a byte-exact 1 MiB WRITE + READ of an honest peer:

1. ``preauth``: N/4 connections to the control port, each sending a random or
   bit-flipped frame instead of HELLO;
2. ``link``: N/4 sealed LINK messages with malformed or mutated worker addresses
   from a peer that knows the secret;
3. ``headers``: N/2 crafted slice headers (random segment, sid, offset, length,
   inline WRITE payloads) from that peer, one per header slot as the protocol
   wants, answered by ACK, DATA or ERROR;
4. ``relay``: a relay between the honest peer and the engine, then one message of
   its own;
5. ``flood``: --flood tagged 64-byte messages to the rail's UCX port from
   --senders raw UCX clients (processes) sharing them, with the honest peer's
   4 KiB WRITEs running meanwhile and for one second after it ended.

Checks: the read-only segment and an untouched read-write one keep their bytes,
the engine stays alive, and its resident memory is reported before, at the peak
and after, with a breakdown (C heap in use, C heap free but kept, Python blocks)
after each phase, at the end, and after a ``malloc_trim`` (what that gives back
was free memory the allocator kept, not memory anyone held).  Needs ucxx; run
it alone (it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from procnet import listening_ports  # noqa: E402
from relay import tcp_relay  # noqa: E402
from test_addresses import mutations  # noqa: E402

import tent_async as tent  # noqa: E402
from conftest import PeerProcess  # noqa: E402
from tent_async.backends.ucx import protocol as p  # noqa: E402

MiB = 1 << 20
RAILS = [{"name": "lo", "device": "lo"}]
SECRET = "s3cret"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise KeyError("VmRSS")


class Peak:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.01)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


async def honest_round(engine: tent.Engine, kv: Any, src: Any, dst: Any, out: np.ndarray, data: np.ndarray) -> str:
    """A byte-exact 1 MiB WRITE and READ; retried (rails come back after quarantine) up to 5 times."""
    errors = []
    for _ in range(5):
        try:
            await asyncio.wait_for(engine.transfer(src[:], kv[:MiB]), 30)
            out[:] = 0
            await asyncio.wait_for(engine.transfer(kv[:MiB], dst[:]), 30)
        except Exception as exc:
            errors.append(type(exc).__name__)
            await asyncio.sleep(2.0)
            continue
        return ("ok" if (out == data).all() else "WRONG BYTES") + (f" after {errors}" if errors else "")
    return f"failed: {errors}"


def preauth(port: int, count: int, rng: random.Random) -> int:
    hello = p.frame(p.Hello(p.PROTOCOL_VERSION, "x", "h", (), bytes(32), bytes(32)))
    sent = 0
    for _ in range(count):
        if rng.random() < 0.5:
            junk = rng.randbytes(rng.randrange(1, 200))
        else:
            junk = bytearray(hello)
            for _ in range(rng.randrange(1, 4)):
                junk[rng.randrange(len(junk))] ^= 1 << rng.randrange(8)
            junk = bytes(junk)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(junk)
                sent += 1
        except OSError:
            pass
    return sent


def _extent_list(rng: random.Random, request: int, names: list[str], segments: dict[str, Any]) -> p.ScatterRequest:
    """A crafted inline WRITEV/READV: up to 3 segments (some unknown or stale), up to 400
    extents of 1-40 bytes (often beyond the extent budget), offsets in, at the edge of or past
    their segment."""
    table = []
    for name in rng.sample(names, rng.randint(1, min(3, len(names)))):
        seg = segments.get(name)
        sid = seg.sid if seg is not None and rng.random() < 0.9 else rng.randrange(1 << 32)
        table.append((name, sid, seg.size if seg is not None else MiB))
    count = rng.choice([1, rng.randint(2, 64), rng.randint(200, 400)])
    index = [rng.randrange(len(table)) for _ in range(count)]
    lengths = [rng.randint(1, 40) for _ in range(count)]
    offsets = [
        rng.choice([0, rng.randrange(table[i][2]), table[i][2] - n, table[i][2] - n + 1])
        for i, n in zip(index, lengths, strict=True)
    ]
    total = sum(lengths)
    packed = p.pack_table(index, [max(o, 0) for o in offsets], lengths)
    segs = tuple((name, sid) for name, sid, _size in table)
    if rng.random() < 0.5:
        return p.ScatterRequest(p.Op.WRITE, request, segs, count, total, packed, rng.randbytes(total))
    return p.ScatterRequest(p.Op.READ, request, segs, count, total, packed, inline=True)


async def headers(rogue_peer: Any, count: int, rng: random.Random, segments: dict[str, Any]) -> dict[str, int]:
    link = next(iter(rogue_peer.links.values()))
    ch = link.channel
    replies: dict[str, int] = {}
    request = 1 << 20
    names = [*segments, "nope"]
    for i in range(count):
        slot = i % rogue_peer.slots
        name = rng.choice(names)
        seg = segments.get(name)
        sid = seg.sid if seg is not None and rng.random() < 0.9 else rng.randrange(1 << 32)
        size = seg.size if seg is not None else MiB
        offset = rng.choice([0, rng.randrange(size), size - 1, size, rng.randrange(1 << 62)])
        length = rng.choice([1, rng.randrange(1, 16 * 1024), 16 * 1024, 16 * 1024 + 1, 0])
        msg: p.SliceRequest | p.ScatterRequest
        if rng.random() < 0.25:  # an inline extent list (WRITEV/READV): bounds, budget, permissions
            msg = _extent_list(rng, request, names, segments)
        elif rng.random() < 0.5 and length > 0:
            msg = p.SliceRequest(p.Op.WRITE, request, name, sid, offset, length, rng.randbytes(length))
        else:
            msg = p.SliceRequest(p.Op.READ, request, name, sid, offset, max(length, 1), inline=True)
        buf = np.zeros(4 + p.REPLY_ROOM + 16 * 1024, dtype=np.uint8)
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ch.recv_message(
            buf, p.make_tag(link.ns, p.KIND_CONTROL, request), lambda m, e, f=got: f.done() or f.set_result(m or e)
        )
        data = np.frombuffer(p.pack_data(msg), dtype=np.uint8)
        ch.keep(ch.tag_send(data, p.make_tag(link.peer_ns, p.KIND_CONTROL, slot)), data, None, send=True)
        reply = await asyncio.wait_for(got, 10)
        kind = type(reply).__name__
        replies[kind] = replies.get(kind, 0) + 1
        request += 1
    return replies


async def relay(target: PeerProcess, rails: list[Any]) -> dict[str, Any]:
    async with (
        tcp_relay(target.address) as tap,
        tent.Engine(backend="ucx", name="relayed", secret=SECRET, rails=rails) as engine,
    ):
        peer = await engine.connect(f"127.0.0.1:{tap.port}")
        await peer.segment("kv")
        leaked = [a for a in target.cmd(cmd="addresses")["addresses"] if bytes.fromhex(a) in tap.seen]
        tap.upstream[0].write(p.frame(p.Lookup(name="kv")))
        for _ in range(500):
            if peer.closed:
                break
            await asyncio.sleep(0.02)
        return {"relayed_bytes": len(tap.seen), "addresses_leaked": len(leaked), "session_ended": peer.closed}


async def main(messages: int, flood: int, senders: int = 1, phases: str = "all") -> dict[str, Any]:
    rng = random.Random(11)
    server = PeerProcess(
        {
            "name": "decode-0",
            "secret": SECRET,
            "rails": RAILS,
            "segments": [
                {"name": "kv", "size": 4 * MiB, "seed": 1},
                {"name": "ro", "size": MiB, "seed": 2, "permission": "r"},
                {"name": "untouched", "size": MiB, "seed": 3},
            ],
        }
    )
    result: dict[str, Any] = {"phases": {}}
    try:
        pid = server.proc.pid
        control = int(server.address.rsplit(":", 1)[1])
        ucx_port = next(port for port in listening_ports(pid) if port != control)
        ro0 = server.cmd(cmd="digest", segment="ro")["digest"]
        un0 = server.cmd(cmd="digest", segment="untouched")["digest"]
        rails = [tent.RailSpec(**r) for r in RAILS]
        data = np.random.default_rng(5).integers(0, 256, MiB, dtype=np.uint8)
        out = np.zeros(MiB, dtype=np.uint8)
        async with (
            tent.Engine(backend="ucx", name="honest", secret=SECRET, rails=rails) as honest,
            tent.Engine(backend="ucx", name="rogue", secret=SECRET, rails=rails) as rogue,
        ):
            hpeer = await honest.connect(server.address)
            kv = await hpeer.segment("kv")
            src, dst = honest.register(data, name="src"), honest.register(out, name="dst")
            assert await honest_round(honest, kv, src, dst, out, data) == "ok"
            await asyncio.sleep(1.0)
            base = rss(pid)
            result["rss_base_mib"] = round(base / MiB, 1)
            result["memory_base"] = server.cmd(cmd="memory")["memory"]
            peak = Peak(pid)

            async def phase(name: str, coro: Any) -> None:
                t0 = time.monotonic()
                info = await coro
                ok = await honest_round(honest, kv, src, dst, out, data)
                result["phases"][name] = {
                    "result": info,
                    "seconds": round(time.monotonic() - t0, 1),
                    "honest_round_after": ok,
                    "rss_after_mib": round(rss(pid) / MiB, 1),
                    "memory": server.cmd(cmd="memory")["memory"],
                }

            async def run_preauth() -> Any:
                return {"frames": await asyncio.to_thread(preauth, control, messages // 4, rng)}

            async def run_links() -> Any:
                real = rogue.backend.local_rails["lo"].address  # type: ignore[attr-defined]
                sent = 0
                addresses = mutations(real, rng, messages // 4)
                for start in range(0, len(addresses), 60):  # a connection may send 64 LINKs at once
                    peer = await rogue.connect(server.address)
                    for i, address in enumerate(addresses[start : start + 60]):
                        peer.send_control(p.Link(link_id=10**9 + i, rail="lo", address=address, namespace=1 + i))
                        sent += 1
                    await peer.segment("kv", refresh=True)  # answered after every LINK before it
                    await peer.close()
                return {"links": sent}

            wanted = {"preauth", "link", "headers", "relay", "flood"} if phases == "all" else set(phases.split(","))
            if "preauth" in wanted:
                await phase("preauth", run_preauth())
            if "link" in wanted:
                await phase("link", run_links())
            if "headers" in wanted:
                rpeer2 = await rogue.connect(server.address)  # the LINK phase replaced its links
                segs = {"kv": await rpeer2.segment("kv"), "ro": await rpeer2.segment("ro")}
                await phase("headers", headers(rpeer2, messages // 2, rng, segs))
            if "relay" in wanted:
                await phase("relay", relay(server, rails))

            async def run_flood() -> Any:
                attackers = [
                    subprocess.Popen(  # noqa: ASYNC220 - runs for the whole phase, polled below
                        [
                            sys.executable,
                            str(HERE / "ucx_attacker.py"),
                            "forged",
                            str(ucx_port),
                            "flood",
                            "64",
                            str(flood // senders),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(senders)
                ]
                small = honest.register(np.ones(4096, dtype=np.uint8), name="small")
                ok = failed = 0
                errors: list[str] = []
                worst = 0.0
                t0 = time.monotonic()
                while any(a.poll() is None for a in attackers):
                    t = time.monotonic()
                    try:
                        await asyncio.wait_for(honest.transfer(small[:], kv[:4096]), 10)
                        ok += 1
                    except Exception as exc:
                        failed += 1
                        if len(errors) < 5:
                            errors.append(f"{type(exc).__name__}: {exc}")
                    worst = max(worst, time.monotonic() - t)
                    await asyncio.sleep(0.01)
                during = time.monotonic() - t0
                dropped = server.cmd(cmd="stats")["stats"].get("unexpected_dropped", 0)
                t = time.monotonic()
                await asyncio.wait_for(honest.transfer(small[:], kv[:4096]), 30)
                first_after = time.monotonic() - t
                # Service within a second of the flood's end: 4 KiB WRITEs for one second.
                after_ok, after_worst, t1 = 0, 0.0, time.monotonic()
                while time.monotonic() - t1 < 1.0:
                    t = time.monotonic()
                    await asyncio.wait_for(honest.transfer(small[:], kv[:4096]), 30)
                    after_ok += 1
                    after_worst = max(after_worst, time.monotonic() - t)
                dropped_later = server.cmd(cmd="stats")["stats"].get("unexpected_dropped", 0)
                reports = []
                for attacker in attackers:
                    assert attacker.stdout is not None
                    reports.append(json.loads(attacker.stdout.read().strip().splitlines()[-1]))
                return {
                    "senders": senders,
                    "attackers": reports,
                    "writes_in_1s_after": after_ok,
                    "slowest_in_1s_after_s": round(after_worst, 3),
                    "honest_4k_writes_during": ok,
                    "honest_failed_during": failed,
                    "honest_errors": errors,
                    "honest_slowest_s": round(worst, 3),
                    "flood_s": round(during, 2),
                    "first_write_after_s": round(first_after, 3),
                    "dropped_when_it_ended": dropped,
                    "dropped_1s_after": dropped_later,
                }

            if "flood" in wanted:
                await phase("flood", run_flood())
            result["rss_peak_mib"] = round(peak.stop() / MiB, 1)
        await asyncio.sleep(3.0)
        result["rss_after_mib"] = round(rss(pid) / MiB, 1)
        result["memory_after"] = server.cmd(cmd="memory")["memory"]
        # Whose memory is it?  Collect garbage and give the C heap's free pages back (malloc_trim):
        # what that returns was free memory the allocator kept, not memory anyone holds.
        result["memory_after_trim"] = server.cmd(cmd="trim")["memory"]
        stats = server.cmd(cmd="stats")["stats"]
        result["engine_alive"] = server.proc.poll() is None
        result["ro_unchanged"] = server.cmd(cmd="digest", segment="ro")["digest"] == ro0
        result["untouched_unchanged"] = server.cmd(cmd="digest", segment="untouched")["digest"] == un0
        result["stats"] = stats
        result["messages"] = messages + flood
    finally:
        server.close()
    return result


if __name__ == "__main__":
    os.environ.setdefault("UCX_LOG_LEVEL", "fatal")  # the LINK phase makes UCX log each refused address
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000, help="fuzzed and crafted messages (phases 1-3)")
    parser.add_argument("--flood", type=int, default=100000, help="tagged messages in the flood")
    parser.add_argument("--senders", type=int, default=1, help="attacker processes sharing the flood")
    parser.add_argument("--phases", default="all", help="comma-separated subset: preauth,link,headers,relay,flood")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.messages, args.flood, args.senders, args.phases)), indent=1))
