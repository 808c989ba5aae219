"""A ucx engine in its own process, driven over stdin/stdout with JSON lines (test helper).

    python tests/ucx/serve_engine.py '{"name": "decode-0", "segments": [...], ...}'

Prints ``{"address": ...}`` once listening, then answers one JSON command per
line: ``digest`` (sha256 of a segment range), ``read`` (hex of a range),
``fill`` (reset a segment from its seed), ``notes`` (notifications so far),
``stats`` (the backend's counters), ``fds`` (open descriptors), ``unregister``/``register``,
``pull`` (connect to another engine and READ one of its segments over and over, in the
background; ``pulled`` says how many READs finished and how the loop ended), ``quit``.
It runs in a fresh interpreter (never forked from a process that uses UCX).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import json
import sys
from typing import Any

import numpy as np

import tent_async as tent


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    return ctypes.CDLL(None)


def memory_report() -> dict[str, Any]:
    """Resident memory, what the C heap holds (in use / free but kept) and Python's own view."""
    with open("/proc/self/status") as fh:
        rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
    out: dict[str, Any] = {
        "rss_mib": round(rss / 2**20, 1),
        "py_blocks": sys.getallocatedblocks(),
        "gc_objects": len(gc.get_objects()),
    }
    libc = _libc()
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
        info = libc.mallinfo2()
        out["heap_in_use_mib"] = round((info.uordblks + info.hblkhd) / 2**20, 1)
        out["heap_free_kept_mib"] = round(info.fordblks / 2**20, 1)
        out["heap_arena_mib"] = round(info.arena / 2**20, 1)
    return out


