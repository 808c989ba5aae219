"""Hierarchical KV cache over the ucx backend: serving processes load hit prefixes from a cache server.

Three or more processes, as with SGLang HiCache and a remote host-memory store: this process
starts a *cache server* (a listening ucx engine whose registered host pool holds KV prefixes,
page by page) and ``--servers`` *serving* processes.  Each serving process handles a stream
of requests concurrently: for each one, the prefix pages that hit in the cache are loaded
(READ, priority ``high``) from the server's pool into scattered pages of the serving
process's own pool as **one** ``transfer_blocks`` intent, while the KV computed for the rest
of the prompt is written back to the server (offload, priority ``background``).  Every load
is checked byte-exact against the prefix's known content.

    python examples/hicache.py [--servers 2] [--requests 16] [--concurrency 4] [--prefix-pages 64]

Output: per serving process, load latency P50/P90/P99 and throughput, and whether every
load was exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

BLOCK = 4096  # one layer's K or V of a page: a tiny model, to keep the example light
LAYERS = 4


def page_bytes() -> int:
    return 2 * LAYERS * BLOCK  # K and V of every layer: blocks of a page are scattered by layer


def offsets(pages: np.ndarray, pool_pages: int) -> np.ndarray:
    """Byte offsets of the blocks of ``pages``: pool[layer][k or v][page] -> BLOCK bytes."""
    plane = np.arange(2 * LAYERS, dtype=np.int64)[:, None] * pool_pages
    return ((plane + pages[None, :].astype(np.int64)) * BLOCK).ravel()


def prefix_content(prefix: int, n_blocks: int) -> np.ndarray:
    return np.random.default_rng(prefix).integers(0, 256, (n_blocks, BLOCK), dtype=np.uint8)


def engine_options(config: dict[str, Any]) -> dict[str, Any]:
    """``--deadline-floor``: a loaded host (a shared CI machine) is slower than its loopback rail;
    a longer floor keeps a late thread hop from being taken for a failing rail.  Given as a
    mapping, it changes only that field of the backend's default config (a whole
    ``SchedulerConfig`` would also drop the ucx backend's 4 ms slices and windows)."""
    floor = config.get("deadline_floor")
    return {"config": {"deadline_floor": floor}} if floor else {}


def rails(names: str) -> list[Any]:
    from tent_async.rails import RailSpec

    return [RailSpec(name=n, device="shm" if n == "shm" else "lo") for n in names.split(",")]


