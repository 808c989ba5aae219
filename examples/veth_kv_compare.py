"""The same KV bytes as one contiguous transfer and as one block batch, over the veth testbed.

A diagnostic for examples/pd_disagg.py's slow KV batches over heterogeneous rails
(docs/benchmarks.md): one server engine in the testbed's server namespace, one client in
the client namespace, each with one rail per shaped veth pair (bandwidth hint = its rate).
For each scheduler configuration the client moves ``--blocks`` x ``--block`` bytes

* as one contiguous ``engine.transfer`` and
* as one ``engine.transfer_blocks`` to permuted places (as the example's KV does),

and prints, per case, the slices and bytes each rail carried, the mean slice size and
the throughput against the links' aggregate rate.  The configurations (``--configs``):
``backend`` (the ucx backend's default, ``config=None``), ``override``
(``config={"deadline_floor": "1s"}``: that one field changed, what ``pd_disagg.py
--deadline-floor 1s`` passes now) and ``replace`` (``config=SchedulerConfig(deadline_floor="1s")``:
the core's defaults for everything else, what the example passed before).  Needs root
(docs/testbed.md)::

    python examples/veth_kv_compare.py [--rates 800mbit,200mbit] [--blocks 3840] [--block 32KiB]
        [--configs backend,override,replace,min256KiB] [--cases contiguous,batch]
        [--scatter-src] [--priority high] [--profile DIR]

``minSIZE`` is the backend's default with ``deadline_floor`` 1 s and ``min_slice`` SIZE;
``--profile`` writes each side's cProfile stats (main thread) into DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np


def rails(spec: list[dict[str, Any]]) -> list[Any]:
    from tent_async.rails import RailSpec

    return [RailSpec(name=r["name"], device=r["device"], bandwidth=r["bandwidth"]) for r in spec]


def config_of(name: str) -> Any:
    from tent_async.core import SchedulerConfig

    if name == "backend":
        return None
    if name == "override":
        return {"deadline_floor": "1s"}
    if name.startswith("min"):  # e.g. min256KiB: the backend's default with a bigger min_slice
        return {"deadline_floor": "1s", "min_slice": name[3:]}
    if name == "replace":
        return SchedulerConfig(deadline_floor="1s")
    raise SystemExit(f"unknown config {name!r}; choose from backend, override, replace")


async def server(spec: dict[str, Any]) -> None:
    import tent_async as tent

    buf = np.zeros(spec["size"], dtype=np.uint8)
    async with tent.Engine(backend="ucx", name="server", listen=spec["listen"], rails=rails(spec["rails"])) as engine:
        engine.register(buf, name="buf")
        print(json.dumps({"address": engine.address}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the client is done


async def client(spec: dict[str, Any]) -> None:
    import tent_async as tent

    size, block = spec["size"], spec["block"]
    n = size // block
    src = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    perm = np.random.default_rng(2).permutation(n).astype(np.int64) * block
    src_perm = np.random.default_rng(3).permutation(n).astype(np.int64) * block
    aggregate = sum(r["bandwidth"] for r in spec["rails"])
    for cname in spec["configs"]:
        async with tent.Engine(
            backend="ucx", name=f"client-{cname}", rails=rails(spec["rails"]), config=config_of(cname)
        ) as engine:
            local = engine.register(src, name="src", permission="r")
            peer = await engine.connect(spec["address"])
            remote = await peer.segment("buf")
            await engine.transfer(local[0 : 1 << 20], remote[0 : 1 << 20])  # wire-up
            cfg = engine.config
            for case in spec["cases"]:
                before = {r.name: r.slices_total for r in engine.telemetry().rails}
                t0 = time.perf_counter()
                if case == "contiguous":
                    res = await engine.transfer(local[0:size], remote[0:size])
                else:
                    src_off = src_perm if spec["scatter_src"] else np.arange(n, dtype=np.int64) * block
                    res = await engine.transfer_blocks(local, src_off, remote, perm, block, priority=spec["priority"])
                secs = time.perf_counter() - t0
                tel = engine.telemetry()
                per_rail = {
                    r.name.rsplit("/", 1)[-1]: {
                        "slices": r.slices_total - before.get(r.name, 0),
                        "bytes": res.bytes_per_rail.get(r.name, 0),
                        "learned_MBps": round(r.bandwidth / 1e6, 1),
                        "learned_lat_ms": round(r.latency * 1e3, 2),
                    }
                    for r in tel.rails
                }
                print(
                    json.dumps(
                        {
                            "config": cname,
                            "target_slice_ms": cfg.target_slice_time * 1e3,
                            "window": cfg.window,
                            "max_window": cfg.max_window,
                            "case": case,
                            "seconds": round(secs, 3),
                            "MBps": round(size / secs / 1e6, 1),
                            "vs_aggregate": round(size / secs / aggregate, 2),
                            "slices": res.slices,
                            "mean_slice_KiB": round(size / max(1, res.slices) / 1024, 1),
                            "rails": per_rail,
                        }
                    ),
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="800mbit,200mbit")
    parser.add_argument("--blocks", type=int, default=3840)
    parser.add_argument("--block", default="32KiB")
    parser.add_argument("--configs", default="backend,override,replace")
    parser.add_argument("--scatter-src", action="store_true", help="source blocks permuted too (as pd_disagg's)")
    parser.add_argument("--priority", default="normal", help="the batch's priority (pd_disagg: high)")
    parser.add_argument("--cases", default="contiguous,batch")
    parser.add_argument("--profile", help="write each side's cProfile stats into this directory")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        spec = json.loads(args.spec)
        if spec.get("profile"):  # CPU profile of this side, for finding where a slice's time goes
            import cProfile

            with cProfile.Profile() as prof:
                asyncio.run(server(spec) if args.role == "server" else client(spec))
            prof.dump_stats(f"{spec['profile']}/{args.role}.prof")
            return 0
        asyncio.run(server(spec) if args.role == "server" else client(spec))
        return 0

    import subprocess

    from tent_async.testbed import VethTestbed, available
    from tent_async.units import parse_size

    ok, why = available()
    if not ok:
        raise SystemExit(f"needs the veth testbed (root, iproute2, netns, veth, tbf): {why}")
    block = parse_size(args.block)
    size = args.blocks * block
    with VethTestbed(rates=[r.strip() for r in args.rates.split(",")]) as tb:
        side_rails = {
            side: [
                {
                    "name": f"r{r.mbit:g}",
                    "device": r.client_dev if side == "client" else r.server_dev,
                    "bandwidth": r.bandwidth,
                }
                for r in tb.rails
            ]
            for side in ("client", "server")
        }
        sspec = {
            "profile": args.profile,
            "size": size,
            "rails": side_rails["server"],
            "listen": f"{tb.rails[0].server_ip}:0",
        }
        proc = tb.popen(
            "server",
            [sys.executable, __file__, "--role", "server", "--spec", json.dumps(sspec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdin is not None
        address = json.loads(proc.stdout.readline())["address"]
        cspec = {
            "size": size,
            "block": block,
            "rails": side_rails["client"],
            "address": address,
            "configs": args.configs.split(","),
            "scatter_src": args.scatter_src,
            "cases": args.cases.split(","),
            "profile": args.profile,
            "priority": args.priority,
        }
        argv = [sys.executable, __file__, "--role", "client", "--spec", json.dumps(cspec)]
        child = tb.run("client", argv, timeout=600)
        proc.stdin.close()
        proc.wait(30)
        return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
