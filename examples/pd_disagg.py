"""Prefill/decode disaggregation over the ucx backend: paged KV cache, one intent per request.

Two processes, as in a disaggregated serving deployment: this one is the *prefill* instance;
it starts a *decode* instance in a fresh interpreter (never a fork of a UCX process) and
talks to it over a pipe, standing in for the router.  Each has a paged KV pool registered
with its engine, laid out as vLLM lays out one GPU's cache:

    pool[layer][k or v][page] -> one block of page_tokens x kv_heads x head_dim x dtype bytes

For every request the decode side allocates pages (its block table) and tells the prefill
side; prefill fills its own pages with the request's KV (deterministic bytes, so the decode
side can check them), "computes" the prefill (modelled, see ``prefill_seconds``) and sends
the request's 2 x layers x pages scattered blocks as **one** ``transfer_blocks`` intent with
``notify="req <id>"``.  The decode side checks, when the notification arrives, that every
block of the request landed byte-exact in the pages it allocated: the notification comes
after the data.

    python examples/pd_disagg.py [--model llama3-8b|tiny] [--requests 8] [--rails shm,tcp]

Output: one row per request with its KV bytes, blocks, transfer time and TTFT (modelled
prefill compute + measured transfer).  ``--json`` prints the rows as JSON lines instead.
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

# name: (layers, kv_heads, head_dim, dtype bytes, parameters, page tokens)
MODELS = {
    "llama3-8b": (32, 8, 128, 2, 8.03e9, 16),  # 32 KiB blocks, 128 KiB of KV per token
    "tiny": (4, 2, 64, 2, 1.0e8, 16),  # 4 KiB blocks, for tests
}
PEAK_FLOPS = 989e12 * 0.5  # one H800 at 50% of its bf16 peak


def block_bytes(model: str) -> int:
    _layers, heads, dim, dtype, _params, page = MODELS[model]
    return page * heads * dim * dtype


def prefill_seconds(model: str, tokens: int) -> float:
    """Modelled prefill compute: 2 x parameters x tokens FLOPs at 50% of one H800's peak."""
    return 2 * MODELS[model][4] * tokens / PEAK_FLOPS


def offsets(model: str, pages: np.ndarray, pool_pages: int) -> np.ndarray:
    """Byte offsets of a request's blocks, layer by layer, K then V, page by page."""
    layers = MODELS[model][0]
    block = block_bytes(model)
    plane = np.arange(2 * layers, dtype=np.int64)[:, None] * pool_pages  # (layer, k/v) planes
    return ((plane + pages[None, :].astype(np.int64)) * block).ravel()


def request_kv(rid: int, n_blocks: int, block: int) -> np.ndarray:
    """The KV bytes of request ``rid``: what prefill computes and decode must receive."""
    return np.random.default_rng(rid).integers(0, 256, (n_blocks, block), dtype=np.uint8)


def engine_options(config: dict[str, Any]) -> dict[str, Any]:
    """``--deadline-floor``: a loaded host (a shared CI machine) is slower than its loopback rail;
    a longer floor keeps a late thread hop from being taken for a failing rail."""
    from tent_async.core import SchedulerConfig

    floor = config.get("deadline_floor")
    return {"config": SchedulerConfig(deadline_floor=floor)} if floor else {}


def rails(names: str) -> list[Any]:
    from tent_async.rails import RailSpec

    return [RailSpec(name=n, device="shm" if n == "shm" else "lo") for n in names.split(",")]


# ------------------------------------------------------------------ decode


async def decode(config: dict[str, Any]) -> None:
    import tent_async as tent

    model, pool_pages = config["model"], config["pool_pages"]
    block = block_bytes(model)
    layers = MODELS[model][0]
    pool = np.zeros(2 * layers * pool_pages * block, dtype=np.uint8)
    free = list(range(pool_pages))
    pages_of: dict[int, np.ndarray] = {}
    loop = asyncio.get_running_loop()
    async with tent.Engine(backend="ucx", name="decode", listen="127.0.0.1:0", rails=rails(config["rails"])) as engine:
        engine.register(pool, name="kv")
        print(json.dumps({"address": engine.address}), flush=True)

        async def router() -> None:  # block tables out, over the pipe
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                cmd = json.loads(line)
                rid, n = cmd["rid"], cmd["pages"]
                rng = np.random.default_rng(10_000 + rid)
                take = sorted(rng.choice(len(free), n, replace=False).tolist(), reverse=True)
                pages = np.array([free.pop(i) for i in take], dtype=np.int64)  # scattered
                pages_of[rid] = pages
                print(json.dumps({"rid": rid, "pages": pages.tolist()}), flush=True)

        async def check() -> None:  # notifications in: the request's KV must be there already
            async for note in engine.notifications():
                rid = int(note.message.split()[1])
                pages = pages_of.pop(rid)
                got = pool[offsets(model, pages, pool_pages)[:, None] + np.arange(block)]
                ok = bool(np.array_equal(got, request_kv(rid, got.shape[0], block)))
                print(json.dumps({"rid": rid, "exact": ok, "from": note.source}), flush=True)
                free.extend(pages.tolist())

        task = asyncio.ensure_future(check())
        try:
            await router()
        finally:
            task.cancel()