def trim_heap() -> bool:
    gc.collect()
    libc = _libc()
    if not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def pattern(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


async def main(config: dict[str, Any]) -> None:
    rails = None
    if config.get("rails") is not None:
        rails = [tent.RailSpec(**spec) for spec in config["rails"]]
    options = {k: config[k] for k in ("secret", "withdraw_grace", "progress", "cma") if k in config}
    if "protocol_version" in config:  # tests: pretend to speak another protocol version
        from tent_async.backends.ucx import protocol

        protocol.PROTOCOL_VERSION = config["protocol_version"]  # type: ignore[misc]
        from tent_async.backends.ucx import backend, server

        backend.PROTOCOL_VERSION = config["protocol_version"]  # type: ignore[attr-defined]
        server.PROTOCOL_VERSION = config["protocol_version"]  # type: ignore[attr-defined]
    if config.get("bulk_wait"):  # tests: a short deadline for a served slice's bulk bytes
        from tent_async.backends.ucx import scatter

        scatter.BULK_WAIT = config["bulk_wait"]
    if config.get("staging_per_link"):  # tests: a small bound on scatter-gather staging
        from tent_async.backends.ucx import scatter

        scatter.STAGING_PER_LINK = config["staging_per_link"]
    if config.get("staging_per_engine"):  # tests: a small engine-wide bound (one connection may take it all)
        from tent_async.backends.ucx import scatter

        scatter.STAGING_PER_ENGINE = scatter.STAGING_PER_CONNECTION = config["staging_per_engine"]
    if config.get("short_reads"):  # tests: a peer that answers large READs with half the bytes (and says so)
        import attrs

        from tent_async.backends.ucx import server
        from tent_async.backends.ucx.protocol import Op

        serve = server.Server.serve

        def short_serve(self: Any, link: Any, msg: Any) -> None:
            if msg.op is Op.READ and not msg.inline:
                msg = attrs.evolve(msg, length=msg.length // 2)
            serve(self, link, msg)

        server.Server.serve = short_serve  # type: ignore[method-assign]
    if config.get("retry_refusals"):  # tests: every refusal says "retry" (as a busy peer's would)
        from tent_async.backends.ucx import server as retrying

        refuse = retrying.ServerLink.refuse

        def retry_refuse(self: Any, request: int, reason: str, *, retry: bool = False) -> None:
            refuse(self, request, reason, retry=True)

        retrying.ServerLink.refuse = retry_refuse  # type: ignore[method-assign]
    if config.get("lying_reads"):  # tests: sends half of every large READ but claims the whole of it
        import attrs

        from tent_async.backends.ucx import server as lying
        from tent_async.backends.ucx.protocol import Op

        serve_read = lying.Server.serve

        def lying_serve(self: Any, link: Any, msg: Any) -> None:
            if msg.op is not Op.READ or msg.inline:
                serve_read(self, link, msg)
                return
            after_send = self._after_send
            # The reply is built from the request it is given: the whole one, with its true tail.
            self._after_send = lambda link_, seg, _short, mark: after_send(link_, seg, msg, mark)
            try:
                serve_read(self, link, attrs.evolve(msg, length=msg.length // 2))
            finally:
                del self._after_send

        lying.Server.serve = lying_serve  # type: ignore[method-assign]
    if config.get("bad_addresses"):  # tests: a server whose WELCOME carries malformed worker addresses
        import os as os_

        import attrs

        from tent_async.backends.ucx import site as bad

        rail_ads = bad.Site.rail_ads

        def bad_ads(self: Any) -> Any:
            return tuple(attrs.evolve(ad, address=os_.urandom(40)) for ad in rail_ads(self))

        bad.Site.rail_ads = bad_ads  # type: ignore[method-assign]
    if config.get("done_wait"):  # tests: how long a direct copy's DONE may take (server.DONE_WAIT)
        from tent_async.backends.ucx import server as srv_done

        srv_done.DONE_WAIT = float(config["done_wait"])
    if config.get("slow_headers"):  # tests: headers dispatched late, so WRITE bytes overtake them
        from tent_async.backends.ucx import server as srv

        on_header = srv.ServerLink._on_header

        def slow_header(self: Any, slot: int, msg: Any, error: Any) -> None:
            asyncio.get_running_loop().call_later(0.05, on_header, self, slot, msg, error)

        srv.ServerLink._on_header = slow_header  # type: ignore[method-assign]
    notes: list[dict[str, Any]] = []
    async with tent.Engine(
        backend="ucx",
        name=config.get("name", "server"),
        listen=config.get("listen", "127.0.0.1:0"),
        rails=rails,
        **options,
    ) as engine:
        buffers: dict[str, np.ndarray] = {}
        many = config.get("many_segments")  # tests: {"count": N, "name_length": L}, 16 bytes each
        for i in range(many["count"] if many else 0):
            name = f"{i:06d}".rjust(many["name_length"], "s")
            buffers[name] = np.zeros(16, dtype=np.uint8)
            engine.register(buffers[name], name=name)
        for seg in config.get("segments", []):
            buffers[seg["name"]] = pattern(seg.get("seed", 0), seg["size"])
            engine.register(buffers[seg["name"]], name=seg["name"], permission=seg.get("permission", "rw"))

        async def collect() -> None:
            async for note in engine.notifications():
                # what the data looks like when the notification arrives (ordering check)
                digest = None
                if note.message.startswith("check "):
                    _, name, start, stop = note.message.split()
                    digest = hashlib.sha256(buffers[name][int(start) : int(stop)].tobytes()).hexdigest()
                notes.append({"message": note.message, "source": note.source, "digest": digest})

        if config.get("read_notes", True):  # tests: False leaves them queued, unread
            asyncio.get_running_loop().create_task(collect())
        print(
            json.dumps(
                {
                    "address": engine.address,
                    "rails": [r.name for r in engine.backend.site.rail_ads()],  # type: ignore[attr-defined]
                }
            ),
            flush=True,
        )
        pulled: dict[str, Any] = {"reads": 0, "ended": None}
        pulling: set[asyncio.Task[None]] = set()  # referenced: the loop keeps only weak references

        async def pull(address: str, segment: str) -> None:
            try:
                peer = await engine.connect(address)
                remote = await peer.segment(segment)
                local = engine.register(np.zeros(remote.size, dtype=np.uint8), name=f"pulled-{segment}")
                while True:
                    await engine.transfer(remote[:], local[:])
                    pulled["reads"] += 1
            except Exception as exc:
                pulled["ended"] = f"{type(exc).__name__}: {exc}"

        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["cmd"]
            out: dict[str, Any] = {"ok": True}
            try:
                if op == "digest":
                    buf = buffers[cmd["segment"]][cmd.get("start", 0) : cmd.get("stop")]
                    out["digest"] = hashlib.sha256(buf.tobytes()).hexdigest()
                elif op == "read":
                    out["hex"] = buffers[cmd["segment"]][cmd["start"] : cmd["stop"]].tobytes().hex()
                elif op == "fill":
                    buffers[cmd["segment"]][:] = pattern(cmd["seed"], buffers[cmd["segment"]].size)
                elif op == "notes":
                    out["notes"] = notes
                elif op == "queued":  # notifications queued, unread (with read_notes false)
                    out["queued"] = len(engine._notifications)
                elif op == "addresses":  # the UCX worker addresses of its rails (hex)
                    out["addresses"] = [ad.address.hex() for ad in engine.backend.site.rail_ads()]  # type: ignore[attr-defined]
                elif op == "internals":  # what the backend still holds (leak checks)
                    b = engine.backend
                    out["internals"] = {
                        "channels": sum(len(r.channels) for r in b.local_rails.values()),  # type: ignore[attr-defined]
                        "namespaces": sum(len(r.owners) for r in b.local_rails.values()),  # type: ignore[attr-defined]
                        "connections": len(b._server.connections),  # type: ignore[attr-defined]
                        "links": sum(len(c.links) for c in b._server.connections.values()),  # type: ignore[attr-defined]
                    }
                elif op == "memory":  # resident memory and who holds it (RSS investigation)
                    out["memory"] = memory_report()
                elif op == "trim":  # collect garbage, give free heap pages back to the OS, report again
                    out["before"] = memory_report()
                    out["trimmed"] = trim_heap()
                    out["memory"] = memory_report()
                elif op == "stats":
                    out["stats"] = dict(engine.backend.stats)  # type: ignore[attr-defined]
                elif op == "loop":  # which event loop serves (uvloop tests)
                    out["loop"] = f"{type(loop).__module__}.{type(loop).__name__}"
                elif op == "yields":  # passes that gave the CPU away while a slice's bytes moved (progress.py)
                    rails = engine.backend.local_rails.values()  # type: ignore[attr-defined]
                    out["yields"] = sum(getattr(r.progress, "yields", 0) for r in rails)
                elif op == "fds":
                    import os

                    out["fds"] = len(os.listdir("/proc/self/fd"))
                elif op == "unregister":
                    engine.unregister(cmd["segment"])
                elif op == "register":
                    buffers[cmd["segment"]] = pattern(cmd.get("seed", 0), cmd["size"])
                    engine.register(
                        buffers[cmd["segment"]], name=cmd["segment"], permission=cmd.get("permission", "rw")
                    )
                elif op == "pull":
                    pulling.add(loop.create_task(pull(cmd["address"], cmd["segment"])))
                elif op == "pulled":
                    out.update(pulled)
                elif op == "quit":
                    print(json.dumps(out), flush=True)
                    return
                else:
                    out = {"ok": False, "error": f"unknown command {op!r}"}
            except Exception as exc:
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    import logging
    import os

    logging.basicConfig(level=os.environ.get("TENT_TEST_LOG", "WARNING"), format="peer %(name)s: %(message)s")
    peer_config = json.loads(sys.argv[1])
    if peer_config.get("uvloop"):  # tests: the engine on uvloop's event loop (what uvicorn runs on)
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main(peer_config))
    else:
        asyncio.run(main(peer_config))