def child(role: str, config: dict[str, Any]) -> subprocess.Popen[str]:
    """A process in a fresh interpreter (a forked UCX process cannot connect)."""
    return subprocess.Popen(
        [sys.executable, __file__, f"--{role}", json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


# ------------------------------------------------------------- cache server


async def cache_server(config: dict[str, Any]) -> None:
    import tent_async as tent

    pool_pages = config["pool_pages"]
    pool = np.zeros(2 * LAYERS * pool_pages * BLOCK, dtype=np.uint8)
    for prefix, pages in enumerate(config["prefixes"]):  # the cached prefixes, scattered in the pool
        pages_a = np.array(pages, dtype=np.int64)
        src = offsets(pages_a, pool_pages)
        pool[src[:, None] + np.arange(BLOCK)] = prefix_content(prefix, src.size)
    loop = asyncio.get_running_loop()
    async with tent.Engine(backend="ucx", name="cache", listen="127.0.0.1:0", rails=rails(config["rails"])) as engine:
        engine.register(pool, name="pool")  # serving processes READ prefixes and WRITE offloads
        print(json.dumps({"address": engine.address}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin


# ---------------------------------------------------------- serving process


async def serving(config: dict[str, Any]) -> None:
    import tent_async as tent

    index, pool_pages = config["index"], config["pool_pages"]
    prefixes = [np.array(p, dtype=np.int64) for p in config["prefixes"]]
    offload_at = np.array(config["offload_pages"], dtype=np.int64)  # this process's write-back area
    local_pages = 4 * max(len(p) for p in prefixes) * config["concurrency"]
    pool = np.zeros(2 * LAYERS * local_pages * BLOCK, dtype=np.uint8)
    rng = np.random.default_rng(100 + index)
    free = list(range(local_pages))
    lat: list[float] = []
    exact: list[bool] = []
    async with tent.Engine(
        backend="ucx", name=f"serving-{index}", rails=rails(config["rails"]), **engine_options(config)
    ) as engine:
        local = engine.register(pool, name="kv")
        peer = await engine.connect(config["address"], expect_name="cache")
        remote = await peer.segment("pool")
        t_start = time.perf_counter()

        async def one(r: int) -> None:
            prefix = int(rng.integers(len(prefixes)))
            src_pages = prefixes[prefix]
            n = len(src_pages)
            take = sorted(rng.choice(len(free), n, replace=False).tolist(), reverse=True)
            mine = np.array([free.pop(i) for i in take], dtype=np.int64)
            dst = offsets(mine, local_pages)
            t0 = time.perf_counter()
            await engine.transfer_blocks(remote, offsets(src_pages, pool_pages), local, dst, BLOCK, priority="high")
            lat.append(time.perf_counter() - t0)
            exact.append(bool(np.array_equal(pool[dst[:, None] + np.arange(BLOCK)], prefix_content(prefix, dst.size))))
            # offload this request's new KV (here: its first quarter of pages) in the background
            new = mine[: max(1, n // 4)]
            back = offload_at[: new.size]
            await engine.transfer_blocks(
                local, offsets(new, local_pages), remote, offsets(back, pool_pages), BLOCK, priority="background"
            )
            free.extend(mine.tolist())

        sem = asyncio.Semaphore(config["concurrency"])

        async def limited(r: int) -> None:
            async with sem:
                await one(r)

        await asyncio.gather(*(limited(r) for r in range(config["requests"])))
        wall = time.perf_counter() - t_start
    print(json.dumps({"index": index, "latencies": lat, "exact": exact, "wall": wall}), flush=True)


# ------------------------------------------------------------------ parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(np.ceil(q / 100 * len(ordered))) - 1))]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    n_prefixes = 6
    offload_pages = args.prefix_pages  # per serving process
    pool_pages = n_prefixes * args.prefix_pages + args.servers * offload_pages
    order = rng.permutation(n_prefixes * args.prefix_pages)  # prefixes scattered over the pool
    prefixes = [order[i * args.prefix_pages : (i + 1) * args.prefix_pages].tolist() for i in range(n_prefixes)]
    base = {"pool_pages": pool_pages, "prefixes": prefixes, "rails": args.rails, "deadline_floor": args.deadline_floor}
    server = child("cache", base)
    assert server.stdin is not None
    assert server.stdout is not None
    procs: list[subprocess.Popen[str]] = []
    try:
        address = json.loads(server.stdout.readline())["address"]
        for i in range(args.servers):
            start = n_prefixes * args.prefix_pages + i * offload_pages
            procs.append(
                child(
                    "serving",
                    {
                        **base,
                        "index": i,
                        "address": address,
                        "requests": args.requests,
                        "concurrency": args.concurrency,
                        "offload_pages": list(range(start, start + offload_pages)),
                    },
                )
            )
        results = []
        for p in procs:
            assert p.stdout is not None
            lines = [line for line in p.stdout.read().splitlines() if line.startswith("{")]
            if p.wait(60) != 0 or not lines:
                raise RuntimeError(f"a serving process failed with code {p.returncode}")
            results.append(json.loads(lines[-1]))
        return results
    finally:
        server.stdin.close()
        for p in [*procs, server]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--serving", help=argparse.SUPPRESS)
    parser.add_argument("--servers", type=int, default=2, help="serving processes")
    parser.add_argument("--requests", type=int, default=16, help="requests per serving process")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per serving process")
    parser.add_argument("--prefix-pages", type=int, default=64, help="pages of a cached prefix")
    parser.add_argument("--rails", default="shm", help="comma-separated: shm, tcp (loopback)")
    parser.add_argument("--deadline-floor", default=None, help="SchedulerConfig.deadline_floor, e.g. 500ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cache:
        asyncio.run(cache_server(json.loads(args.cache)))
        return 0
    if args.serving:
        asyncio.run(serving(json.loads(args.serving)))
        return 0
    results = run(args)
    ok = all(all(r["exact"]) and len(r["exact"]) == args.requests for r in results)
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        load = args.prefix_pages * page_bytes()
        blocks = args.prefix_pages * 2 * LAYERS
        print(f"prefix load: {args.prefix_pages} pages, {load / 2**20:.1f} MiB, {blocks} blocks")
        for r in results:
            lat = r["latencies"]
            print(
                f"serving-{r['index']}: load P50 {percentile(lat, 50) * 1e3:.1f} ms, "
                f"P90 {percentile(lat, 90) * 1e3:.1f} ms, P99 {percentile(lat, 99) * 1e3:.1f} ms; "
                f"{len(lat) / r['wall']:.1f} requests/s; exact {all(r['exact'])}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