# ----------------------------------------------------------------- prefill


def start_decode(config: dict[str, Any]) -> subprocess.Popen[str]:
    """The decode instance, in a fresh interpreter (a forked UCX process cannot connect)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--decode", json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


async def prefill(args: argparse.Namespace) -> list[dict[str, Any]]:
    import tent_async as tent

    model = args.model
    block = block_bytes(model)
    layers, _heads, _dim, _dtype, _params, page = MODELS[model]
    rng = np.random.default_rng(args.seed)
    prompts = [
        int(rng.integers(args.min_tokens // page, args.max_tokens // page + 1)) * page for _ in range(args.requests)
    ]
    pool_pages = 2 * max(prompts) // page + 8
    config = {"model": model, "pool_pages": pool_pages, "rails": args.rails}
    proc = start_decode(config)
    assert proc.stdin is not None
    assert proc.stdout is not None
    loop = asyncio.get_running_loop()

    async def read() -> dict[str, Any]:
        while True:
            line = await loop.run_in_executor(None, proc.stdout.readline)  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"decode process exited with {proc.wait()}")
            if line.startswith("{"):
                out: dict[str, Any] = json.loads(line)
                return out

    rows: list[dict[str, Any]] = []
    try:
        address = (await read())["address"]
        pool = np.zeros(2 * layers * pool_pages * block, dtype=np.uint8)
        async with tent.Engine(
            backend="ucx", name="prefill", rails=rails(args.rails), **engine_options(vars(args))
        ) as engine:
            local = engine.register(pool, name="kv", permission="r")
            peer = await engine.connect(address, expect_name="decode")
            remote = await peer.segment("kv")
            for rid, tokens in enumerate(prompts):
                n_pages = tokens // page
                proc.stdin.write(json.dumps({"rid": rid, "pages": n_pages}) + "\n")
                proc.stdin.flush()
                dst_pages = np.array((await read())["pages"], dtype=np.int64)
                src_pages = rng.choice(pool_pages, n_pages, replace=False)
                src = offsets(model, src_pages, pool_pages)
                pool[src[:, None] + np.arange(block)] = request_kv(rid, src.size, block)  # "prefill" writes its KV
                dst = offsets(model, dst_pages, pool_pages)
                t0 = time.perf_counter()
                result = await engine.transfer_blocks(
                    local, src, remote, dst, block, notify=f"req {rid}", priority="high"
                )
                seconds = time.perf_counter() - t0
                verdict = await read()
                rows.append(
                    {
                        "request": rid,
                        "tokens": tokens,
                        "kv_bytes": result.bytes,
                        "blocks": int(src.size),
                        "transfer_s": seconds,
                        "prefill_s": prefill_seconds(model, tokens),
                        "ttft_s": prefill_seconds(model, tokens) + seconds,
                        "exact": verdict["exact"] and verdict["rid"] == rid,
                        "rails": sorted(result.bytes_per_rail),
                    }
                )
    finally:
        proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--rails", default="shm", help="comma-separated: shm, tcp (loopback)")
    parser.add_argument("--deadline-floor", default=None, help="SchedulerConfig.deadline_floor, e.g. 500ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.decode:
        asyncio.run(decode(json.loads(args.decode)))
        return 0
    rows = asyncio.run(prefill(args))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{'req':>4} {'tokens':>7} {'KV MiB':>8} {'blocks':>7} {'transfer ms':>12} {'prefill ms':>11} "
              f"{'TTFT ms':>8} {'GB/s':>6}  exact")  # fmt: skip
        for r in rows:
            print(
                f"{r['request']:>4} {r['tokens']:>7} {r['kv_bytes'] / 2**20:>8.1f} {r['blocks']:>7} "
                f"{r['transfer_s'] * 1e3:>12.2f} {r['prefill_s'] * 1e3:>11.1f} {r['ttft_s'] * 1e3:>8.1f} "
                f"{r['kv_bytes'] / r['transfer_s'] / 1e9:>6.2f}  {r['exact']}"
            )
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
