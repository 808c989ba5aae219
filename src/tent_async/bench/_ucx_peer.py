"""The far side of ``tent-async bench ucx``, run in its own process.

    python -m tent_async.bench._ucx_peer raw    '{"rail": "shm", "size": N, "rounds": [[bytes, count], ...],
                                                   "progress": "thread"}'
    python -m tent_async.bench._ucx_peer engine '{"rail": "shm", "size": N, "progress": "loop"}'
    python -m tent_async.bench._ucx_peer kv     '{"size": N, "seed": S}'
    python -m tent_async.bench._ucx_peer steps  '{"rail": "shm", "size": N, "progress": "loop"}'

``raw``: one UCX context with the rail's settings (the same :class:`LocalRail`
the backend uses), one endpoint opened from the client's worker address (as
the backend does: no listener); for each round it receives ``count`` messages
of ``bytes`` into a pre-posted receive and answers each with an 8-byte tagged
ack, progressing its worker the way ``progress`` says (:data:`RAW_MODES`).
It prints ``{"address": <its worker address, hex>}`` and then reads the
client's as one JSON line on stdin.  ``engine``: a listening ucx engine with
that one rail (``"default"``: ``rails=None``, discovered) and two segments,
progressing as ``progress`` says; it prints ``{"address": "host:port"}``.  ``kv``:
a listening engine with the default rails (``rails=None``) and one ``pool``
segment filled from ``seed``; it answers each stdin line ``{"digest": true}``
with the pool's sha256 and ``{"fill": seed}`` by refilling it.  ``steps``: the
``engine`` peer with every step stamped and its work counted (:mod:`.ucx_steps`); a stdin
line ``mark`` clears both and answers its CPU time, and when stdin closes it prints its
stamps and counts.  ``raw`` and ``engine`` answer each further stdin line ``cpu`` with
``{"cpu": <their CPU seconds so far>, "at": <their perf_counter>}``.  All of them exit when stdin closes.  A fresh
interpreter, never a fork of a UCX process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import numpy as np

ACK_TAG = 1 << 62
RAW_MODES = ("thread", "loop", "poll", "spin")  # how raw ucxx progresses its worker (see wait())


def rail_progress(mode: str) -> str:
    """The :mod:`~tent_async.backends.ucx.progress` mode a raw run's rail uses ("spin" sets up as "loop")."""
    return "loop" if mode == "spin" else mode


async def wait(rail: Any, req: Any, mode: str) -> None:
    """Wait for a raw request: its future, or (``"spin"``) polling the worker until it is done.

    ``"spin"`` is progress by polling while requests are outstanding: ``progress`` and
    ``run_request_notifier`` on the loop thread, yielding to the loop between polls.
    """
    future = req.future
    if mode == "spin":
        worker = rail.worker
        while not future.done():
            worker.progress()
            worker.run_request_notifier()
            if future.done():
                break
            await asyncio.sleep(0)
    await future


def rail_spec(rail: str) -> Any:
    from ..rails import RailSpec

    return RailSpec(name=rail, device="shm" if rail == "shm" else "lo")


async def _stdin_closed() -> None:
    """Return when stdin closes; meanwhile answer each ``cpu`` line with this process's CPU seconds."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "cpu":  # the --gaps part's question
            print(json.dumps({"cpu": time.process_time(), "at": time.perf_counter()}), flush=True)


async def serve_raw(config: dict[str, Any]) -> None:
    from ..backends.ucx import _ucxx
    from ..backends.ucx.rails import LocalRail, plan_from_spec

    ucx = _ucxx.load()
    loop = asyncio.get_running_loop()
    mode = config.get("progress", "thread")
    rail = LocalRail(plan_from_spec(rail_spec(config["rail"])), loop, sweep=False, progress=rail_progress(mode))
    print(json.dumps({"address": rail.address.hex()}), flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    stop = asyncio.ensure_future(_stdin_closed())
    try:
        ep = rail.connect(bytes.fromhex(json.loads(line)["address"]))

        async def answer_rounds() -> None:
            buf = np.ones(config["size"], dtype=np.uint8)
            ack = np.zeros(8, dtype=np.uint8)
            tag = 0
            for nbytes, count in config["rounds"]:
                view = buf[:nbytes]
                recv = ep.tag_recv(ucx.Array(view), ucx.L.UCXXTag(tag))
                rail.progress.kick()
                for i in range(count):
                    await wait(rail, recv, mode)
                    tag += 1
                    if i + 1 < count:  # pre-post the next one before the ack; none past the round:
                        # cancelling a receive races with the client's next message matching it.
                        recv = ep.tag_recv(ucx.Array(view), ucx.L.UCXXTag(tag))
                    send = ep.tag_send(ucx.Array(ack), ucx.L.UCXXTag(ACK_TAG | (tag - 1)))
                    rail.progress.kick(send)
                    await wait(rail, send, mode)

        serving = asyncio.ensure_future(answer_rounds())
        await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            # stdin closed mid-run: the client is gone (killed at its --limit, say) and no more
            # messages come; waiting for them would keep this process (and in "poll" or "spin"
            # mode a core) busy for good.
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            return
        serving.result()
        await stop
        ep.close_blocking(10**9, 1)
    finally:
        stop.cancel()
        rail.close()


async def serve_engine(config: dict[str, Any]) -> None:
    from ..engine import Engine

    rails = [rail_spec(config["rail"])] if config["rail"] != "default" else None
    options = {"progress": config["progress"]} if "progress" in config else {}
    async with Engine(backend="ucx", name="bench-server", listen="127.0.0.1:0", rails=rails, **options) as e:
        e.register(np.ones(config["size"], dtype=np.uint8), name="dst")  # touched: no first-touch page faults
        e.register(np.full(config["size"], 7, dtype=np.uint8), name="src", permission="r")
        print(json.dumps({"address": e.address}), flush=True)
        await _stdin_closed()


async def serve_steps(config: dict[str, Any]) -> None:
    """``serve_engine`` with every step stamped (:mod:`.ucx_steps`); stdin ``mark`` clears the stamps."""
    from ..engine import Engine
    from . import ucx_steps

    ucx_steps.install()
    rails = [rail_spec(config["rail"])] if config["rail"] != "default" else None
    options = {"progress": config["progress"]} if "progress" in config else {}
    async with Engine(backend="ucx", name="steps-server", listen="127.0.0.1:0", rails=rails, **options) as e:
        e.register(np.ones(config["size"], dtype=np.uint8), name="dst")
        e.register(np.full(config["size"], 7, dtype=np.uint8), name="src", permission="r")
        print(json.dumps({"address": e.address}), flush=True)
        loop = asyncio.get_running_loop()
        ucx_steps.count_turns(loop)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "mark":
                del ucx_steps.LOG[:]
                ucx_steps.WORK.clear()
                print(json.dumps({"cpu": time.process_time(), "at": time.perf_counter()}), flush=True)
        work = {k: ucx_steps.WORK[k] for k in ucx_steps.WORK_KEYS}
        print(json.dumps({"cpu": time.process_time(), "log": ucx_steps.LOG, "work": work}), flush=True)


def kv_pool(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


async def serve_kv(config: dict[str, Any]) -> None:
    import hashlib

    from ..engine import Engine

    pool = kv_pool(config["seed"], config["size"])
    options = {"progress": config["progress"]} if "progress" in config else {}
    async with Engine(backend="ucx", name="bench-kv-server", listen="127.0.0.1:0", **options) as e:
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
    serve = {"raw": serve_raw, "engine": serve_engine, "kv": serve_kv, "steps": serve_steps}[mode]
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
