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
    python examples/pd_disagg.py --veth 800mbit,200mbit [...]   # as root: heterogeneous rails

Output: one row per request with its KV bytes, blocks, transfer time and TTFT (modelled
prefill compute + measured transfer).  ``--json`` prints the rows as JSON lines instead.

``--veth RATES`` runs the two instances over the veth testbed (:mod:`tent_async.testbed`,
docs/testbed.md) instead of loopback: two network namespaces joined by one veth pair per
rate, each shaped with ``tc tbf`` (real rails of different speeds).  Prefill runs in the
client namespace, decode in the server namespace, and each engine has one rail per veth
pair, named by its rate (``r800``, ``r200``) with the rate as its bandwidth hint.  The
bytes each rail carried are printed after the table.  It needs root, iproute2, network
namespaces, veth and tbf; where any is missing it stops at once and says what is missing.
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
    a longer floor keeps a late thread hop from being taken for a failing rail.  Given as a
    mapping, it changes only that field of the backend's default config (a whole
    ``SchedulerConfig`` would also drop the ucx backend's 4 ms slices and windows)."""
    floor = config.get("deadline_floor")
    return {"config": {"deadline_floor": floor}} if floor else {}


def rails(spec: str | list[dict[str, Any]]) -> list[Any]:
    """Rails from ``--rails`` (``"shm,tcp"``: loopback) or from the veth testbed's list of
    ``{"name", "device", "bandwidth"}`` (one per veth pair, this side's device)."""
    from tent_async.rails import RailSpec

    if isinstance(spec, str):
        return [RailSpec(name=n, device="shm" if n == "shm" else "lo") for n in spec.split(",")]
    return [RailSpec(name=r["name"], device=r["device"], bandwidth=r["bandwidth"]) for r in spec]


def veth_rails(tb: Any, side: str) -> list[dict[str, Any]]:
    """The testbed's rails as ``side`` (client: prefill, server: decode) sees them."""
    out: list[dict[str, Any]] = []
    for r in tb.rails:
        name = f"r{r.mbit:g}"
        if any(x["name"] == name for x in out):
            name = f"{name}_{r.index}"  # two rails of the same rate
        out.append(
            {"name": name, "device": r.client_dev if side == "client" else r.server_dev, "bandwidth": r.bandwidth}
        )
    return out


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
    listen = config.get("listen", "127.0.0.1:0")
    async with tent.Engine(backend="ucx", name="decode", listen=listen, rails=rails(config["rails"])) as engine:
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


def start_decode(config: dict[str, Any], netns: str | None = None) -> subprocess.Popen[str]:
    """The decode instance, in a fresh interpreter (a forked UCX process cannot connect),
    inside network namespace ``netns`` when given (the veth testbed's server side)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.Popen(
        [*prefix, sys.executable, __file__, "--decode", json.dumps(config)],
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
    veth: dict[str, Any] | None = json.loads(args.veth_config) if args.veth_config else None
    config: dict[str, Any] = {"model": model, "pool_pages": pool_pages, "rails": args.rails}
    my_rails: str | list[dict[str, Any]] = args.rails
    if veth is not None:
        config.update(rails=veth["server_rails"], listen=veth["listen"])
        my_rails = veth["client_rails"]
    proc = start_decode(config, veth["server_ns"] if veth else None)
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
            backend="ucx", name="prefill", rails=rails(my_rails), **engine_options(vars(args))
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
                        "bytes_per_rail": dict(result.bytes_per_rail),
                        "slices": result.slices,
                        "reroutes": result.reroutes,
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


def run_over_veth(args: argparse.Namespace, argv: list[str]) -> int:
    """Build the veth testbed, run this example's prefill side in its client namespace, remove it."""
    from tent_async.testbed import VethTestbed, available

    ok, why = available()
    if not ok:
        raise SystemExit(
            f"--veth needs the veth testbed, which is not available here: {why}. It needs root, iproute2 "
            "(ip, tc), network namespaces, veth and sch_tbf (docs/testbed.md); without --veth the example "
            "runs over loopback."
        )
    rates = [r.strip() for r in args.veth.split(",") if r.strip()]
    with VethTestbed(rates=rates) as tb:
        veth = {
            "client_rails": veth_rails(tb, "client"),
            "server_rails": veth_rails(tb, "server"),
            "server_ns": tb.ns("server"),
            "listen": f"{tb.rails[0].server_ip}:0",
        }
        rest = [a for i, a in enumerate(argv) if a != "--veth" and not (i > 0 and argv[i - 1] == "--veth")]
        rest = [a for a in rest if not a.startswith("--veth=")]
        child = tb.run("client", [sys.executable, __file__, *rest, "--veth-config", json.dumps(veth)], timeout=None)
        return child.returncode


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
    parser.add_argument(
        "--veth",
        default=None,
        help="run over the veth testbed with one shaped rail per rate, e.g. 800mbit,200mbit (needs root)",
    )
    parser.add_argument("--veth-config", help=argparse.SUPPRESS)  # the prefill side inside the testbed
    parser.add_argument("--json", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.decode:
        asyncio.run(decode(json.loads(args.decode)))
        return 0
    if args.veth:
        return run_over_veth(args, argv)
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
        per_rail: dict[str, int] = {}
        for r in rows:
            for rail, n in r["bytes_per_rail"].items():
                per_rail[rail] = per_rail.get(rail, 0) + n
        total = sum(per_rail.values()) or 1
        print("bytes per rail: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(per_rail.items())))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
