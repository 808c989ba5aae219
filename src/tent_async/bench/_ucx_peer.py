"""The far side of ``tent-async bench ucx``, run in its own process.

    python -m tent_async.bench._ucx_peer raw    '{"rail": "shm", "size": N, "rounds": [[bytes, count], ...]}'
    python -m tent_async.bench._ucx_peer engine '{"rail": "shm", "size": N}'
    python -m tent_async.bench._ucx_peer kv     '{"size": N, "seed": S}'

``raw``: one UCX context with the rail's settings (the same :class:`LocalRail`
the backend uses), one endpoint opened from the client's worker address (as
the backend does: no listener); for each round it receives ``count`` messages
of ``bytes`` into a pre-posted receive and answers each with an 8-byte tagged
ack.  It prints ``{"address": <its worker address, hex>}`` and then reads the
client's as one JSON line on stdin.  ``engine``: a listening ucx engine with
that one rail and one segment; it prints ``{"address": "host:port"}``.  ``kv``:
a listening engine with the default rails (``rails=None``) and one ``pool``
segment filled from ``seed``; it answers each stdin line ``{"digest": true}``
with the pool's sha256 and ``{"fill": seed}`` by refilling it.  All three
exit when stdin closes.  A fresh interpreter, never a fork of a UCX process.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np

ACK_TAG = 1 << 62


def rail_spec(rail: str) -> Any:
    from ..rails import RailSpec

    return RailSpec(name=rail, device="shm" if rail == "shm" else "lo")


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


async def serve_raw(config: dict[str, Any]) -> None:
    from ..backends.ucx import _ucxx
    from ..backends.ucx.rails import LocalRail, plan_from_spec

    ucx = _ucxx.load()
    loop = asyncio.get_running_loop()
    rail = LocalRail(plan_from_spec(rail_spec(config["rail"])), loop, sweep=False)
    print(json.dumps({"address": rail.address.hex()}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    stop = asyncio.ensure_future(_stdin_closed())
    try:
        ep = rail.connect(bytes.fromhex(json.loads(line)["address"]))
        buf = np.ones(config["size"], dtype=np.uint8)
        ack = np.zeros(8, dtype=np.uint8)
        tag = 0
        for nbytes, count in config["rounds"]:
            view = buf[:nbytes]
            recv = ep.tag_recv(ucx.Array(view), ucx.L.UCXXTag(tag))
            for i in range(count):
                await recv.wait()
                tag += 1
                if i + 1 < count:  # pre-post the next one before the ack; none past the round:
                    # cancelling a receive races with the client's next message matching it.
                    recv = ep.tag_recv(ucx.Array(view), ucx.L.UCXXTag(tag))
                await ep.tag_send(ucx.Array(ack), ucx.L.UCXXTag(ACK_TAG | (tag - 1))).wait()
        await stop
        ep.close_blocking(10**9, 1)
    finally:
        stop.cancel()
        rail.close()


async def serve_engine(config: dict[str, Any]) -> None:
    from ..engine import Engine

    async with Engine(backend="ucx", name="bench-server", listen="127.0.0.1:0", rails=[rail_spec(config["rail"])]) as e:
        e.register(np.ones(config["size"], dtype=np.uint8), name="dst")  # touched: no first-touch page faults
        e.register(np.full(config["size"], 7, dtype=np.uint8), name="src", permission="r")
        print(json.dumps({"address": e.address}), flush=True)
        await _stdin_closed()


def kv_pool(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


async def serve_kv(config: dict[str, Any]) -> None:
    import hashlib

    from ..engine import Engine

    pool = kv_pool(config["seed"], config["size"])
    async with Engine(backend="ucx", name="bench-kv-server", listen="127.0.0.1:0") as e:
        e.register(pool, name="pool")
        print(json.dumps({"address": e.address}), flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if "fill" in cmd:
                pool[:] = kv_pool(cmd["fill"], config["size"])
            stats = dict(e.backend.stats)  # type: ignore[attr-defined]
            print(json.dumps({"digest": hashlib.sha256(pool.data).hexdigest(), "stats": stats}), flush=True)


def main() -> None:
    mode, config = sys.argv[1], json.loads(sys.argv[2])
    serve = {"raw": serve_raw, "engine": serve_engine, "kv": serve_kv}[mode]
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
